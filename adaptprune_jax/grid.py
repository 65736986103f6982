"""The square grid of image tokens: its side, its coordinates and AdaptPrune's centre prior.

Image tokens are laid out row-major on a ``grid x grid`` patch grid (``j = r * grid + c``). Every
function here derives ``grid`` from the token count, so no caller hard-codes a grid size.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

DEFAULT_PRIOR_SIGMA = 12.0
"""Width of the centre prior in grid units (the released code's value for a 24 x 24 grid)."""


def grid_side(num_tokens: int) -> int:
    """Side of the square token grid holding ``num_tokens`` tokens; ValueError if not a square."""
    num_tokens = int(num_tokens)
    side = math.isqrt(num_tokens) if num_tokens >= 0 else -1
    if num_tokens <= 0 or side * side != num_tokens:
        raise ValueError(
            f"num_image_tokens={num_tokens} is not a perfect square: the spatial cues need the image "
            "tokens on a square grid (e.g. 576 = 24 x 24)."
        )
    return side


def grid_coordinates(grid: int) -> tuple[jax.Array, jax.Array]:
    """(row, col) float32 coordinates of the ``grid * grid`` tokens, row-major, each shape (N,)."""
    index = jnp.arange(grid * grid, dtype=jnp.int32)
    return (index // grid).astype(jnp.float32), (index % grid).astype(jnp.float32)


def center_prior(grid: int, sigma: float = DEFAULT_PRIOR_SIGMA) -> jax.Array:
    """AdaptPrune's positional-bias correction: a Gaussian bump centred on the grid, max 1.

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
