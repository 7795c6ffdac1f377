"""`Llama.build(...)` -> `generator.chat_completion(dialogs, ...)`: the interface of Meta's reference code, over
any model llama.loaders understands and any backend in llama.backends."""
import atexit
from pathlib import Path

import torch

from llama import backends, loaders
from utils import pick_device


def pick_dtype(device, dtype=None):
    if isinstance(dtype, str):
        if not isinstance(getattr(torch, dtype, None), torch.dtype):
            raise ValueError(f"unknown dtype {dtype!r}: use float32, bfloat16 or float16")
        return getattr(torch, dtype)
    if dtype is not None:
        return dtype
    from utils import bf16_supported  # the repo's check: CUDA bf16, or a CPU with AVX512-BF16/AMX
    if bf16_supported(device):
        return torch.bfloat16
    return torch.float16 if device.type == "cuda" else torch.float32


class Llama:
    @staticmethod
    def build(ckpt_dir=None, tokenizer_path=None, max_seq_len=512, max_batch_size=6, backend="transformers",
              server_url=None, model_name=None, seed=1, dtype=None, device=None, **backend_kwargs):
        """ckpt_dir: HF folder or hub id, .gguf, Meta Llama 3 folder, or None for SmolLM2-135M-Instruct.
        backend: "transformers" | "vllm" | "openai" (then server_url, and optionally model_name, is what counts) |
        "llamacpp" (llama.cpp's server started here on the GGUF file, max_batch_size parallel slots of max_seq_len
        tokens each; stopped when this process exits).
        Extra keyword arguments go to the backend: openai: concurrency, timeout, retries, backoff, api_key,
        grammar_field; llamacpp: threads, timeout, retries, backoff;
        vllm: vllm.LLM's engine arguments; transformers: prefix_cache (default True), others ignored."""
        torch.manual_seed(seed)
        if backend == "openai":
            if not server_url:
                raise ValueError("backend='openai' needs server_url, e.g. http://127.0.0.1:8000/v1")
            backend_kwargs.setdefault("concurrency", max_batch_size)
            impl = backends.OpenAIBackend(server_url, model_name, seed=seed, **backend_kwargs)
        elif backend == "llamacpp":
            from llama.server import LocalServer
            kind, path = loaders.resolve(ckpt_dir)
            if kind != "gguf":
                raise loaders.ModelLoadError(f"{path}: backend='llamacpp' serves GGUF files (convert a Hugging Face "
                                             f"model with llama.cpp's convert_hf_to_gguf.py), or use another backend")
            server = LocalServer(path, parallel=max_batch_size, ctx_per_slot=max_seq_len, seed=seed,
                                 threads=backend_kwargs.pop("threads", None))
            atexit.register(server.close)
            impl = backends.OpenAIBackend(server.url, seed=seed, concurrency=max_batch_size, grammar_field="grammar",
                                          server=server, **backend_kwargs)
        elif backend == "vllm":
            kind, path = loaders.resolve(ckpt_dir)
            if kind == "meta":
                raise loaders.ModelLoadError(f"{path}: vLLM cannot read Meta's original format; use "
                                             f"backend='transformers' or a Hugging Face conversion of the model")
            if kind == "gguf":
                path = loaders.gguf_to_hf_folder(path)
            hf_tokenizer = tokenizer_path if tokenizer_path and Path(tokenizer_path).is_dir() else None
            impl = backends.VLLMBackend(path, max_seq_len, seed, dtype, tokenizer=hf_tokenizer, **backend_kwargs)
        elif backend == "transformers":
            device = pick_device(device)
            model, chat = loaders.load(ckpt_dir, tokenizer_path, pick_dtype(device, dtype), device)
            impl = backends.TransformersBackend(model, chat, max_seq_len, max_batch_size, seed, device,
                                                prefix_cache=backend_kwargs.get("prefix_cache", True))
        else:
            raise ValueError(f"unknown backend {backend!r}: choose transformers, vllm, openai or llamacpp")
        return Llama(impl)

    def __init__(self, backend):
        self.backend = backend

    def chat_completion(self, dialogs, temperature=0.6, top_p=0.9, max_gen_len=None, grammar=None):
        """dialogs: lists of {"role": "system"|"user"|"assistant", "content": str}. temperature 0 = greedy.
        grammar: GBNF text every reply must follow (constrained generation), or None.
        Returns [{"generation": {"role": "assistant", "content": str}}], one per dialog, same order."""
        for i, dialog in enumerate(dialogs):
            if not dialog or any(m.get("role") not in ("system", "user", "assistant")
                                 or not isinstance(m.get("content"), str) for m in dialog):
                raise ValueError(f"dialog {i} must be a non-empty list of {{'role': system|user|assistant, "
                                 f"'content': str}}: {str(dialog)[:200]}")
        extra = {"grammar": grammar} if grammar is not None else {}
        replies = self.backend.generate(dialogs, temperature, top_p, max_gen_len, **extra) if dialogs else []
        return [{"generation": {"role": "assistant", "content": r.strip()}} for r in replies]
