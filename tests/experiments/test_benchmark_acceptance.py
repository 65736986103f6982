"""The acceptance targets are judged only on the run they were set for (LLaVA-1.5-7B on a GPU)."""

from __future__ import annotations

from experiments.benchmark import acceptance
from experiments.benchmark.report import acceptance_tag


def fast_rows():
    """Unpruned and AdaptPrune@64 rows at batch 1 whose TTFT speedup (3x) passes its target."""
    common = dict(framework="jax", batch=1, status="ok", decode_ms_per_token=1.0, llm_prefill_ms=1.0)
    return [
        dict(common, method="none", keep=0, ttft_ms=30.0, prompt_tokens=600),
        dict(common, method=acceptance.ACCEPT_METHOD, keep=acceptance.ACCEPT_KEEP, ttft_ms=10.0),
    ]


def ttft_b1(checks):
    return next(
        check for check in checks if check["name"].startswith("TTFT speedup") and "b1" in check["name"]
    )


def test_the_target_run_is_judged():
    checks = acceptance.acceptance(fast_rows(), [], (acceptance.TARGET_MODEL, acceptance.TARGET_PLATFORM))
    assert ttft_b1(checks)["pass"] is True and acceptance_tag(ttft_b1(checks)) == "PASS"


def test_a_cpu_or_other_model_run_is_listed_but_not_judged():
    for run_on in (("tiny", "cpu"), (acceptance.TARGET_MODEL, "cpu"), ("llava-1.5-13b", "gpu")):
        checks = acceptance.acceptance(fast_rows(), [], run_on)
        assert len(checks) == len(acceptance.TARGETS)
        assert all(check["pass"] is None for check in checks)
        check = ttft_b1(checks)
        assert check["value"] == 3.0  # still reported
        assert (
            acceptance_tag(check) == "n/a " and f"this run is {run_on[0]} on {run_on[1]}" in check["detail"]
        )


def throughput_rows(vs_transformers, vs_unpruned):
    """The pruned row at the throughput targets' batch, with its speedups already added."""
    return [
        dict(
            framework="jax",
            method=acceptance.ACCEPT_METHOD,
            keep=acceptance.ACCEPT_KEEP,
            batch=acceptance.THROUGHPUT_BATCH,
            status="ok",
            speedup_vs_transformers=vs_transformers,
            speedup_vs_unpruned=vs_unpruned,
        )
    ]


def test_throughput_targets_pass_fail_and_not_measured():
    target_run = (acceptance.TARGET_MODEL, acceptance.TARGET_PLATFORM)
    targets = acceptance.THROUGHPUT_TARGETS
    passing = acceptance.throughput_acceptance(
        throughput_rows(targets["vs_transformers"], targets["vs_unpruned"] + 0.5), target_run
    )
    assert [check["pass"] for check in passing] == [True, True]
    assert "transformers b1" in passing[0]["name"] and "JAX unpruned b128" in passing[1]["name"]
    failing = acceptance.throughput_acceptance(throughput_rows(19.9, 2.9), target_run)
    assert [check["pass"] for check in failing] == [False, False]
    assert "FAIL (gap -0.100x)" in failing[0]["detail"]
    missing = acceptance.throughput_acceptance(throughput_rows(None, 4.0), target_run)
    assert missing[0]["pass"] is None and acceptance_tag(missing[0]) == "n/a "
    assert acceptance.throughput_acceptance([], target_run)[1]["value"] is None


def test_throughput_targets_are_not_judged_on_a_cpu_or_another_model():
    for run_on in (("tiny", "cpu"), (acceptance.TARGET_MODEL, "cpu")):
        checks = acceptance.throughput_acceptance(throughput_rows(30.0, 4.0), run_on)
        assert [check["pass"] for check in checks] == [None, None]
        assert [check["value"] for check in checks] == [30.0, 4.0]  # still reported
        assert all(acceptance_tag(check) == "n/a " for check in checks)
