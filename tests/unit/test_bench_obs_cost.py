"""benchmarks.obs_cost: its arguments and how it sums up rounds (the runs themselves need real
workers: `make bench-obs`)."""

from __future__ import annotations

import pytest

from benchmarks import obs_cost


def test_ratios_are_the_median_of_each_rounds_ratio_to_its_own_baseline() -> None:
    rounds = [
        {"obs-base": [1.0, 1.0, 3.0], "call-metrics": [1.1, 1.1, 0.1]},  # run medians: 1.0 / 1.1
        {"obs-base": [2.0], "call-metrics": [2.0]},
        {"obs-base": [1.0], "call-metrics": [1.02]},
    ]
    row = obs_cost.summarize(rounds, ["call-metrics"])["call-metrics"]
    expected = {"median": 1.02, "low": 1.0, "high": 1.1}
    assert {k: row[k] for k in expected} == pytest.approx(expected)
    # The bootstrap interval of the median lies within the rounds' range, around the median.
    assert 1.0 <= row["ci_low"] <= row["median"] <= row["ci_high"] <= 1.1
    assert obs_cost.summarize(rounds, ["call-metrics"])["call-metrics"] == row  # seeded


def test_cpu_per_call_is_the_median_over_every_run() -> None:
    cpu = [
        {"obs-base": [{"client": 1.0, "worker": 10.0}, {"client": 3.0, "worker": 30.0}]},
        {"obs-base": [{"client": 2.0, "worker": 20.0}]},
    ]
    assert obs_cost.cpu_per_call(cpu, ["obs-base"]) == {"obs-base": {"client": 2.0, "worker": 20.0}}


def test_paths_default_to_every_observability_path_and_unknown_ones_are_refused(
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert obs_cost.parse_args([]).paths == list(obs_cost.OBS_PATHS)
    assert obs_cost.parse_args(["--paths", "call-metrics"]).paths == ["call-metrics"]
    with pytest.raises(SystemExit):
        obs_cost.parse_args(["--paths", "call-metrics,call"])
    assert "unknown path(s) ['call']" in capsys.readouterr().err
    assert set(obs_cost.GOALS) == set(obs_cost.OBS_PATHS)
