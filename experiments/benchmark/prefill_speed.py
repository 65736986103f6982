"""What selection costs inside the prefill, and what pruning buys: one process, one model, many variants.

    python -m experiments.benchmark.prefill_speed --model=llava-1.5-7b --keep=64 --output=results.json

Random bfloat16 weights (speed depends on shapes, not values) are built directly on the device. The
vision tower and the embedding merge run once; then the LLM prefill (from the merged embeddings, the
part pruning shortens) is jitted and timed for each variant: unpruned; pruned at layer K to FIXED
indices (no cue, no selection); AdaptPrune with each NMS implementation; FastV. Selection overhead =
AdaptPrune - fixed. Medians over --repeats runs after a warm-up; compile time reported separately.
Unlike experiments.benchmark (a process per configuration, the full pipeline), this answers one
question cheaply: one model build, one compile per variant.
"""

from __future__ import annotations

import dataclasses
import json
import os
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app
from flax import nnx

import adaptprune_jax as prune
from experiments.benchmark.acceptance import TARGETS
from experiments.flag_config import define_flags, from_flags, setting
from models.config import from_hf_config
from models.presets import llava_config, random_model


@dataclasses.dataclass(frozen=True)
class PrefillSpeedConfig:
    """The one model, batch and budget every variant is timed on."""

    model: str = setting("llava-1.5-7b", "Preset name (models.presets).")
    keep: int = setting(64, "Image tokens kept.")
    layer: int = setting(2, "Pruning layer K.")
    batch: int = setting(1, "Batch size.")
    text_tokens: int = setting(64, "Text tokens per prompt (the image span comes on top).")
    repeats: int = setting(30, "Timed runs per variant.")
    nms_implementations: tuple[str, ...] = setting(
        ("xla", "pallas"), "AdaptPrune NMS implementations to time."
    )
    output: str | None = setting(None, "JSON results file.")


def median_ms(fn, repeats: int) -> tuple[float, list[float]]:
    """(median, all) milliseconds of `repeats` calls; the caller has warmed `fn` up (compiled it)."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn())
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times), times


def run(settings: PrefillSpeedConfig) -> dict:
    """Time the LLM prefill of every variant; the summary judges selection overhead and pruned speedup."""
    hf_config = llava_config(settings.model)
    cfg = from_hf_config(hf_config)
    model = random_model(hf_config, dtype="bfloat16")
    graphdef, state = nnx.split(model)
    num_image = cfg.num_image_tokens
    length = num_image + settings.text_tokens
    rng = np.random.default_rng(0)
    ids = rng.integers(4, 1000, (settings.batch, length)).astype(np.int32)
    ids[:, 1 : 1 + num_image] = cfg.image_token_index
    pixels = rng.standard_normal((settings.batch, 3, cfg.vision.image_size, cfg.vision.image_size)).astype(
        np.float32
    )

    @jax.jit
    def vision_and_merge(state, ids, pixels):
        m = nnx.merge(graphdef, state)
        return m.embed_prompt(ids, m.image_features(pixels))

    start = time.perf_counter()
    x, image_slots = jax.block_until_ready(vision_and_merge(state, ids, pixels))
    vision_compile = time.perf_counter() - start
    vision_ms, _ = median_ms(lambda: vision_and_merge(state, ids, pixels), settings.repeats)
    positions = jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32), (settings.batch, length))
    last_index = jnp.full((settings.batch,), length - 1, jnp.int32)

    def llm_prefill(pruning):
        @jax.jit
        def step(state, x):
            model = nnx.merge(graphdef, state)
            out = model.language_model.prefill(
                x,
                positions,
                last_index,
                model.image_tokens(image_slots),
                extra_slots=0,
                pruning=pruning,
                rng=jax.random.key(0),
            )
            return out.logits, out.kept

        return step

    keep = settings.keep
    fixed = prune.FixedIndicesConfig(
        indices=tuple(range(0, num_image, num_image // keep))[:keep], layer=settings.layer
    )
    variants = {"unpruned": (None, 0), "fixed indices": (fixed, keep)}
    for implementation in settings.nms_implementations:
        variants[f"adaptprune ({implementation})"] = (
            prune.AdaptPruneConfig(keep=keep, layer=settings.layer, nms_implementation=implementation),
            keep,
        )
    variants["fastv"] = (prune.FastVConfig(keep=keep, layer=settings.layer), keep)

    rows = {}
    for name, (pruning, _) in variants.items():
        step = llm_prefill(pruning)
        start = time.perf_counter()
        try:
            _, kept = jax.block_until_ready(step(state, x))
        except Exception as error:  # a variant that does not compile on this backend is reported, not fatal
            rows[name] = {"error": f"{type(error).__name__}: {str(error)[:300]}"}
            print(f"{name}: FAILED {rows[name]['error']}", flush=True)
            continue
        compile_s = time.perf_counter() - start
        ms, times = median_ms(lambda step=step: step(state, x), settings.repeats)
        rows[name] = {
            "median_ms": ms,
            "min_ms": min(times),
            "max_ms": max(times),
            "compile_s": compile_s,
            "kept_first": None if kept is None else np.asarray(kept)[0, :8].tolist(),
        }
        print(f"{name:<24} {ms:8.3f} ms  (compile {compile_s:5.1f} s)", flush=True)

    base = rows["unpruned"]["median_ms"]
    fixed_ms = rows["fixed indices"]["median_ms"]
    summary = {}
    for name, row in rows.items():
        if "median_ms" in row:
            row["speedup_vs_unpruned"] = base / row["median_ms"]
            if name.startswith("adaptprune") or name == "fastv":
                row["selection_overhead_ms"] = row["median_ms"] - fixed_ms
    adaptprune_rows = {n: r for n, r in rows.items() if n.startswith("adaptprune") and "median_ms" in r}
    if adaptprune_rows:
        best = min(adaptprune_rows, key=lambda n: adaptprune_rows[n]["median_ms"])
        summary = {
            "best_adaptprune": best,
            "selection_overhead_ms": adaptprune_rows[best]["selection_overhead_ms"],
            "selection_overhead_ok": adaptprune_rows[best]["selection_overhead_ms"]
            <= TARGETS["selection_overhead_ms"],
            "pruned_speedup": adaptprune_rows[best]["speedup_vs_unpruned"],
            "pruned_speedup_ok": adaptprune_rows[best]["speedup_vs_unpruned"] >= TARGETS["ttft_speedup_b1"],
        }
    return {
        "model": settings.model,
        "dtype": "bfloat16",
        "batch": settings.batch,
        "prompt_tokens": length,
        "image_tokens": num_image,
        "keep": keep,
        "layer": settings.layer,
        "repeats": settings.repeats,
        "vision_and_merge_ms": vision_ms,
        "vision_compile_s": vision_compile,
        "llm_prefill": rows,
        "summary": summary,
        "device": jax.devices()[0].device_kind,
        "jax": jax.__version__,
        "date": time.strftime("%Y-%m-%d"),
        "command": " ".join(os.sys.argv),
    }


def main(argv):
    del argv
    settings = from_flags(PrefillSpeedConfig)
    results = run(settings)
    if settings.output:
        with open(settings.output, "w") as f:
            json.dump(results, f, indent=2)
    print(json.dumps(results["summary"], indent=2))


if __name__ == "__main__":
    define_flags(PrefillSpeedConfig)
    app.run(main)
