"""Shared neural-network pieces: dense, norms, rotary embeddings, position-addressed attention.

Precision policy (one place): weights and activations in the model dtype (bfloat16 on GPU, float32 for
parity), every reduction (norm statistics, softmax, attention logits) in float32.

Attention is addressed by position, not by slot: every key carries the RoPE position of its token
(-1 for an empty or padding slot), and a query at position p attends keys with 0 <= position <= p.
That one rule covers causal prefill, right-padded batches, a static KV cache with unused slots, and
layers after pruning whose kept tokens have non-contiguous positions. `self_attention` runs a
sequence's attention over itself through a chosen implementation (the exact einsum, or the fused
`jax.nn.dot_product_attention` through cuDNN or XLA), which a model config names per tower.
"""

from __future__ import annotations

import itertools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

StageCache = dict[str, "jax.Array | list[jax.Array]"]
"""The KV cache of a run of consecutive decoder layers that hold the same tokens (the layers between
two pruning stages; every layer when nothing is pruned): per layer ``k`` and ``v``, lists of (B, C, Hkv, D);
shared by the run, ``positions`` (B, C) int32 (-1 = an empty slot), ``end_index`` (the next slot to
write) and ``shift`` (B,) int32, added to a new token's position in these layers (non-zero where a later
pruning stage renumbered the sequence: each run continues its own numbering). The shared fields are
held once per run, not once per layer, so a decoding step writes one position and builds one mask per
run. Runs differ in capacity (pruning shortens later ones)."""

INIT_STD = 0.02  # transformers' initializer_range for LLaMA and the projector; used for random weights
EMPTY_POSITION = -1  # position of a padding token or an unused cache slot


def normal_param(rngs: nnx.Rngs, shape: tuple[int, ...], dtype) -> nnx.Param:
    """A parameter drawn from N(0, INIT_STD^2), as transformers initialises these models."""
    return nnx.Param(jax.random.normal(rngs.params(), shape, jnp.float32).astype(dtype) * INIT_STD)


class Dense(nnx.Module):
    """y = x @ kernel + bias, kernel stored (in, out) (transposed from torch's (out, in))."""

    def __init__(self, in_features: int, out_features: int, *, use_bias: bool, dtype, rngs: nnx.Rngs):
        self.kernel = normal_param(rngs, (in_features, out_features), dtype)
        self.bias = nnx.Param(jnp.zeros((out_features,), dtype)) if use_bias else None

    def __call__(self, x: jax.Array) -> jax.Array:
        y = x @ self.kernel[...]
        return y + self.bias[...] if self.bias is not None else y


class FusedDense(nnx.Module):
    """Several projections of one input as one matmul: one kernel (in, sum(sizes)) holding the parts
    side by side along the output axis (q/k/v, gate/up), so the input is read once and one wide
    matmul replaces several narrow ones. Checkpoints keep the parts apart (`models.checkpoint` joins
    them at load and splits them at save).

    ``blocks`` > 1 lays the columns out in that many equal blocks, each holding the same slice of
    every part (block b: part 0's b-th slice, part 1's b-th slice, ...), so that splitting the columns
    over ``blocks`` devices gives each device whole heads of q, k and v together (tensor parallelism,
    `models.sharding.relayout_fused`); the projections returned are the same in either layout."""

    def __init__(self, in_features: int, sizes: tuple[int, ...], *, use_bias: bool, dtype, rngs: nnx.Rngs):
        self.sizes = tuple(int(size) for size in sizes)
        self.blocks = 1
        self.kernel = normal_param(rngs, (in_features, sum(self.sizes)), dtype)
        self.bias = nnx.Param(jnp.zeros((sum(self.sizes),), dtype)) if use_bias else None

    def __call__(self, x: jax.Array) -> tuple[jax.Array, ...]:
        """Every part's projection of ``x``, in order."""
        return self.project(x, 0, len(self.sizes))

    def project(self, x: jax.Array, first: int, count: int = 1) -> tuple[jax.Array, ...]:
        """The projections of parts ``first .. first + count - 1`` alone (one matmul over their
        columns: the other parts are not computed)."""
        kernel, bias = self._columns(first, count)
        y = x @ kernel
        y = y + bias if bias is not None else y
        return split_blocked(y, self.sizes[first : first + count], self.blocks)

    def part(self, index: int) -> tuple[jax.Array, jax.Array | None]:
        """(kernel (in, sizes[index]), bias or None) of one projection, as a `Dense` would hold it."""
        kernel, bias = self._columns(index, 1)
        if self.blocks == 1:
            return kernel, bias
        return kernel.reshape(kernel.shape[0], -1), None if bias is None else bias.reshape(-1)

    def _columns(self, first: int, count: int) -> tuple[jax.Array, jax.Array | None]:
        """The kernel and bias columns of parts ``first .. first + count - 1``, still in blocks:
        (in, blocks * width / blocks) as one axis when ``blocks`` is 1, (in, blocks, width / blocks)
        otherwise."""
        blocks = self.blocks
        start = sum(self.sizes[:first]) // blocks
        stop = start + sum(self.sizes[first : first + count]) // blocks
        kernel = self.kernel[...]
        bias = None if self.bias is None else self.bias[...]
        if blocks > 1:
            kernel = kernel.reshape(kernel.shape[0], blocks, -1)
            bias = None if bias is None else bias.reshape(blocks, -1)
        if (start, stop) != (0, kernel.shape[-1]):
            kernel = kernel[..., start:stop]
            bias = None if bias is None else bias[..., start:stop]
        if blocks > 1:
            kernel = kernel.reshape(kernel.shape[0], -1)
            bias = None if bias is None else bias.reshape(-1)
        return kernel, bias


def split_blocked(y: jax.Array, sizes: tuple[int, ...], blocks: int) -> tuple[jax.Array, ...]:
    """The parts (each (..., size)) of columns ``y`` (..., sum(sizes)) laid out in ``blocks`` equal
    blocks of every part's slices (`FusedDense`); ``blocks`` 1: the parts side by side."""
    if blocks == 1:
        return tuple(jnp.split(y, list(itertools.accumulate(sizes[:-1])), axis=-1))
    widths = [size // blocks for size in sizes]
    pieces = jnp.split(y.reshape(*y.shape[:-1], blocks, -1), list(itertools.accumulate(widths[:-1])), axis=-1)
    return tuple(piece.reshape(*y.shape[:-1], -1) for piece in pieces)


def join_blocked(parts, blocks: int):
    """The inverse of `split_blocked`: parts (each (..., size), numpy or jax) as one array of columns
    in ``blocks`` blocks."""
    xp = np if all(isinstance(part, np.ndarray) for part in parts) else jnp
    if blocks == 1:
        return xp.concatenate(parts, axis=-1)
    pieces = [part.reshape(*part.shape[:-1], blocks, -1) for part in parts]
    joined = xp.concatenate(pieces, axis=-1)
    return joined.reshape(*joined.shape[:-2], -1)


class LayerNorm(nnx.Module):
    """LayerNorm with float32 statistics (two-pass variance, as torch computes it)."""

    def __init__(self, features: int, *, eps: float, dtype):
        self.scale = nnx.Param(jnp.ones((features,), dtype))
        self.bias = nnx.Param(jnp.zeros((features,), dtype))
        self.eps = eps

    def __call__(self, x: jax.Array) -> jax.Array:
        x32 = x.astype(jnp.float32)
        mean = x32.mean(-1, keepdims=True)
        var = jnp.square(x32 - mean).mean(-1, keepdims=True)
        y = (x32 - mean) * jax.lax.rsqrt(var + self.eps)
        return (y * self.scale[...].astype(jnp.float32) + self.bias[...].astype(jnp.float32)).astype(x.dtype)


def rms_normalize(x: jax.Array, scale: jax.Array, eps: float) -> jax.Array:
    """LLaMA RMSNorm in float32, cast back to the input dtype."""
    x32 = x.astype(jnp.float32)
    y = x32 * jax.lax.rsqrt(jnp.square(x32).mean(-1, keepdims=True) + eps)
    return (y * scale.astype(jnp.float32)).astype(x.dtype)


class RMSNorm(nnx.Module):
    def __init__(self, features: int, *, eps: float, dtype):
        self.scale = nnx.Param(jnp.ones((features,), dtype))
        self.eps = eps

    def __call__(self, x: jax.Array) -> jax.Array:
        return rms_normalize(x, self.scale[...], self.eps)


def apply_rope(x: jax.Array, positions: jax.Array, theta: float) -> jax.Array:
    """Rotary embedding in transformers' rotate_half layout. x (B, S, H, D), positions (B, S)."""
    head_dim = x.shape[-1]
    inv_freq = 1.0 / (theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.int32).astype(jnp.float32) / head_dim))
    freqs = positions.astype(jnp.float32)[..., None] * inv_freq
    angles = jnp.concatenate([freqs, freqs], axis=-1)[:, :, None, :]
    x32 = x.astype(jnp.float32)
    first, second = jnp.split(x32, 2, axis=-1)
    rotated = jnp.concatenate([-second, first], axis=-1)
    return (x32 * jnp.cos(angles) + rotated * jnp.sin(angles)).astype(x.dtype)


def attention_mask(
    query_positions: jax.Array, key_positions: jax.Array, sliding_window: int | None = None
) -> jax.Array:
    """(B, Sq, Sk) bool: key is a real token at or before the query's position, and, with a
    ``sliding_window`` W, less than W positions before it (transformers' Mistral rule
    ``kv > q - W``: the query and the W - 1 keys before it)."""
    keys = key_positions[:, None, :]
    queries = query_positions[:, :, None]
    mask = (keys >= 0) & (keys <= queries)
    if sliding_window is not None:
        mask &= keys > queries - sliding_window
    return mask


# Largest float32 attention-logits tensor (B, H, Sq, Sk) one attention call materialises; a call whose
# logits would be larger runs its queries in equal chunks, one after another (`jax.lax.map`), so the
# logits and probabilities of only one chunk are alive at a time. Exact: every query row's softmax is
# its own. The default keeps batch-1 and batch-16 prefills of LLaVA-1.5-7B (32 heads, 640 tokens: 52 MB
# and 0.84 GB) in one piece and splits batch 64 (3.4 GB) in four. A trace-time constant (shapes are
# static), set with `set_attention_logits_budget` before tracing.
_ATTENTION_LOGITS_BUDGET_BYTES = 1 << 30


def set_attention_logits_budget(num_bytes: int) -> int:
    """Set the attention-logits budget (bytes) for functions traced from now on; returns the old one."""
    global _ATTENTION_LOGITS_BUDGET_BYTES
    if int(num_bytes) < 1:
        raise ValueError(f"attention logits budget must be a positive number of bytes, got {num_bytes}")
    old, _ATTENTION_LOGITS_BUDGET_BYTES = _ATTENTION_LOGITS_BUDGET_BYTES, int(num_bytes)
    return old


def attention_logits_budget() -> int:
    return _ATTENTION_LOGITS_BUDGET_BYTES


def query_chunks(batch: int, heads: int, q_len: int, k_len: int, budget_bytes: int | None = None) -> int:
    """How many equal query chunks keep each chunk's float32 logits within the budget (1 = no split)."""
    budget_bytes = attention_logits_budget() if budget_bytes is None else budget_bytes
    logits_bytes = batch * heads * q_len * k_len * jnp.dtype(jnp.float32).itemsize
    return max(1, min(q_len, -(-logits_bytes // budget_bytes)))


def attend(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array | None) -> jax.Array:
    """Softmax attention with grouped-query heads; logits and softmax in float32.

    q (B, Sq, H, D), k and v (B, Sk, Hkv, D) with H a multiple of Hkv, mask (B, Sq, Sk) or None.
    Returns (B, Sq, H * D) in q's dtype. A fully masked query row (padding) gets a finite output.
    Queries run in chunks when the logits would exceed the budget (`query_chunks`).
    """
    batch, q_len, heads, head_dim = q.shape
    chunks = query_chunks(batch, heads, q_len, k.shape[1])
    if chunks == 1:
        return _attend(q, k, v, mask)
    size = -(-q_len // chunks)
    pad = size * chunks - q_len  # padded rows (zeros; masked out when a mask is given) stay finite, then cut

    def split(x):  # (B, Sq, ...) -> (chunks, B, size, ...)
        x = jnp.pad(x, [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2))
        return x.reshape(batch, chunks, size, *x.shape[2:]).swapaxes(0, 1)

    chunked = (split(q), None if mask is None else split(mask))  # None is an empty pytree to lax.map
    out = jax.lax.map(lambda chunk: _attend(chunk[0], k, v, chunk[1]), chunked)
    return out.swapaxes(0, 1).reshape(batch, size * chunks, heads * head_dim)[:, :q_len]  # padded rows cut


EINSUM, CUDNN, XLA, AUTO = "einsum", "cudnn", "xla", "auto"
ATTENTION_IMPLEMENTATIONS = (EINSUM, CUDNN, XLA, AUTO)
"""How a tower's self-attention runs (`self_attention`): `einsum` (`attend`: the position rule
computed exactly, float32 logits; the parity path, and the only one on a CPU besides `xla`), `cudnn`
(cuDNN's fused flash kernel through `jax.nn.dot_product_attention`: no logits in memory; bfloat16 /
float16 on a GPU), `xla` (the same call's XLA implementation, for checking the fused path's masking
anywhere), `auto` (resolved when the model is loaded: `resolve_attention`)."""


def check_attention(implementation: str) -> str:
    """``implementation`` if it names one of ATTENTION_IMPLEMENTATIONS; a ValueError listing them if not."""
    if implementation not in ATTENTION_IMPLEMENTATIONS:
        raise ValueError(
            f"unknown attention implementation {implementation!r}; valid: {', '.join(ATTENTION_IMPLEMENTATIONS)}"
        )
    return implementation


def resolve_attention(implementation: str, dtype, backend: str | None = None) -> str:
    """``auto`` -> `cudnn` on a GPU backend in bfloat16 / float16 (the fast path, where the fused
    kernel exists), `einsum` otherwise (float32 is the parity path); any other choice as it is."""
    check_attention(implementation)
    if implementation != AUTO:
        return implementation
    backend = jax.default_backend() if backend is None else backend
    half = jnp.dtype(dtype) in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
    return CUDNN if backend == "gpu" and half else EINSUM


def self_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    implementation: str,
    positions: jax.Array | None = None,
    sliding_window: int | None = None,
    *,
    zero_padding_rows: bool = True,
) -> jax.Array:
    """A sequence's attention over itself through ``implementation``; q, k, v and the output as in
    `attend`. ``positions`` None: every token sees every token (the vision tower); ``positions`` (B, S)
    (-1 = padding): the position rule of `attention_mask(positions, positions)`. With ``positions``, k
    and v may hold more slots than q (a layer's cache, `with_empty_slots`): the slots past S are empty
    (position -1); `einsum` reads them masked, the fused kernels as keys past every row's length
    (their causal mask starts at the first slot; with a sliding window they get the first S). cuDNN
    takes any sequence length: nothing is padded for it.

    `einsum` computes the position rule exactly, for any positions. `cudnn` and `xla` take it as
    causal attention over each row's first n slots, n = the row's real tokens (position >= 0): the
    same keys for every real token when, in every row, the real tokens form a prefix of the slots and
    their positions increase strictly along them, as the pruning driver's sequences do
    (`tests/models/test_attention.py` checks every sequence it feeds a layer). Their padding rows are
    zeros, unlike `einsum`'s (an average of the values); nothing reads a padding row's output (its
    keys and values are cached at position -1, which no query sees). ``zero_padding_rows`` False
    leaves the fused kernels' padding rows as they come (any values, NaN included): for a caller that
    masks them later, where the mask fuses into other work (the decoder's residual add).

    ``sliding_window`` W (with ``positions``): `einsum` applies the window on positions; `cudnn` and
    `xla` as the kernel's local window of W - 1 slots to the left, the same keys where every row's real
    tokens also sit at the slots their positions name (no gaps: an unpruned prompt, or one renumbered
    by slot). A sequence with gaps (pruned, original positions kept) must take `einsum`.
    """
    implementation = resolve_attention(implementation, q.dtype)
    batch, length, heads, head_dim = q.shape
    key_slots = k.shape[1]
    if key_slots != length and positions is None:
        raise ValueError(
            f"keys hold {key_slots} slots for {length} queries: only a causal call may add empty slots"
        )
    if implementation == EINSUM:
        mask = None
        if positions is not None:
            mask = attention_mask(
                positions, with_empty_positions(positions, key_slots - length), sliding_window
            )
        return attend(q, k, v, mask)
    lengths = None  # real tokens per row (position >= 0): all of them without positions
    if positions is not None:
        lengths = jnp.sum(positions >= 0, axis=1, dtype=jnp.int32)
    if key_slots != length and sliding_window is not None:  # the local window on equal lengths only: its
        k, v = k[:, :length], v[:, :length]  # placement over extra key slots is not checked
    out = jax.nn.dot_product_attention(
        q,
        k,
        v,
        is_causal=positions is not None,
        query_seq_lengths=lengths,
        key_value_seq_lengths=lengths,
        local_window_size=None if sliding_window is None or positions is None else (sliding_window - 1, 0),
        implementation=implementation,
    )
    if lengths is not None and zero_padding_rows:  # padding rows: zeros, whatever the kernel left there
        real = jnp.arange(length)[None, :] < lengths[:, None]
        out = zero_rows(out, real)
    return out.reshape(batch, length, heads * head_dim)


def cache_attention(
    q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array, implementation: str
) -> jax.Array:
    """New tokens' attention over a layer's cache (decoding): q (B, Sq, H, D), k and v (B, C, Hkv, D),
    mask (B, Sq, C) the position rule's (`attention_mask`), output as in `attend`. `einsum` is `attend`;
    the fused implementations take the mask as it is (as an additive bias), so unlike `self_attention`
    they are exact for any positions: padding inside a row, gaps, a sliding window. A new token always
    sees itself, so no row is fully masked."""
    implementation = resolve_attention(implementation, q.dtype)
    if implementation == EINSUM:
        return attend(q, k, v, mask)
    batch, length, heads, head_dim = q.shape
    out = jax.nn.dot_product_attention(q, k, v, mask=mask[:, None], implementation=implementation)
    return out.reshape(batch, length, heads * head_dim)


def zero_rows(x: jax.Array, keep: jax.Array) -> jax.Array:
    """x (B, S, ...) with the rows where ``keep`` (B, S) is False set to zero (padding rows, whose
    values a fused kernel leaves unspecified)."""
    return jnp.where(keep.reshape(keep.shape + (1,) * (x.ndim - 2)), x, jnp.zeros((), x.dtype))


def with_empty_slots(x: jax.Array, extra_slots: int) -> jax.Array:
    """(B, S, ...) followed by ``extra_slots`` zero slots along axis 1: a layer's keys or values as its
    cache holds them (prompt, then room for the generated tokens)."""
    if extra_slots == 0:
        return x
    return jnp.pad(x, [(0, 0), (0, extra_slots)] + [(0, 0)] * (x.ndim - 2))


def with_empty_positions(positions: jax.Array, extra_slots: int) -> jax.Array:
    """(B, S) positions followed by ``extra_slots`` slots at EMPTY_POSITION: the positions of keys
    as `with_empty_slots` lays them out (a layer's cache)."""
    return jnp.pad(positions, ((0, 0), (0, extra_slots)), constant_values=EMPTY_POSITION)


def _attend(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array | None) -> jax.Array:
    """`attend` in one piece."""
    batch, q_len, heads, head_dim = q.shape
    kv_heads = k.shape[2]
    q = q.reshape(batch, q_len, kv_heads, heads // kv_heads, head_dim)
    logits = jnp.einsum("bqhgd,bkhd->bhgqk", q, k, preferred_element_type=jnp.float32) * (head_dim**-0.5)
    if mask is not None:
        logits = jnp.where(mask[:, None, None], logits, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
    out = jnp.einsum("bhgqk,bkhd->bqhgd", probs, v, preferred_element_type=jnp.float32)
    return out.astype(q.dtype).reshape(batch, q_len, heads * head_dim)


def new_stage_cache(
    keys: list[jax.Array],
    values: list[jax.Array],
    positions: jax.Array,
    extra_slots: int,
    shift: jax.Array | None = None,
) -> StageCache:
    """The cache of a run of layers from their prefill: each layer's keys and values (B, S + extra_slots,
    Hkv, D) with their ``extra_slots`` empty slots for decoding already in place (`with_empty_slots`,
    as the decoder layer returns them), and the run's positions (B, S)."""
    length = positions.shape[1]
    if len(keys) != len(values) or not keys:
        raise ValueError(
            f"a run of layers needs keys and values for each layer, got {len(keys)} and {len(values)}"
        )
    for layer, (k, v) in enumerate(zip(keys, values)):
        if k.shape[1] != length + extra_slots or v.shape[1] != length + extra_slots:
            raise ValueError(
                f"a cache of {length} prompt slots and {extra_slots} empty ones needs keys and values of "
                f"{length + extra_slots} slots, got {k.shape[1]} and {v.shape[1]} (layer {layer} of the run)"
            )
    return {
        "k": list(keys),
        "v": list(values),
        "positions": with_empty_positions(positions, extra_slots),
        "end_index": jnp.asarray(length, jnp.int32),
        "shift": jnp.zeros(positions.shape[:1], jnp.int32) if shift is None else shift.astype(jnp.int32),
    }


def rows_take(x: jax.Array, index: jax.Array) -> jax.Array:
    """x[b, index[b, ...]] for every row b (index (B, n) into axis 1)."""
    expand = index.reshape(index.shape + (1,) * (x.ndim - 2))
    return jnp.take_along_axis(x, expand, axis=1)
