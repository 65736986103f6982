"""experiments.benchmark.dispatch_overhead keeps the real parameter tree while shrinking the widths."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import pytest
from flax import nnx

from experiments.benchmark import dispatch_overhead
from models import presets
from models.config import from_hf_config
from models.llava import LlavaForConditionalGeneration


class _OneKey:
    """Stands in for nnx.Rngs when only shapes are wanted: every parameter draws from one fixed key.
    Under eval_shape an nnx.Rngs counter is a tracer, and each of its hundreds of updates makes flax
    ask the tracer for a sharding, whose error message JAX builds by searching the whole trace."""

    def params(self):
        return jax.random.key(0)


@pytest.mark.slow
def test_narrow_model_has_the_full_size_parameter_tree():
    cfg = from_hf_config(presets.llava_config("llava-1.5-7b"))
    abstract = nnx.eval_shape(lambda: LlavaForConditionalGeneration(cfg, dtype=jnp.bfloat16, rngs=_OneKey()))
    full_size_arrays = len(jax.tree.leaves(nnx.state(abstract)))
    result = dispatch_overhead.measure("llava-1.5-7b", calls=2)
    assert result["arrays"] == full_size_arrays
    assert set(result["us_per_call"]) == {"nnx_state", "flat_tuple", "no_weights"}
    assert all(value > 0 for value in result["us_per_call"].values())
