"""The greedy loop of the adaptive NMS as one Pallas (Triton) kernel for GPUs.

Why: under XLA each of the `keep` iterations is a few kernel launches plus a loop-condition round
trip, so 64 iterations cost on the order of a millisecond on a GPU although each does almost no
work. Here one program per batch row holds the (padded) score vector in registers and runs the whole
loop: per iteration one argmax (first index on ties), one row read of the precomputed
suppression matrix (L2-resident) and one multiply. Same semantics as the XLA loop in nms.py: ties go
to the first index, kept tokens are masked to -inf so none is kept twice, even with all-zero scores.

The window form (``greedy_order_pallas_band``) holds per token only the factors of its band (the
tokens a few grid rows either side, where every pair of its window lies): each pick loads the kept
token's band row with one masked load at the band's offset, as the dense kernel loads a matrix row;
scores stay in registers, no scatter.

Triton blocks are powers of two, so tokens are padded (padding scores -inf, never chosen). Runs on
the CPU in Pallas interpret mode for tests.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pallas_triton


def _next_power_of_two(n: int) -> int:
    return 1 << max(n - 1, 0).bit_length()


def _compiler_params(num_warps: int | None, interpret: bool):
    """Triton's settings for a row's program: its default (4 warps) unless ``num_warps`` is given."""
    if interpret or num_warps is None:
        return None
    return pallas_triton.CompilerParams(num_warps=num_warps)


PICKS = ("max_then_index", "argmax")
"""How a program finds the highest score's first index: a max-reduction then a min-reduction over
the indices holding it, or one argmax ((value, index) pairs reduced together, first index on ties;
the default: one reduction instead of two per pick, as fast at batch 1 and faster at batch 8)."""


def _pick(scores, token, padded_tokens, pick):
    """The highest score's token, the first on ties."""
    if pick not in PICKS:
        raise ValueError(f"unknown pick {pick!r}; known: {', '.join(PICKS)}.")
    if pick == "argmax":
        return jnp.argmax(scores).astype(jnp.int32)
    best = jnp.max(scores)
    return jnp.min(jnp.where(scores == best, token, padded_tokens))


def _greedy_kernel(
    scores_ref, factors_ref, order_ref, *, keep: int, padded_tokens: int, padded_keep: int, pick: str
):
    token = lax.broadcasted_iota(jnp.int32, (padded_tokens,), 0)
    slot = lax.broadcasted_iota(jnp.int32, (padded_keep,), 0)

    def pick_one(step, state):
        scores, order = state
        chosen = _pick(scores, token, padded_tokens, pick)
        row = factors_ref[chosen, :]
        scores = jnp.where((token == chosen) | (scores == -jnp.inf), -jnp.inf, scores * row)
        return scores, jnp.where(slot == step, chosen, order)

    initial = (scores_ref[...], jnp.zeros((padded_keep,), jnp.int32))
    order_ref[...] = lax.fori_loop(0, keep, pick_one, initial)[1]


def _band_kernel(
    scores_ref,
    factors_ref,
    order_ref,
    *,
    keep: int,
    padded_tokens: int,
    padded_keep: int,
    block: int,
    reach: int,
    pick: str,
):
    width = block + 2 * reach
    token = lax.broadcasted_iota(jnp.int32, (padded_tokens,), 0)
    slot = lax.broadcasted_iota(jnp.int32, (padded_keep,), 0)

    def pick_one(step, state):
        scores, order = state
        chosen = _pick(scores, token, padded_tokens, pick)
        position = token - (chosen // block * block - reach)  # each token's place in the chosen's band
        in_band = (position >= 0) & (position < width)
        factor = pallas_triton.load(
            factors_ref.at[chosen, jnp.where(in_band, position, 0)], mask=in_band, other=1.0
        )
        scores = jnp.where((token == chosen) | (scores == -jnp.inf), -jnp.inf, scores * factor)
        return scores, jnp.where(slot == step, chosen, order)

    initial = (scores_ref[...], jnp.zeros((padded_keep,), jnp.int32))
    order_ref[...] = lax.fori_loop(0, keep, pick_one, initial)[1]


def _row_spec(size: int) -> pl.BlockSpec:
    return pl.BlockSpec((None, size), lambda b: (b, 0))


@functools.partial(jax.jit, static_argnames=("keep", "interpret", "num_warps", "pick"))
def greedy_order_pallas(
    factors: jax.Array,
    scores: jax.Array,
    keep: int,
    interpret: bool = False,
    num_warps: int | None = None,
    pick: str = "argmax",
) -> jax.Array:
    """Selection order (B, keep) int32 for scores (B, N) and suppression factors (B, N, N);
    ``num_warps``: warps of each row's program (None: Triton's default); ``pick``: one of PICKS."""
    batch, num_tokens = scores.shape
    padded_tokens, padded_keep = _next_power_of_two(num_tokens), _next_power_of_two(keep)
    pad = padded_tokens - num_tokens
    scores = jnp.pad(scores.astype(jnp.float32), ((0, 0), (0, pad)), constant_values=-jnp.inf)
    factors = jnp.pad(factors.astype(jnp.float32), ((0, 0), (0, pad), (0, pad)), constant_values=1.0)
    kernel = functools.partial(
        _greedy_kernel, keep=keep, padded_tokens=padded_tokens, padded_keep=padded_keep, pick=pick
    )
    order = pl.pallas_call(
        kernel,
        out_shape=jax.ShapeDtypeStruct((batch, padded_keep), jnp.int32),
        grid=(batch,),
        in_specs=[
            _row_spec(padded_tokens),
            pl.BlockSpec((None, padded_tokens, padded_tokens), lambda b: (b, 0, 0)),
        ],
        out_specs=_row_spec(padded_keep),
        interpret=interpret,
        compiler_params=_compiler_params(num_warps, interpret),
    )(scores, factors)
    return order[:, :keep]


@functools.partial(jax.jit, static_argnames=("block", "reach", "keep", "interpret", "num_warps", "pick"))
def greedy_order_pallas_band(
    factors: jax.Array,
    scores: jax.Array,
    block: int,
    reach: int,
    keep: int,
    interpret: bool = False,
    num_warps: int | None = None,
    pick: str = "argmax",
) -> jax.Array:
    """Selection order (B, keep) int32 for scores (B, N) and band factors (B, N, block + 2 reach) as
    ``nms.band_suppression_factors`` returns them: per pick one masked load of the kept token's band
    row, the scores held in registers as in the dense kernel."""
    batch, num_tokens = scores.shape
    width = block + 2 * reach
    padded_tokens, padded_keep = _next_power_of_two(num_tokens), _next_power_of_two(keep)
    padded_width = _next_power_of_two(width)
    scores = jnp.pad(
        scores.astype(jnp.float32), ((0, 0), (0, padded_tokens - num_tokens)), constant_values=-jnp.inf
    )
    factors = jnp.pad(
        factors.astype(jnp.float32),
        ((0, 0), (0, padded_tokens - num_tokens), (0, padded_width - width)),
        constant_values=1.0,
    )
    kernel = functools.partial(
        _band_kernel,
        keep=keep,
        padded_tokens=padded_tokens,
        padded_keep=padded_keep,
        block=block,
        reach=reach,
        pick=pick,
    )
    order = pl.pallas_call(
        kernel,
        out_shape=jax.ShapeDtypeStruct((batch, padded_keep), jnp.int32),
        grid=(batch,),
        in_specs=[
            _row_spec(padded_tokens),
            pl.BlockSpec((None, padded_tokens, padded_width), lambda b: (b, 0, 0)),
        ],
        out_specs=_row_spec(padded_keep),
        interpret=interpret,
        compiler_params=_compiler_params(num_warps, interpret),
    )(scores, factors)
    return order[:, :keep]
