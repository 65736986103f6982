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


def test_a_speedup_verdict_says_what_the_floors_allow():
    rows = fast_rows()
    rows[0]["floors"], rows[1]["floors"] = {"ttft_ms": 12.0}, {"ttft_ms": 4.8}
    checks = acceptance.acceptance(rows, [], (acceptance.TARGET_MODEL, acceptance.TARGET_PLATFORM))
    assert ttft_b1(checks)["detail"].endswith("; at the floors 2.50x"), ttft_b1(checks)
    assert "at the floors" not in ttft_b1(acceptance.acceptance(fast_rows(), [], None))["detail"]


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


def test_rows_on_several_devices_are_not_judged():
    target_run = (acceptance.TARGET_MODEL, acceptance.TARGET_PLATFORM)
    on_two = [dict(row, mesh="data:1,model:2", devices=2) for row in fast_rows()]
    assert ttft_b1(acceptance.acceptance(on_two, [], target_run))["value"] is None
    slower_on_one = [
        dict(row, mesh="data:1,model:1", devices=1, ttft_ms=2 * row["ttft_ms"]) for row in fast_rows()
    ]
    on_two[1]["ttft_ms"] = 1.0  # a 30x speedup on two devices must not count
    assert ttft_b1(acceptance.acceptance(on_two + slower_on_one, [], target_run))["value"] == 3.0
    pruned_on_two = dict(throughput_rows(30.0, 4.0)[0], devices=2)
    assert acceptance.throughput_acceptance([pruned_on_two], target_run)[0]["value"] is None


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


def test_an_anyres_run_is_judged_against_the_llava_next_targets():
    """AdaptPrune passes (4x faster first token, 0.5 ms selection), FastV fails (2x, 1.5 ms), the
    unpruned prefill is at 1.2x its FLOP floor; the same rows on the CPU are listed but not judged."""
    common = dict(framework="jax", batch=1, status="ok", anyres=True)
    base = dict(common, method="none", keep=0, ttft_ms=40.0, llm_prefill_ms=12.0, prompt_tokens=2992)
    base["floors"] = {"llm_prefill_flop_ms": 10.0}
    keep = acceptance.NEXT_KEEP
    rows = [
        base,
        dict(common, method="adaptprune", keep=keep, ttft_ms=10.0, selection_overhead_ms=0.5),
        dict(common, method="fastv", keep=keep, ttft_ms=20.0, selection_overhead_ms=1.5),
    ]
    checks = {c["name"]: c for c in acceptance.acceptance(rows, [], ("llava-v1.6-vicuna-7b", "gpu"))}
    assert checks["unpruned LLM prefill b1 (2992 tokens) / FLOP floor"]["pass"] is True
    assert checks[f"first token speedup adaptprune@{keep} b1"]["value"] == 4.0
    assert checks[f"first token speedup adaptprune@{keep} b1"]["pass"] is True
    assert checks[f"selection overhead adaptprune@{keep} b1"]["pass"] is True
    assert checks[f"first token speedup fastv@{keep} b1"]["pass"] is False
    assert checks[f"selection overhead fastv@{keep} b1"]["pass"] is False
    assert not any("@64" in name for name in checks)  # LLaVA-1.5's targets are not this run's
    on_cpu = acceptance.acceptance(rows, [], ("tiny-next", "cpu"))
    assert [c["name"] for c in on_cpu] == list(checks) and all(c["pass"] is None for c in on_cpu)
    assert "llava-v1.6-vicuna-7b / llava-v1.6-mistral-7b on a gpu" in on_cpu[0]["detail"]
