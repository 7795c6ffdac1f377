"""Run many command lines of the entry points, each in its own process, after importing the heavy libraries once.

    python tests/preloaded.py OUT_DIR < cases.json      (a JSON list of argv lists, argv[0] the script)

Each case runs in a child forked from this process, as `python SCRIPT ARGS...` would run it (`__main__`, sys.argv,
sys.path[0] the script's folder), its stdout and stderr into OUT_DIR/{i}.out and OUT_DIR/{i}.err and its exit status
into OUT_DIR/{i}.status; two children at a time. Why: test_errors runs some forty entry points that fail within a
second of starting, and each fresh interpreter spent ~5 s importing torch and transformers before failing."""
import importlib
import json
import os
import runpy
import sys
import traceback
from pathlib import Path

# Third-party only: the children import the project's own modules themselves, as a fresh interpreter would.
for name in ["numpy", "torch", "transformers", "transformers.models.t5.modeling_t5", "safetensors.torch",
             "sentencepiece", "tqdm", "yaml", "peft"]:
    try:
        importlib.import_module(name)
    except ImportError:
        pass


def run_case(argv, out_dir, i):
    """In the child: the script as __main__, its streams into files; never returns."""
    for fd, suffix in [(1, "out"), (2, "err")]:
        f = os.open(out_dir / f"{i}.{suffix}", os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
        os.dup2(f, fd)
        os.close(f)
    sys.argv = list(argv)
    sys.path[0] = str(Path(argv[0]).resolve().parent)
    try:
        runpy.run_path(argv[0], run_name="__main__")
        status = 0
    except SystemExit as stop:                     # sys.exit / argparse, with the interpreter's meaning of its code
        if stop.code is None or isinstance(stop.code, int):
            status = stop.code or 0
        else:
            print(stop.code, file=sys.stderr)
            status = 1
    except BaseException:                          # what an uncaught exception does: the excepthook, status 1
        sys.excepthook(*sys.exc_info())            # report_user_errors' hook exits 2 itself for a UserError
        status = 1
    try:
        sys.stdout.flush()
        sys.stderr.flush()
    except Exception:
        traceback.print_exc()
    os._exit(status)


def main():
    out_dir = Path(sys.argv[1])
    cases = json.load(sys.stdin)
    running, todo = {}, list(enumerate(cases))
    while todo or running:
        while todo and len(running) < 2:
            i, argv = todo.pop(0)
            pid = os.fork()
            if pid == 0:
                run_case(argv, out_dir, i)
            running[pid] = i
        pid, wait_status = os.wait()
        (out_dir / f"{running.pop(pid)}.status").write_text(str(os.waitstatus_to_exitcode(wait_status)))


if __name__ == "__main__":
    main()
