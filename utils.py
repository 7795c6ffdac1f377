"""Small shared helpers: user errors, progress lines, seeding, devices, atomic files, hashing, run metadata."""
import hashlib
import json
import math
import os
import platform
import random
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm


class UserError(Exception):
    """Bad input from the user (a file, a flag, a server): one line `error: ...` and exit status 2, no traceback."""


def report_user_errors():
    """Every entry point calls this first. A UserError (DataError, ModelLoadError, ServerError, ...) then ends the
    run with `error: <message>` on stderr and exit status 2 (argparse's status for a bad command line); `--debug`
    anywhere on the command line, or HDREC_DEBUG=1, shows its traceback as well. Any other exception is a bug and
    keeps Python's full traceback and status 1."""
    if "--debug" in sys.argv:
        sys.argv.remove("--debug")
        os.environ["HDREC_DEBUG"] = "1"           # child processes (torchrun workers) inherit it
    debug = os.environ.get("HDREC_DEBUG", "") not in ("", "0")
    python_hook = sys.excepthook

    def hook(kind, error, tb):
        if not issubclass(kind, UserError):
            return python_hook(kind, error, tb)
        if debug:
            python_hook(kind, error, tb)
        else:
            print(f"error: {error}", file=sys.stderr)
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(2)                               # an excepthook cannot otherwise change the exit status

    sys.excepthook = hook


class _Lines:
    """A file for tqdm that turns its carriage-return redraws into whole lines (for logs and CI)."""

    def __init__(self, stream):
        self.stream = stream
        self.last = None

    def write(self, s):
        s = s.replace("\r", "").rstrip()
        if s and s.split("[")[0] != self.last:        # closing a bar redraws its last state: once is enough
            self.stream.write(s + "\n")
            self.last = s.split("[")[0]

    def flush(self):
        self.stream.flush()


class _LogBar(tqdm):
    def set_postfix(self, ordered_dict=None, refresh=True, **kwargs):
        super().set_postfix(ordered_dict, refresh=False, **kwargs)   # shown with the next line, not as a line


def progress_bar(iterable=None, every_seconds=60, **kwargs):
    """tqdm on a terminal; elsewhere (a log file, CI) a plain line with rate and ETA once both a minute
    (`every_seconds`) and 5% of the total have passed: at most 20 lines a loop, however long it runs."""
    if kwargs.get("disable"):
        return tqdm(iterable, **kwargs)
    if sys.stderr.isatty():
        return tqdm(iterable, dynamic_ncols=True, **kwargs)
    total = kwargs.get("total")
    if total is None and iterable is not None and hasattr(iterable, "__len__"):
        total = len(iterable)
    return _LogBar(iterable, file=_Lines(sys.stderr), mininterval=every_seconds, maxinterval=float("inf"),
                miniters=max(1, (total or 0) // 20),
                bar_format="{desc}: {percentage:3.0f}% {n_fmt}/{total_fmt} [{elapsed}<{remaining}, {rate_fmt}{postfix}]"
                if total else "{desc}: {n_fmt} [{elapsed}, {rate_fmt}{postfix}]", **kwargs)


@dataclass
class EarlyStopping:
    """The best validation figure so far and the validations since then without gain; training stops after
    `endure_times` of them in a row. Lower is better: negate a figure to maximise (-NDCG@10). `best` and `endured`
    are plain numbers, for a resumable state's JSON (json writes math.inf as Infinity and reads it back)."""
    endure_times: int
    best: float = math.inf
    endured: int = 0

    def improved(self, figure):
        """Count one validation: True when `figure` is the best so far (keep that model)."""
        if figure < self.best:
            self.best, self.endured = figure, 0
            return True
        self.endured += 1
        return False

    @property
    def stop(self):
        return self.endured >= self.endure_times


def seed_everything(seed):
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def pick_device(want=False):
    """The device to run on. want: True or "cuda" (the scripts' --cuda): the GPU of this process (LOCAL_RANK under
    torchrun), the CPU with a warning when none is visible; False: the CPU; None: a GPU where there is one; any
    other string: that device."""
    if want is None or want is True or str(want) == "cuda":
        if torch.cuda.is_available():
            return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        if want is not None:
            print("--cuda given but no CUDA device is visible: running on CPU", file=sys.stderr)
        return torch.device("cpu")
    return torch.device(want) if want else torch.device("cpu")


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


def machine():
    """What a minutes budget ran on: the CPU's model, its cores, whether it has bf16, and the GPU if any (figures
    measured under a budget are comparable only on the same machine)."""
    cpu = platform.processor() or platform.machine()
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                   if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    out = f"{cpu}, {os.cpu_count()} cores, bf16 {'yes' if bf16_supported(torch.device('cpu')) else 'no'}"
    if torch.cuda.is_available():
        out += f", {torch.cuda.device_count()} x {torch.cuda.get_device_name(0)}"
    return out


def versions():
    out = {"python": platform.python_version(), "torch": torch.__version__, "numpy": np.__version__,
           "machine": machine()}
    for name in ("transformers", "sentencepiece", "peft"):  # absent in a baseline's own venv (RecBole's)
        try:
            out[name] = __import__(name).__version__
        except ImportError:
            pass
    try:
        out["git_commit"] = os.popen(f"git -C {Path(__file__).parent} rev-parse HEAD 2>/dev/null").read().strip() or None
    except Exception:
        out["git_commit"] = None
    return out
