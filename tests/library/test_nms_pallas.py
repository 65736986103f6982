"""The Pallas NMS kernel (run in interpret mode here) selects exactly what the XLA loop selects."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import adaptprune_jax as prune


@pytest.mark.slow
@pytest.mark.parametrize("num_tokens, keep", [(16, 5), (64, 17), (576, 64)])
def test_every_nms_implementation_selects_the_same_tokens(num_tokens, keep):
    rng = np.random.default_rng(num_tokens)
    scores = rng.random((2, num_tokens)).astype(np.float32)
    scores[1, ::3] = scores[1, 0]  # exact ties
    keys = jnp.asarray(rng.standard_normal((2, num_tokens, 8)), jnp.float32)
    # jitted: one program per implementation (eagerly, each operation compiles for these shapes)
    select = jax.jit(prune.adaptive_nms, static_argnames=("keep", "implementation"))
    results = {
        impl: np.asarray(select(jnp.asarray(scores), keys, keep=keep, implementation=impl))
        for impl in prune.NMS_IMPLEMENTATIONS
    }
    for impl, kept in results.items():
        np.testing.assert_array_equal(kept, results["xla"], err_msg=impl)


def test_pallas_kernel_never_keeps_a_token_twice_on_all_zero_scores():
    keys = jnp.asarray(np.random.default_rng(0).standard_normal((1, 64, 4)), jnp.float32)
    kept = np.asarray(prune.adaptive_nms(jnp.zeros((1, 64)), keys, 10, implementation="pallas"))
    np.testing.assert_array_equal(kept[0], np.arange(10))


def test_unknown_implementation_is_refused():
    with pytest.raises(ValueError, match="unknown NMS implementation 'cuda'"):
        prune.adaptive_nms(jnp.ones((16,)), jnp.ones((16, 2)), 2, implementation="cuda")
