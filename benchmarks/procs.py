"""Subprocesses that are always bounded in time and always cleaned up.

Each worker runs in its own session (so its whole process tree can be signalled and measured
at once) under coreutils ``timeout`` (a hard lifetime even if this process is killed with
SIGKILL), and gets SIGTERM when the process that started it dies (``PR_SET_PDEATHSIG``).
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Sequence
from typing import IO, Any

_PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:  # pragma: no cover - runs in the child between fork and exec
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
    except Exception:
        pass


class Worker:
    """A worker process tree in its own session; ``stop()`` ends all of it."""

    def __init__(
        self,
        name: str,
        cmd: Sequence[str],
        *,
        env: dict[str, str],
        cwd: str,
        log_path: str,
        lifetime: float,
    ) -> None:
        self.name = name
        self.log_path = log_path
        full = list(cmd)
        if shutil.which("timeout"):
            full = ["timeout", "-k", "5", str(int(lifetime)), *full]
        self._log: IO[bytes] = open(log_path, "wb")  # closed in stop()
        self.proc = subprocess.Popen(
            full,
            env=env,
            cwd=cwd,
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            preexec_fn=_die_with_parent,
        )

    @property
    def session_id(self) -> int:
        """The worker's session (= the pid of the process started first)."""
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc.poll() is None

    def pause(self) -> None:
        """SIGSTOP the whole session (e.g. while another worker's idle cost is measured)."""
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.proc.pid, signal.SIGSTOP)

    def resume(self) -> None:
        """SIGCONT the whole session."""
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.proc.pid, signal.SIGCONT)

    def stop(self, grace: float = 8.0) -> None:
        """SIGTERM the whole session, SIGKILL whatever is left after ``grace`` seconds."""
        self.resume()  # a paused process would not see its SIGTERM
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(grace)
        except subprocess.TimeoutExpired:
            pass
        # The group may outlive its leader (e.g. forked workers): make sure nothing is left.
        deadline = time.monotonic() + 1.0
        while _group_alive(self.proc.pid) and time.monotonic() < deadline:
            time.sleep(0.05)
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(2)
        self._log.close()

    def log_tail(self, lines: int = 15) -> str:
        try:
            with open(self.log_path, encoding="utf-8", errors="replace") as fh:
                return "".join(fh.readlines()[-lines:])
        except OSError:
            return ""


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except (ProcessLookupError, PermissionError):
        return False
    return True


def run_bounded(cmd: Sequence[str], *, env: dict[str, str], cwd: str, timeout: float) -> int:
    """Run ``cmd`` (inheriting stderr, for its progress bar) and wait at most ``timeout`` s.

    On Ctrl-C/exceptions the child is terminated (then killed) before the exception goes on.
    """
    proc: subprocess.Popen[Any] = subprocess.Popen(
        list(cmd), env=env, cwd=cwd, stdin=subprocess.DEVNULL, preexec_fn=_die_with_parent
    )
    try:
        return proc.wait(timeout)
    except subprocess.TimeoutExpired:
        return -999
    finally:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(3)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(3)
