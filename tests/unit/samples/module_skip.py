"""Run only by tests/unit/test_skip_policy.py: a module-level importorskip."""

import pytest

pytest.importorskip("rpc_tasks_no_such_module")


def test_never_runs() -> None:
    assert 1 + 1 == 3
