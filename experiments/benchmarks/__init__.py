"""Benchmark readers and metrics for the LLaVA-1.5 evaluation suite, on the files researchers
already have (LLaVA's eval layout: a question JSONL plus an image folder).

Pruning results are only comparable with published ones if the prompts, answer parsing and
metrics are exactly the ones LLaVA-1.5 used, so each module follows the official evaluation code
it cites, quirks included, and documents every place it deliberately differs.

Usage (what experiments/eval.py does)::

    benchmark = get_benchmark("pope")
    questions = benchmark.load_questions("/work/shared/data/pope")        # list[Question]
    # generate benchmark.max_new_tokens tokens for each question.prompt + image, store text
    report = benchmark.score(questions, {question_id: text, ...})
    report["overall"][benchmark.primary_metric]

Every `score` returns {'overall': metrics, 'per_category': {category: metrics}, 'num_scored',
'num_missing'}; each metrics dict also has its own num_scored / num_missing. Units: fractions in
[0, 1], except MME, which keeps MME's percent-based acc / acc_plus and 0..200 subtask scores.

| name      | categories                  | primary_metric   | module       |
|-----------|-----------------------------|------------------|--------------|
| pope      | random/popular/adversarial  | f1               | pope.py      |
| mme       | the 14 MME subtasks         | perception_score | mme.py       |
| gqa       | optional 'category' field   | accuracy         | gqa.py       |
| textvqa   | optional 'category' field   | accuracy         | textvqa.py   |
| scienceqa | optional 'category' field   | accuracy         | scienceqa.py |

`experiments.benchmarks.io` holds the crash-safe prediction file helpers.

The procedural testbed (`testbed.TestbedBenchmark`, name 'testbed') is also served by
`get_benchmark`, but kept out of `BENCHMARKS`: that dict holds the benchmarks that follow LLaVA's
question-file conventions (checked together by tests/experiments/test_benchmarks_registry.py); the
testbed's own split layout is registered in `OWN_BENCHMARKS`.
"""

from __future__ import annotations

from experiments.benchmarks.base import Benchmark, Question
from experiments.benchmarks.gqa import GqaBenchmark
from experiments.benchmarks.mme import MmeBenchmark
from experiments.benchmarks.pope import PopeBenchmark
from experiments.benchmarks.scienceqa import ScienceQaBenchmark
from experiments.benchmarks.testbed import TestbedBenchmark
from experiments.benchmarks.textvqa import TextVqaBenchmark

BENCHMARKS: dict[str, Benchmark] = {
    benchmark.name: benchmark
    for benchmark in (
        PopeBenchmark(),
        MmeBenchmark(),
        GqaBenchmark(),
        TextVqaBenchmark(),
        ScienceQaBenchmark(),
    )
}


# Benchmarks of this project's own making (their files follow their own layout, not LLaVA's).
OWN_BENCHMARKS: dict[str, Benchmark] = {benchmark.name: benchmark for benchmark in (TestbedBenchmark(),)}


def benchmark_names() -> list[str]:
    """Every name `get_benchmark` accepts, sorted."""
    return sorted({*BENCHMARKS, *OWN_BENCHMARKS})


def get_benchmark(name: str) -> Benchmark:
    """The benchmark registered under `name` (case-insensitive)."""
    key = name.strip().lower()
    if key in BENCHMARKS:
        return BENCHMARKS[key]
    if key in OWN_BENCHMARKS:
        return OWN_BENCHMARKS[key]
    raise ValueError(f"unknown benchmark {name!r}; known: {', '.join(benchmark_names())}")


__all__ = ["BENCHMARKS", "OWN_BENCHMARKS", "Benchmark", "Question", "benchmark_names", "get_benchmark"]
