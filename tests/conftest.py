"""Fixtures for every test folder. Parity tests run in exact float32: highest matmul precision in JAX
(and TF32 off in torch, set where torch is first imported: `tests.helpers.exact_torch`). Checkpoints
and compiled runners are session-scoped so the suite compiles each shape once.
"""

from __future__ import annotations

import jax
import numpy as np
import pytest

import tests.keynorm_method  # noqa: F401  (registers a test-only method with the registry)
from tests.helpers import TinyCheckpoint

jax.config.update("jax_default_matmul_precision", "highest")


@pytest.fixture(scope="session")
def tiny_checkpoints(tmp_path_factory):
    """name -> TinyCheckpoint, each written (and its runner built) once per session."""
    cache: dict[str, TinyCheckpoint] = {}

    def get(name: str) -> TinyCheckpoint:
        if name not in cache:
            cache[name] = TinyCheckpoint(name, str(tmp_path_factory.mktemp(name)))
        return cache[name]

    return get


@pytest.fixture
def prompt_rng():
    return np.random.default_rng(1234)
