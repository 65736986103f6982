"""Host time of one jitted call, by how the weights are passed: nnx.State vs a flat tuple of arrays.

At batch 1 the host is on the critical path (the device waits between kernels), so per-call host
time is latency. This times a jitted function that ignores the weights (the device work is nil) with
LLaVA's real parameter tree: the preset's layer counts and parameter names, widths shrunk so it runs
anywhere. Results in WORKSPACE.md.

  python -m experiments.benchmark.dispatch_overhead --model=llava-1.5-7b
"""

from __future__ import annotations

import dataclasses
import json

from absl import app

from experiments.benchmark.timing import median, run_stamp, timed
from experiments.flag_config import define_flags, from_flags, setting


@dataclasses.dataclass(frozen=True)
class DispatchOverheadConfig:
    """Whose parameter tree is passed, and how many calls each variant's median is over."""

    model: str = setting("llava-1.5-7b", "Preset whose parameter tree (layer counts, names) is used.")
    calls: int = setting(300, "Timed calls per variant (the median is reported).")


def _median_us(fn, calls: int) -> float:
    import jax

    return median(timed(fn, calls, jax.block_until_ready)) * 1e3  # timed() warms up (compiles) first


def measure(model_name: str, calls: int) -> dict:
    """Median host time per call of each way of passing the weights, with the run's identity."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from models import presets
    from models.config import from_hf_config
    from models.generate import LlavaRunner
    from models.llava import LlavaForConditionalGeneration

    hf_config = presets.llava_config(model_name)
    narrow = dict(hidden_size=64, intermediate_size=128, num_attention_heads=2)
    for key, value in dict(narrow, num_key_value_heads=2, vocab_size=128).items():
        setattr(hf_config.text_config, key, value)
    for key, value in narrow.items():
        setattr(hf_config.vision_config, key, value)
    model = LlavaForConditionalGeneration(from_hf_config(hf_config), rngs=nnx.Rngs(0))
    state = nnx.split(model)[1]  # what the runner passed before it flattened the weights
    weights = LlavaRunner(model).weights
    x = jnp.ones((4,))
    ignore_weights = jax.jit(lambda weights, v: v + 1)
    no_weights = jax.jit(lambda v: v + 1)
    return {
        "model": model_name,
        "arrays": len(weights),
        "calls": calls,
        "device": str(jax.devices()[0]),
        **run_stamp("experiments.benchmark.dispatch_overhead"),
        "us_per_call": {
            "nnx_state": _median_us(lambda: ignore_weights(state, x), calls),
            "flat_tuple": _median_us(lambda: ignore_weights(weights, x), calls),
            "no_weights": _median_us(lambda: no_weights(x), calls),
        },
    }


def main(argv):
    del argv
    settings = from_flags(DispatchOverheadConfig)
    print(json.dumps(measure(settings.model, settings.calls), indent=1))


if __name__ == "__main__":
    define_flags(DispatchOverheadConfig)
    app.run(main)
