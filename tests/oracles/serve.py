"""Runs the oracle scripts in one long-lived interpreter, so a test binary
pays for importing torch, transformers and mergekit once rather than at
every call (tests/common/mod.rs starts it and sends the calls).

Protocol, one JSON object per line each way:
  request  {"argv": ["SCRIPT.py" | "-c" CODE | "-m" MODULE, ARG...]}
  response {"code": EXIT_STATUS, "stdout": TEXT, "stderr": TEXT}

Each call runs as `python ARGV...` would: the script as `__main__` with
`sys.argv` set and its directory first on `sys.path` (or `-c CODE`, `-m MODULE`), its
output captured, `SystemExit` and uncaught exceptions turned into the exit
status. State a script may change for the next one is put back: torch's
global random state, default dtype and thread count, the working directory
and the environment.
"""

import contextlib
import gc
import io
import json
import os
import runpy
import sys
import traceback

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import torch  # noqa: E402  (after the environment the oracles expect)

# The protocol owns the real stdout; anything written to file descriptor 1
# below Python (a C library's printf) goes to stderr instead.
protocol = os.fdopen(os.dup(1), "w", encoding="utf-8")
os.dup2(2, 1)

rng = torch.random.get_rng_state()
dtype = torch.get_default_dtype()
threads = torch.get_num_threads()
cwd = os.getcwd()
environ = dict(os.environ)
path = list(sys.path)


def run(argv):
    if argv[0] == "-c":
        sys.argv = ["-c", *argv[2:]]
        exec(compile(argv[1], "<string>", "exec"), {"__name__": "__main__"})
    elif argv[0] == "-m":
        sys.argv = [argv[1], *argv[2:]]
        sys.path[0] = os.getcwd()
        runpy.run_module(argv[1], run_name="__main__", alter_sys=True)
    else:
        sys.argv = list(argv)
        sys.path[0] = os.path.dirname(os.path.abspath(argv[0]))
        runpy.run_path(argv[0], run_name="__main__")


def call(argv):
    out, err = io.StringIO(), io.StringIO()
    code = 0
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            run(argv)
        except SystemExit as exit:
            if exit.code is None:
                code = 0
            elif isinstance(exit.code, int):
                code = exit.code
            else:
                print(exit.code, file=sys.stderr)
                code = 1
        except BaseException:
            traceback.print_exc()
            code = 1
    torch.random.set_rng_state(rng)
    torch.set_default_dtype(dtype)
    torch.set_num_threads(threads)
    os.chdir(cwd)
    os.environ.clear()
    os.environ.update(environ)
    sys.path[:] = path
    gc.collect()
    return {"code": code, "stdout": out.getvalue(), "stderr": err.getvalue()}


for line in sys.stdin:
    reply = call(json.loads(line)["argv"])
    protocol.write(json.dumps(reply) + "\n")
    protocol.flush()
