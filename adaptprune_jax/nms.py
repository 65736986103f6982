"""AdaptPrune's selection: adaptive non-maximum suppression on the image-token grid.

Greedy: ``keep`` times, keep the highest-scoring token ``i`` and multiply every token ``j`` within
``distance_limit`` grid cells of it by ``1 - exp(-d^2 / 2 distance_sigma^2) * exp(-(1 - cos)^2 /
2 similarity_sigma^2)``, so that near-duplicate neighbours of a kept token lose their score.

Why it is fast: the suppression factor of every (kept i, token j) pair depends only on the grid and
the keys, never on the scores, so all factors are built once, before the loop. The fixed-trip loop
body is then one argmax, one row read and one multiply; no boolean indexing, no dynamic shapes.

Two forms hold the factors and select the same tokens (one pair-factor function, ``pair_factor``):
'dense', the (N, N) matrix after one matmul; 'window', per token only its K in-window neighbours on
its own grid, (N, K) with K ~ 81 at the default limit, their cosines from a banded matmul
(nms_window.py). The window form needs a static ``distance_limit`` and a row-major layout. Their
factors are equal bit for bit where the two matmuls round every cosine alike (at LLaVA-NeXT's 2,928
tokens on the CPU, an H100 and an H200); at some other widths the CPU's matmuls round a cosine's last
bit differently, which could change a pick only between two scores that close.

Ties and degenerate scores: the argmax takes the first index among equal maxima (``jnp.argmax``),
and already-kept tokens are masked to -inf before it, so a token is never kept twice even when all
remaining scores are equal or have underflowed to 0 (the released code could then re-pick one).
"""

from __future__ import annotations

import functools
import math
import numbers

import jax
import jax.numpy as jnp
from jax import lax
from jax.sharding import PartitionSpec

from adaptprune_jax.grid import (
    DEFAULT_PRIOR_SIGMA,
    NO_GRID,
    TokenLayout,
    layout_center_prior,
    square_layout,
)
from adaptprune_jax.nms_window import (
    band_cosines,
    band_geometry,
    band_partners,
    l2_norms,
    layout_coordinates,
    window_neighbours,
    window_offsets,
    window_pays_off,
)

DEFAULT_DISTANCE_LIMIT = 5.0
DEFAULT_DISTANCE_SIGMA = 1.5
DEFAULT_SIMILARITY_SIGMA = 0.05

# Cosine similarities feed exp(-(1 - cos)^2 / 2 similarity_sigma^2), which amplifies their error by
# up to ~1 / similarity_sigma: reduced-precision (TF32 / bf16-pass) matmuls would flip selections.
SIMILARITY_PRECISION = lax.Precision.HIGHEST


def matmul_precision(name: str) -> lax.PrecisionLike:
    """A precision by name, for settings and flags: 'highest' (float32) or a ``lax.DotAlgorithmPreset``
    name in any case (e.g. 'bf16_bf16_f32_x6': six bf16 tensor-core passes with float32 accumulation,
    error of float32's order; a backend without that algorithm refuses it when compiling)."""
    if not isinstance(name, str):
        raise ValueError(f"a matmul precision is named by a string, got {name!r}.")
    if name.lower() == "highest":
        return lax.Precision.HIGHEST
    try:
        return lax.DotAlgorithmPreset[name.upper()]
    except KeyError:
        known = ", ".join(["highest"] + [preset.name.lower() for preset in lax.DotAlgorithmPreset])
        raise ValueError(f"unknown matmul precision {name!r}; known: {known}.") from None


# How the greedy loop runs: 'xla' (lax.fori_loop; any backend), 'unrolled' (the same loop fully
# unrolled), 'pallas' (one Triton kernel per batch row, GPU; nms_pallas.py), or 'auto' = 'pallas' on
# GPU, else 'xla'. All select identically; on a GPU the XLA loop pays a few kernel launches per pick,
# which the single kernel avoids.
NMS_IMPLEMENTATIONS = ("auto", "xla", "unrolled", "pallas")

# Where the factors live: 'dense' (N, N), 'window' (N, K neighbours for the XLA loops; each token's
# band row for the Pallas loop), or 'auto' = 'window' where its band covers at most half of the N
# tokens and distance_limit is a static number, else 'dense'. Both select the same tokens; 'auto'
# weighs cost. On LLaVA-NeXT's layouts (up to 2,928 tokens) the window's band is under a quarter of
# the tokens (its factors take 1/36 of the dense matrix's 34 MB per row as neighbours, under 1/4 as
# band rows); on LLaVA-1.5's 576 tokens the band would still be two thirds of them and
# the dense matrix is 1.3 MB per row, so the dense form's single matmul and plain loop stay (the
# released-code path, unchanged).
NMS_FORMS = ("auto", "dense", "window")


def l2_normalize(x: jax.Array, axis: int = -1) -> jax.Array:
    """``x / max(||x||, 1e-12)`` along ``axis`` in float32 (torch's F.normalize)."""
    return jnp.asarray(x, jnp.float32) / l2_norms(x, axis)


def check_keep(keep: int, num_tokens: int) -> int:
    """Return ``keep`` as a Python int in [1, num_tokens]; it must be static (it sets shapes)."""
    if isinstance(keep, bool) or not hasattr(keep, "__index__"):
        raise TypeError(f"keep must be a static Python int, got {type(keep).__name__} {keep!r}.")
    keep = int(keep)
    if not 1 <= keep <= num_tokens:
        raise ValueError(f"keep={keep} is out of range: allowed 1..{num_tokens} (the number of tokens).")
    return keep


def pair_factor(
    cosine: jax.Array,
    squared_distance: jax.Array,
    same_grid: jax.Array,
    *,
    distance_limit: float,
    distance_sigma: float,
    similarity_sigma: float,
) -> jax.Array:
    """The factor token j's score is multiplied by when token i is kept, elementwise over pairs.

    ``1 - exp(-d^2 / 2 distance_sigma^2) * exp(-(1 - cos)^2 / 2 similarity_sigma^2)`` inside the window
    (``same_grid`` and ``d <= distance_limit``), exactly 1 outside. Both forms call this one function,
    so their factors agree bit for bit wherever their cosines do.
    """
    in_window = same_grid & (jnp.sqrt(squared_distance) <= jnp.asarray(distance_limit, jnp.float32))
    spatial = jnp.exp(-squared_distance / (2.0 * jnp.square(jnp.asarray(distance_sigma, jnp.float32))))
    similarity = jnp.exp(
        -jnp.square(1.0 - cosine) / (2.0 * jnp.square(jnp.asarray(similarity_sigma, jnp.float32)))
    )
    return jnp.where(in_window, 1.0 - spatial * similarity, 1.0)


def suppression_factors(
    keys: jax.Array,
    *,
    layout: TokenLayout | None = None,
    distance_limit: float = DEFAULT_DISTANCE_LIMIT,
    distance_sigma: float = DEFAULT_DISTANCE_SIGMA,
    similarity_sigma: float = DEFAULT_SIMILARITY_SIGMA,
    precision: lax.PrecisionLike = SIMILARITY_PRECISION,
) -> jax.Array:
    """The (N, N) float32 matrix ``F[i, j]``: the factor token j's score is multiplied by when i is kept.

    ``keys`` is (N, D), not necessarily normalised; ``layout`` the (N,) token layout (default: one
    square grid). Distances are in cells of the tokens' grid. Outside the window (``d >
    distance_limit``), between tokens of different grids and for tokens on no grid the factor is
    exactly 1; on the diagonal of a grid it is 0 (d = 0, cos = 1).
    """
    num_tokens = keys.shape[-2]
    layout = square_layout(num_tokens) if layout is None else layout
    unit_keys = l2_normalize(keys)
    cosine = jnp.einsum("id,jd->ij", unit_keys, unit_keys, precision=precision)
    row, col, grid = layout_coordinates(layout)
    squared_distance = (row[:, None] - row[None, :]) ** 2 + (col[:, None] - col[None, :]) ** 2
    same_grid = (grid[:, None] == grid[None, :]) & (grid[:, None] != NO_GRID)
    return pair_factor(
        cosine,
        squared_distance,
        same_grid,
        distance_limit=distance_limit,
        distance_sigma=distance_sigma,
        similarity_sigma=similarity_sigma,
    )


def _rows_layout(layout: TokenLayout | None, keys: jax.Array) -> tuple[TokenLayout, tuple, int]:
    """The layout of keys (..., N, D) as (rows, N) arrays, with the keys' batch shape and row count."""
    batch_shape, num_tokens = keys.shape[:-2], keys.shape[-2]
    rows = math.prod(batch_shape)
    return _flat_layout(layout, num_tokens, batch_shape, rows), batch_shape, rows


def window_suppression_factors(
    keys: jax.Array,
    *,
    layout: TokenLayout | None = None,
    distance_limit: float = DEFAULT_DISTANCE_LIMIT,
    distance_sigma: float = DEFAULT_DISTANCE_SIGMA,
    similarity_sigma: float = DEFAULT_SIMILARITY_SIGMA,
    precision: lax.PrecisionLike = SIMILARITY_PRECISION,
):
    """The window form of :func:`suppression_factors` for rows of keys (..., N, D): ``(neighbours,
    factors, layout_ok, band_ok)``.

    ``neighbours`` (..., N, K) int32 are each token's candidate neighbours (N where none),
    ``factors`` (..., N, K) float32 the factor ``F[i, neighbours[i, k]]`` (1 where none); every pair
    not listed has factor 1. ``distance_limit`` must be a static number. The selections equal the
    dense form's only where ``layout_ok`` and ``band_ok`` (scalars, over all rows) hold (see
    :func:`nms_window.window_neighbours`). Called on the whole batch, not vmapped, so that the band
    matmul gathers a bounded number of bands at a time (see :func:`nms_window.band_cosines`).
    """
    num_tokens = keys.shape[-2]
    flat_layout, batch_shape, rows = _rows_layout(layout, keys)
    block, reach = band_geometry(distance_limit, num_tokens, flat_layout.wide_row_stride)
    offsets = window_offsets(distance_limit)
    neighbours, squared_distance, same_grid, layout_ok, band_ok = jax.vmap(
        lambda lay: window_neighbours(lay, offsets, block, reach)
    )(flat_layout)
    flat_keys = keys.reshape(rows, num_tokens, -1)
    cosine = band_cosines(flat_keys, neighbours, block, reach, precision)
    factors = pair_factor(
        cosine,
        squared_distance,
        same_grid,
        distance_limit=distance_limit,
        distance_sigma=distance_sigma,
        similarity_sigma=similarity_sigma,
    )
    shape = batch_shape + neighbours.shape[-2:]
    return neighbours.reshape(shape), factors.reshape(shape), jnp.all(layout_ok), jnp.all(band_ok)


def band_suppression_factors(
    keys: jax.Array,
    *,
    layout: TokenLayout | None = None,
    distance_limit: float = DEFAULT_DISTANCE_LIMIT,
    distance_sigma: float = DEFAULT_DISTANCE_SIGMA,
    similarity_sigma: float = DEFAULT_SIMILARITY_SIGMA,
    precision: lax.PrecisionLike = SIMILARITY_PRECISION,
) -> jax.Array:
    """The window form's factors on its band, for rows of keys (..., N, D): (..., N, block + 2 reach)
    float32, position p of token i holding ``F[i, j]`` for j = ``nms_window.band_partners(N, block,
    reach)[i, p]`` (1 where j is no token); ``(block, reach) = nms_window.band_geometry(distance_limit,
    N, layout.wide_row_stride)``.

    Why: a greedy loop reads the kept token's factors as one contiguous band row, as the dense loop
    reads a matrix row, instead of locating the window's cells among all tokens at every pick. Every
    pair the dense form suppresses lies in the band where the window form's checks hold
    (:func:`window_suppression_factors`'s ``layout_ok`` and ``band_ok``), and each factor is the dense
    form's, bit for bit, wherever the band cosines equal the dense matmul's (the batched blocks do at
    2,928 tokens; see the module docstring). Called on the whole batch, as
    :func:`window_suppression_factors` is.
    """
    num_tokens = keys.shape[-2]
    flat_layout, batch_shape, rows = _rows_layout(layout, keys)
    block, reach = band_geometry(distance_limit, num_tokens, flat_layout.wide_row_stride)
    partner = band_partners(num_tokens, block, reach)
    is_token = (partner >= 0) & (partner < num_tokens)
    at = jnp.clip(partner, 0, num_tokens - 1)
    row, col, grid = layout_coordinates(flat_layout)  # (rows, N) each
    squared_distance = (row[:, :, None] - row[:, at]) ** 2 + (col[:, :, None] - col[:, at]) ** 2
    same_grid = is_token & (grid[:, :, None] == grid[:, at]) & (grid[:, :, None] != NO_GRID)
    flat_keys = keys.reshape(rows, num_tokens, -1)
    factors = pair_factor(
        band_cosines(flat_keys, None, block, reach, precision),
        squared_distance,
        same_grid,
        distance_limit=distance_limit,
        distance_sigma=distance_sigma,
        similarity_sigma=similarity_sigma,
    )
    return factors.reshape(batch_shape + factors.shape[-2:])


def _greedy_order(suppress, scores: jax.Array, keep: int, unroll: int | bool) -> jax.Array:
    """Selection order (keep,) int32 for one (N,) score vector; ``suppress(current, chosen)`` applies
    the kept token's factors."""
    num_tokens = scores.shape[-1]
    token_index = jnp.arange(num_tokens, dtype=jnp.int32)

    def pick_one(step, state):
        current, kept, order = state
        chosen = jnp.argmax(jnp.where(kept, -jnp.inf, current)).astype(jnp.int32)
        current = suppress(current, chosen)
        kept = kept | (token_index == chosen)
        return current, kept, order.at[step].set(chosen)

    state = (
        jnp.asarray(scores, jnp.float32),
        jnp.zeros((num_tokens,), bool),
        jnp.zeros((keep,), jnp.int32),
    )
    return lax.fori_loop(0, keep, pick_one, state, unroll=unroll)[2]


def _dense_greedy_order(factors: jax.Array, scores: jax.Array, keep: int, unroll: int | bool) -> jax.Array:
    """Each pick multiplies every score by its row of the (N, N) factors."""

    def suppress(current, chosen):
        return current * lax.dynamic_index_in_dim(factors, chosen, axis=0, keepdims=False)

    return _greedy_order(suppress, scores, keep, unroll)


def _window_greedy_order(
    neighbours: jax.Array, factors: jax.Array, scores: jax.Array, keep: int, unroll: int | bool
) -> jax.Array:
    """Each pick multiplies only its K neighbours' scores (index N: none, dropped)."""

    def suppress(current, chosen):
        return current.at[neighbours[chosen]].multiply(factors[chosen], mode="drop")

    return _greedy_order(suppress, scores, keep, unroll)


def over_mesh_rows(kernel):
    """``kernel`` (arrays with rows first -> rows first) run on each device's rows under the mesh of
    the surrounding context (`jax.set_mesh`), through ``shard_map``: a ``pallas_call`` is not
    partitioned automatically. Rows are split over as many mesh axes (in order) as divide them (none:
    every device runs every row); without a mesh, ``kernel`` itself."""

    def run(*arrays):
        mesh = jax.sharding.get_abstract_mesh()
        if mesh.empty:
            return kernel(*arrays)
        rows, axes, devices = arrays[0].shape[0], [], 1
        for name in mesh.axis_names:
            if rows % (devices * mesh.shape[name]) == 0:
                axes.append(name)
                devices *= mesh.shape[name]
        rows_spec = PartitionSpec(tuple(axes)) if axes else PartitionSpec()
        return jax.shard_map(kernel, mesh=mesh, in_specs=rows_spec, out_specs=rows_spec, check_vma=False)(
            *arrays
        )

    return run


def _flat_layout(layout: TokenLayout | None, num_tokens: int, batch_shape, flat_rows: int) -> TokenLayout:
    """The layout as (rows, N) arrays, one per flattened batch row (default: one square grid)."""
    layout = square_layout(num_tokens) if layout is None else layout
    if layout.num_tokens != num_tokens:
        raise ValueError(f"the layout describes {layout.num_tokens} tokens, the scores {num_tokens}.")
    return jax.tree_util.tree_map(
        lambda x: jnp.broadcast_to(x, tuple(batch_shape) + (num_tokens,)).reshape(flat_rows, num_tokens),
        layout,
    )


def _static_number(value) -> float | None:
    """``value`` as a Python float when it is known at trace time (a Python or NumPy number), else None."""
    if isinstance(value, numbers.Real) and not isinstance(value, (bool, jax.Array)):
        return float(value)
    return None


def resolve_form(form: str, distance_limit, num_tokens: int, wide_row_stride: int | None = None) -> str:
    """'dense' or 'window': which form ``form`` means for this limit, token count and layout's
    ``wide_row_stride`` (see NMS_FORMS)."""
    if form not in NMS_FORMS:
        raise ValueError(f"unknown NMS form {form!r}; known: {', '.join(NMS_FORMS)}.")
    limit = _static_number(distance_limit)
    if form == "window" and (limit is None or not math.isfinite(limit)):
        raise ValueError(
            "form='window' needs distance_limit as a finite static number (it sets the window's shape), "
            f"got {distance_limit!r}; use form='dense' or 'auto' for a traced limit."
        )
    if form == "auto":
        usable = (
            limit is not None and math.isfinite(limit) and window_pays_off(limit, num_tokens, wide_row_stride)
        )
        return "window" if usable else "dense"
    return form


@functools.partial(jax.jit, static_argnames=("distance_limit",))
def _window_layout_checks(flat_layout: TokenLayout, distance_limit: float):
    num_tokens = flat_layout.valid.shape[-1]
    block, reach = band_geometry(distance_limit, num_tokens, flat_layout.wide_row_stride)
    offsets = window_offsets(distance_limit)
    checks = jax.vmap(lambda lay: window_neighbours(lay, offsets, block, reach)[3:])(flat_layout)
    return tuple(jnp.all(check) for check in checks)


def _window_checks(layout, num_tokens: int, batch_shape, flat_rows: int, distance_limit: float):
    """Whether the window form may run on every row: (layout row-major, neighbours within the band).
    Python bools when the layout is known at trace time (the usual case), else traced booleans."""
    with jax.ensure_compile_time_eval():
        flat_layout = _flat_layout(layout, num_tokens, batch_shape, flat_rows)
        layout_ok, band_ok = _window_layout_checks(flat_layout, distance_limit)
    if isinstance(layout_ok, jax.core.Tracer):
        return layout_ok, band_ok
    return bool(layout_ok), bool(band_ok)


def adaptive_nms_order(
    scores: jax.Array,
    keys: jax.Array,
    keep: int,
    *,
    layout: TokenLayout | None = None,
    distance_limit: float = DEFAULT_DISTANCE_LIMIT,
    distance_sigma: float = DEFAULT_DISTANCE_SIGMA,
    similarity_sigma: float = DEFAULT_SIMILARITY_SIGMA,
    unroll: int | bool = 1,
    precision: lax.PrecisionLike = SIMILARITY_PRECISION,
    implementation: str = "auto",
    form: str = "auto",
) -> jax.Array:
    """Like :func:`adaptive_nms` but returns the kept indices in the order they were picked."""
    if implementation not in NMS_IMPLEMENTATIONS:
        raise ValueError(
            f"unknown NMS implementation {implementation!r}; known: {', '.join(NMS_IMPLEMENTATIONS)}."
        )
    if implementation == "auto":
        implementation = "pallas" if jax.default_backend() == "gpu" else "xla"
    scores = jnp.asarray(scores)
    keys = jnp.asarray(keys)
    if scores.ndim < 1 or keys.ndim < 2 or keys.shape[-2] != scores.shape[-1]:
        raise ValueError(
            f"scores must be (..., N) and keys (..., N, D) with the same N; got scores {scores.shape} "
            f"and keys {keys.shape}."
        )
    num_tokens = scores.shape[-1]
    keep = check_keep(keep, num_tokens)
    resolved_form = resolve_form(
        form, distance_limit, num_tokens, None if layout is None else layout.wide_row_stride
    )
    batch_shape = jnp.broadcast_shapes(scores.shape[:-1], keys.shape[:-2])
    flat_scores = jnp.broadcast_to(scores, batch_shape + scores.shape[-1:]).reshape(-1, num_tokens)
    flat_keys = jnp.broadcast_to(keys, batch_shape + keys.shape[-2:]).reshape((-1,) + keys.shape[-2:])
    flat_layout = _flat_layout(layout, num_tokens, batch_shape, flat_scores.shape[0])
    if (
        layout is not None and not layout.dense
    ):  # invalid slots are never picked (keep must not exceed a row's valid count)
        flat_scores = jnp.where(flat_layout.valid, flat_scores.astype(jnp.float32), -jnp.inf)
    # Off the GPU the Pallas kernels run in Pallas' interpreter (slow, exact): for tests and portability.
    interpret = jax.default_backend() != "gpu"
    hyper = dict(
        distance_limit=distance_limit,
        distance_sigma=distance_sigma,
        similarity_sigma=similarity_sigma,
        precision=precision,
    )
    unroll = True if implementation == "unrolled" else unroll

    def dense_order(keys=flat_keys, lay=flat_layout, row_scores=flat_scores, on_mesh=True):
        factors = jax.vmap(lambda k, lay: suppression_factors(k, layout=lay, **hyper))(keys, lay)
        if implementation == "pallas":
            from adaptprune_jax.nms_pallas import greedy_order_pallas

            def kernel(f, s):
                return greedy_order_pallas(f, s, keep, interpret=interpret)

            return (over_mesh_rows(kernel) if on_mesh else kernel)(factors, row_scores)
        return jax.vmap(lambda f, s: _dense_greedy_order(f, s, keep, unroll))(factors, row_scores)

    def dense_fallback():
        """The dense form for a traced layout that turns out unsuitable at run time, one row at a time:
        a branch that never runs on the row-major layouts models make, so its (N, N) factors are one
        row's, not the batch's (a conditional holds the larger branch's buffers either way)."""

        def one_row(row):
            keys, lay, row_scores = jax.tree_util.tree_map(lambda x: x[None], row)
            return dense_order(keys, lay, row_scores, on_mesh=False)[0]

        return over_mesh_rows(lambda *rows: lax.map(one_row, rows))(flat_keys, flat_layout, flat_scores)

    def window_order():
        if implementation == "pallas":  # the kernel reads band rows (see band_suppression_factors)
            from adaptprune_jax.nms_pallas import greedy_order_pallas_band

            block, reach = band_geometry(float(distance_limit), num_tokens, flat_layout.wide_row_stride)
            factors = band_suppression_factors(flat_keys, layout=flat_layout, **hyper)
            return over_mesh_rows(
                lambda f, s: greedy_order_pallas_band(f, s, block, reach, keep, interpret=interpret)
            )(factors, flat_scores)
        neighbours, factors, _, _ = window_suppression_factors(flat_keys, layout=flat_layout, **hyper)
        return jax.vmap(lambda n, f, s: _window_greedy_order(n, f, s, keep, unroll))(
            neighbours, factors, flat_scores
        )

    if resolved_form == "dense":
        order = dense_order()
    else:
        layout_ok, band_ok = _window_checks(
            layout, num_tokens, batch_shape, flat_scores.shape[0], float(distance_limit)
        )
        # 'auto' takes the dense form where the window cannot run; only an explicit 'window' raises
        if isinstance(layout_ok, jax.core.Tracer):  # known only at run time: the dense form if not
            order = lax.cond(layout_ok & band_ok, window_order, dense_fallback)
        elif layout_ok and band_ok:
            order = window_order()
        elif form == "window" and not layout_ok:
            raise ValueError(
                "form='window' needs every grid of the layout row-major with a row stride of its own "
                "(token first + row * stride + col) and each cell held by one token; this layout is not "
                "(use form='dense' or 'auto')."
            )
        elif form == "window":
            raise ValueError(
                f"form='window': a grid's row stride exceeds the reach of the window form's band for "
                f"{num_tokens} tokens (a stride of isqrt(N) + 1, or the layout's wide_row_stride, which "
                "this layout does not carry: one made in a traced program); use form='dense' or 'auto'."
            )
        else:
            order = dense_order()
    return order.reshape(batch_shape + (keep,))


def adaptive_nms(
    scores: jax.Array,
    keys: jax.Array,
    keep: int,
    *,
    layout: TokenLayout | None = None,
    distance_limit: float = DEFAULT_DISTANCE_LIMIT,
    distance_sigma: float = DEFAULT_DISTANCE_SIGMA,
    similarity_sigma: float = DEFAULT_SIMILARITY_SIGMA,
    unroll: int | bool = 1,
    precision: lax.PrecisionLike = SIMILARITY_PRECISION,
    implementation: str = "auto",
    form: str = "auto",
) -> jax.Array:
    """Adaptive NMS: ``keep`` distinct token indices, int32 (..., keep), sorted ascending.

    Args:
      scores: (..., N) non-negative scores, ALREADY weighted by the centre prior (see
        :func:`adaptprune_select`).
      keys: (..., N, D) feature keys; L2-normalised here (in float32), so raw keys are fine.
      keep: static number of tokens to keep, 1 <= keep <= N (and <= each row's valid tokens).
      layout: where the tokens sit, (N,) or (..., N) (default: one square row-major grid);
        suppression acts within a grid only, and invalid slots are never kept.
      distance_limit: grid-distance window of the suppression (``d <= distance_limit``); below 1 only
        the kept token itself is suppressed and the result is the top-k of ``scores``.
      distance_sigma, similarity_sigma: widths of the spatial and cosine-similarity Gaussians.
      unroll: passed to ``lax.fori_loop``; unrolling trades compile time for fewer loop iterations.
      precision: matmul precision of the cosine similarities (keep HIGHEST for parity).
      implementation: 'auto' (Pallas on GPU, else XLA), 'xla', 'unrolled' or 'pallas'; see NMS_IMPLEMENTATIONS.
      form: 'auto', 'dense' or 'window', where the factors live; see NMS_FORMS. 'window' raises for a
        traced ``distance_limit`` or a layout known to be unsuitable; with a layout traced under jit
        the dense form runs on a batch whose layout turns out unsuitable.

    The hyperparameters may be Python floats or traced scalars (a traced distance_limit: dense form).
    """
    order = adaptive_nms_order(
        scores,
        keys,
        keep,
        layout=layout,
        distance_limit=distance_limit,
        distance_sigma=distance_sigma,
        similarity_sigma=similarity_sigma,
        unroll=unroll,
        precision=precision,
        implementation=implementation,
        form=form,
    )
    return jnp.sort(order, axis=-1)


def adaptprune_scores(attention: jax.Array, layout: TokenLayout | None, prior_sigma: float) -> jax.Array:
    """The scores AdaptPrune's NMS ranks, float32 (..., N): attention x the centre prior of each
    token's grid, and +inf for every valid token on no grid, so that those are always kept.

    The multi-grid rule (ours, for anyres layouts): one score vector over all grids, the prior on
    each grid's normalised coordinates, suppression only within a grid. Tokens on no grid (a
    layout's ``grid == NO_GRID`` with ``valid``: LLaVA-NeXT's newline tokens, the [CLS] token of
    LLaVA-1.5's 'full' features) carry no cell to rank by; they are kept, first, and count against
    ``keep``, which must therefore exceed their number in every row.
    """
    attention = jnp.asarray(attention, jnp.float32)
    token_layout = square_layout(attention.shape[-1]) if layout is None else layout
    scores = attention * layout_center_prior(token_layout, prior_sigma)
    if layout is None:
        return scores
    off_grid = (jnp.asarray(layout.grid) == NO_GRID) & jnp.asarray(layout.valid)
    return jnp.where(off_grid, jnp.inf, scores)


def adaptprune_select(
    attention: jax.Array,
    keys: jax.Array,
    keep: int,
    *,
    layout: TokenLayout | None = None,
    prior_sigma: float = DEFAULT_PRIOR_SIGMA,
    distance_limit: float = DEFAULT_DISTANCE_LIMIT,
    distance_sigma: float = DEFAULT_DISTANCE_SIGMA,
    similarity_sigma: float = DEFAULT_SIMILARITY_SIGMA,
    unroll: int | bool = 1,
    precision: lax.PrecisionLike = SIMILARITY_PRECISION,
    implementation: str = "auto",
    form: str = "auto",
) -> jax.Array:
    """AdaptPrune end to end: attention cue x centre prior, then adaptive NMS on the feature keys.

    ``attention`` (..., N) is the attention cue over the image tokens only; ``keys`` (..., N, D);
    ``layout`` as in :func:`adaptive_nms` (the prior is taken per grid; tokens on no grid are kept,
    see :func:`adaptprune_scores`). Returns int32 (..., keep), sorted ascending.
    """
    return adaptive_nms(
        adaptprune_scores(attention, layout, prior_sigma),
        keys,
        keep,
        layout=layout,
        distance_limit=distance_limit,
        distance_sigma=distance_sigma,
        similarity_sigma=similarity_sigma,
        unroll=unroll,
        precision=precision,
        implementation=implementation,
        form=form,
    )
