"""The greedy loop of the adaptive NMS as one Pallas (Triton) kernel for GPUs.

Why: under XLA each of the `keep` iterations is a few kernel launches plus a loop-condition round
trip, so 64 iterations cost on the order of a millisecond on a GPU although each does almost no
work. Here one program per batch row holds the (padded) score vector in registers and runs the whole
loop: per iteration a max-reduction, a first-index tie break, one row read of the precomputed
suppression matrix (L2-resident) and one multiply. Same semantics as the XLA loop in nms.py: ties go
to the first index, kept tokens are masked to -inf so none is kept twice, even with all-zero scores.

Triton blocks are powers of two, so tokens are padded (padding scores -inf, never chosen). Runs on
the CPU in Pallas interpret mode for tests.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl


def _next_power_of_two(n: int) -> int:
    return 1 << max(n - 1, 0).bit_length()


def _greedy_kernel(scores_ref, factors_ref, order_ref, *, keep: int, padded_tokens: int, padded_keep: int):
    token = lax.broadcasted_iota(jnp.int32, (padded_tokens,), 0)
    slot = lax.broadcasted_iota(jnp.int32, (padded_keep,), 0)

    def pick_one(step, state):
        scores, order = state
        best = jnp.max(scores)
        chosen = jnp.min(jnp.where(scores == best, token, padded_tokens))
        row = factors_ref[chosen, :]
        scores = jnp.where((token == chosen) | (scores == -jnp.inf), -jnp.inf, scores * row)
        return scores, jnp.where(slot == step, chosen, order)

    initial = (scores_ref[...], jnp.zeros((padded_keep,), jnp.int32))
    order_ref[...] = lax.fori_loop(0, keep, pick_one, initial)[1]


@functools.partial(jax.jit, static_argnames=("keep", "interpret"))
def greedy_order_pallas(
    factors: jax.Array, scores: jax.Array, keep: int, interpret: bool = False
) -> jax.Array:
    """Selection order (B, keep) int32 for scores (B, N) and suppression factors (B, N, N)."""
    batch, num_tokens = scores.shape
    padded_tokens, padded_keep = _next_power_of_two(num_tokens), _next_power_of_two(keep)
    pad = padded_tokens - num_tokens
    scores = jnp.pad(scores.astype(jnp.float32), ((0, 0), (0, pad)), constant_values=-jnp.inf)
    factors = jnp.pad(factors.astype(jnp.float32), ((0, 0), (0, pad), (0, pad)), constant_values=1.0)
    kernel = functools.partial(
        _greedy_kernel, keep=keep, padded_tokens=padded_tokens, padded_keep=padded_keep
    )
    order = pl.pallas_call(
        kernel,
        out_shape=jax.ShapeDtypeStruct((batch, padded_keep), jnp.int32),
        grid=(batch,),
        in_specs=[
            pl.BlockSpec((None, padded_tokens), lambda b: (b, 0)),
            pl.BlockSpec((None, padded_tokens, padded_tokens), lambda b: (b, 0, 0)),
        ],
        out_specs=pl.BlockSpec((None, padded_keep), lambda b: (b, 0)),
        interpret=interpret,
    )(scores, factors)
    return order[:, :keep]
