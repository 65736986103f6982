"""Wilson intervals in the eval report: the formula, which metrics get one, and where they show.

The results dicts are synthetic but shaped as `experiments.evaluation.runner.run` builds them, so
results.md, results.json and the plot are exercised without a model.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re

import PIL.Image
import pytest

from experiments import reference_numbers, reporting
from experiments.reporting import pair_interval, wilson_interval

Z = 1.959963984540054
NUM_IMAGE_TOKENS, NUM_LAYERS = 576, 32


def pair(method: str, keep: int, layer: int | None, correct: int, n: int, benchmark: str, model: str) -> dict:
    """A pair result as the runner writes it, with the published numbers for (method, keep)."""
    equivalent = (
        keep if layer is None else (layer * NUM_IMAGE_TOKENS + (NUM_LAYERS - layer) * keep) / NUM_LAYERS
    )
    result = {
        "method": method,
        "keep": keep,
        "keep_requested": keep,
        "layer": layer,
        "equivalent_tokens": float(equivalent),
        "primary": correct / n if n else 0.0,
        "metrics": {
            "overall": {"accuracy": correct / n if n else 0.0, "num_scored": n, "num_missing": 0},
            "per_category": {},
            "num_scored": n,
            "num_missing": 0,
        },
        "num_scored": n,
        "num_missing": 0,
        "num_skipped": 0,
        "skipped": [],
        "timing": {"images_per_second": 3.5},
        "predictions_file": f"predictions/{method}_{keep}.jsonl",
    }
    result["published"] = [
        {**dataclasses.asdict(ref), "ours": reference_numbers.comparable_value(ref, result)}
        for ref in reference_numbers.lookup(model, benchmark, method, keep)
    ]
    return result


def synthetic_results(benchmark: str = "gqa", primary_metric: str = "accuracy", n: int = 64) -> dict:
    """Unpruned, FastV (in-LLM, layer 2) and VisionZip (before the LLM) at two budgets each."""
    model = "llava-1.5-7b"
    rows = [
        ("none", NUM_IMAGE_TOKENS, None, 40),
        ("fastv", 192, 2, 33),
        ("fastv", 64, 2, 27),
        ("visionzip", 192, 0, 38),
        ("visionzip", 64, 0, 35),
    ]
    return {
        "benchmark": benchmark,
        "primary_metric": primary_metric,
        "model_name": model,
        "checkpoint": "/checkpoints/llava-1.5-7b",
        "num_questions": n,
        "num_image_tokens": NUM_IMAGE_TOKENS,
        "num_layers": NUM_LAYERS,
        "image_grid": [24, 24],
        "settings": {"dtype": "bfloat16", "batch_size": 8, "max_new_tokens": 16, "seed": 0},
        "command": "python -m experiments.eval --benchmark=gqa",
        "pairs": {
            f"{method}_{keep}": pair(method, keep, layer, round(correct * n / 64), n, benchmark, model)
            for method, keep, layer, correct in rows
        },
    }


# --- wilson_interval --------------------------------------------------------------------------


def test_zero_and_all_successes_have_closed_forms():
    # p = 0: centre = half width = z^2 / (2(n + z^2)), so [0, z^2 / (n + z^2)]; p = 1 mirrors it.
    assert wilson_interval(0, 10) == (0.0, pytest.approx(Z**2 / (10 + Z**2)))
    assert wilson_interval(0, 10)[1] == pytest.approx(0.277533, abs=1e-6)
    assert wilson_interval(10, 10) == (pytest.approx(10 / (10 + Z**2)), 1.0)
    assert wilson_interval(10, 10)[0] == pytest.approx(0.722467, abs=1e-6)


@pytest.mark.parametrize(
    ("successes", "n", "low", "high"),
    [
        # By hand (30-digit decimals): p = 7/8, d = 1 + z^2/n = 1.4801824,
        # centre = (p + z^2/2n) / d = 0.7533472, half = z/d * sqrt(p(1-p)/n + z^2/4n^2) = 0.2242354.
        (7, 8, 0.5291118, 0.9775825),
        # centre 0.5, half = z / 1.0384146 * sqrt(0.0025 + 0.0000960) = 0.0961685.
        (50, 100, 0.4038315, 0.5961685),
        (1, 1, 0.2065493, 1.0),
        (61, 64, 0.8710035, 0.9839310),  # the '95.3 [87.1, 98.4]' of a 64-question run
    ],
)
def test_hand_computed_values(successes, n, low, high):
    assert wilson_interval(successes, n) == (pytest.approx(low, abs=1e-7), pytest.approx(high, abs=1e-7))


def test_no_interval_without_questions_and_bad_counts_are_refused():
    assert wilson_interval(0, 0) is None
    with pytest.raises(ValueError, match="successes"):
        wilson_interval(11, 10)
    with pytest.raises(ValueError, match="successes"):
        wilson_interval(-1, 10)


def test_interval_is_symmetric_inside_unit_range_and_narrows_with_n():
    low, high = wilson_interval(3, 20)
    mirror_low, mirror_high = wilson_interval(17, 20)
    assert low == pytest.approx(1 - mirror_high) and high == pytest.approx(1 - mirror_low)
    widths = []
    for n in (10, 100, 1000, 10000):
        low, high = wilson_interval(n // 5, n)
        assert 0.0 <= low < 0.2 < high <= 1.0
        widths.append(high - low)
    assert widths == sorted(widths, reverse=True)
    # Large n: the normal approximation's half width z * sqrt(p(1-p)/n).
    assert widths[-1] / 2 == pytest.approx(Z * math.sqrt(0.2 * 0.8 / 10000), rel=1e-3)


def test_z_sets_the_confidence_level():
    narrow, wide = wilson_interval(50, 100, z=1.0), wilson_interval(50, 100, z=2.575829)
    assert wide[0] < wilson_interval(50, 100)[0] < narrow[0]


# --- which metrics get an interval ------------------------------------------------------------


def test_plain_proportions_get_an_interval_over_their_denominator():
    results = synthetic_results("gqa")
    result = results["pairs"]["fastv_192"]  # 33 / 64
    assert pair_interval(results, result) == wilson_interval(33, 64)
    for benchmark in ("scienceqa", "testbed"):
        assert pair_interval(synthetic_results(benchmark), result) == wilson_interval(33, 64)


def test_testbed_counts_missing_answers_in_its_denominator():
    results = synthetic_results("testbed")
    result = results["pairs"]["fastv_192"]
    # 33 correct out of 66 counted (2 unanswered, scored wrong), 64 scored.
    result["primary"] = result["metrics"]["overall"]["accuracy"] = 33 / 66
    result["metrics"]["overall"]["count"] = 66
    assert pair_interval(results, result) == wilson_interval(33, 66)


@pytest.mark.parametrize(
    ("benchmark", "metric"),
    [("pope", "f1"), ("textvqa", "accuracy"), ("mme", "perception_score")],
)
def test_metrics_that_are_not_plain_proportions_get_none(benchmark, metric):
    results = synthetic_results(benchmark, metric)
    assert all(pair_interval(results, result) is None for result in results["pairs"].values())


def test_no_interval_for_a_value_that_is_no_whole_count_or_without_questions():
    results = synthetic_results("gqa")
    soft = dict(results["pairs"]["fastv_192"], primary=0.5123)
    assert pair_interval(results, soft) is None
    empty = synthetic_results("gqa", n=0)
    assert pair_interval(empty, empty["pairs"]["fastv_192"]) is None


# --- results.md, results.json, plot -----------------------------------------------------------


def table_rows(markdown: str) -> dict[tuple[str, int], list[str]]:
    lines = [line for line in markdown.splitlines() if line.startswith("| ")]
    rows = [[cell.strip() for cell in line.strip("|").split("|")] for line in lines[1:]]
    return {(cells[0], int(cells[1])): cells for cells in rows if cells[1].isdigit()}


def test_summary_table_prints_the_interval_beside_the_metric():
    results = synthetic_results("gqa")
    rows = table_rows(reporting.summary_table(results))
    low, high = wilson_interval(61, 64)
    assert reporting.display_with_interval(results, dict(results["pairs"]["fastv_192"], primary=61 / 64)) == (
        f"95.3 [{100 * low:.1f}, {100 * high:.1f}]"
    )
    for result in results["pairs"].values():
        cell = rows[(result["method"], result["keep"])][3]
        match = re.fullmatch(r"(\d+\.\d) \[(\d+\.\d), (\d+\.\d)\]", cell)
        assert match, cell
        value, low, high = map(float, match.groups())
        assert value == round(100 * result["primary"], 1)
        assert low <= value <= high


def test_summary_table_keeps_the_bare_metric_where_no_interval_applies():
    results = synthetic_results("pope", "f1")
    rows = table_rows(reporting.summary_table(results))
    for result in results["pairs"].values():
        assert rows[(result["method"], result["keep"])][3] == f"{100 * result['primary']:.1f}"


def test_add_intervals_adds_one_key_per_pair_and_keeps_the_rest(tmp_path):
    results = synthetic_results("gqa")
    before = json.loads(json.dumps(results))
    assert reporting.add_intervals(results) and not reporting.add_intervals(results)
    for name, result in results["pairs"].items():
        interval = result.pop("interval_95")
        assert interval == list(wilson_interval(round(result["primary"] * 64), 64))
        assert result == before["pairs"][name]
    assert {key: value for key, value in results.items() if key != "pairs"} == {
        key: value for key, value in before.items() if key != "pairs"
    }
    reporting.write_report(str(tmp_path), synthetic_results("gqa"))
    assert "95% Wilson score interval" in (tmp_path / "results.md").read_text()


def test_no_interval_where_the_metric_is_not_a_proportion():
    results = synthetic_results("pope", "f1")
    reporting.add_intervals(results)
    assert all(result["interval_95"] is None for result in results["pairs"].values())


def test_write_report_without_results_json_writes_only_the_markdown(tmp_path):
    reporting.write_report(str(tmp_path), synthetic_results("gqa"))
    assert sorted(path.name for path in tmp_path.iterdir()) == ["results.md"]


@pytest.mark.parametrize(("benchmark", "metric"), [("gqa", "accuracy"), ("pope", "f1")])
def test_plot_has_a_kept_and_an_equivalent_token_panel(tmp_path, monkeypatch, benchmark, metric):
    results = synthetic_results(benchmark, metric)
    figures = []
    savefig = reporting.plt.Figure.savefig

    def keep_figure(figure, *args, **kwargs):
        figures.append(figure)
        return savefig(figure, *args, **kwargs)

    monkeypatch.setattr(reporting.plt.Figure, "savefig", keep_figure)
    path = reporting.plot_accuracy_vs_tokens(str(tmp_path / "accuracy_vs_tokens.png"), results)
    with PIL.Image.open(path) as image:
        image.verify()
        width, height = image.size
    assert width > 1.5 * height
    (figure,) = figures
    kept_axes, equivalent_axes = figure.axes
    assert "kept" in kept_axes.get_xlabel() and "equivalent" in equivalent_axes.get_xlabel()
    # FastV at keep 64 sits at x = 64 on the left and at its equivalent tokens on the right.
    # (2 * 576 + 30 * 64) / 32 = 96 and (2 * 576 + 30 * 192) / 32 = 216. On the kept panel the
    # methods are dodged sideways by 1.2% of the span so their bars do not hide each other.
    left = {tuple(line.get_xydata()[:, 0]) for line in kept_axes.lines if len(line.get_xydata()) == 2}
    right = {tuple(line.get_xydata()[:, 0]) for line in equivalent_axes.lines}
    dodge = 0.012 * (192 - 64) / 2
    assert (64 - dodge, 192 - dodge) in left and (64 + dodge, 192 + dodge) in left
    assert (96.0, 216.0) in right and (64.0, 192.0) in right
