"""Shared fixtures: tiny llava-hf checkpoints written by transformers, and the JAX runner loaded from them.

Parity tests run in exact float32 on both sides: highest matmul precision in JAX, no TF32 in torch.
Checkpoints and compiled runners are session-scoped so the suite compiles each shape once.
"""

from __future__ import annotations

import jax
import numpy as np
import pytest
import torch

jax.config.update("jax_default_matmul_precision", "highest")
torch.backends.cuda.matmul.allow_tf32 = False
torch.backends.cudnn.allow_tf32 = False

from models import presets  # noqa: E402
from models.checkpoint import load_checkpoint  # noqa: E402
from models.generate import LlavaRunner  # noqa: E402

# How each tiny preset is written: one per on-disk variant the loader must handle.
CHECKPOINT_VARIANTS = {
    "tiny": dict(key_spelling="saved"),  # save_pretrained, one file
    "tiny-gqa": dict(key_spelling="saved", max_shard_size="300KB"),  # sharded with an index
    "tiny-full": dict(key_spelling="state_dict"),  # newer in-memory key spelling
}


class TinyCheckpoint:
    def __init__(self, name: str, directory: str):
        self.name = name
        self.directory = directory
        self.hf_config = presets.llava_config(name)
        self.torch_model = presets.random_torch_model(self.hf_config, seed=0)
        presets.write_random_checkpoint(
            self.hf_config, directory, model=self.torch_model, **CHECKPOINT_VARIANTS[name]
        )
        _, self.jax_model = load_checkpoint(directory)
        self.runner = LlavaRunner(self.jax_model)
        self.config = self.jax_model.config
        self.pad_token_id = self.hf_config.text_config.pad_token_id


@pytest.fixture(scope="session")
def tiny_checkpoints(tmp_path_factory):
    cache: dict[str, TinyCheckpoint] = {}

    def get(name: str) -> TinyCheckpoint:
        if name not in cache:
            cache[name] = TinyCheckpoint(name, str(tmp_path_factory.mktemp(name)))
        return cache[name]

    return get


def make_prompt(config, rng: np.random.Generator, before: int, after: int) -> list[int]:
    """BOS, `before` word ids, the image span, `after` word ids (ids from the tiny vocabulary)."""
    words = lambda n: [int(t) for t in rng.integers(4, 60, n)]  # noqa: E731
    return [1] + words(before) + [config.image_token_index] * config.num_image_tokens + words(after)


@pytest.fixture
def prompt_rng():
    return np.random.default_rng(1234)


def random_pixels(rng: np.random.Generator, batch: int, size: int) -> np.ndarray:
    return rng.standard_normal((batch, 3, size, size)).astype(np.float32)
