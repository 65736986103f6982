"""AdaptPrune's selection alone, by NMS form and implementation, on LLaVA-1.5's and LLaVA-NeXT's layouts.

    python -m experiments.benchmark.select_speed --layouts=24x24,24x24+48x48n --batch_sizes=1,8,16

Synthetic cues (speed depends on shapes, not values): attention (B, N) and float32 keys (B, N, D),
D = 4096 by default (a 7B model's 32 KV heads x 128). A layout is grids joined by '+': 'RxC' a
row-major grid, 'RxCn' one with a newline token after each row (LLaVA-NeXT's high-resolution
grid), so '24x24+48x48n' is its largest layout, 2,928 tokens. Each (layout, batch, form,
implementation) is one jitted program; it reports the median select time after a warm-up, the
compile time and XLA's temporary-buffer size (where the dense form's (N, N) matrices live).
"""

from __future__ import annotations

import dataclasses
import json
import time

from absl import app

from experiments.benchmark.timing import median, run_stamp, timed
from experiments.flag_config import define_flags, from_flags, setting


@dataclasses.dataclass(frozen=True)
class SelectSpeedConfig:
    """Which layouts, batches and NMS variants to time."""

    layouts: tuple[str, ...] = setting(("24x24", "24x24+48x48n"), "Token layouts, e.g. 24x24+37x48n.")
    batch_sizes: tuple[int, ...] = setting((1, 8, 16), "Batch sizes.")
    keep: int = setting(64, "Image tokens kept (must exceed a layout's newline count).")
    dim: int = setting(4096, "Key width D (KV heads x head_dim).")
    forms: tuple[str, ...] = setting(("dense", "window", "auto"), "NMS forms (adaptprune_jax NMS_FORMS).")
    implementations: tuple[str, ...] = setting(("auto",), "NMS loop implementations (NMS_IMPLEMENTATIONS).")
    static_layout: bool = setting(
        True,
        "Layout known at trace time; False passes it as data, as the model does with per-batch layouts "
        "(the window form then also compiles the dense form, for a layout found unsuitable at run time).",
    )
    loop_warps: tuple[int, ...] = setting(
        (),
        "Also time the Pallas greedy loop alone (factors precomputed) on dense rows and on band rows (the "
        "window form's), with each of these warp counts per row's program (0 = Triton's default, what the "
        "selection runs with): where a selection's time goes.",
    )
    loop_picks: tuple[str, ...] = setting(
        ("argmax",), "With --loop_warps: the pick reductions to time (nms_pallas.PICKS)."
    )
    factor_parts: bool = setting(
        False,
        "Also time the suppression factors alone (dense, window, band) and the window form's cosines alone per "
        "--band_block_sizes and --band_modes.",
    )
    band_block_sizes: tuple[int, ...] = setting(
        (128,), "With --factor_parts: query tokens per block of the band."
    )
    band_modes: tuple[str, ...] = setting(
        ("loop", "unrolled", "batched"), "With --factor_parts: how the blocks run (nms_window.BAND_BLOCKS)."
    )
    cosine_precisions: tuple[str, ...] = setting(
        (),
        "Also time the cosines and the whole selection (the form 'auto' resolves to) at each of these matmul precisions: "
        "'highest' (float32) or a lax.DotAlgorithmPreset name (e.g. BF16_BF16_F32_X6), each with its "
        "cosines' largest error against float64 on the host (first row), whether its band cosines equal its "
        "dense matmul bit for bit, and the share of kept tokens it has in common with the first precision's "
        "(the first one the backend accepts).",
    )
    key_mean_cosine: float = setting(
        0.0,
        "Synthetic keys share one direction so that two tokens' cosine centres on this value; 0 draws "
        "independent keys, whose cosines near 0 leave suppression inert (selection = top-k of the scores).",
    )
    repeats: int = setting(
        50,
        "Timed calls per variant; 0 compiles each variant on abstract inputs and reports its temporary "
        "buffers only (any batch's memory in seconds, on any backend, with no data made or run).",
    )
    output: str | None = setting(None, "JSON results file.")


def parse_layout(spec: str):
    """'24x24+48x48n' -> the TokenLayout: grids in order (ids 0, 1, ...), 'n' = a newline per row."""
    import adaptprune_jax as prune

    parts = []
    for grid_id, part in enumerate(spec.split("+")):
        newline = part.endswith("n")
        try:
            rows, cols = (int(side) for side in part.rstrip("n").split("x"))
        except ValueError:
            raise ValueError(f"layout part {part!r} of {spec!r} is not RxC or RxCn") from None
        parts.append((prune.newline_grid_layout if newline else prune.grid_layout)(rows, cols, grid_id))
    return prune.concat_layouts(*parts)


def time_variant(
    settings: SelectSpeedConfig, spec: str, layout, attention, keys, form, implementation
) -> dict:
    """One jitted selection: its median time, compile time and temporary buffers."""
    import jax
    import jax.numpy as jnp

    import adaptprune_jax as prune

    num_tokens, keep = layout.num_tokens, settings.keep
    config = prune.AdaptPruneConfig(keep=keep, nms_form=form, nms_implementation=implementation)
    config.validate(num_tokens, 32, layout)
    batch_layout = layout.broadcast(attention.shape[:1])

    def select(a, k, lay):
        return config.select(prune.Cues(attention=a, keys=k, layout=lay), keep)

    if settings.static_layout:
        jitted, args = jax.jit(lambda a, k: select(a, k, batch_layout)), (attention, keys)
    else:
        jitted, args = jax.jit(select), (attention, keys, jax.tree_util.tree_map(jnp.asarray, batch_layout))
    start = time.perf_counter()
    compiled = jitted.lower(*args).compile()
    compile_s = time.perf_counter() - start
    memory = compiled.memory_analysis()
    samples = (
        timed(lambda: compiled(*args), settings.repeats, jax.block_until_ready) if settings.repeats else []
    )
    return {
        "layout": spec,
        "image_tokens": num_tokens,
        "batch": int(attention.shape[0]),
        "form": form,
        "resolved_form": prune.nms.resolve_form(
            form, config.distance_limit, num_tokens, layout.wide_row_stride
        ),
        "implementation": implementation,
        "select_ms": median(samples) if samples else None,
        "min_ms": min(samples) if samples else None,
        "compile_s": compile_s,
        "temp_bytes": None if memory is None else memory.temp_size_in_bytes,
    }


def time_parts(settings: SelectSpeedConfig, spec: str, layout, attention, keys) -> list[dict]:
    """Where a selection's time goes: the suppression factors alone (dense, window, band; the window's cosines
    per block mode) and the Pallas greedy loop alone on precomputed factors (dense rows or band rows),
    per pick reduction and warp count."""
    import jax
    import jax.numpy as jnp

    import adaptprune_jax as prune
    from adaptprune_jax.nms_pallas import (
        greedy_order_pallas,
        greedy_order_pallas_band,
    )

    batch_layout = layout.broadcast(attention.shape[:1])
    scores = prune.nms.adaptprune_scores(attention, batch_layout, prune.AdaptPruneConfig().prior_sigma)
    factor_programs = {
        "dense factors": jax.jit(jax.vmap(lambda k, lay: prune.nms.suppression_factors(k, layout=lay))),
        # the window forms take the batch whole, as the selection calls them (their bands in groups)
        "window factors": jax.jit(lambda k, lay: prune.nms.window_suppression_factors(k, layout=lay)[1]),
        "band factors": jax.jit(lambda k, lay: prune.nms.band_suppression_factors(k, layout=lay)),
    }
    block, reach = prune.nms_window.band_geometry(
        prune.nms.DEFAULT_DISTANCE_LIMIT, layout.num_tokens, layout.wide_row_stride
    )
    layout_arrays = jax.tree_util.tree_map(jnp.asarray, batch_layout)
    rows, outputs = [], {}

    def record(part, fn, **fields):
        output = jax.block_until_ready(fn())
        samples = timed(fn, settings.repeats, jax.block_until_ready)
        rows.append(
            {
                "layout": spec,
                "image_tokens": layout.num_tokens,
                "batch": int(attention.shape[0]),
                "part": part,
                **fields,
                "select_ms": median(samples),
                "min_ms": min(samples),
            }
        )
        detail = " ".join(f"{key}={value}" for key, value in fields.items())
        print(
            f"{spec:<16}{layout.num_tokens:>6} b{attention.shape[0]:<3} {part} {detail} {median(samples):9.3f} ms",
            flush=True,
        )
        return output

    if settings.cosine_precisions:
        time_precisions(settings, layout, attention, keys, record, rows)
    if settings.factor_parts:
        for part, program in factor_programs.items():
            outputs[part] = record(part, lambda p=program: p(keys, layout_arrays))
        time_band_cosines(settings, layout_arrays, keys, record, rows)
    if not settings.loop_warps:
        return rows
    dense = outputs.get("dense factors")
    if dense is None:
        dense = factor_programs["dense factors"](keys, layout_arrays)
    band = outputs.get("band factors")
    if band is None:
        band = factor_programs["band factors"](keys, layout_arrays)
    interpret = jax.default_backend() != "gpu"  # Pallas' interpreter off the GPU: a smoke run, not a speed
    first_order = None
    for warps in settings.loop_warps:
        for pick in settings.loop_picks:
            common = dict(interpret=interpret, num_warps=warps or None, pick=pick)
            variants = {
                "dense": lambda c=common: greedy_order_pallas(dense, scores, settings.keep, **c),
                "band": lambda c=common: greedy_order_pallas_band(
                    band, scores, block, reach, settings.keep, **c
                ),
            }
            for form, fn in variants.items():
                order = record(
                    "pallas loop alone",
                    fn,
                    form=form,
                    pick=pick,
                    num_warps=warps or "default",
                )
                # every variant, of every form, must select what the first one did
                first_order = order if first_order is None else first_order
                rows[-1]["same_order_as_first_variant"] = bool(jnp.array_equal(order, first_order))
    return rows


def time_band_cosines(settings: SelectSpeedConfig, layout_arrays, keys, record, rows: list[dict]) -> None:
    """The window form's cosines alone per block size and way of running the blocks, each with how
    many of its cosines differ from the dense form's (N, N) matmul on this device, and by how much."""
    import jax
    import jax.numpy as jnp

    import adaptprune_jax as prune
    from adaptprune_jax import nms_window

    limit = prune.nms.DEFAULT_DISTANCE_LIMIT
    num_tokens = keys.shape[-2]
    offsets = nms_window.window_offsets(limit)
    _, reach = nms_window.band_geometry(limit, num_tokens, layout_arrays.wide_row_stride)
    precision = prune.nms.SIMILARITY_PRECISION

    def dense_at_neighbours(k, lay):
        unit = prune.nms.l2_normalize(k)
        neighbours, _, same_grid, _, _ = nms_window.window_neighbours(lay, offsets, 1, reach)
        cosine = jnp.einsum("id,jd->ij", unit, unit, precision=precision)
        return jnp.take_along_axis(cosine, jnp.minimum(neighbours, num_tokens - 1), axis=1), same_grid

    dense, listed = jax.jit(jax.vmap(dense_at_neighbours))(keys, layout_arrays)
    for block in settings.band_block_sizes:
        for blocks in settings.band_modes:

            def cosines(k, lay, block=block, blocks=blocks):
                neighbours = jax.vmap(
                    lambda one: nms_window.window_neighbours(one, offsets, block, reach)[0]
                )(lay)
                return nms_window.band_cosines(k, neighbours, block, reach, precision, blocks=blocks)

            program = jax.jit(cosines)
            window = record(
                "window cosines", lambda p=program: p(keys, layout_arrays), block=block, blocks=blocks
            )
            difference = jnp.where(listed, jnp.abs(window - dense), 0.0)
            agreement = {
                "cosines_differing_from_dense": int(jnp.sum(difference > 0)),
                "cosines_listed": int(jnp.sum(listed)),
                "max_abs_difference_from_dense": float(jnp.max(difference)),
            }
            print(f"    against the dense matmul: {agreement}", flush=True)
            rows[-1].update(agreement)


def synthetic_keys(rng, batch: int, num_tokens: int, dim: int, mean_cosine: float):
    """Gaussian keys (batch, N, D), float32; with ``mean_cosine`` c > 0, a shared unit-variance
    direction plus noise scaled by sqrt(1 / c - 1), so that E[cos(k_i, k_j)] ~ c."""
    import jax.numpy as jnp

    if not 0 <= mean_cosine < 1:
        raise ValueError(f"--key_mean_cosine must be in [0, 1), got {mean_cosine}")
    keys = rng.standard_normal((batch, num_tokens, dim))
    if mean_cosine > 0:
        keys = rng.standard_normal((batch, 1, dim)) + keys * (1.0 / mean_cosine - 1.0) ** 0.5
    return jnp.asarray(keys, jnp.float32)


def time_precisions(settings: SelectSpeedConfig, layout, attention, keys, record, rows: list[dict]) -> None:
    """Per --cosine_precisions: the dense (N, N) cosines, the batched band cosines and the whole
    window-form selection; the band's cosines against the dense matmul at the same precision, every
    listed cosine against float64 (first row, on the host), kept tokens shared with the first precision."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    import adaptprune_jax as prune
    from adaptprune_jax import nms_window

    limit = prune.nms.DEFAULT_DISTANCE_LIMIT
    num_tokens = keys.shape[-2]
    offsets = nms_window.window_offsets(limit)
    block, reach = nms_window.band_geometry(limit, num_tokens, layout.wide_row_stride)
    batch_layout = layout.broadcast(attention.shape[:1])
    layout_arrays = jax.tree_util.tree_map(jnp.asarray, batch_layout)
    neighbours, _, listed, _, _ = jax.vmap(lambda lay: nms_window.window_neighbours(lay, offsets, 1, reach))(
        layout_arrays
    )
    safe_neighbours = jnp.minimum(neighbours, num_tokens - 1)
    unit64 = np.asarray(keys[0], np.float64)
    unit64 /= np.maximum(np.linalg.norm(unit64, axis=-1, keepdims=True), 1e-12)
    exact = np.take_along_axis(unit64 @ unit64.T, np.asarray(safe_neighbours[0]), axis=1)
    first_kept = None
    for name in settings.cosine_precisions:
        precision = prune.nms.matmul_precision(name)

        def dense(k, n, precision=precision):
            unit = prune.nms.l2_normalize(k)
            cosine = jnp.einsum("id,jd->ij", unit, unit, precision=precision)
            return jnp.take_along_axis(cosine, n, axis=1)

        def band(k, lay, precision=precision):
            window = jax.vmap(lambda one: nms_window.window_neighbours(one, offsets, block, reach)[0])(lay)
            return nms_window.band_cosines(k, window, block, reach, precision, blocks="batched")

        def select(a, k, precision=precision):
            return prune.nms.adaptprune_select(a, k, settings.keep, layout=batch_layout, precision=precision)

        dense_program, band_program = jax.jit(jax.vmap(dense)), jax.jit(band)
        select_program = jax.jit(select)
        try:  # a backend without this algorithm refuses it when compiling: a row saying so, then the next
            dense_cosines = record(
                "dense cosines", lambda p=dense_program: p(keys, safe_neighbours), precision=name
            )
        except Exception as error:  # noqa: BLE001 (any compiler error is this precision's result)
            message = f"{type(error).__name__}: {str(error)[:300]}"
            print(f"    {name}: refused: {message}", flush=True)
            rows.append(
                {"image_tokens": num_tokens, "batch": int(keys.shape[0]), "precision": name, "error": message}
            )
            continue
        band_cosines = record("band cosines", lambda p=band_program: p(keys, layout_arrays), precision=name)
        difference = jnp.where(listed, jnp.abs(band_cosines - dense_cosines), 0.0)
        error = np.where(np.asarray(listed[0]), np.abs(np.asarray(dense_cosines[0], np.float64) - exact), 0.0)
        rows_fields = {
            "band_cosines_differing_from_dense": int(jnp.sum(difference > 0)),
            "cosines_listed": int(jnp.sum(listed)),
            "max_abs_error_vs_float64": float(error.max()),
            "mean_abs_error_vs_float64": float(error.sum() / max(int(np.sum(listed[0])), 1)),
        }
        kept = np.asarray(record("selection", lambda p=select_program: p(attention, keys), precision=name))
        first_kept = kept if first_kept is None else first_kept
        shared = np.mean([len(np.intersect1d(a, b)) / kept.shape[-1] for a, b in zip(kept, first_kept)])
        rows_fields["kept_shared_with_first_precision"] = float(shared)
        print(f"    {name}: {rows_fields}", flush=True)
        rows[-1].update(rows_fields)


def measure(settings: SelectSpeedConfig) -> list[dict]:
    import jax
    import jax.numpy as jnp
    import numpy as np

    memory_only = settings.repeats == 0
    if memory_only and (settings.factor_parts or settings.loop_warps or settings.cosine_precisions):
        raise ValueError(
            "--repeats=0 reports memory only: drop --factor_parts, --loop_warps, --cosine_precisions."
        )
    rng = np.random.default_rng(0)
    rows = []
    for spec in settings.layouts:
        layout = parse_layout(spec)
        for batch in settings.batch_sizes:
            if memory_only:  # abstract inputs: each program is compiled, never run
                attention = jax.ShapeDtypeStruct((batch, layout.num_tokens), jnp.float32)
                keys = jax.ShapeDtypeStruct((batch, layout.num_tokens, settings.dim), jnp.float32)
            else:
                attention = jnp.asarray(rng.dirichlet(np.ones(layout.num_tokens), size=batch), jnp.float32)
                keys = synthetic_keys(rng, batch, layout.num_tokens, settings.dim, settings.key_mean_cosine)
            for form in settings.forms:
                for implementation in settings.implementations:
                    row = time_variant(settings, spec, layout, attention, keys, form, implementation)
                    rows.append(row)
                    timing = "" if memory_only else f"{row['select_ms']:9.3f} ms  "
                    print(
                        f"{spec:<16}{row['image_tokens']:>6} b{batch:<3}{form:>7} ({row['resolved_form']}) "
                        f"{implementation:>8} {timing}temp {row['temp_bytes'] / 2**20:9.1f} MiB",
                        flush=True,
                    )
            if not memory_only:
                rows.extend(time_parts(settings, spec, layout, attention, keys))
    return rows


def main(argv):
    del argv
    settings = from_flags(SelectSpeedConfig)
    import jax

    result = {
        "device": str(jax.devices()[0]),
        "keep": settings.keep,
        "dim": settings.dim,
        "static_layout": settings.static_layout,
        **run_stamp("experiments.benchmark.select_speed"),
        "rows": measure(settings),
    }
    if settings.output:
        with open(settings.output, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    define_flags(SelectSpeedConfig)
    app.run(main)
