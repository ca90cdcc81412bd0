"""tests/check_assertions.py: flags test functions that assert nothing, with file:line."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from tests import check_assertions

ROOT = Path(__file__).resolve().parents[2]


def _write(tmp_path: Path, body: str, name: str = "test_sample.py") -> Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(body))
    return path


def test_a_test_without_an_assertion_is_reported_with_file_and_line(tmp_path: Path) -> None:
    path = _write(
        tmp_path,
        """
        import time

        def test_fine():
            assert 1 + 1 == 2

        def test_sleeps_and_checks_nothing():
            time.sleep(0)

        class TestGroup:
            def test_method_without_assert(self):
                pass
        """,
    )
    problems = check_assertions.check_file(path)
    assert [p.split(": ")[0] for p in problems] == [f"{path}:7", f"{path}:11"]
    assert "test_sleeps_and_checks_nothing has no assertion" in problems[0]
    assert check_assertions.main([str(tmp_path)]) == 1


@pytest.mark.parametrize(
    "body",
    [
        "assert x",
        "with pytest.raises(ValueError):\n        int('x')",
        "pytest.raises(ValueError, int, 'x')",
        "with pytest.warns(UserWarning):\n        pass",
        "pytest.fail('never')",
        "assert_equal(1, 1)",
        "self_check = _check_decode(b'')",
        "expect_frame(ws)",
        "helpers.check_no_reply(key)",
        "self.assertEqual(1, 1)",
        "async def scenario():\n        assert x\n    asyncio.run(scenario())",
        "async def scenario():\n        assert x\n    run(scenario)",
    ],
)
def test_each_kind_of_check_counts(tmp_path: Path, body: str) -> None:
    path = _write(tmp_path, f"def test_it():\n    x = 1\n    {body}\n")
    assert check_assertions.check_file(path) == []


def test_asserts_that_do_not_run_in_the_test_do_not_count(tmp_path: Path) -> None:
    """An assert inside a thread target (or a lambda, or an uncalled helper) fails that thread,
    not the test; a library function named check_* is not a test helper."""
    path = _write(
        tmp_path,
        """
        import threading
        from rpc_tasks import check_broker

        def test_assert_only_in_a_thread():
            def target():
                assert False
            threading.Thread(target=target).start()

        def test_library_check_is_not_an_assertion():
            check_broker(None)

        def test_assert_only_in_a_pool_or_a_thread_positionally(pool):
            def job():
                assert False
            pool.submit(job)
            threading.Thread(None, job).start()
        """,
    )
    problems = check_assertions.check_file(path)
    assert [p.split(": ")[0] for p in problems] == [f"{path}:5", f"{path}:10", f"{path}:13"]


def test_allow_marker_needs_a_reason(tmp_path: Path) -> None:
    path = _write(
        tmp_path,
        """
        import pytest

        # no-assert-ok: only checks that importing the plugin does not raise
        @pytest.mark.slow
        def test_marked_above_decorators():
            pass

        def test_marked_on_def_line():  # no-assert-ok: smoke test of the CLI entry point
            pass

        def test_marker_without_reason():  # no-assert-ok:
            pass
        """,
    )
    problems = check_assertions.check_file(path)
    assert len(problems) == 1
    assert problems[0].startswith(f"{path}:12: test_marker_without_reason")
    assert "needs a reason" in problems[0]


def test_the_suite_itself_passes_and_the_script_runs_standalone(tmp_path: Path) -> None:
    ok = subprocess.run(
        [sys.executable, "tests/check_assertions.py", "tests"], cwd=ROOT, capture_output=True, text=True
    )
    assert ok.returncode == 0, ok.stdout + ok.stderr
    bad = _write(tmp_path, "def test_nothing():\n    pass\n")
    failed = subprocess.run(
        [sys.executable, str(ROOT / "tests/check_assertions.py"), str(bad)], capture_output=True, text=True
    )
    assert failed.returncode == 1
    assert f"{bad}:1: test_nothing has no assertion" in failed.stdout
