"""The benchmark's arq paths without arq: the runner skips them (and says why) when their own
environment (``.venv-arq``) is missing or broken, their client code imports no rpc_tasks, and
the async peers' headline ratios include them. ``make bench`` measures them for real."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from benchmarks import aio_report, arq_env, groups, run
from benchmarks.arq_paths import ArqFastPath, ArqPath
from benchmarks.client import planned_calls

ROOT = Path(__file__).resolve().parents[2]


def fake_python(tmp_path: Path, body: str) -> str:
    """An executable standing in for the arq environment's python."""
    path = tmp_path / "python"
    path.write_text(f"#!/bin/sh\n{body}\n", encoding="utf-8")
    path.chmod(path.stat().st_mode | stat.S_IXUSR)
    return str(path)


def test_check_skips_when_the_arq_environment_is_missing(tmp_path: Path) -> None:
    problem, versions = arq_env.check(str(tmp_path / ".venv-arq" / "bin" / "python"))
    assert problem is not None
    assert problem.startswith("skipped: no arq environment")
    assert "make bench" in problem
    assert versions == {}


def test_check_skips_when_arq_cannot_be_imported(tmp_path: Path) -> None:
    python = fake_python(tmp_path, "echo \"ModuleNotFoundError: No module named 'arq'\" >&2; exit 1")
    problem, versions = arq_env.check(python)
    assert problem is not None
    assert "cannot import arq" in problem
    assert "No module named 'arq'" in problem
    assert versions == {}


def test_check_skips_when_the_arq_processes_would_import_rpc_tasks(tmp_path: Path) -> None:
    python = fake_python(tmp_path, """echo '{"arq": "0.28.0", "redis": "5.3.1", "bad": ["rpc_tasks"]}'""")
    problem, _ = arq_env.check(python)
    assert problem is not None
    assert "imports rpc_tasks" in problem


def test_check_reports_the_versions_of_a_working_environment(tmp_path: Path) -> None:
    python = fake_python(tmp_path, """echo '{"arq": "0.28.0", "redis": "5.3.1", "bad": []}'""")
    assert arq_env.check(python) == (None, {"arq": "0.28.0", "redis (arq env)": "5.3.1"})


def test_arq_processes_get_only_the_repository_on_their_path() -> None:
    env = arq_env.process_env({"PYTHONPATH": "/somewhere/else", "BENCH_TAG": "t"})
    assert env == {"PYTHONPATH": str(ROOT), "BENCH_TAG": "t"}
    cmd, extra = groups.worker_command("arq-fast", 4, 60, "t", python="/venv/bin/python")
    assert cmd == ["/venv/bin/python", "-m", "benchmarks.workers.arq_app"]
    assert extra == {"BENCH_ARQ_KIND": "fast"}


def test_the_arq_client_modules_import_neither_rpc_tasks_nor_dramatiq() -> None:
    code = (
        "import sys\n"
        "import benchmarks.client, benchmarks.paths, benchmarks.rpc_paths, benchmarks.peer_paths\n"
        "import benchmarks.aio_paths, benchmarks.arq_paths\n"
        "print(sorted(m for m in ('rpc_tasks', 'dramatiq', 'pydantic', 'arq') if m in sys.modules))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code],
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        cwd=str(ROOT),
        capture_output=True,
        text=True,
        check=True,
    )
    assert out.stdout.strip() == "[]"


def test_the_default_arq_path_caps_its_calls_and_the_fast_one_does_not() -> None:
    args = type("Args", (), {"warmup": 200, "calls": 1000, "runs": 2, "first_samples": 5})()
    assert ArqPath().calls(1000) == ArqPath.max_calls == 20
    assert ArqFastPath().calls(1000) == 1000
    assert planned_calls(ArqPath(), args) == 20 + 2 * 20 + 5  # type: ignore[arg-type]


class _NoRedis:
    """What the runner asks of Redis when every selected group is skipped."""

    def info(self, section: str) -> dict[str, Any]:
        return {"redis_version": "test"}


def test_runner_skips_every_arq_path_without_its_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(run.redis.Redis, "from_url", staticmethod(lambda *a, **k: _NoRedis()))
    monkeypatch.setattr(run, "claim_db", lambda *a: None)
    monkeypatch.setattr(run, "release_db", lambda *a: None)
    missing = tmp_path / "no-venv" / "bin" / "python"
    rc = run.main(
        [
            *("--paths", "arq,arq-fast,arq-10k", "--arq-python", str(missing)),
            *("--no-plot", "--out-dir", str(tmp_path), "--redis-url", "redis://127.0.0.1:6379/15"),
        ]
    )
    assert rc == 0
    (result,) = tmp_path.glob("*.json")
    paths = json.loads(result.read_text(encoding="utf-8"))["paths"]
    assert set(paths) == {"arq", "arq-fast", "arq-10k"}
    for summary in paths.values():
        assert summary["skipped"].startswith(f"skipped: no arq environment ({missing} does not exist")
        assert "error" not in summary
    out = capsys.readouterr().out
    assert "] arq: skipped: no arq environment" in out
    assert "] arq-fast: skipped: no arq environment" in out


def test_acall_is_compared_with_the_best_async_peer_arq_included() -> None:
    summaries = {
        "acall": {"p50_ms": 1.0},
        "taskiq-fast": {"p50_ms": 3.8},
        "arq": {"p50_ms": 501.0},
        "arq-fast": {"p50_ms": 1.7},
        "acall-10k": {"calls_per_s": 1500.0},
        "arq-10k": {"calls_per_s": 2000.0, "peak_redis_connections": 200},
    }
    comp = aio_report.comparisons(summaries)
    assert comp["acall_vs_async_peers"]["best_peer"] == "arq-fast"
    assert comp["acall_vs_async_peers"]["ratio_to_best"] == pytest.approx(1.0 / 1.7)
    assert comp["acall_10k_vs_arq_10k"]["ratio"] == pytest.approx(0.75)
    text = "\n".join(aio_report.lines(comp))
    assert "acall-10k vs arq-10k: 1500 / 2000 calls/s = 0.75x (arq-10k's connections: 200)" in text
