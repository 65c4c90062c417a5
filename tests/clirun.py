"""Run many ``graphopt`` command lines cheaply, each in its own process.

Importing graphopt and its dependencies costs about a second per process; hundreds of CLI runs
(bad inputs, fuzzing) would spend minutes on it. :func:`run_batch` starts one driver process that
imports :mod:`graphopt.cli` once and then forks a child per command line: the child has its own
stdout/stderr files, calls ``cli.main(argv)`` exactly as the console script does and exits with
its return value (an uncaught exception prints the interpreter's traceback and exits 1, as the
console script would). A child that runs past ``timeout`` is killed and reported as hung; one
killed by a signal (a crash in native code) reports ``-signal``.
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path


@dataclasses.dataclass
class CliResult:
    argv: list[str]
    code: int  # exit code; -N when killed by signal N; None-like -999 when it hung
    stdout: str
    stderr: str
    seconds: float

    @property
    def hung(self) -> bool:
        return self.code == HUNG


HUNG = -999


def run_batch(
    calls: Sequence[tuple[Sequence[str], str | os.PathLike[str]]], *, timeout: float = 60.0, workers: int = 2, prelude: str = ""
) -> list[CliResult]:
    """Run each ``(argv, cwd)`` as ``graphopt argv`` in ``cwd``; results in the same order.

    ``prelude`` is Python source the driver runs first (e.g. registering test passes).
    """
    with tempfile.TemporaryDirectory(prefix="clirun-") as tmp:
        request = {"calls": [{"argv": list(a), "cwd": str(c)} for a, c in calls], "timeout": timeout, "workers": workers, "tmp": tmp, "prelude": prelude}
        proc = subprocess.run(
            [sys.executable, "-c", "import sys; sys.path.insert(0, sys.argv[1]); import clirun; clirun._serve()", str(Path(__file__).parent)],
            input=json.dumps(request),
            capture_output=True,
            text=True,
            timeout=timeout * len(calls) / max(workers, 1) + 120,
        )
        if proc.returncode != 0:
            raise RuntimeError(f"clirun driver failed ({proc.returncode}): {proc.stderr[-2000:]}")
        return [CliResult(**r) for r in json.loads(proc.stdout)]


def _serve() -> None:  # the driver process
    request = json.loads(sys.stdin.read())
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    import graphopt.cli
    import graphopt.registry

    exec(compile(request["prelude"], "<prelude>", "exec"), {"__name__": "clirun_prelude"})

    graphopt.registry.all_passes()  # import the passes once, before forking
    calls, tmp, timeout = request["calls"], Path(request["tmp"]), request["timeout"]
    results: list[dict | None] = [None] * len(calls)
    running: dict[int, tuple[int, float]] = {}  # pid -> (index, start)
    queue = list(range(len(calls)))
    while queue or running:
        while queue and len(running) < request["workers"]:
            i = queue.pop(0)
            pid = os.fork()
            if pid == 0:
                _child(calls[i], tmp / f"{i}.out", tmp / f"{i}.err")
            running[pid] = (i, time.monotonic())
        pid, status = os.waitpid(-1, os.WNOHANG)
        if pid == 0:
            for pid, (i, start) in list(running.items()):
                if time.monotonic() - start > timeout:
                    os.kill(pid, 9)
                    os.waitpid(pid, 0)
                    del running[pid]
                    results[i] = _result(calls[i], HUNG, tmp, i, time.monotonic() - start)
            time.sleep(0.01)
            continue
        i, start = running.pop(pid)
        code = os.waitstatus_to_exitcode(status)
        results[i] = _result(calls[i], code, tmp, i, time.monotonic() - start)
    sys.stdout.write(json.dumps(results))


def _result(call: dict, code: int, tmp: Path, i: int, seconds: float) -> dict:
    read = lambda p: p.read_text(errors="replace") if p.exists() else ""  # noqa: E731
    return {"argv": call["argv"], "code": code, "stdout": read(tmp / f"{i}.out"), "stderr": read(tmp / f"{i}.err"), "seconds": round(seconds, 3)}


def _child(call: dict, out: Path, err: Path) -> None:
    code = 1
    try:
        os.chdir(call["cwd"])
        for fd, path in ((1, out), (2, err)):
            f = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            os.dup2(f, fd)
            os.close(f)
        from graphopt import cli

        try:
            code = cli.main(call["argv"])
        except SystemExit as e:  # argparse
            code = e.code if isinstance(e.code, int) else 1
        except BaseException:
            import traceback

            traceback.print_exc()  # what the interpreter prints for an uncaught exception
            code = 1
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
