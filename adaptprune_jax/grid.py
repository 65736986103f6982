"""Where image tokens sit: a layout of per-token coordinates, and AdaptPrune's centre prior on it.

The library never derives geometry from a token count. A ``TokenLayout`` gives every image token its
cell (row, col) on its own grid, the grid's id and size, and whether the slot holds a token at all,
as arrays. LLaVA-1.5's single 24 x 24 grid is one layout; LLaVA-NeXT's base grid + high-resolution
grid + newline tokens (and rows of one batch with different token counts) are others, with the same
shapes kept static by padding slots marked invalid.

The square helpers (``grid_side``, ``center_prior``) remain: they are the definitions the layout
functions reduce to exactly on a square grid, and the tests hold the layout forms to them.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

DEFAULT_PRIOR_SIGMA = 12.0
"""Width of the centre prior in grid units (the released code's value for a 24 x 24 grid)."""

NO_GRID = -1
"""Grid id of a token on no grid (a [CLS] or newline token, or an invalid padding slot)."""

ROW_STRIDE_STEP = 16
"""``TokenLayout.wide_row_stride`` is a multiple of this: LLaVA-NeXT's wide photos (row strides 49 to
73 with the v1.6 pinpoints) then come in a few static values, each a compiled program of its own."""


@struct.dataclass
class TokenLayout:
    """Per-token geometry of the image tokens, arrays of shape (..., N).

    row, col: float32 cell coordinates on the token's grid (0 for tokens on no grid).
    grid: int32 grid id; tokens of different grids never suppress each other; ``NO_GRID`` = none.
    grid_rows, grid_cols: int32 size of the token's grid (0 on no grid).
    valid: bool, False for padding slots (a row with fewer image tokens than the batch's maximum).
    dense: static; True when every slot is known to hold a token, so methods take their unmasked
      path (the released computation, bit for bit).
    wide_row_stride: static; where a grid's row stride (the index step from a token to the one below
      it) exceeds ``square_row_stride(N)``, as a wide photo's high-resolution grid in LLaVA-NeXT's
      packing does, a bound on the layout's row strides (the largest, rounded up to a multiple of
      ``ROW_STRIDE_STEP`` so that layouts of similar widths share one compiled program), so that code
      reaching a token's vertical neighbours by index (the NMS's window form) can size its reach;
      None otherwise, and where not known (a layout made inside a traced program). Set from the
      arrays by the constructors here.
    """

    row: jax.Array
    col: jax.Array
    grid: jax.Array
    grid_rows: jax.Array
    grid_cols: jax.Array
    valid: jax.Array
    dense: bool = struct.field(pytree_node=False, default=False)
    wide_row_stride: int | None = struct.field(pytree_node=False, default=None)

    @property
    def num_tokens(self) -> int:
        return int(self.valid.shape[-1])

    def broadcast(self, batch_shape: Sequence[int]) -> TokenLayout:
        """This layout for every row of ``batch_shape`` (an (N,) layout becomes batch_shape + (N,)).

        A host-side (NumPy) layout stays one, so that under jit it is still known at trace time (the
        NMS then checks it once, on the host, instead of in the program)."""

        def broadcast(x):
            shape = tuple(batch_shape) + x.shape[-1:]
            return np.broadcast_to(x, shape) if isinstance(x, np.ndarray) else jnp.broadcast_to(x, shape)

        return jax.tree_util.tree_map(broadcast, self)


def square_row_stride(num_tokens: int) -> int:
    """The largest row stride of a grid no wider than square among N tokens: a g x g grid with a
    newline token after each row (stride g + 1) needs N >= g (g + 1), so g + 1 <= isqrt(N) + 1."""
    return math.isqrt(int(num_tokens)) + 1


def _wide_row_stride(grid: np.ndarray, grid_rows: np.ndarray, grid_cols: np.ndarray) -> int | None:
    """The largest row stride of the layout's grids (row-major: from each grid's first and last token
    and its size), rounded up to a multiple of ``ROW_STRIDE_STEP``, where it exceeds
    ``square_row_stride(N)``, else None. Host arrays (..., N)."""
    num_tokens = grid.shape[-1]
    largest = 0
    rows_of = (
        np.reshape(x, (-1, num_tokens)) if num_tokens else np.zeros((0, 0), np.int32)
        for x in (grid, grid_rows, grid_cols)
    )
    for row_grid, rows, cols in zip(*rows_of):
        for grid_id in np.unique(row_grid[row_grid != NO_GRID]):
            members = np.flatnonzero(row_grid == grid_id)
            height, width = int(rows[members[0]]), int(cols[members[0]])
            if height > 1:
                largest = max(largest, (int(members[-1]) - int(members[0]) - (width - 1)) // (height - 1))
    if largest <= square_row_stride(num_tokens):
        return None
    return -(-largest // ROW_STRIDE_STEP) * ROW_STRIDE_STEP


def _layout(row, col, grid, grid_rows, grid_cols, valid) -> TokenLayout:
    valid = np.asarray(valid, bool)
    grid, grid_rows, grid_cols = (np.asarray(x, np.int32) for x in (grid, grid_rows, grid_cols))
    return TokenLayout(
        row=np.asarray(row, np.float32),
        col=np.asarray(col, np.float32),
        grid=grid,
        grid_rows=grid_rows,
        grid_cols=grid_cols,
        valid=valid,
        dense=bool(valid.all()),
        wide_row_stride=_wide_row_stride(grid, grid_rows, grid_cols),
    )


def _fields(layout: TokenLayout) -> tuple:
    return (layout.row, layout.col, layout.grid, layout.grid_rows, layout.grid_cols, layout.valid)


def grid_layout(rows: int, cols: int, grid_id: int = 0) -> TokenLayout:
    """One ``rows x cols`` grid in row-major order (token ``j = r * cols + c``), all valid."""
    if rows < 1 or cols < 1:
        raise ValueError(f"a grid needs at least one row and one column, got {rows} x {cols}.")
    index = np.arange(rows * cols)
    count = rows * cols
    return _layout(
        index // cols,
        index % cols,
        np.full(count, grid_id),
        np.full(count, rows),
        np.full(count, cols),
        np.ones(count, bool),
    )


def newline_grid_layout(rows: int, cols: int, grid_id: int = 0) -> TokenLayout:
    """A ``rows x cols`` grid with a newline token (on no grid) after each of its rows, as LLaVA-NeXT
    packs its high-resolution features: ``rows * (cols + 1)`` tokens, a row stride of cols + 1."""
    if rows < 1 or cols < 1:
        raise ValueError(f"a grid needs at least one row and one column, got {rows} x {cols}.")
    row, col = np.divmod(np.arange(rows * (cols + 1)), cols + 1)
    on_grid = col < cols
    return _layout(
        np.where(on_grid, row, 0),
        np.where(on_grid, col, 0),
        np.where(on_grid, grid_id, NO_GRID),
        np.where(on_grid, rows, 0),
        np.where(on_grid, cols, 0),
        np.ones(row.size, bool),
    )


def off_grid_layout(count: int, *, valid: bool = True) -> TokenLayout:
    """``count`` tokens on no grid (a [CLS] token, newline tokens; or, with valid=False, padding)."""
    zeros = np.zeros(count)
    return _layout(zeros, zeros, np.full(count, NO_GRID), zeros, zeros, np.full(count, valid))


def concat_layouts(*layouts: TokenLayout) -> TokenLayout:
    """Layouts one after another along the token axis (grid ids are kept as given)."""
    return _layout(*(np.concatenate(parts, axis=-1) for parts in zip(*map(_fields, layouts))))


def stack_layouts(layouts: Sequence[TokenLayout], num_tokens: int | None = None) -> TokenLayout:
    """Per-row layouts as one (B, N_max) layout, shorter rows padded with invalid off-grid slots."""
    num_tokens = max(layout.num_tokens for layout in layouts) if num_tokens is None else num_tokens
    padded = []
    for layout in layouts:
        if layout.num_tokens > num_tokens:
            raise ValueError(f"a row has {layout.num_tokens} image tokens, more than {num_tokens}.")
        padding = off_grid_layout(num_tokens - layout.num_tokens, valid=False)
        padded.append(concat_layouts(layout, padding))
    return _layout(*(np.stack(parts) for parts in zip(*map(_fields, padded))))


def square_layout(num_tokens: int) -> TokenLayout:
    """The ``g x g`` grid of ``num_tokens = g * g`` tokens (ValueError if not a square)."""
    side = grid_side(num_tokens)
    return grid_layout(side, side)


def grid_side(num_tokens: int) -> int:
    """Side of the square token grid holding ``num_tokens`` tokens; ValueError if not a square."""
    num_tokens = int(num_tokens)
    side = math.isqrt(num_tokens) if num_tokens >= 0 else -1
    if num_tokens <= 0 or side * side != num_tokens:
        raise ValueError(
            f"num_image_tokens={num_tokens} is not a perfect square: without a token layout the spatial "
            "cues assume one square grid (e.g. 576 = 24 x 24); pass a TokenLayout for other geometries."
        )
    return side


def center_prior(grid: int, sigma: float = DEFAULT_PRIOR_SIGMA) -> jax.Array:
    """AdaptPrune's positional-bias correction on a square grid: a Gaussian bump, max 1.

    ``x = linspace(-(grid // 2), grid // 2, grid)``, ``w[r, c] = exp(-(x_r^2 + x_c^2) / (2 sigma^2))``,
    divided by its maximum. Returns float32 (grid, grid).

    Computed as ``exp(-(u_r^2 + u_c^2) * step^2 / (2 sigma^2))`` with ``u = arange(grid) - (grid - 1)
    / 2`` and ``x = u * step``: the same values up to float32 rounding, but ``u_r^2 + u_c^2`` is exact,
    so positions at mathematically equal radius (mirrored, transposed, or like (3, 4) and (0, 5)) get
    bit-identical weights and tied attention values stay exactly tied; ties then break by index.
    """
    grid = int(grid)
    if grid <= 0:
        raise ValueError(f"grid must be a positive int, got {grid}.")
    half = grid // 2
    step = (2.0 * half / (grid - 1)) if grid > 1 else 0.0
    offsets = jnp.arange(grid, dtype=jnp.float32) - (grid - 1) / 2.0
    squared_offsets = offsets[:, None] ** 2 + offsets[None, :] ** 2  # exact: quarter-integers
    sigma = jnp.asarray(sigma, jnp.float32)
    weights = jnp.exp(-squared_offsets * (jnp.float32(step**2) / (2.0 * sigma**2)))
    return weights / jnp.max(weights)


def _axis_terms(coordinate, size, sigma):
    """Per token: the exact squared offset from its grid's centre, and the scale ``step^2 / (2 sigma^2)``
    with ``step = 2 (size // 2) / (size - 1)`` (0 for a size-1 axis)."""
    size_f = size.astype(jnp.float32)
    offset = coordinate - (size_f - 1.0) / 2.0
    half = (size // 2).astype(jnp.float32)
    # step^2 as 4 half^2 / (size - 1)^2: integer numerator and denominator, one rounding, the same
    # float32 value as the square form's float32(step ** 2) (checked for every size the tests use).
    step_squared = jnp.where(size > 1, (4.0 * half * half) / jnp.square(jnp.maximum(size_f - 1.0, 1.0)), 0.0)
    return jnp.square(offset), step_squared / (2.0 * sigma**2)


def reduce_per_grid(segment_op, values: jax.Array, grid: jax.Array) -> jax.Array:
    """Each token's value replaced by ``segment_op`` (e.g. ``jax.ops.segment_max``) over the tokens of
    its grid, for one layout row: (N,) values and grid ids (ids 0..N-1; tokens on no grid form one
    group of their own)."""
    num_tokens = values.shape[-1]
    segment = grid + 1  # NO_GRID (-1) gets a segment of its own
    return segment_op(values, segment, num_segments=num_tokens + 1)[segment]


def _max_per_grid(values: jax.Array, grid: jax.Array) -> jax.Array:
    """Each token's value replaced by the maximum over the tokens of its grid, (..., N)."""
    num_tokens = values.shape[-1]
    flat = jax.vmap(lambda v, g: reduce_per_grid(jax.ops.segment_max, v, g))(
        values.reshape(-1, num_tokens), jnp.broadcast_to(grid, values.shape).reshape(-1, num_tokens)
    )
    return flat.reshape(values.shape)


def layout_center_prior(layout: TokenLayout, sigma: float = DEFAULT_PRIOR_SIGMA) -> jax.Array:
    """The centre prior of every token on its own grid, float32 (..., N), max 1 on each grid.

    A Gaussian in each grid's normalised coordinates, ``x = (2u / (size - 1)) * (size // 2)`` per axis
    (so ``x`` spans ``[-(size // 2), size // 2]`` on each axis, as the released prior does on 24 x 24),
    divided by its maximum over the grid. On a square grid this is exactly ``center_prior(g)
    .reshape(-1)``, bit for bit: the two axes share one scale, so the exponent is the same ``(u_r^2 +
    u_c^2) * scale`` (the column term is multiplied by the ratio of the axis scales, exactly 1 there),
    and the maximum is taken over the same values. Tokens on no grid get weight 1; invalid ones 0.
    """
    # A constant layout must not be constant-folded: XLA's folder rounds exp differently from the
    # kernels, and the prior must equal the square form's bit for bit wherever it is computed.
    layout = jax.lax.optimization_barrier(jax.tree_util.tree_map(jnp.asarray, layout))
    sigma = jnp.asarray(sigma, jnp.float32)
    row_sq, row_scale = _axis_terms(jnp.asarray(layout.row), jnp.asarray(layout.grid_rows), sigma)
    col_sq, col_scale = _axis_terms(jnp.asarray(layout.col), jnp.asarray(layout.grid_cols), sigma)
    rows_vary = row_scale > 0
    ratio = jnp.where(rows_vary, col_scale / jnp.where(rows_vary, row_scale, 1.0), 0.0)
    exponent = jnp.where(rows_vary, (row_sq + col_sq * ratio) * row_scale, col_sq * col_scale)
    weights = jnp.exp(-exponent)
    on_grid = (jnp.asarray(layout.grid) != NO_GRID) & jnp.asarray(layout.valid)
    weights = jnp.where(on_grid, weights, 0.0)
    # Times the reciprocal, not divided: XLA turns the square form's division by one scalar maximum
    # into this multiplication, and the two differ in the last bit.
    weights = weights * (1.0 / jnp.where(on_grid, _max_per_grid(weights, jnp.asarray(layout.grid)), 1.0))
    weights = jnp.where(jnp.asarray(layout.grid) == NO_GRID, 1.0, weights)
    return jnp.where(jnp.asarray(layout.valid), weights, 0.0)
