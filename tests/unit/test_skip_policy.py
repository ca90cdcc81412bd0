"""tests/conftest.py: a skip says why, and with --require-services every service skip
(pytest.skip, a module-level importorskip) is a failure; xfail and [not-a-service] skips stay."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SAMPLES = ["tests/unit/samples/skips.py", "tests/unit/samples/module_skip.py"]


def _run(require: bool, *samples: str) -> str:
    env = {k: v for k, v in os.environ.items() if k != "RPC_TASKS_REQUIRE_SERVICES"}
    if require:
        env["RPC_TASKS_REQUIRE_SERVICES"] = "1"
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "-p",
            "no:cacheprovider",
            "-q",
            "--continue-on-collection-errors",
            *samples,
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    return done.stdout + done.stderr


def test_default_run_skips_and_says_why() -> None:
    out = _run(False, *SAMPLES)
    assert "SKIPPED [1] tests/unit/samples/skips.py:7: Example service is not reachable" in out, out
    assert "could not import 'rpc_tasks_no_such_module'" in out
    assert out.strip().splitlines()[-1].startswith("3 skipped, 1 xfailed"), out


def test_require_services_turns_service_skips_into_failures() -> None:
    out = _run(True, *SAMPLES)
    assert "services are required (--require-services): Example service is not reachable" in out, out
    assert "services are required (--require-services): could not import" in out, out
    summary = out.strip().splitlines()[-1]
    assert summary.startswith("1 failed, 1 skipped, 1 xfailed, 1 error"), summary
