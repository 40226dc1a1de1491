"""The numbers behind notebook 03's β table and reward-hacking section (labkit.evaluate, labkit.report)."""

import math

import pytest

from labkit import evaluate, report


def test_length_fit_recovers_a_line_and_its_correlation():
    lengths = [1.0, 2.0, 3.0, 4.0]
    fit = evaluate.length_fit(lengths, [2 * x + 1 for x in lengths])
    assert fit["slope"] == pytest.approx(2.0) and fit["intercept"] == pytest.approx(1.0)
    assert fit["r"] == pytest.approx(1.0) and fit["slope_se"] == pytest.approx(0.0, abs=1e-12)
    # hand-computed: x = (0, 1, 2), y = (0, 2, 1): slope 0.5, intercept 0.5, residuals (-0.5, 1, -0.5)
    fit = evaluate.length_fit([0, 1, 2], [0, 2, 1])
    assert fit["slope"] == pytest.approx(0.5) and fit["intercept"] == pytest.approx(0.5)
    assert fit["slope_se"] == pytest.approx(math.sqrt(1.5 / 1 / 2))
    assert fit["r"] == pytest.approx(0.5)
    with pytest.raises(ValueError, match="same length"):
        evaluate.length_fit([3, 3, 3], [0, 1, 2])
    with pytest.raises(ValueError, match="at least 3"):
        evaluate.length_fit([1, 2], [0, 1])


def test_compare_runs_says_when_a_difference_is_beyond_the_noise():
    def history(values):
        return {"objective/kl": [[i + 1, v] for i, v in enumerate(values)]}

    quiet, far, near = history([9, 9, 1.0, 1.2, 0.8]), history([5.0, 5.2, 4.8]), history([1.1, 0.7, 1.3])
    assert evaluate.tail_stats(quiet, "objective/kl", 3) == pytest.approx({"mean": 1.0, "se": 0.2 / math.sqrt(3), "steps": 3})
    (row,) = evaluate.compare_runs({"a": quiet, "b": far}, ["objective/kl"], last=3)
    assert row["a"] == pytest.approx(1.0) and row["b"] == pytest.approx(5.0) and row["difference"] == pytest.approx(4.0)
    assert row["beyond 2 SE"] == "yes"
    assert evaluate.compare_runs({"a": quiet, "b": near}, ["objective/kl"], last=3)[0]["beyond 2 SE"] == "no"
    assert evaluate.compare_runs({"a": quiet, "b": far}, ["objective/kl"], last=1)[0]["beyond 2 SE"] == "unknown"


def test_reward_hacking_and_length_figures_draw_every_run_and_the_fit():
    histories = {"beta=0": {"objective/scores": [[1, 0.1], [2, 0.5]], "response/length": [[1, 10], [2, 30]]},
                 "beta=0.5": {"objective/scores": [[1, 0.1], [2, 0.2]], "response/length": [[1, 10], [2, 12]]}}
    fig = report.reward_hacking_figure(histories, {"objective/scores": "reward", "response/length": "length"}, "t")
    assert len(fig.data) == 4 and sum(t.showlegend for t in fig.data) == 2
    fit = evaluate.length_fit([1, 2, 3], [0.0, 1.0, 2.0])
    fig = report.length_figure({"SFT": ([1, 2], [0.0, 1.0]), "PPO": ([3], [2.0])}, fit, "t")
    assert len(fig.data) == 3 and list(fig.data[-1].y) == pytest.approx([0.0, 2.0])


def test_length_preference_names_the_side_only_beyond_the_noise():
    assert evaluate.length_preference({"slope": 0.1, "slope_se": 0.01}) == "it pays more for longer answers"
    assert evaluate.length_preference({"slope": -0.1, "slope_se": 0.01}) == "it pays more for shorter answers"
    assert evaluate.length_preference({"slope": 0.1, "slope_se": 0.1}).startswith("no length preference")
