"""llama.cpp's server on this machine: `LocalServer(gguf, parallel=N)` starts llama-server on a free port of
127.0.0.1 serving one GGUF file with N parallel slots (continuous batching: N requests decode together), waits until
it answers, and stops it on close(). backend="llamacpp" in Llama.build talks to it as to any OpenAI-compatible server.

The binary: $LLAMA_SERVER, else .llamacpp/bin/llama-server (scripts/setup_llamacpp.sh builds it), else llama-server
on the PATH.
"""
import ctypes
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from utils import UserError

REPO_BINARY = Path(__file__).resolve().parents[1] / ".llamacpp" / "bin" / "llama-server"


def find_binary():
    for candidate in (os.environ.get("LLAMA_SERVER"), REPO_BINARY, shutil.which("llama-server")):
        if candidate and Path(candidate).is_file() and os.access(candidate, os.X_OK):
            return Path(candidate)
    raise UserError(f"llama-server not found: run `bash scripts/setup_llamacpp.sh` (builds {REPO_BINARY}) or set "
                    f"LLAMA_SERVER=/path/to/llama-server")


def die_with_parent():
    """Runs in the child before exec: Linux sends it SIGTERM when the process that started it dies, even by SIGKILL,
    so a killed distillation leaves no server behind."""
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # 1 = PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LocalServer:
    def __init__(self, gguf, parallel=4, ctx_per_slot=1024, threads=None, seed=1, log_path=None, startup_timeout=120):
        """ctx_per_slot: prompt + answer tokens one request may hold (the server's context is split between slots)."""
        self.binary, self.gguf, self.parallel = find_binary(), Path(gguf), parallel
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}/v1"
        self.log_path = Path(log_path) if log_path else Path(tempfile.mkstemp(prefix="llama-server-", suffix=".log")[1])
        threads = threads or max(1, len(os.sched_getaffinity(0)))
        self.command = [str(self.binary), "-m", str(self.gguf), "--host", "127.0.0.1", "--port", str(self.port),
                        "--parallel", str(parallel), "--ctx-size", str(ctx_per_slot * parallel), "--threads", str(threads),
                        "--seed", str(seed), "--no-webui", "--metrics"]
        self.log = open(self.log_path, "w")
        self.process = subprocess.Popen(self.command, stdout=self.log, stderr=subprocess.STDOUT,
                                        stdin=subprocess.DEVNULL,
                                        preexec_fn=die_with_parent if sys.platform == "linux" else None)
        self.wait_ready(startup_timeout)

    def wait_ready(self, timeout):
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.process.poll() is not None:
                self.log.close()
                tail = self.log_path.read_text(errors="replace")[-1500:]
                raise UserError(f"llama-server exited with code {self.process.returncode} while loading {self.gguf} "
                                f"(log {self.log_path}):\n{tail}")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/health", timeout=2) as r:
                    if r.status == 200:
                        return
            except OSError:   # not listening yet, or 503 while the model loads
                pass
            time.sleep(0.2)
        self.close()
        raise UserError(f"llama-server did not become ready within {timeout} s (log {self.log_path})")

    def slots_used(self):
        """Distinct slot ids that have processed a request so far (read from the server's log)."""
        self.log.flush()
        text = self.log_path.read_text(errors="replace")
        return {int(line.split("id", 1)[1].split("|")[0]) for line in text.splitlines()
                if "launch_slot_" in line and "processing task" in line}

    def close(self):
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.log.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
