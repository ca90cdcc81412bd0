"""The arq paths' own environment, runner side.

arq 0.28 (the current release) requires ``redis<6``; rpc-tasks and taskiq-redis need redis-py
>= 7, so arq cannot be installed next to them. ``make bench`` creates ``.venv-arq`` (arq and its
redis-py 5 only; optional: if it cannot be created, the arq paths are skipped), and the runner
starts the arq group's worker and client processes with that environment's python, with the
repository on ``PYTHONPATH`` for :mod:`benchmarks` (those processes import arq, the standard
library and a few benchmark modules, never rpc_tasks: see :mod:`benchmarks.arq_paths`).
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
#: The arq group's interpreter unless ``--arq-python`` or ``BENCH_ARQ_PYTHON`` names another.
DEFAULT_PYTHON = ROOT / ".venv-arq" / "bin" / "python"
#: Worker process kinds of the arq paths (``WORKER_OF`` in :mod:`benchmarks.groups`; also the names
#: of their groups) and their ``BENCH_ARQ_KIND`` (``benchmarks/workers/arq_app.py``).
WORKER_KINDS = {"arq": "default", "arq-fast": "fast"}
HOW_TO_CREATE = "`make bench` creates .venv-arq; see benchmarks/README.md, arq paths"
_PROBE = (
    "import json, sys\n"
    "import arq, redis\n"
    "import benchmarks.arq_paths, benchmarks.client, benchmarks.workers.arq_app\n"
    "bad = [m for m in ('rpc_tasks', 'dramatiq', 'pydantic') if m in sys.modules]\n"
    "print(json.dumps({'arq': arq.VERSION, 'redis': redis.__version__, 'bad': bad}))\n"
)


def default_python() -> str:
    """``BENCH_ARQ_PYTHON``, else ``.venv-arq/bin/python`` of this repository."""
    return os.environ.get("BENCH_ARQ_PYTHON") or str(DEFAULT_PYTHON)


def process_env(env: dict[str, str]) -> dict[str, str]:
    """``env`` for an arq process: only this repository on ``PYTHONPATH`` (``benchmarks``
    importable, nothing of the caller's environment)."""
    return {**env, "PYTHONPATH": str(ROOT)}


def check(
    python: str, env: dict[str, str] | None = None, timeout: float = 60.0
) -> tuple[str | None, dict[str, str]]:
    """Whether ``python`` can run the arq paths (it imports arq and the benchmark modules its
    processes run, and they import no rpc_tasks): ``(None, versions)``, or ``(why not, {})``,
    the reason worded as the path's "skipped: ..." message."""
    if not os.path.exists(python):
        return f"skipped: no arq environment ({python} does not exist; {HOW_TO_CREATE})", {}
    try:
        proc = subprocess.run(
            [python, "-c", _PROBE],
            env=process_env(dict(env if env is not None else os.environ)),
            cwd=str(ROOT),
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=timeout,
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"skipped: {python} does not run ({type(exc).__name__}: {exc}; {HOW_TO_CREATE})", {}
    if proc.returncode != 0:
        last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        return f"skipped: {python} cannot import arq or the arq paths ({last}; {HOW_TO_CREATE})", {}
    try:
        found = json.loads(proc.stdout.strip().splitlines()[-1])
    except (ValueError, IndexError):
        return f"skipped: {python} did not report arq's version ({proc.stdout.strip()[:80]!r})", {}
    if found.get("bad"):
        return f"skipped: importing arq in {python} imports {', '.join(found['bad'])}", {}
    return None, {"arq": str(found["arq"]), "redis (arq env)": str(found["redis"])}


def worker_command(python: str, kind: str) -> tuple[list[str], dict[str, str]]:
    """The command and extra environment of an arq worker process of ``kind``."""
    return [python, "-m", "benchmarks.workers.arq_app"], {"BENCH_ARQ_KIND": WORKER_KINDS[kind]}
