"""The two in-LLM cues AdaptPrune (and FastV) score image tokens with, as pure array functions.

The model computes them at prefill and passes plain arrays here; nothing in this file knows about
the model. Reductions (softmax, norms) run in float32 whatever the input dtype.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from jax import lax

from adaptprune_jax.nms import l2_normalize

DEFAULT_NORM_EPS = 1e-6  # LLaMA / Vicuna RMSNorm epsilon.


def last_token_attention(
    query: jax.Array,
    keys: jax.Array,
    key_mask: jax.Array,
    *,
    scale: float | None = None,
) -> jax.Array:
    """Head-averaged attention probabilities of one query row (the last prompt token) over all keys.

    Only this single row is computed (B x H x S logits), never the S x S attention matrix.

    Args:
      query: (B, H, D) post-RoPE query of the last prompt token of each row.
      keys: (B, S, Hkv, D) post-RoPE keys of the same layer; H must be a multiple of Hkv and head h
        reads kv head ``h // (H // Hkv)`` (grouped-query attention).
      key_mask: (B, S) bool, the keys this query attends to (valid and causal, not padding).
      scale: logit scale; default ``1 / sqrt(D)``.

    Returns:
      (B, S) float32: ``mean_h softmax(q_h . k / sqrt(D))``; masked keys get exactly 0 (a row with no
      allowed key is all 0).
    """
    batch, num_heads, head_dim = query.shape
    if keys.ndim != 4 or keys.shape[0] != batch or keys.shape[-1] != head_dim:
        raise ValueError(f"keys must be (B, S, Hkv, D) matching query {query.shape}; got {keys.shape}.")
    num_kv_heads = keys.shape[2]
    if num_heads % num_kv_heads:
        raise ValueError(f"query heads H={num_heads} must be a multiple of kv heads Hkv={num_kv_heads}.")
    if key_mask.shape != keys.shape[:2]:
        raise ValueError(f"key_mask must be (B, S) = {keys.shape[:2]}; got {key_mask.shape}.")
    scale = 1.0 / math.sqrt(head_dim) if scale is None else scale

    grouped_query = query.astype(jnp.float32).reshape(
        batch, num_kv_heads, num_heads // num_kv_heads, head_dim
    )
    logits = (
        jnp.einsum(
            "bkgd,bskd->bkgs", grouped_query, keys.astype(jnp.float32), precision=lax.Precision.HIGHEST
        )
        * scale
    )
    mask = key_mask.astype(bool)[:, None, None, :]
    logits = jnp.where(mask, logits, -jnp.inf)
    row_max = jnp.max(logits, axis=-1, keepdims=True)
    row_max = jnp.where(jnp.isfinite(row_max), row_max, 0.0)  # Fully masked row: avoid inf - inf.
    unnormalised = jnp.where(mask, jnp.exp(logits - row_max), 0.0)
    total = jnp.sum(unnormalised, axis=-1, keepdims=True)
    probabilities = unnormalised / jnp.where(total > 0, total, 1.0)
    return jnp.mean(probabilities, axis=(1, 2))


def rms_norm(x: jax.Array, scale: jax.Array, eps: float = DEFAULT_NORM_EPS) -> jax.Array:
    """LLaMA RMSNorm in float32: ``x * rsqrt(mean(x^2) + eps) * scale``."""
    x = jnp.asarray(x, jnp.float32)
    return x * lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + eps) * jnp.asarray(scale, jnp.float32)


def feature_keys(
    hidden: jax.Array,
    k_proj_kernel: jax.Array,
    k_proj_bias: jax.Array | None = None,
    *,
    norm_scale: jax.Array | None = None,
    norm_eps: float = DEFAULT_NORM_EPS,
) -> jax.Array:
    """AdaptPrune's feature cue: the layer-K key projection of the image tokens, L2-normalised.

    Args:
      hidden: (..., N, d_model) residual-stream input of layer K at the image tokens.
      k_proj_kernel: (d_model, Hkv * D), in x out layout; k_proj_bias: optional (Hkv * D,).
      norm_scale: if given, LLaMA RMSNorm (with this scale) is applied first. By default it is not:
        QUIRK of the released code, which projects the raw residual stream (and applies no RoPE).
      norm_eps: RMSNorm epsilon.

    Returns:
      (..., N, Hkv * D) float32 unit rows. The projection runs in the inputs' common dtype (bf16 in
      the model, like its own k_proj) with float32 accumulation.
    """
    x = rms_norm(hidden, norm_scale, norm_eps) if norm_scale is not None else hidden
    compute_dtype = jax.dtypes.canonicalize_dtype(jnp.result_type(hidden.dtype, k_proj_kernel.dtype))
    projected = jnp.einsum(
        "...d,de->...e",
        x.astype(compute_dtype),
        k_proj_kernel.astype(compute_dtype),
        preferred_element_type=jnp.float32,
        precision=lax.Precision.HIGHEST,
    )
    if k_proj_bias is not None:
        projected = projected + jnp.asarray(k_proj_bias, jnp.float32)
    return l2_normalize(projected)
