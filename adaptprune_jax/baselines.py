"""Baseline token selections with AdaptPrune's output convention.

Every function returns int32 (..., keep) indices into the image tokens: distinct and sorted
ascending, so the model can gather kept tokens (and their original position ids) in order.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from adaptprune_jax.grid import TokenLayout, grid_side
from adaptprune_jax.nms import SIMILARITY_PRECISION, check_keep, l2_normalize


def topk_select(scores: jax.Array, keep: int, valid: jax.Array | None = None) -> jax.Array:
    """FastV: the ``keep`` highest scores along the last axis; ties go to the lower index first.

    ``valid`` (..., N) bool, optional: slots that hold no token are never kept.
    """
    scores = jnp.asarray(scores, jnp.float32)
    keep = check_keep(keep, scores.shape[-1])
    if valid is not None:
        scores = jnp.where(valid, scores, -jnp.inf)
    _, indices = lax.top_k(scores, keep)  # lax.top_k puts the lower index first among equal values.
    return jnp.sort(indices.astype(jnp.int32), axis=-1)


def random_select(
    rng_key: jax.Array,
    num_tokens: int,
    keep: int,
    batch_shape: tuple[int, ...] = (),
    valid: jax.Array | None = None,
) -> jax.Array:
    """``keep`` of ``num_tokens`` uniformly at random without replacement, independently per row.

    Deterministic in ``rng_key``; returns int32 ``batch_shape + (keep,)``. With ``valid`` (batch_shape
    + (N,) bool), only valid slots are drawn: the ``keep`` valid slots with the largest uniform keys.
    """
    keep = check_keep(keep, num_tokens)
    if valid is not None:
        draws = jax.random.uniform(rng_key, tuple(batch_shape) + (num_tokens,))
        return topk_select(draws, keep, valid)
    tokens = jnp.broadcast_to(jnp.arange(num_tokens, dtype=jnp.int32), tuple(batch_shape) + (num_tokens,))
    shuffled = jax.random.permutation(rng_key, tokens, axis=-1, independent=True)
    return jnp.sort(shuffled[..., :keep], axis=-1)


def uniform_grid_indices(num_tokens: int, keep: int) -> np.ndarray:
    """The static index set of :func:`uniform_select`, as a NumPy int32 (keep,) array.

    Rule: ``cols = ceil(sqrt(keep))`` and ``rows = ceil(keep / cols)`` grid lines, each set evenly
    spaced and centred on the ``grid x grid`` grid (line ``i`` of ``n`` at ``floor((i + 0.5) * grid /
    n)``). When ``keep`` is a perfect square this is a regular stride sub-grid (keep=64 on 24 x 24:
    rows and cols 1, 4, ..., 22, stride 3). Otherwise the ``rows * cols >= keep`` candidates, in
    row-major order, are thinned evenly to exactly ``keep`` (candidate ``floor((t + 0.5) * rows * cols
    / keep)`` for t < keep). Every step is strictly increasing, so the indices are always distinct.
    """
    grid = grid_side(num_tokens)
    keep = check_keep(keep, num_tokens)
    cols = math.isqrt(keep - 1) + 1  # ceil(sqrt(keep)) exactly, for keep >= 1.
    rows = -(-keep // cols)

    def centred_lines(count: int) -> np.ndarray:
        return ((np.arange(count) + 0.5) * grid / count).astype(np.int64)

    candidates = (centred_lines(rows)[:, None] * grid + centred_lines(cols)[None, :]).reshape(-1)
    thinned = ((np.arange(keep) + 0.5) * candidates.size / keep).astype(np.int64)
    return candidates[thinned].astype(np.int32)


def uniform_select(num_tokens: int, keep: int) -> jax.Array:
    """Spatially uniform stride sampling on the square token grid (no scores); int32 (keep,) sorted.

    See :func:`uniform_grid_indices` for the rule, including ``keep`` that is not a perfect square.
    """
    return jnp.asarray(uniform_grid_indices(num_tokens, keep))


def _centred_lines(count: int, size: jax.Array) -> jax.Array:
    """Line ``i`` of ``count`` evenly spaced, centred lines on an axis of ``size`` cells, (..., count).

    Integer arithmetic, ``floor((2i + 1) size / (2 count))``: the exact value of the float rule in
    ``uniform_grid_indices``, whose quotient is never within rounding of an integer it is not.
    """
    lines = jnp.arange(count, dtype=jnp.int32)
    return ((2 * lines + 1) * size[..., None]) // (2 * count)


def uniform_layout_select(layout: TokenLayout, keep: int) -> jax.Array:
    """Uniform selection on token coordinates: ``uniform_grid_indices``' rule on every grid.

    On each grid, the tokens on ``rows = ceil(keep / cols)`` centred rows and ``cols =
    ceil(sqrt(keep))`` centred columns are candidates (in token order); the candidates of all grids
    are thinned evenly to exactly ``keep`` (candidate ``floor((t + 0.5) * candidates / keep)``). On
    one square grid this is ``uniform_grid_indices`` exactly. Tokens on no grid and invalid slots are
    never candidates. Returns int32 (..., keep), sorted; ``keep`` must not exceed any row's candidates.
    """
    num_tokens = layout.num_tokens
    keep = check_keep(keep, num_tokens)
    cols = math.isqrt(keep - 1) + 1
    rows = -(-keep // cols)
    row = jnp.asarray(layout.row).astype(jnp.int32)
    col = jnp.asarray(layout.col).astype(jnp.int32)
    on_row = jnp.any(row[..., None] == _centred_lines(rows, jnp.asarray(layout.grid_rows)), axis=-1)
    on_col = jnp.any(col[..., None] == _centred_lines(cols, jnp.asarray(layout.grid_cols)), axis=-1)
    candidate = on_row & on_col & (jnp.asarray(layout.grid) >= 0) & jnp.asarray(layout.valid)
    rank = jnp.cumsum(candidate, axis=-1) - 1
    total = jnp.sum(candidate, axis=-1, keepdims=True)
    thinned = ((2 * jnp.arange(keep, dtype=jnp.int32) + 1) * total) // (2 * keep)  # (..., keep)
    chosen = candidate & jnp.any(rank[..., None] == thinned[..., None, :], axis=-1)
    _, indices = lax.top_k(chosen.astype(jnp.int32) * (num_tokens - jnp.arange(num_tokens)), keep)
    return jnp.sort(indices.astype(jnp.int32), axis=-1)


def divprune_select(
    embeddings: jax.Array,
    keep: int,
    *,
    valid: jax.Array | None = None,
    precision: lax.PrecisionLike = SIMILARITY_PRECISION,
) -> jax.Array:
    """DivPrune: greedy max-min diversity over cosine distance ``1 - cos``, int32 (..., keep) sorted.

    As the released loop: first the token whose nearest other token is farthest (the 2nd smallest
    entry of its column of the distance matrix, the smallest being itself), then ``keep - 1`` times
    the token whose minimum distance to the kept set is largest. Vectorised with a running
    minimum-distance vector; kept tokens are masked out, so none is picked twice (the released code
    could re-pick one when every remaining distance is 0). Ties go to the lower index. ``valid``
    (..., N) bool, optional: slots holding no token take no part (keep <= each row's valid count).
    """
    embeddings = jnp.asarray(embeddings)
    num_tokens = embeddings.shape[-2]
    keep = check_keep(keep, num_tokens)
    batch_shape = embeddings.shape[:-2]
    flat = embeddings.reshape((-1,) + embeddings.shape[-2:])
    flat_valid = (
        None
        if valid is None
        else jnp.broadcast_to(valid, batch_shape + (num_tokens,)).reshape(-1, num_tokens)
    )
    token_index = jnp.arange(num_tokens, dtype=jnp.int32)

    def one_row(row_embeddings, row_valid):
        unit = l2_normalize(row_embeddings)
        distance = 1.0 - jnp.einsum("id,jd->ij", unit, unit, precision=precision)
        if num_tokens == 1:
            return jnp.zeros((1,), jnp.int32)
        # 2nd smallest of each column (as torch.topk(.., 2, largest=False).values[1]): mask one
        # occurrence of the column minimum and take the minimum of the rest (XLA's CPU top_k is slow).
        columns = distance.T if row_valid is None else jnp.where(row_valid[None, :], distance.T, jnp.inf)
        smallest_at = jnp.argmin(columns, axis=-1)
        nearest_other = jnp.min(jnp.where(token_index == smallest_at[:, None], jnp.inf, columns), axis=-1)
        if row_valid is not None:
            nearest_other = jnp.where(row_valid, nearest_other, -jnp.inf)
        first = jnp.argmax(nearest_other).astype(jnp.int32)

        def pick_one(step, state):
            min_distance, kept, order = state
            chosen = jnp.argmax(jnp.where(kept, -jnp.inf, min_distance)).astype(jnp.int32)
            min_distance = jnp.minimum(
                min_distance, lax.dynamic_index_in_dim(distance, chosen, axis=0, keepdims=False)
            )
            return min_distance, kept | (token_index == chosen), order.at[step].set(chosen)

        kept = token_index == first if row_valid is None else (token_index == first) | ~row_valid
        state = (distance[first], kept, jnp.zeros((keep,), jnp.int32).at[0].set(first))
        return lax.fori_loop(1, keep, pick_one, state)[2]

    order = (
        jax.vmap(one_row)(flat, flat_valid)
        if valid is not None
        else jax.vmap(lambda e: one_row(e, None))(flat)
    )
    return jnp.sort(order, axis=-1).reshape(batch_shape + (keep,))
