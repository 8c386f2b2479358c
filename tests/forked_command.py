"""Run a command line as `python -m` runs it, in a process forked from a server that has imported torch once.

For tests that run many short commands (tests/test_bad_input.py): a fresh interpreter spends over a second
importing torch before the command reads its first argument. Only this module (standard library only) and
`PRELOADED` are imported before the fork, never a project module, so the command's own modules import under
the environment it is given.
"""

from __future__ import annotations

import atexit
import multiprocessing
import multiprocessing.context
import multiprocessing.process
import os
import runpy
import sys

PRELOADED = ("numpy", "torch", "torchvision")   # imported by the fork server only: no project module
_context: multiprocessing.context.ForkServerContext | None = None


def context() -> multiprocessing.context.ForkServerContext:
    """The fork server's context (started on its first process), which has imported `PRELOADED`."""
    global _context
    if _context is None:
        _context = multiprocessing.get_context("forkserver")
        _context.set_forkserver_preload([*PRELOADED, __name__])
    return _context


def run_module(module: str, argv: list[str], cwd: str, env: dict[str, str], out: str, err: str, status: str
               ) -> None:
    """In the forked process: what `python -m module *argv` does, in `cwd` under `env`, output to files, its exit
    code written to the file `status` as it exits (`exit_code` reads it)."""
    os.setsid()   # a session of its own: whatever the command starts (a Ray it should not have) is stopped with it
    os.chdir(cwd)
    os.environ.clear()
    os.environ.update(env)
    for fd, path in ((1, out), (2, err)):
        os.dup2(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC), fd)
    sys.stdout = open(1, "w", buffering=1, closefd=False)   # noqa: SIM115 - the process's own streams
    sys.stderr = open(2, "w", buffering=1, closefd=False)   # noqa: SIM115
    sys.stdin = open(os.devnull)                             # noqa: SIM115
    sys.argv = [module, *argv]
    sys.path[0] = cwd                                        # `python -m` puts the working directory first
    code = 0
    try:
        runpy.run_module(module, run_name="__main__", alter_sys=True)
    except SystemExit as stop:
        code = stop.code if isinstance(stop.code, int) else (0 if stop.code is None else 1)
        if not isinstance(stop.code, int | None):
            print(stop.code, file=sys.stderr)
    except BaseException:   # as the interpreter does with an uncaught exception: its traceback, exit 1
        import traceback

        traceback.print_exc()
        code = 1
    atexit._run_exitfuncs()   # the interpreter's exit, then no more: os._exit skips the fork server's handlers
    sys.stdout.flush()
    sys.stderr.flush()
    with open(status, "w") as file:
        file.write(str(code))
    os._exit(code)


def exit_code(process: multiprocessing.process.BaseProcess, status: str) -> int | None:
    """The exit code of a `run_module` process that has ended: the one it wrote, else (killed before it could write
    one) the fork server's. The fork server's alone is not enough: under load its SIGCHLD handling can lose a
    child's status and report 255 for a command that exited 2 (python/cpython#140867, seen in this suite's CI)."""
    try:
        with open(status) as file:
            return int(file.read())
    except (FileNotFoundError, ValueError):
        return process.exitcode
