"""The attention and feature cues against float64 NumPy computations of what they stand for."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from adaptprune_jax import feature_keys, l2_normalize, last_token_attention


def full_attention_rows(q, k, valid, rows):
    """float64 full causal attention with padding (B, H, S, S), GQA by repeating kv heads; then the
    requested query row of each batch element, averaged over heads."""
    batch, seq, heads, dim = q.shape
    kv_heads = k.shape[2]
    k = np.repeat(k, heads // kv_heads, axis=2)  # head h -> kv head h // (H // Hkv)
    logits = np.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(dim)
    allowed = np.tril(np.ones((seq, seq), bool))[None, None] & valid[:, None, None, :]
    logits = np.where(allowed, logits, -np.inf)
    logits -= np.where(allowed.any(-1, keepdims=True), logits.max(-1, keepdims=True), 0.0)
    probs = np.where(allowed, np.exp(logits), 0.0)
    probs /= np.maximum(probs.sum(-1, keepdims=True), 1e-300)  # rows with no key (padding) stay 0
    return np.stack([probs[b, :, rows[b]].mean(0) for b in range(batch)])


@pytest.mark.parametrize("heads,kv_heads", [(8, 2), (4, 4), (6, 1)])
def test_last_token_attention_matches_full_attention(heads, kv_heads):
    rng = np.random.default_rng(heads * 10 + kv_heads)
    batch, seq, dim = 3, 20, 16
    q = rng.normal(size=(batch, seq, heads, dim)) * 2
    k = rng.normal(size=(batch, seq, kv_heads, dim)) * 2
    valid = np.ones((batch, seq), bool)
    valid[1, :5] = False  # left padding
    valid[2, 15:] = False  # right padding: the last prompt token is at 14
    last = np.array([seq - 1, seq - 1, 14])
    expected = full_attention_rows(q, k, valid, last)

    query = q[np.arange(batch), last]  # (B, H, D)
    key_mask = valid & (np.arange(seq)[None] <= last[:, None])
    got = np.asarray(jax.jit(last_token_attention)(query.astype(np.float32), k.astype(np.float32), key_mask))
    assert got.shape == (batch, seq) and got.dtype == np.float32
    np.testing.assert_allclose(got, expected, rtol=2e-5, atol=1e-7)
    assert np.all(got[~key_mask] == 0.0)
    np.testing.assert_allclose(got.sum(-1), 1.0, rtol=1e-5)


def test_last_token_attention_bf16_inputs_fully_masked_row_and_no_square_matrix():
    rng = np.random.default_rng(0)
    batch, seq, heads, kv_heads, dim = 2, 12, 4, 2, 8
    query = rng.normal(size=(batch, heads, dim)).astype(np.float32)
    keys = rng.normal(size=(batch, seq, kv_heads, dim)).astype(np.float32)
    key_mask = np.ones((batch, seq), bool)
    key_mask[1] = False
    got = last_token_attention(jnp.asarray(query, jnp.bfloat16), jnp.asarray(keys, jnp.bfloat16), key_mask)
    assert got.dtype == jnp.float32
    np.testing.assert_array_equal(got[1], 0.0)  # nothing to attend: zeros, not NaN
    reference = last_token_attention(query, keys, np.ones_like(key_mask))
    np.testing.assert_allclose(got[0], reference[0], rtol=0.05, atol=1e-3)
    # Only the one query row: no intermediate is (.., S, S).
    jaxpr = jax.make_jaxpr(last_token_attention)(query, keys, key_mask)
    shapes = [v.aval.shape for eqn in jaxpr.jaxpr.eqns for v in eqn.outvars]
    assert not any(len(s) >= 2 and s[-1] == seq and s[-2] == seq for s in shapes)


def test_last_token_attention_rejects_bad_head_counts():
    with pytest.raises(ValueError, match=r"multiple of kv heads"):
        last_token_attention(np.zeros((1, 6, 4)), np.zeros((1, 3, 4, 4)), np.ones((1, 3), bool))


def _reference_keys(hidden, kernel, bias=None, norm_scale=None, eps=1e-6):
    """float64; rows whose key is zero stay zero (as torch's F.normalize)."""
    x = hidden.astype(np.float64)
    if norm_scale is not None:
        x = x / np.sqrt((x**2).mean(-1, keepdims=True) + eps) * norm_scale
    k = x @ kernel.astype(np.float64)
    if bias is not None:
        k = k + bias
    return k / np.maximum(np.linalg.norm(k, axis=-1, keepdims=True), 1e-12)


@pytest.mark.parametrize("use_norm", [False, True])
@pytest.mark.parametrize("use_bias", [False, True])
def test_feature_keys_match_projection(use_norm, use_bias):
    rng = np.random.default_rng(int(use_norm) * 2 + int(use_bias))
    batch, tokens, d_model, out = 2, 9, 32, 24
    # A large, uneven residual stream: RMSNorm then changes the direction of the keys noticeably.
    hidden = (rng.normal(size=(batch, tokens, d_model)) * rng.uniform(0.1, 30, size=d_model)).astype(
        np.float32
    )
    kernel = (rng.normal(size=(d_model, out)) / np.sqrt(d_model)).astype(np.float32)
    bias = rng.normal(size=out).astype(np.float32) if use_bias else None
    norm_scale = rng.uniform(0.5, 1.5, size=d_model).astype(np.float32) if use_norm else None
    got = np.asarray(jax.jit(feature_keys)(hidden, kernel, bias, norm_scale=norm_scale))
    assert got.shape == (batch, tokens, out) and got.dtype == np.float32
    np.testing.assert_allclose(got, _reference_keys(hidden, kernel, bias, norm_scale), atol=2e-6)
    np.testing.assert_allclose(np.linalg.norm(got, axis=-1), 1.0, rtol=1e-6)
    if use_norm:  # The quirk matters: without the norm the keys differ.
        unnormed = np.asarray(feature_keys(hidden, kernel, bias))
        assert np.abs(unnormed - got).max() > 1e-2


def test_feature_keys_bf16_and_zero_rows():
    rng = np.random.default_rng(5)
    hidden = rng.normal(size=(1, 4, 16)).astype(np.float32)
    hidden[0, 2] = 0.0
    kernel = rng.normal(size=(16, 8)).astype(np.float32)
    got = feature_keys(jnp.asarray(hidden, jnp.bfloat16), jnp.asarray(kernel, jnp.bfloat16))
    assert got.dtype == jnp.float32
    np.testing.assert_array_equal(got[0, 2], 0.0)  # zero input: zero key, not NaN
    np.testing.assert_allclose(got[0, [0, 1, 3]], _reference_keys(hidden, kernel)[0, [0, 1, 3]], atol=0.03)
    np.testing.assert_allclose(l2_normalize(got), got, atol=1e-6)
