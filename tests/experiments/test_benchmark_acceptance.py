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
