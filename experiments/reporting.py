"""Tables, plots and kept-token pictures of an eval run, all made from its results dict.

`experiments.eval.run` builds the results dict (the content of results.json) and calls:
  * `write_report`: results.md, one table of method x keep with the primary metric (and its 95%
    Wilson interval where the metric is a plain proportion, see `pair_interval`), the kept and
    equivalent token counts, throughput and the published PyTorch number beside ours, then the
    per-category table and the published numbers of methods this run did not evaluate;
  * `plot_accuracy_vs_tokens`: the primary metric, with interval error bars, against kept tokens
    and, in a second panel, against equivalent tokens (so in-LLM and pre-LLM pruning compare at
    equal cost); a line per method, the unpruned model as a horizontal reference, published points
    as hollow markers;
  * `experiments.overlays.write_kept_token_overlays`: the kept-token pictures.

Everything works from results.json alone (plus the prediction files and the engine for overlays),
so a report can be redrawn without rerunning the model.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence

import matplotlib

matplotlib.use("Agg")  # files only: no display on the machines this runs on
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from experiments import reference_numbers  # noqa: E402

UNPRUNED = reference_numbers.UNPRUNED
Z_95 = 1.959963984540054  # two-sided 95% standard normal quantile
INTERVAL_KEY = "interval_95"
# (benchmark, metric) whose value is correct / N with every question scored 0 or 1. Left out on
# purpose: POPE's F1 (a harmonic mean of two proportions over different denominators), TextVQA's
# accuracy (a mean of soft 0, 1/3, 2/3, 1 scores) and MME's score (summed points).
PROPORTION_METRICS = frozenset(
    {("gqa", "accuracy"), ("scienceqa", "accuracy"), ("testbed", "accuracy"), ("pope", "accuracy")}
)


def wilson_interval(successes: int, n: int, z: float = Z_95) -> tuple[float, float] | None:
    """Wilson score interval of a proportion, or None when n = 0.

    Wilson rather than the normal approximation because eval runs are often small (tens of
    questions) and accuracies near 0 or 1, where p +- z*sqrt(p(1-p)/n) collapses to zero width or
    leaves [0, 1]; Wilson's stays inside [0, 1] and keeps a sensible width at 0/n and n/n.
    """
    if n <= 0:
        return None
    if not 0 <= successes <= n:
        raise ValueError(f"successes must be in [0, {n}], got {successes}")
    p = successes / n
    z2 = z * z
    denominator = 1.0 + z2 / n
    centre = (p + z2 / (2 * n)) / denominator
    half_width = z / denominator * math.sqrt(p * (1.0 - p) / n + z2 / (4 * n * n))
    # Clamp rounding noise: at 0/n and n/n the bound is exactly 0 or 1 in exact arithmetic.
    low = 0.0 if successes == 0 else max(0.0, centre - half_width)
    high = 1.0 if successes == n else min(1.0, centre + half_width)
    return low, high


def pair_interval(results: dict, pair_result: dict) -> tuple[float, float] | None:
    """95% Wilson interval of a pair's primary metric (as a fraction), or None where none applies.

    Rule: an interval only where (benchmark, primary metric) is in PROPORTION_METRICS, i.e. the
    metric is correct / N over 0-or-1 question scores. N is the metric's own denominator: the
    overall 'count' where the scorer reports one (the testbed counts missing answers as wrong),
    else num_scored. A value that is not a whole number of successes over N (a scorer that is not
    a plain proportion after all) gets no interval rather than a wrong one.
    """
    if (results["benchmark"], results["primary_metric"]) not in PROPORTION_METRICS:
        return None
    value = pair_result.get("primary")
    overall = pair_result.get("metrics", {}).get("overall", {})
    n = overall.get("count", pair_result.get("num_scored"))
    if value is None or not n:
        return None
    successes = round(value * n)
    if abs(value * n - successes) > 1e-6 * n:
        return None
    return wilson_interval(successes, n)


def add_intervals(results: dict) -> bool:
    """Set `interval_95` ([low, high] as fractions, or None) on every pair; True if any was new."""
    changed = False
    for pair_result in results["pairs"].values():
        interval = pair_interval(results, pair_result)
        value = None if interval is None else [interval[0], interval[1]]
        if pair_result.get(INTERVAL_KEY, "unset") != value:
            pair_result[INTERVAL_KEY] = value
            changed = True
    return changed


def display_value(results: dict, value: float | None) -> str:
    """A metric in published units (percent, or MME points), or '-'."""
    if value is None:
        return "-"
    return f"{reference_numbers.to_published_units(results['benchmark'], value):.1f}"


def display_with_interval(results: dict, pair_result: dict) -> str:
    """'95.3 [87.1, 98.4]': the primary metric and its 95% interval, or the metric alone.

    One decimal in published units throughout: the interval, not the digits, shows how much N
    supports (at N = 10 it spans tens of points, at N = 10,000 about one).
    """
    text = display_value(results, pair_result["primary"])
    interval = pair_interval(results, pair_result)
    if interval is None:
        return text
    low, high = (display_value(results, bound) for bound in interval)
    return f"{text} [{low}, {high}]"


def metric_label(results: dict) -> str:
    unit = "" if results["benchmark"] == "mme" else " (%)"
    return f"{results['benchmark']} {results['primary_metric']}{unit}"


def _format_rate(timing: dict) -> str:
    rate = timing.get("images_per_second")
    return f"{rate:.2f}" if rate else "-"


def _published_cell(pair_result: dict) -> str:
    """'85.9 (ours 84.2, mean of splits) [1]' per published number; '-' when none is known."""
    cells = []
    for entry in pair_result.get("published", []):
        ours = entry.get("ours")
        how = ", mean of categories" if entry["aggregate"] == reference_numbers.MEAN_OVER_CATEGORIES else ""
        ours_text = f"ours {ours:.1f}{how}" if ours is not None else "ours -"
        cells.append(f"{entry['value']:.1f} ({ours_text}) [{_source_key(entry['source'])}]")
    return "; ".join(cells) or "-"


def _source_key(source: str) -> str:
    """A short tag for a source string: the first author's name and year ('Yang 2025')."""
    words = source.replace(",", " ").split()
    year = next((word for word in words if word.isdigit() and len(word) == 4), "")
    return f"{words[0]} {year}".strip() if words else "?"


def ordered_pairs(results: dict) -> list[tuple[str, dict]]:
    """Unpruned first, then by method (in run order) and decreasing keep."""
    pairs = list(results["pairs"].items())
    methods = list(dict.fromkeys(result["method"] for _, result in pairs))
    return sorted(
        pairs,
        key=lambda item: (item[1]["method"] != UNPRUNED, methods.index(item[1]["method"]), -item[1]["keep"]),
    )


def summary_table(results: dict) -> str:
    """The main markdown table: method x keep with the primary metric (and its 95% interval where
    one applies) and the published number."""
    lines = [
        f"| method | keep | equivalent tokens | {metric_label(results)} | published PyTorch | images/s "
        f"| scored | skipped |",
        "|---|---:|---:|---:|---|---:|---:|---:|",
    ]
    for _, result in ordered_pairs(results):
        lines.append(
            f"| {result['method']} | {result['keep']} | {result['equivalent_tokens']:.1f} "
            f"| {display_with_interval(results, result)} | {_published_cell(result)} "
            f"| {_format_rate(result.get('timing', {}))} | {result['num_scored']} | {result['num_skipped']} |"
        )
    return "\n".join(lines)


def category_table(results: dict) -> str:
    """Primary metric per category (POPE split, testbed question kind, ...) for every pair."""
    ordered = ordered_pairs(results)
    categories = list(
        dict.fromkeys(
            category for _, result in ordered for category in result["metrics"].get("per_category", {})
        )
    )
    if not categories:
        return ""
    metric = results["primary_metric"]
    lines = ["| method | keep | " + " | ".join(categories) + " |", "|---|---:|" + "---:|" * len(categories)]
    for _, result in ordered:
        per_category = result["metrics"].get("per_category", {})
        cells = [
            display_value(results, per_category.get(category, {}).get(metric)) for category in categories
        ]
        lines.append(f"| {result['method']} | {result['keep']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def other_published_table(results: dict) -> str:
    """Published numbers for this model and benchmark whose (method, keep) this run did not evaluate."""
    evaluated = {(result["method"], result["keep"]) for result in results["pairs"].values()}
    rows = [
        entry
        for entry in reference_numbers.for_benchmark(results.get("model_name"), results["benchmark"])
        if (entry.method, entry.keep) not in evaluated
        and not (entry.method == UNPRUNED and any(m == UNPRUNED for m, _ in evaluated))
    ]
    if not rows:
        return ""
    lines = ["| method | keep | metric | published | source |", "|---|---:|---|---:|---|"]
    for entry in rows:
        lines.append(
            f"| {entry.method} | {entry.keep if entry.keep is not None else 'all'} | {entry.metric} "
            f"| {entry.value:.1f} | {_source_key(entry.source)} |"
        )
    return "\n".join(lines)


def write_report(output_dir: str, results: dict) -> str:
    """Write results.md; returns its path. The intervals it prints are `add_intervals`' (the run adds
    them before it writes results.json; set here too, in place, for a results dict that lacks them)."""
    add_intervals(results)
    settings = results["settings"]
    sources = sorted(
        {
            entry.source
            for entry in reference_numbers.for_benchmark(results.get("model_name"), results["benchmark"])
        }
    )
    parts = [
        f"# {results['benchmark']} on {results['model_name']}",
        "",
        f"{results['num_questions']} questions; {'up to ' if results.get('image_tokens_vary') else ''}"
        f"{results['num_image_tokens']} image tokens per image, "
        f"{results['num_layers']} LLM layers; dtype {settings['dtype']}, batch {settings['batch_size']}, "
        f"max_new_tokens {settings['max_new_tokens']}, seed {settings['seed']}.",
        "",
        "Command: `" + (results.get("command") or f"run({_settings_text(settings)})") + "`",
        "",
        "keep = image tokens the LLM keeps from the pruning layer on; equivalent tokens = "
        "(K * N + (L - K) * keep) / L, the per-layer average that makes in-LLM pruning comparable "
        "with pruning before the LLM. images/s excludes the first batch (jit compilation); "
        "skipped = questions left out of the metrics: no readable image, or a prompt that does not fit "
        "(reasons in results.json).",
    ]
    if any(pair_interval(results, result) for result in results["pairs"].values()):
        parts += [
            "",
            "[low, high] beside the metric: 95% Wilson score interval over the question count "
            "(`interval_95` in results.json); given only where the metric is a plain proportion.",
        ]
    parts += [
        "",
        summary_table(results),
    ]
    category = category_table(results)
    if category:
        parts += ["", f"## {results['primary_metric']} per category", "", category]
    other = other_published_table(results)
    if other:
        parts += ["", "## Published numbers for settings not evaluated here", "", other]
    if sources:
        parts += ["", "## Sources", ""] + [f"- [{_source_key(source)}] {source}" for source in sources]
        if any(
            entry.aggregate == reference_numbers.MEAN_OVER_CATEGORIES
            for entry in reference_numbers.for_benchmark(results.get("model_name"), results["benchmark"])
        ):
            parts += [
                "",
                "Published numbers marked 'mean of categories' average the per-category values "
                "(POPE: the random / popular / adversarial splits); `ours` beside them is computed "
                "the same way, while the main column pools all questions.",
            ]
    path = os.path.join(output_dir, "results.md")
    with open(path, "w") as file:
        file.write("\n".join(parts).rstrip() + "\n")
    return path


def _settings_text(settings: dict) -> str:
    return ", ".join(f"{key}={value!r}" for key, value in settings.items() if value is not None)


def _error_bars(results: dict, method_results: Sequence[dict], scale: float) -> np.ndarray:
    """(2, n) below / above distances of each pair's 95% interval, in plotted units (0 if none)."""
    bars = np.zeros((2, len(method_results)))
    for index, result in enumerate(method_results):
        interval = pair_interval(results, result)
        if interval is not None:
            bars[:, index] = (
                scale * (result["primary"] - interval[0]),
                scale * (interval[1] - result["primary"]),
            )
    return bars


# Eleven and more methods outrun matplotlib's ten-colour cycle: each method gets its own colour
# (tab20's dark shades, then its light ones) and marker, so no two lines look alike.
_METHOD_MARKERS = ("o", "s", "^", "D", "v", "P", "X")


def _method_colour(index: int):
    return plt.get_cmap("tab20")(2 * (index % 10) + (index // 10) % 2)


def _draw_metric_panel(axes, results: dict, x_key: str, with_legend: bool) -> None:
    """One panel: the primary metric against `x_key` ('keep' or 'equivalent_tokens') per method,
    with interval error bars, unpruned as a dashed line over its interval band, published hollow."""
    by_method: dict[str, list[dict]] = {}
    for result in results["pairs"].values():
        by_method.setdefault(result["method"], []).append(result)
    scale = reference_numbers.to_published_units(results["benchmark"], 1.0)
    colours, offsets = {}, {}
    pruned_methods = [method for method in by_method if method != UNPRUNED]
    xs = [r[x_key] for r in results["pairs"].values() if r["method"] != UNPRUNED]
    # Methods share the kept-token budgets, so their bars would hide each other: shift each method
    # sideways by a small fraction of the axis span (kept panel only; equivalent tokens differ).
    step = 0.012 * (max(xs) - min(xs)) if x_key == "keep" and len(xs) > 1 else 0.0
    for method_index, method in enumerate(pruned_methods):
        offset = offsets[method] = step * (method_index - (len(pruned_methods) - 1) / 2)
        method_results = sorted(by_method[method], key=lambda result: result[x_key])
        container = axes.errorbar(
            [r[x_key] + offset for r in method_results],
            [scale * r["primary"] for r in method_results],
            yerr=_error_bars(results, method_results, scale),
            marker=_METHOD_MARKERS[method_index % len(_METHOD_MARKERS)],
            color=_method_colour(method_index),
            capsize=3,
            label=method,
        )
        colours[method] = container.lines[0].get_color()
    for result in by_method.get(UNPRUNED, []):
        axes.axhline(
            scale * result["primary"],
            color="black",
            linestyle="--",
            label=f"unpruned ({result['keep']} tokens)",
        )
        interval = pair_interval(results, result)
        if interval is not None:
            axes.axhspan(
                scale * interval[0],
                scale * interval[1],
                color="black",
                alpha=0.08,
                linewidth=0,
                label="unpruned 95% interval",
            )
    # Published points for the methods and budgets evaluated here, in the same colour.
    for result in results["pairs"].values():
        for entry in result.get("published", []):
            if result["method"] == UNPRUNED:
                axes.axhline(entry["value"], color="grey", linestyle=":", linewidth=1)
            else:
                axes.plot(
                    [result[x_key] + offsets.get(result["method"], 0.0)],
                    [entry["value"]],
                    marker="o",
                    markerfacecolor="none",
                    color=colours.get(result["method"], "grey"),
                    linestyle="none",
                )
    if with_legend and any(result.get("published") for result in results["pairs"].values()):
        axes.plot(
            [],
            [],
            marker="o",
            markerfacecolor="none",
            color="grey",
            linestyle="none",
            label="published PyTorch",
        )
    if x_key == "keep":
        keeps = sorted({r["keep"] for r in results["pairs"].values() if r["method"] != UNPRUNED})
        if keeps:
            axes.set_xticks(keeps)
    axes.grid(alpha=0.3)
    if with_legend:
        axes.legend(fontsize="small")


def plot_accuracy_vs_tokens(path: str, results: dict) -> str:
    """Primary metric vs kept tokens (left) and vs equivalent tokens (right), error bars from the
    95% intervals. The right panel exists because kept tokens flatter in-LLM pruning: a method
    that prunes at layer K still runs every image token through the first K layers, so only the
    equivalent-token axis compares it fairly with pruning before the LLM."""
    figure, (kept_axes, equivalent_axes) = plt.subplots(1, 2, figsize=(12, 4.5), sharey=True)
    _draw_metric_panel(kept_axes, results, "keep", with_legend=True)
    _draw_metric_panel(equivalent_axes, results, "equivalent_tokens", with_legend=False)
    kept_axes.set_xlabel("image tokens kept")
    kept_axes.set_ylabel(metric_label(results))
    kept_axes.set_title("vs tokens kept", fontsize="medium")
    equivalent_axes.set_xlabel("equivalent tokens ((K * N + (L - K) * keep) / L)")
    equivalent_axes.set_title("vs equivalent tokens (equal cost)", fontsize="medium")
    equivalent_axes.tick_params(labelleft=True)
    has_intervals = any(pair_interval(results, r) for r in results["pairs"].values())
    figure.suptitle(
        f"{results['benchmark']} on {results['model_name']}: {results['primary_metric']} vs tokens"
        + (" (bars: 95% Wilson interval)" if has_intervals else "")
    )
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return path


def load_results(output_dir: str) -> dict:
    with open(os.path.join(output_dir, "results.json")) as file:
        return json.load(file)


__all__ = [
    "add_intervals",
    "category_table",
    "display_with_interval",
    "ordered_pairs",
    "load_results",
    "other_published_table",
    "pair_interval",
    "plot_accuracy_vs_tokens",
    "summary_table",
    "wilson_interval",
    "write_report",
]
