"""Run only by tests/unit/test_skip_policy.py (the name keeps it out of normal collection)."""

import pytest


def test_service_missing() -> None:
    pytest.skip("Example service is not reachable")


def test_not_for_this_platform() -> None:
    pytest.skip("[not-a-service] only on another platform")


@pytest.mark.xfail(strict=True, reason="a known bug")
def test_known_bug() -> None:
    assert 1 + 1 == 3
