"""Where the neighbour-window form of the adaptive NMS finds each token's neighbours and their cosines.

Only pairs of one grid within ``distance_limit`` cells have a suppression factor other than 1 (about
81 per token at the default limit of 5), so the window form keeps, per token, its K candidate
neighbours (N, K) for the XLA loops, or its band row (N, block + 2 reach) for the Pallas loop,
instead of the dense (N, N) matrix (34 MB per row at LLaVA-NeXT's 2,928 image tokens). The
cosines come from a banded matmul: the tokens in blocks of consecutive indices, each block against
the keys within ``reach`` indices of it (its band), all blocks in one batched matmul, so the keys
are copied a few times (the bands), never K times, and no (N, K, D) array exists.

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

from adaptprune_jax.grid import NO_GRID, TokenLayout, reduce_per_grid

WINDOW_BLOCK = 128
"""Query tokens per block of the banded cosine matmul."""


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


def band_geometry(distance_limit: float, num_tokens: int) -> tuple[int, int]:
    """(block, reach) of the banded matmul: each block of ``block`` tokens is multiplied with the keys
    up to ``reach`` indices before and after it.

    ``reach`` covers a row stride up to isqrt(N) + 1 (a square grid, with or without a newline token
    per row); a layout reaching further is reported by :func:`window_neighbours`. When the band would
    be as wide as all N tokens it is all of them: one block, no reach.
    """
    reach = window_span(distance_limit) * (math.isqrt(num_tokens) + 2)
    if WINDOW_BLOCK + 2 * reach >= num_tokens:
        return num_tokens, 0
    return WINDOW_BLOCK, reach


def window_pays_off(distance_limit: float, num_tokens: int) -> bool:
    """Whether the band covers at most half of the N tokens, where the window form's smaller matmul
    outweighs its extra steps (a neighbour search, the blocks' gathers, and in the XLA loop a scatter
    per pick)."""
    block, reach = band_geometry(distance_limit, num_tokens)
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
"""How :func:`band_cosines` runs its blocks: one matmul per block in a loop over blocks, the same
matmuls written out one after another (static slices), or batched matmuls over groups of blocks
(each block's band gathered first, at most ``BAND_GROUP_BYTES`` of bands per row at a time)."""

BAND_GROUP_BYTES = 1 << 28
"""Gathered float32 bands per row per batched matmul (256 MiB: all 23 blocks of LLaVA-NeXT's 2,928
tokens at 4,096-wide keys in one matmul, the configuration measured on the GPU); the gathered bands
are this form's largest temporary, so a wider or longer row runs its blocks in groups."""


def band_partners(num_tokens: int, block: int, reach: int) -> jax.Array:
    """(N, block + 2 reach) int32: the token each band position of each token's row stands for (its
    block's first token minus ``reach``, onwards; outside 0..N-1 where the band overhangs the row).
    Built from iotas, so a program holds no (N, block + 2 reach) constant."""
    first = jnp.arange(num_tokens, dtype=jnp.int32) // block * block - reach
    return first[:, None] + jnp.arange(block + 2 * reach, dtype=jnp.int32)[None, :]


def band_cosines(
    unit_keys: jax.Array,
    neighbours: jax.Array | None,
    block: int,
    reach: int,
    precision: lax.PrecisionLike,
    blocks: str = "batched",
    group_bytes: int = BAND_GROUP_BYTES,
) -> jax.Array:
    """cos(token i, its k-th neighbour) (N, K) for one row of unit keys (N, D), block by block; with
    ``neighbours`` None, every band position instead: (N, block + 2 reach), position p of token i
    being its partner ``band_partners(...)[i, p]`` (an arbitrary value where that is no token).

    Each block's (block, block + 2 reach) tile is one matmul at ``precision``, then its neighbours'
    entries are picked out; a candidate outside the band (only where ``band_ok`` is False) or no
    token reads an arbitrary entry, which the caller masks. ``blocks``: one of BAND_BLOCKS. Why
    'batched' by default: its cosines equal the dense form's (N, N) matmul bit for bit on the CPU,
    an H100 and an H200 (measured at 2,928 tokens; on the CPU not at every token count, as neither
    matmul's rounding is fixed by its inputs alone), where the loop's 2-D matmuls differ in the last
    bits, and it is the fastest of the three on the GPU.
    """
    if blocks not in BAND_BLOCKS:
        raise ValueError(f"unknown band blocks {blocks!r}; known: {', '.join(BAND_BLOCKS)}.")
    num_tokens, dim = unit_keys.shape
    num_blocks = -(-num_tokens // block)
    padding = num_blocks * block - num_tokens
    width = block + 2 * reach
    band_keys = jnp.pad(unit_keys, ((reach, padding + reach), (0, 0)))
    queries = jnp.pad(unit_keys, ((0, padding), (0, 0))).reshape(num_blocks, block, dim)
    whole_tile = neighbours is None
    if whole_tile:
        neighbours = jnp.zeros((num_tokens, 0), jnp.int32)
    block_neighbours = jnp.pad(neighbours, ((0, padding), (0, 0))).reshape(num_blocks, block, -1)
    starts = jnp.arange(num_blocks, dtype=jnp.int32) * block

    def one_block(args):
        start, block_queries, block_neighbour = args
        band = lax.dynamic_slice_in_dim(band_keys, start, width)
        tile = jnp.einsum("qd,sd->qs", block_queries, band, precision=precision)
        if whole_tile:
            return tile
        local = jnp.clip(block_neighbour - start + reach, 0, width - 1)
        return jnp.take_along_axis(tile, local, axis=1)

    if blocks == "unrolled":
        cosines = jnp.stack(
            [
                one_block((index * block, queries[index], block_neighbours[index]))
                for index in range(num_blocks)
            ]
        )
    elif blocks == "batched":
        # vmapped, the band slices become one gather and the matmuls one batched matmul; a row whose
        # bands exceed group_bytes runs them in groups, one after another (lax.map's batch_size)
        group = max(group_bytes // (width * dim * unit_keys.dtype.itemsize), 1)
        arguments = (starts, queries, block_neighbours)
        if group >= num_blocks:
            cosines = jax.vmap(one_block)(arguments)
        else:
            cosines = lax.map(one_block, arguments, batch_size=group)
    else:
        cosines = lax.map(one_block, (starts, queries, block_neighbours))
    return cosines.reshape(num_blocks * block, -1)[:num_tokens]
