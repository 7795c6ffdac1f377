"""Three ways to turn a list of dialogs into a list of replies; each exposes generate(dialogs, temperature, top_p,
max_gen_len, grammar=None) -> list[str], in the order given. `grammar` (GBNF text) constrains every reply to it:
transformers through xgrammar's logits processor, vLLM through its structured outputs (xgrammar inside), an
OpenAI-compatible server through the request field it reads (`grammar_field`: llama.cpp's `grammar` by default).

  TransformersBackend  in-process model.generate, batched with left padding (default; CPU or one GPU)
  VLLMBackend          vLLM in-process, tensor parallel over the visible GPUs (imported only when asked for)
  OpenAIBackend        any OpenAI-compatible server by URL (vLLM, llama.cpp, TGI, Ollama): concurrent requests,
                       time-outs, retries with exponential back-off
"""
import copy
import json
import os
import threading
import time
import urllib.error
import urllib.request
import zlib
from concurrent.futures import ThreadPoolExecutor

import torch

from utils import UserError


class TransformersBackend:
    MIN_PREFIX = 8  # shorter shared prefixes are not worth a cache

    def __init__(self, model, chat, max_seq_len, max_batch_size, seed, device, prefix_cache=True):
        self.model, self.chat = model, chat
        self.max_seq_len, self.max_batch_size, self.seed, self.device = max_seq_len, max_batch_size, seed, device
        self.prefix_cache = prefix_cache
        self.stats = {"prompt_tokens": 0, "generated_tokens": 0}  # running totals, for throughput reports
        self.compiled = {}  # grammar text -> xgrammar's compiled grammar for this tokenizer

    def compile(self, grammar):
        """xgrammar: a maintained C++ grammar engine (vLLM's and SGLang's default) whose per-token masks cost little
        on a CPU, reading the same GBNF text as llama.cpp; compiled once per grammar and tokenizer."""
        if grammar not in self.compiled:
            import xgrammar as xgr
            if not self.compiled:
                self.compiler = xgr.GrammarCompiler(tokenizer_info(self.chat, self.model.config.vocab_size))
            self.compiled[grammar] = self.compiler.compile_grammar(grammar)
        return self.compiled[grammar]

    def generate(self, dialogs, temperature, top_p, max_gen_len, grammar=None):
        prompts = [self.chat.encode_dialog_prompt(d) for d in dialogs]
        for i, p in enumerate(prompts):
            if len(p) >= self.max_seq_len:
                raise ValueError(f"dialog {i} has {len(p)} prompt tokens, leaving no room to generate within "
                                 f"max_seq_len={self.max_seq_len}; raise --max_seq_len or shorten it")
        # Distillation prompts share their system prompt: its keys/values are computed once per call, not per row.
        prefix = shared_prefix(prompts) if self.prefix_cache else []
        prefix = prefix if len(prefix) >= self.MIN_PREFIX else []
        cache = self.encode_prefix(prefix) if prefix else None
        # Longest first so each batch holds similar lengths (less padding); answers go back in the given order.
        order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
        replies = [None] * len(prompts)
        for start in range(0, len(order), self.max_batch_size):
            idx = order[start:start + self.max_batch_size]
            batch = [prompts[i] for i in idx]
            for i, text in zip(idx, self.generate_batch(batch, temperature, top_p, max_gen_len, prefix, cache, grammar)):
                replies[i] = text
        return replies

    @torch.inference_mode()
    def encode_prefix(self, prefix):
        return self.model(torch.tensor([prefix], device=self.device), use_cache=True).past_key_values

    @torch.inference_mode()
    def generate_batch(self, prompts, temperature, top_p, max_gen_len, prefix=(), prefix_cache=None, grammar=None):
        # Row layout: [shared prefix][padding][rest of the prompt]. The mask hides the padding and position ids
        # follow the mask, so each row is computed as if it stood alone (plain left padding when no prefix).
        n = len(prefix)
        rests = [p[n:] for p in prompts]
        width = max(len(r) for r in rests)
        ids = torch.full((len(prompts), n + width), self.chat.pad_id, dtype=torch.long)
        mask = torch.zeros_like(ids)
        ids[:, :n], mask[:, :n] = torch.tensor(prefix, dtype=torch.long), 1
        for row, rest in enumerate(rests):
            ids[row, n + width - len(rest):] = torch.tensor(rest)
            mask[row, n + width - len(rest):] = 1
        kwargs = {}
        if prefix_cache is not None:
            kwargs["past_key_values"] = copy.deepcopy(prefix_cache)
            kwargs["past_key_values"].batch_repeat_interleave(len(prompts))
        if grammar is not None:
            import xgrammar.contrib.hf
            kwargs["logits_processor"] = [xgrammar.contrib.hf.LogitsProcessor(self.compile(grammar))]  # one per call
        # Meta's semantics: at most max_gen_len new tokens (default max_seq_len - 1), prompt + reply <= max_seq_len.
        max_new = min(max_gen_len or self.max_seq_len - 1, self.max_seq_len - max(len(p) for p in prompts))
        # Seeded from the batch's own tokens: the same prompts give the same samples whatever ran before.
        torch.manual_seed(self.seed + zlib.crc32(json.dumps(prompts).encode()))
        sampling = dict(do_sample=True, temperature=temperature, top_p=top_p, top_k=0) if temperature > 0 else \
            dict(do_sample=False, temperature=None, top_p=None, top_k=None)
        out = self.model.generate(input_ids=ids.to(self.device), attention_mask=mask.to(self.device),
                                  max_new_tokens=max_new, eos_token_id=self.chat.stop_ids,
                                  pad_token_id=self.chat.pad_id, **sampling, **kwargs)
        replies = []
        for row in out[:, n + width:].tolist():
            cut = next((k for k, t in enumerate(row) if t in self.chat.stop_ids), len(row))
            replies.append(self.chat.decode(row[:cut]))
            self.stats["generated_tokens"] += min(cut + 1, len(row))  # the stop token was generated too
        self.stats["prompt_tokens"] += sum(len(p) for p in prompts)
        return replies


def tokenizer_info(chat, vocab_size):
    """xgrammar's view of the model's vocabulary: a Hugging Face tokenizer, or Meta's tiktoken one (raw bytes)."""
    import xgrammar as xgr
    if hasattr(chat.tokenizer, "model") and hasattr(chat.tokenizer.model, "decode_single_token_bytes"):  # Meta's
        enc = chat.tokenizer.model   # tiktoken: special tokens decode to their own text too
        vocab = [enc.decode_single_token_bytes(i) for i in range(enc.n_vocab)]
        return xgr.TokenizerInfo(vocab, xgr.VocabType.RAW, vocab_size=vocab_size, stop_token_ids=list(chat.stop_ids))
    return xgr.TokenizerInfo.from_huggingface(chat.tokenizer, vocab_size=vocab_size, stop_token_ids=list(chat.stop_ids))


def shared_prefix(prompts):
    """Longest common token prefix, leaving at least one token of every prompt to feed the model."""
    n = 0
    shortest = min(len(p) for p in prompts) - 1
    while n < shortest and all(p[n] == prompts[0][n] for p in prompts):
        n += 1
    return prompts[0][:n]


class VLLMBackend:
    """vLLM in-process. Alone: tensor parallel over all visible GPUs. Under torchrun: one GPU per rank (the ranks
    split the records), so each rank sees only its LOCAL_RANK GPU."""

    def __init__(self, model_path, max_seq_len, seed, dtype=None, tokenizer=None, **engine_kwargs):
        if int(os.environ.get("WORLD_SIZE", 1)) > 1:
            os.environ["CUDA_VISIBLE_DEVICES"] = os.environ.get("LOCAL_RANK", "0")  # before vLLM touches CUDA
            tp = 1
        else:
            tp = max(1, torch.cuda.device_count())
        try:
            from vllm import LLM
        except ImportError as e:
            raise ImportError("backend='vllm' needs vLLM: pip install vllm (GPU machines)") from e
        self.seed = seed
        self.llm = LLM(model=str(model_path), tokenizer=str(tokenizer or model_path), tensor_parallel_size=tp,
                       max_model_len=max_seq_len, seed=seed, dtype=str(dtype).replace("torch.", "") if dtype else "auto",
                       **engine_kwargs)

    def generate(self, dialogs, temperature, top_p, max_gen_len, grammar=None):
        from vllm import SamplingParams
        constraint = {}
        if grammar is not None:
            try:   # vLLM >= 0.10.2
                from vllm.sampling_params import StructuredOutputsParams
                constraint = {"structured_outputs": StructuredOutputsParams(grammar=grammar)}
            except ImportError:
                from vllm.sampling_params import GuidedDecodingParams
                constraint = {"guided_decoding": GuidedDecodingParams(grammar=grammar)}
        params = SamplingParams(temperature=temperature, top_p=top_p if temperature > 0 else 1.0,
                                max_tokens=max_gen_len, seed=self.seed, **constraint)
        return [o.outputs[0].text for o in self.llm.chat(dialogs, params, use_tqdm=False)]


class ServerError(UserError, RuntimeError):
    """An OpenAI-compatible server kept failing (after retries) or answered something unreadable."""


class PromptRejected(ServerError, ValueError):
    """The server refused this request (HTTP 400/413/422, e.g. a prompt longer than its context): a ValueError like
    the in-process backends' prompt errors, so the caller can ask again without it."""


def chat_url(server_url):
    url = server_url.rstrip("/")
    if url.endswith("/chat/completions"):
        return url
    return url + ("/chat/completions" if url.endswith("/v1") else "/v1/chat/completions")


# where an OpenAI-compatible server reads a GBNF grammar: llama.cpp's server; vLLM's server before and since 0.10.2;
# "none" for servers that have no such field (OpenAI's own API rejects unknown fields): answers are parsed as free text
GRAMMAR_FIELDS = ("grammar", "guided_grammar", "structured_outputs", "none")


def grammar_request(field, grammar):
    if grammar is None or field == "none":
        return {}
    if field not in GRAMMAR_FIELDS:
        raise UserError(f"--grammar_field {field!r}: choose from {', '.join(GRAMMAR_FIELDS)}")
    return {"structured_outputs": {"grammar": grammar}} if field == "structured_outputs" else {field: grammar}


class OpenAIBackend:
    RETRY_STATUS = {408, 409, 429, 500, 502, 503, 504}
    REJECT_STATUS = {400, 413, 422}

    def __init__(self, server_url, model_name=None, seed=1, concurrency=6, timeout=120.0, retries=4, backoff=1.0,
                 api_key=None, grammar_field="grammar", server=None):
        """server: the llama.server.LocalServer behind the URL, when this process started it (its exit is then
        reported at once instead of being retried)."""
        grammar_request(grammar_field, "")  # checks the name now
        self.grammar_field, self.server = grammar_field, server
        self.stats = {"prompt_tokens": 0, "generated_tokens": 0}  # from the replies' usage, for throughput reports
        self.stats_lock = threading.Lock()
        self.url = chat_url(server_url)
        self.seed, self.concurrency, self.timeout, self.retries, self.backoff = seed, concurrency, timeout, retries, backoff
        self.api_key = api_key or os.environ.get("OPENAI_API_KEY")
        served = self.served_model()        # also checks that the server is there, before any record is queued
        self.model_name = model_name or served

    def post_or_get(self, url, body=None):
        headers = {"Content-Type": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        data = json.dumps(body).encode() if body is not None else None
        request = urllib.request.Request(url, data=data, headers=headers)
        with urllib.request.urlopen(request, timeout=self.timeout) as response:
            return json.loads(response.read())

    def served_model(self):
        """The model the server serves (vLLM and llama.cpp list it at /v1/models); servers ignoring it get 'default'.
        A server that cannot be reached at all is an error now, not after every batch has failed."""
        base = self.url.rsplit("/chat/completions", 1)[0]
        try:
            return self.post_or_get(base + "/models")["data"][0]["id"]
        except urllib.error.HTTPError:
            return "default"
        except (urllib.error.URLError, ConnectionError, OSError) as e:
            reason = getattr(e, "reason", e)
            raise ServerError(f"{base}: cannot reach the server ({type(reason).__name__}: {reason})") from None
        except (ValueError, KeyError, IndexError, TypeError):
            return "default"

    def server_gone(self):
        return self.server is not None and self.server.process.poll() is not None

    def complete(self, dialog, temperature, top_p, max_gen_len, grammar=None):
        body = {"model": self.model_name, "messages": dialog, "temperature": temperature, "top_p": top_p,
                "seed": self.seed, **grammar_request(self.grammar_field, grammar)}
        if max_gen_len:
            body["max_tokens"] = max_gen_len
        last = None
        for attempt in range(self.retries + 1):
            if self.server_gone():   # a local server that died will not come back: no retries
                break
            if attempt:
                time.sleep(self.backoff * 2 ** (attempt - 1))
            try:
                answer = self.post_or_get(self.url, body)
            except urllib.error.HTTPError as e:
                last = f"HTTP {e.code}: {e.read()[:200].decode(errors='replace')}"
                if e.code in self.REJECT_STATUS:
                    raise PromptRejected(f"{self.url}: {last}") from e
                if e.code not in self.RETRY_STATUS:
                    raise ServerError(f"{self.url}: {last}") from e
                continue
            except (urllib.error.URLError, TimeoutError, ConnectionError, json.JSONDecodeError) as e:
                last = f"{type(e).__name__}: {e}"
                continue
            try:
                content = answer["choices"][0]["message"]["content"] or ""
            except (KeyError, IndexError, TypeError) as e:
                raise ServerError(f"{self.url}: reply without choices[0].message.content: {str(answer)[:200]}") from e
            usage = answer.get("usage") if isinstance(answer.get("usage"), dict) else {}
            with self.stats_lock:
                self.stats["prompt_tokens"] += usage.get("prompt_tokens") or 0
                self.stats["generated_tokens"] += usage.get("completion_tokens") or 0
            return content
        if self.server_gone():
            raise ServerError(f"{self.url}: llama-server exited (code {self.server.process.returncode}; log "
                              f"{self.server.log_path})")
        raise ServerError(f"{self.url}: failed after {self.retries + 1} attempts; last error: {last}")

    def generate(self, dialogs, temperature, top_p, max_gen_len, grammar=None):
        with ThreadPoolExecutor(max_workers=self.concurrency) as pool:
            return list(pool.map(lambda d: self.complete(d, temperature, top_p, max_gen_len, grammar), dialogs))
