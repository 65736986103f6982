"""The acceptance targets, each judged from the rows and searches of a run: pass, fail, or n/a."""

from __future__ import annotations

# The pruned configuration the targets are about, and the targets (ratios, fractions, milliseconds).
ACCEPT_METHOD, ACCEPT_KEEP = "adaptprune", 64
TARGETS = dict(
    decode_vs_weight_floor=1.4,
    prefill_vs_flop_floor=1.3,
    vision_ms_b1=2.3,
    ttft_speedup_b1=2.2,
    ttft_speedup_b16=3.5,
    memory_saving_b64=0.40,
    max_batch_ratio=2.0,
    selection_overhead_ms=0.25,
)
# What the targets were set for: a run of another model or on another platform is not judged.
TARGET_MODEL, TARGET_PLATFORM = "llava-1.5-7b", "gpu"
# LLaVA-NeXT's targets (a run whose JAX rows are anyres, e.g. at --image_size=672x672, 2,928 image
# tokens): each method keeping NEXT_KEEP at batch 1 against the unpruned row, judged on these models on
# a GPU.
NEXT_METHODS, NEXT_KEEP = ("adaptprune", "fastv"), 320
NEXT_TARGETS = dict(ttft_speedup_b1=3.5, selection_overhead_ms=1.0, prefill_vs_flop_floor=1.3)
NEXT_TARGET_MODELS = ("llava-v1.6-vicuna-7b", "llava-v1.6-mistral-7b")
# The targets are one device's: rows on a mesh of several devices (--mesh) are not judged.


def on_one_device(row: dict) -> bool:
    """A row run on one device: without a mesh, or on a mesh of one device."""
    return row.get("devices", 1) == 1


# Throughput mode's targets: questions per second of the pruned configuration at THROUGHPUT_BATCH
# against transformers answering one question at a time, and against unpruned JAX at that batch.
THROUGHPUT_BATCH, TORCH_REFERENCE_BATCH = 128, 1
THROUGHPUT_TARGETS = dict(vs_transformers=20.0, vs_unpruned=3.0)


def acceptance(rows: list[dict], searches: list[dict], run_on: tuple[str, str] | None = None) -> list[dict]:
    """The targets, each with its value, pass/fail and the gap; n/a when not measured here.

    `run_on` = (model, platform) of the run: the targets are about LLaVA-1.5-7B on a GPU, so any other
    (the CPU smoke run of the tiny preset) gets every target listed as not judged, never a FAIL. A
    LLaVA-NeXT run (its rows anyres) is judged against the LLaVA-NeXT targets instead.
    """
    if any(r.get("anyres") for r in rows) or (run_on is not None and run_on[0] in NEXT_TARGET_MODELS):
        return _on_the_target_run(_judge_next(rows), run_on, NEXT_TARGET_MODELS)
    return _on_the_target_run(_judge(rows, searches), run_on)


def throughput_acceptance(rows: list[dict], run_on: tuple[str, str] | None = None) -> list[dict]:
    """Throughput mode's targets, from the speedups of the pruned row at THROUGHPUT_BATCH
    (`experiments.benchmark.throughput.add_speedups`), judged only on LLaVA-1.5-7B on a GPU."""
    key = ("jax", ACCEPT_METHOD, ACCEPT_KEEP, THROUGHPUT_BATCH, "ok")
    row = next(
        (
            r
            for r in rows
            if (r["framework"], r["method"], r["keep"], r["batch"], r["status"]) == key and on_one_device(r)
        ),
        {},
    )
    name = f"questions/s {ACCEPT_METHOD}@{ACCEPT_KEEP} b{THROUGHPUT_BATCH}"
    checks = [
        _verdict(
            f"{name} / transformers b{TORCH_REFERENCE_BATCH}",
            row.get("speedup_vs_transformers"),
            THROUGHPUT_TARGETS["vs_transformers"],
            False,
            "x",
        ),
        _verdict(
            f"{name} / JAX unpruned b{THROUGHPUT_BATCH}",
            row.get("speedup_vs_unpruned"),
            THROUGHPUT_TARGETS["vs_unpruned"],
            False,
            "x",
        ),
    ]
    return _on_the_target_run(checks, run_on)


def _on_the_target_run(
    checks: list[dict], run_on: tuple[str, str] | None, models: tuple[str, ...] = (TARGET_MODEL,)
) -> list[dict]:
    """The checks as judged, or, for a run of another model or platform, listed but not judged."""
    if run_on is not None and (run_on[0] not in models or run_on[1] != TARGET_PLATFORM):
        model, platform = run_on
        reason = (
            f"not judged: the targets are for {' / '.join(models)} on a {TARGET_PLATFORM}, "
            f"this run is {model} on {platform}"
        )
        return [{**check, "pass": None, "judged": False, "detail": reason} for check in checks]
    return checks


def _verdict(name, value, target, at_most, unit="", note="", decided=True) -> dict:
    """One target's check: its value against the target (at most or at least), pass / fail / None
    (not measured, or measured but undecided) and the gap."""
    if value is None:
        return {
            "name": name,
            "value": None,
            "target": target,
            "pass": None,
            "detail": "n/a (not measured in this run)",
        }
    ok = (value <= target if at_most else value >= target) if decided else None
    verdict = {True: "PASS", False: "FAIL", None: "INCONCLUSIVE"}[ok]
    return {
        "name": name,
        "value": value,
        "target": target,
        "pass": ok,
        "detail": f"{value:.3f}{unit} {'<=' if at_most else '>='} {target}{unit}: {verdict} "
        f"(gap {value - target:+.3f}{unit}){note}",
    }


def _floor_speedup_note(base: dict | None, pruned: dict | None) -> str:
    """What the floors allow a first-token speedup to be (the unpruned row's first-token floor over the
    pruned row's, selection not counted): a target above it cannot be met by faster kernels alone."""
    base_floor = base and base.get("floors", {}).get("ttft_ms")
    pruned_floor = pruned and pruned.get("floors", {}).get("ttft_ms")
    if not base_floor or not pruned_floor:
        return ""
    return f"; at the floors {base_floor / pruned_floor:.2f}x"


def _jax_row(rows: list[dict], method: str, keep: int, batch: int) -> dict | None:
    """The measured JAX row of a configuration on one device, if the run has one."""
    return next(
        (
            r
            for r in rows
            if r["framework"] == "jax"
            and r["method"] == method
            and r["keep"] == keep
            and r["batch"] == batch
            and r["status"] == "ok"
            and on_one_device(r)
        ),
        None,
    )


def _judge_next(rows: list[dict]) -> list[dict]:
    """LLaVA-NeXT's targets: the unpruned prefill against its FLOP floor, and each of NEXT_METHODS at
    NEXT_KEEP, batch 1: its first-token speedup and its selection overhead."""
    base = _jax_row(rows, "none", 0, 1)
    flop_floor = base and base.get("floors", {}).get("llm_prefill_flop_ms")
    checks = [
        _verdict(
            f"unpruned LLM prefill b1 ({base['prompt_tokens'] if base else '?'} tokens) / FLOP floor",
            base["llm_prefill_ms"] / flop_floor if flop_floor else None,
            NEXT_TARGETS["prefill_vs_flop_floor"],
            True,
            "x",
        )
    ]
    for method in NEXT_METHODS:
        pruned = _jax_row(rows, method, NEXT_KEEP, 1)
        speedup = None
        if base and pruned and base.get("ttft_ms") and pruned.get("ttft_ms"):
            speedup = base["ttft_ms"] / pruned["ttft_ms"]
        checks.append(
            _verdict(
                f"first token speedup {method}@{NEXT_KEEP} b1",
                speedup,
                NEXT_TARGETS["ttft_speedup_b1"],
                False,
                "x",
                _floor_speedup_note(base, pruned),
            )
        )
        checks.append(
            _verdict(
                f"selection overhead {method}@{NEXT_KEEP} b1",
                pruned and pruned.get("selection_overhead_ms"),
                NEXT_TARGETS["selection_overhead_ms"],
                True,
                " ms",
            )
        )
    return checks


def _judge(rows: list[dict], searches: list[dict]) -> list[dict]:
    def row(method, keep, batch):
        return _jax_row(rows, method, keep, batch)

    base1, acc1 = row("none", 0, 1), row(ACCEPT_METHOD, ACCEPT_KEEP, 1)
    base16, acc16 = row("none", 0, 16), row(ACCEPT_METHOD, ACCEPT_KEEP, 16)
    base64, acc64 = row("none", 0, 64), row(ACCEPT_METHOD, ACCEPT_KEEP, 64)
    checks = []

    def check(name, value, target, at_most, unit="", note="", decided=True):
        checks.append(_verdict(name, value, target, at_most, unit, note, decided))

    def ratio(num, den, key):
        return num[key] / den[key] if num and den and num.get(key) and den.get(key) else None

    weight_floor = base1 and base1.get("floors", {}).get("decode_weight_read_ms")
    check(
        "decode b1 / weight-read floor",
        base1["decode_ms_per_token"] / weight_floor if weight_floor else None,
        TARGETS["decode_vs_weight_floor"],
        True,
        "x",
    )
    flop_floor = base1 and base1.get("floors", {}).get("llm_prefill_flop_ms")
    check(
        f"unpruned LLM prefill b1 ({base1['prompt_tokens'] if base1 else '?'} tokens) / FLOP floor",
        base1["llm_prefill_ms"] / flop_floor if flop_floor else None,
        TARGETS["prefill_vs_flop_floor"],
        True,
        "x",
    )
    check(
        "vision tower b1",
        base1 and base1.get("vision_ms"),
        TARGETS["vision_ms_b1"],
        True,
        " ms",
    )
    check(
        f"TTFT speedup {ACCEPT_METHOD}@{ACCEPT_KEEP} b1",
        ratio(base1, acc1, "ttft_ms"),
        TARGETS["ttft_speedup_b1"],
        False,
        "x",
        _floor_speedup_note(base1, acc1),
    )
    check(
        f"TTFT speedup {ACCEPT_METHOD}@{ACCEPT_KEEP} b16",
        ratio(base16, acc16, "ttft_ms"),
        TARGETS["ttft_speedup_b16"],
        False,
        "x",
        _floor_speedup_note(base16, acc16),
    )
    saving = None
    if base64 and acc64 and base64.get("peak_bytes") and acc64.get("peak_bytes"):
        saving = 1 - acc64["peak_bytes"] / base64["peak_bytes"]
    check(
        f"peak memory saving {ACCEPT_METHOD}@{ACCEPT_KEEP} b64", saving, TARGETS["memory_saving_b64"], False
    )
    search = {(s["method"], s["keep"]): s for s in searches}
    s_base, s_acc = search.get(("none", 0)), search.get((ACCEPT_METHOD, ACCEPT_KEEP))
    value, note, decided = None, "", True
    if s_base and s_acc and s_base["largest_fit"] and s_acc["largest_fit"]:
        value = s_acc["largest_fit"] / s_base["largest_fit"]
        base_fail, acc_fail = s_base["smallest_failure"], s_acc["smallest_failure"]
        # True largest batches lie in [largest_fit, smallest_failure - 1]: decide only what the bounds prove.
        proven_pass = bool(base_fail) and s_acc["largest_fit"] >= TARGETS["max_batch_ratio"] * (base_fail - 1)
        proven_fail = bool(acc_fail) and acc_fail - 1 < TARGETS["max_batch_ratio"] * s_base["largest_fit"]
        decided = proven_pass or proven_fail
        note = (
            f"; fits {s_acc['largest_fit']} vs {s_base['largest_fit']}, first failures {acc_fail} vs "
            f"{base_fail}"
        )
    check(
        f"largest batch {ACCEPT_METHOD}@{ACCEPT_KEEP} / unpruned",
        value,
        TARGETS["max_batch_ratio"],
        False,
        "x",
        note,
        decided,
    )
    check(
        f"selection overhead {ACCEPT_METHOD}@{ACCEPT_KEEP} b1",
        acc1 and acc1.get("selection_overhead_ms"),
        TARGETS["selection_overhead_ms"],
        True,
        " ms",
    )
    return checks
