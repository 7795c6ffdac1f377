"""Small shared helpers: seeding, devices, atomic files, hashing, run metadata."""
import hashlib
import json
import os
import platform
import random
import sys
from pathlib import Path

import numpy as np
import torch


def seed_everything(seed):
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def pick_device(cuda=False):
    if cuda and not torch.cuda.is_available():
        print("--cuda given but no CUDA device is visible: running on CPU", file=sys.stderr)
    if cuda and torch.cuda.is_available():
        local_rank = int(os.environ.get("LOCAL_RANK", 0))
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


def bf16_supported(device):
    """bf16 autocast pays off on GPUs that have it and on CPUs with AVX512-BF16/AMX."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    try:
        flags = open("/proc/cpuinfo").read()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def atomic_write_bytes(path, data):
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def atomic_write_text(path, text):
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path, obj):
    atomic_write_text(path, json.dumps(obj, indent=2, ensure_ascii=False) + "\n")


def file_sha256(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def versions():
    import transformers
    out = {"python": platform.python_version(), "torch": torch.__version__,
           "transformers": transformers.__version__, "numpy": np.__version__}
    try:
        import sentencepiece
        out["sentencepiece"] = sentencepiece.__version__
    except ImportError:
        pass
    try:
        out["git_commit"] = os.popen(f"git -C {Path(__file__).parent} rev-parse HEAD 2>/dev/null").read().strip() or None
    except Exception:
        out["git_commit"] = None
    return out
