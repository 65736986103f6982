"""Where the neighbour-window form of the adaptive NMS finds each token's neighbours and their cosines.

Only pairs of one grid within ``distance_limit`` cells have a suppression factor other than 1 (about
81 per token at the default limit of 5), so the window form keeps, per token, its K candidate
neighbours (N, K) for the XLA loops, or its band row (N, block + 2 reach) for the Pallas loop,
instead of the dense (N, N) matrix (34 MB per row at LLaVA-NeXT's 2,928 image tokens). The
cosines come from a banded matmul: the tokens in blocks of consecutive indices, each block against
the keys within ``reach`` indices of it (its band), the blocks of all rows in batched matmuls, so the
keys are copied a few times (the bands), never K times, and no (N, K, D) array exists; the bands are
gathered in groups of bounded size, so their memory does not grow with the batch. The band reaches
the row stride of a square grid among N tokens, or further where the layout says its grids are wider
(``TokenLayout.wide_row_stride``: a wide photo's grid in LLaVA-NeXT's packing).

Neighbours come from the layout, per row (rows of one batch may hold different layouts): every grid
laid out row-major with a row stride of its own (token ``first + row * stride + col``; a newline
token after every row makes the stride cols + 1), each cell held by exactly one token. That is
checked in full (``layout_ok``), and each candidate neighbour is checked against the layout's grid,
row and column; a layout that is not so (tokens permuted, a gathered subset, a cell twice) is
reported, never silently handled differently from the dense form.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from adaptprune_jax.grid import NO_GRID, TokenLayout, reduce_per_grid, square_row_stride

WINDOW_BLOCK = 128
"""Query tokens per block of the banded cosine matmul."""

NORM_EPS = 1e-12
"""torch.nn.functional.normalize's eps: an all-zero key stays zero, not NaN."""


def l2_norms(x: jax.Array, axis: int = -1) -> jax.Array:
    """``max(||x||, NORM_EPS)`` along ``axis`` in float32, kept as a size-1 axis: what every key is
    divided by (``nms.l2_normalize``, and the band's gathered keys), one expression for both, so the
    window and dense forms' unit keys are the same bits."""
    x = jnp.asarray(x, jnp.float32)
    return jnp.maximum(jnp.sqrt(jnp.sum(x * x, axis=axis, keepdims=True)), NORM_EPS)


def window_span(distance_limit: float) -> int:
    """The largest cell offset along one axis a window of ``distance_limit`` reaches (0 below 1)."""
    limit = float(distance_limit)
    if not math.isfinite(limit):
        raise ValueError(f"the window form needs a finite distance_limit, got {distance_limit!r}.")
    return max(math.floor(limit), 0)


def window_offsets(distance_limit: float) -> np.ndarray:
    """The (K, 2) int32 cell offsets (dr, dc) a window of ``distance_limit`` may hold, (0, 0) first.

    A hair wider than ``dr^2 + dc^2 <= limit^2``: the shared pair factor then applies the dense form's
    own float32 test, so a rounding at the window's edge cannot make the two forms differ.
    """
    limit, span = float(distance_limit), window_span(distance_limit)
    offsets = [(0, 0)] + [
        (dr, dc)
        for dr in range(-span, span + 1)
        for dc in range(-span, span + 1)
        if (dr, dc) != (0, 0) and dr * dr + dc * dc <= limit * limit * (1.0 + 1e-6)
    ]
    return np.asarray(offsets, np.int32)


def band_geometry(
    distance_limit: float, num_tokens: int, wide_row_stride: int | None = None
) -> tuple[int, int]:
    """(block, reach) of the banded matmul: each block of ``block`` tokens is multiplied with the keys
    up to ``reach`` indices before and after it.

    ``reach`` covers a row stride up to ``square_row_stride(N)`` (a square grid, with or without a
    newline token per row), or up to a layout's ``wide_row_stride`` where it has one (a wide photo's
    grid); a layout reaching further is reported by :func:`window_neighbours`. When the band would be
    as wide as all N tokens it is all of them: one block, no reach.
    """
    stride = max(square_row_stride(num_tokens), wide_row_stride or 0)
    reach = window_span(distance_limit) * (stride + 1)
    if WINDOW_BLOCK + 2 * reach >= num_tokens:
        return num_tokens, 0
    return WINDOW_BLOCK, reach


def window_pays_off(distance_limit: float, num_tokens: int, wide_row_stride: int | None = None) -> bool:
    """Whether the band covers at most half of the N tokens, where the window form's smaller matmul
    outweighs its extra steps (a neighbour search, the blocks' gathers, and in the XLA loop a scatter
    per pick)."""
    block, reach = band_geometry(distance_limit, num_tokens, wide_row_stride)
    return 2 * (block + 2 * reach) <= num_tokens


def layout_coordinates(layout: TokenLayout):
    """(row, col, grid) of a layout as arrays XLA cannot constant-fold: with a static layout it would
    otherwise evaluate the spatial factor on the host, whose exp differs from the compiled one in the
    last bit, so a form's factors would depend on whether the layout was traced."""
    return lax.optimization_barrier(
        (
            jnp.asarray(layout.row, jnp.float32),
            jnp.asarray(layout.col, jnp.float32),
            jnp.asarray(layout.grid, jnp.int32),
        )
    )


def window_neighbours(layout: TokenLayout, offsets: np.ndarray, block: int, reach: int):
    """Each token's candidate neighbours in one layout row (fields (N,)).

    Returns ``neighbours`` (N, K) int32 (N where the candidate is no token of the window: off the
    grid, or the token is on no grid), ``squared_distance`` (N, K) float32 from the layout's own
    coordinates, ``same_grid`` (N, K) bool (the candidate is that token, on the same grid), and two
    scalars: ``layout_ok`` (every grid row-major with its own stride, each cell once) and ``band_ok``
    (every neighbour within the banded matmul's reach).
    """
    num_tokens = layout.valid.shape[-1]
    index = jnp.arange(num_tokens, dtype=jnp.int32)
    row, col, grid = layout_coordinates(layout)
    rows, cols = jnp.asarray(layout.grid_rows, jnp.int32), jnp.asarray(layout.grid_cols, jnp.int32)
    on_grid = grid != NO_GRID
    row_cell, col_cell = row.astype(jnp.int32), col.astype(jnp.int32)

    # The grid's first and last token and its token count give the stride; then every token must sit
    # at first + row * stride + col with stride >= cols (so distinct tokens have distinct cells) and
    # the grid must hold rows * cols tokens (so every cell has one).
    first = reduce_per_grid(jax.ops.segment_min, jnp.where(on_grid, index, num_tokens), grid)
    last = reduce_per_grid(jax.ops.segment_max, jnp.where(on_grid, index, -1), grid)
    count = reduce_per_grid(jax.ops.segment_sum, on_grid.astype(jnp.int32), grid)
    stride = jnp.where(rows > 1, (last - first - (cols - 1)) // jnp.maximum(rows - 1, 1), cols)
    row_major = (
        (row_cell.astype(jnp.float32) == row)
        & (col_cell.astype(jnp.float32) == col)
        & (row_cell >= 0)
        & (row_cell < rows)
        & (col_cell >= 0)
        & (col_cell < cols)
        & (stride >= cols)
        & (index == first + row_cell * stride + col_cell)
        & (count == rows * cols)
    )
    layout_ok = jnp.all(row_major | ~on_grid)

    dr, dc = jnp.asarray(offsets[:, 0]), jnp.asarray(offsets[:, 1])
    target_row, target_col = row_cell[:, None] + dr, col_cell[:, None] + dc
    in_grid = (
        on_grid[:, None]
        & (target_row >= 0)
        & (target_row < rows[:, None])
        & (target_col >= 0)
        & (target_col < cols[:, None])
    )
    candidate = index[:, None] + dr * stride[:, None] + dc
    inside = in_grid & (candidate >= 0) & (candidate < num_tokens)
    gather_at = jnp.where(inside, candidate, 0)
    same_grid = (
        inside
        & (grid[gather_at] == grid[:, None])
        & (row[gather_at] == target_row.astype(jnp.float32))
        & (col[gather_at] == target_col.astype(jnp.float32))
    )
    layout_ok &= jnp.all(same_grid == in_grid)
    neighbours = jnp.where(same_grid, candidate, num_tokens)
    squared_distance = jnp.square(row[:, None] - row[gather_at]) + jnp.square(col[:, None] - col[gather_at])
    band_start = (index // block)[:, None] * block - reach
    band_ok = jnp.all(~same_grid | ((candidate >= band_start) & (candidate < band_start + block + 2 * reach)))
    return neighbours, squared_distance, same_grid, layout_ok, band_ok


BAND_BLOCKS = ("loop", "unrolled", "batched")
"""How :func:`band_cosines` runs its blocks: one step per block in a loop over blocks, the same steps
written out one after another (static slices), or batched matmuls over groups of blocks (each group's
bands gathered first, at most ``BAND_GROUP_BYTES`` of them at a time). Every step runs all rows."""

BAND_GROUP_BYTES = 1 << 28
"""Gathered float32 bands per batched matmul, over all rows of a batch (256 MiB: the 23 blocks of one
LLaVA-NeXT row of 2,928 tokens at 4,096-wide keys in one matmul). The gathered bands are this form's
largest temporary, about five copies of the keys: grouping keeps them from growing with the batch."""


def band_partners(num_tokens: int, block: int, reach: int) -> jax.Array:
    """(N, block + 2 reach) int32: the token each band position of each token's row stands for (its
    block's first token minus ``reach``, onwards; outside 0..N-1 where the band overhangs the row).
    Built from iotas, so a program holds no (N, block + 2 reach) constant."""
    first = jnp.arange(num_tokens, dtype=jnp.int32) // block * block - reach
    return first[:, None] + jnp.arange(block + 2 * reach, dtype=jnp.int32)[None, :]


def band_cosines(
    keys: jax.Array,
    neighbours: jax.Array | None,
    block: int,
    reach: int,
    precision: lax.PrecisionLike,
    blocks: str = "batched",
    group_bytes: int | None = None,
) -> jax.Array:
    """cos(token i, its k-th neighbour) (..., N, K) for rows of keys (..., N, D) and their
    neighbours (..., N, K), block by block; with ``neighbours`` None, every band position instead:
    (..., N, block + 2 reach), position p of token i being its partner ``band_partners(...)[i, p]``
    (an arbitrary value where that is no token).

    The keys are L2-normalised as ``nms.l2_normalize`` does (by :func:`l2_norms`), each block's
    queries and band as they are gathered, so no normalised or padded copy of all keys exists. Each
    block's (block, block + 2 reach) tile is one matmul at ``precision``, then its neighbours'
    entries are picked out; a candidate outside the band (only where ``band_ok`` is False) or no
    token reads an arbitrary entry, which the caller masks. ``blocks``: one of BAND_BLOCKS;
    ``group_bytes``: the bands gathered per step (default ``BAND_GROUP_BYTES``, read at the call). Each step
    runs one block (or group of blocks) of every row, so call this on the whole batch rather than
    under ``jax.vmap``: vmapped, every row's bands would be gathered at once. Why 'batched' by
    default: its cosines equal the dense form's (N, N) matmul bit for bit on the CPU, an H100 and an
    H200 (measured at 2,928 tokens; on the CPU not at every token count, as neither matmul's
    rounding is fixed by its inputs alone), where the loop's 2-D matmuls differ in the last bits,
    and it is the fastest of the three on the GPU.
    """
    if blocks not in BAND_BLOCKS:
        raise ValueError(f"unknown band blocks {blocks!r}; known: {', '.join(BAND_BLOCKS)}.")
    *batch_shape, num_tokens, dim = keys.shape
    keys = keys.reshape(-1, num_tokens, dim)
    rows = keys.shape[0]
    num_blocks = -(-num_tokens // block)
    padding = num_blocks * block - num_tokens
    width = block + 2 * reach
    starts = jnp.arange(num_blocks, dtype=jnp.int32) * block

    # normalised per gathered row, by norms taken once: no normalised copy of the keys
    norms = l2_norms(keys)

    def rows_from(row_keys, row_norms, first, count):  # unit keys first .. first + count - 1, 0 beyond
        at = first + jnp.arange(count)
        gathered = jnp.take(row_keys, at, axis=0, mode="fill", fill_value=0).astype(jnp.float32)
        return gathered / jnp.take(row_norms, at, axis=0, mode="fill", fill_value=1)

    def tile(start, row_keys, row_norms):  # one block of one row against its band: (block, width)
        band = rows_from(row_keys, row_norms, start - reach, width)
        block_queries = rows_from(row_keys, row_norms, start, block)
        return jnp.einsum("qd,sd->qs", block_queries, band, precision=precision)

    if neighbours is None:

        def every_row(start):  # one block of every row: (rows, block, width)
            return jax.vmap(tile, in_axes=(None, 0, 0))(start, keys, norms)

    else:
        neighbours = jnp.broadcast_to(neighbours, (*batch_shape, num_tokens, neighbours.shape[-1]))
        padded_neighbours = jnp.pad(neighbours.reshape(rows, num_tokens, -1), ((0, 0), (0, padding), (0, 0)))

        def neighbour_cosines(start, row_keys, row_norms, row_neighbours):
            block_neighbours = lax.dynamic_slice_in_dim(row_neighbours, start, block)
            local = jnp.clip(block_neighbours - start + reach, 0, width - 1)
            return jnp.take_along_axis(tile(start, row_keys, row_norms), local, axis=1)

        def every_row(start):  # one block of every row: (rows, block, K)
            return jax.vmap(neighbour_cosines, in_axes=(None, 0, 0, 0))(start, keys, norms, padded_neighbours)

    if blocks == "unrolled":
        cosines = jnp.stack([every_row(index * block) for index in range(num_blocks)])
    elif blocks == "batched":
        # vmapped, the band slices become one gather and the matmuls one batched matmul; bands over
        # group_bytes run in groups of blocks, one after another (lax.map's batch_size)
        group_bytes = BAND_GROUP_BYTES if group_bytes is None else group_bytes
        group = max(group_bytes // (rows * width * dim * 4), 1)  # float32 bands
        cosines = (
            jax.vmap(every_row)(starts)
            if group >= num_blocks
            else lax.map(every_row, starts, batch_size=group)
        )
    else:
        cosines = lax.map(every_row, starts)
    # (blocks, rows, block, M) -> (..., N, M)
    cosines = jnp.moveaxis(cosines, 0, 1).reshape(rows, num_blocks * block, -1)[:, :num_tokens]
    return cosines.reshape(*batch_shape, num_tokens, -1)
