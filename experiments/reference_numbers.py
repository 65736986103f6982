"""Published PyTorch numbers for LLaVA-1.5, printed beside ours in results.md and the plot.

A reimplementation is only trusted once its unpruned and pruned scores land near the published ones
on the same model and benchmark, so every entry here names the paper it comes from. Only numbers
copied from a paper's own table are listed; where a paper was not at hand, or its protocol differs
from our metric (e.g. MME totals that add the cognition score to the perception score we report),
the entry is left out rather than guessed.

Units are the papers': percent for POPE F1 and accuracies, MME points for MME perception. Our
scores are fractions in [0, 1] (MME excepted), so `to_published_units` converts them.

POPE: the LLaVA-1.5 evaluation and the pruning papers below report F1 averaged over the random,
popular and adversarial splits (`aggregate='mean_over_categories'`); `overall` in our results pools
the questions of all splits instead, so the comparison uses our per-split mean.

The testbed has no published numbers (it is this project's own procedural benchmark).
"""

from __future__ import annotations

import dataclasses
import os

UNPRUNED = "none"  # method name of the unpruned model (all image tokens kept)

OVERALL = "overall"
MEAN_OVER_CATEGORIES = "mean_over_categories"

_LLAVA15 = (
    "Liu et al. 2024, 'Improved Baselines with Visual Instruction Tuning' (LLaVA-1.5, CVPR), "
    "main results table"
)
_VISIONZIP = (
    "Yang et al. 2025, 'VisionZip: Longer is Better but Not Necessary in Vision Language "
    "Models' (CVPR), Table 1 (LLaVA-1.5-7B; FastV and SparseVLM as run by the VisionZip authors)"
)

_MMTOK = (
    "MMTok (ICLR 2026), Table 1 (LLaVA-1.5-7B, 64 tokens), as digested in the project's anchors: "
    "its FastV, SparseVLM and VisionZip rows equal VisionZip's Table 1"
)


@dataclasses.dataclass(frozen=True)
class ReferenceNumber:
    """One published score: `value` of `metric` for `method` keeping `keep` image tokens.

    keep is None for the unpruned model. aggregate says which of our numbers is comparable:
    'overall' or 'mean_over_categories' (the mean of the per-category values).
    """

    model: str
    benchmark: str
    method: str
    keep: int | None
    metric: str
    value: float
    source: str
    aggregate: str = OVERALL
    note: str = ""


def _entries(
    model: str, source: str, method: str, keep: int | None, note: str = "", **values: float
) -> list[ReferenceNumber]:
    """One ReferenceNumber per benchmark given as keyword (pope, gqa, mme, textvqa, scienceqa)."""
    metrics = {
        "pope": "f1",
        "gqa": "accuracy",
        "mme": "perception_score",
        "textvqa": "accuracy",
        "scienceqa": "accuracy",
    }
    return [
        ReferenceNumber(
            model=model,
            benchmark=benchmark,
            method=method,
            keep=keep,
            metric=metrics[benchmark],
            value=value,
            source=source,
            aggregate=MEAN_OVER_CATEGORIES if benchmark == "pope" else OVERALL,
            note=note,
        )
        for benchmark, value in values.items()
    ]


REFERENCE_NUMBERS: tuple[ReferenceNumber, ...] = tuple(
    # LLaVA-1.5 itself. Its ScienceQA number is the IMG subset with LLaVA's single-prediction prompt.
    _entries(
        "llava-1.5-7b",
        _LLAVA15,
        UNPRUNED,
        None,
        pope=85.9,
        gqa=62.0,
        mme=1510.7,
        textvqa=58.2,
        scienceqa=66.8,
    )
    + _entries(
        "llava-1.5-13b",
        _LLAVA15,
        UNPRUNED,
        None,
        pope=85.9,
        gqa=63.3,
        mme=1531.3,
        textvqa=61.3,
        scienceqa=71.6,
    )
    # VisionZip's re-run of the same unpruned model, the baseline its pruned rows are measured
    # against (its MME column, 1862, is perception + cognition, so it is not listed).
    + _entries("llava-1.5-7b", _VISIONZIP, UNPRUNED, None, pope=85.9, gqa=61.9, textvqa=58.2, scienceqa=69.5)
    + _entries("llava-1.5-7b", _VISIONZIP, "fastv", 192, pope=64.8, gqa=52.7, textvqa=52.5, scienceqa=67.3)
    + _entries("llava-1.5-7b", _VISIONZIP, "fastv", 128, pope=59.6, gqa=49.6, textvqa=50.6, scienceqa=60.2)
    + _entries("llava-1.5-7b", _VISIONZIP, "fastv", 64, pope=48.0, gqa=46.1, textvqa=47.8, scienceqa=51.1)
    + _entries(
        "llava-1.5-7b", _VISIONZIP, "sparsevlm", 192, pope=83.6, gqa=57.6, textvqa=56.1, scienceqa=69.1
    )
    + _entries(
        "llava-1.5-7b", _VISIONZIP, "sparsevlm", 128, pope=80.5, gqa=56.0, textvqa=54.9, scienceqa=67.1
    )
    + _entries("llava-1.5-7b", _VISIONZIP, "sparsevlm", 64, pope=75.1, gqa=52.7, textvqa=51.8, scienceqa=62.2)
    + _entries(
        "llava-1.5-7b", _VISIONZIP, "visionzip", 192, pope=85.3, gqa=59.3, textvqa=57.3, scienceqa=68.9
    )
    + _entries(
        "llava-1.5-7b", _VISIONZIP, "visionzip", 128, pope=83.2, gqa=57.6, textvqa=56.8, scienceqa=68.9
    )
    + _entries("llava-1.5-7b", _VISIONZIP, "visionzip", 64, pope=77.0, gqa=55.1, textvqa=55.5, scienceqa=69.0)
    # 64-token rows of the later methods (their MME column is perception + cognition, not listed).
    + _entries("llava-1.5-7b", _MMTOK, "pyramiddrop", 64, pope=55.9, gqa=47.5, textvqa=50.6, scienceqa=68.6)
    + _entries(
        "llava-1.5-7b",
        _MMTOK,
        "dart",
        64,
        note="the released budget 64 keeps 68 image tokens (dart keep=68 here)",
        pope=73.9,
        gqa=55.9,
        textvqa=54.4,
        scienceqa=69.8,
    )
)


def canonical_model_name(name: str) -> str:
    """'llava-hf/llava-1.5-7b-hf', '/ckpt/llava-v1.5-7b/' or 'LLaVA-1.5-7B' -> 'llava-1.5-7b'.

    A checkpoint directory is usually named after the hub repository it was downloaded from, so its
    base name identifies the model; the '-hf' suffix and the 'v' of the original repo names go.
    """
    base = os.path.basename(os.path.normpath(name.strip())).lower()
    if base.endswith("-hf"):
        base = base[: -len("-hf")]
    return base.replace("llava-v1.5", "llava-1.5")


def lookup(
    model_name: str | None, benchmark: str, method: str, keep: int | None = None
) -> list[ReferenceNumber]:
    """Published numbers for (model, benchmark, method, keep); keep is ignored for the unpruned model."""
    if not model_name:
        return []
    model = canonical_model_name(model_name)
    return [
        entry
        for entry in REFERENCE_NUMBERS
        if entry.model == model
        and entry.benchmark == benchmark
        and entry.method == method
        and (method == UNPRUNED or entry.keep == keep)
    ]


def for_benchmark(model_name: str | None, benchmark: str) -> list[ReferenceNumber]:
    """Every published number for this model and benchmark (all methods and budgets)."""
    if not model_name:
        return []
    model = canonical_model_name(model_name)
    return [entry for entry in REFERENCE_NUMBERS if entry.model == model and entry.benchmark == benchmark]


def to_published_units(benchmark: str, value: float) -> float:
    """Our metric value in the papers' units: fractions become percent; MME keeps its own points."""
    return value if benchmark == "mme" else 100.0 * value


def comparable_value(reference: ReferenceNumber, pair_result: dict) -> float | None:
    """Our number, in published units, computed the way `reference` was (see `aggregate`)."""
    metrics = pair_result.get("metrics", {})
    if reference.aggregate == MEAN_OVER_CATEGORIES:
        values = [
            category[reference.metric]
            for category in metrics.get("per_category", {}).values()
            if reference.metric in category
        ]
        if not values:
            return None
        value = sum(values) / len(values)
    else:
        value = metrics.get("overall", {}).get(reference.metric)
        if value is None:
            return None
    return to_published_units(reference.benchmark, value)
