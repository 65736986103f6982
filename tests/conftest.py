"""Fixtures for every test folder. Parity tests run in exact float32: highest matmul precision in JAX
(and TF32 off in torch, set where torch is first imported: `tests.helpers.exact_torch`). Checkpoints
and compiled runners are session-scoped so the suite compiles each shape once.
"""

from __future__ import annotations

import os
import shutil
import tempfile

# One persistent compilation cache for the whole session, set before JAX is imported so that every
# test process and every subprocess it starts (evaluation, benchmark and training runs) reads and fills
# it: a program the suite compiles in several places (the tiny model's prefill at a shape many tests
# use, a benchmark worker's stages) compiles once. Made fresh per session and removed after it; a
# JAX_COMPILATION_CACHE_DIR already set (the xdist controller's, or a user's) is used as it is. A program
# a test starts with --compile_cache= (off) still reads and fills it: the variable is JAX's own setting.
_SESSION_CACHE = None
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    _SESSION_CACHE = tempfile.mkdtemp(prefix="adaptprune-jax-test-compile-cache-")
    os.environ["JAX_COMPILATION_CACHE_DIR"] = _SESSION_CACHE
    os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
    os.environ["JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES"] = "0"

import jax  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

import tests.keynorm_method  # noqa: F401, E402  (registers a test-only method with the registry)
from tests.helpers import TinyCheckpoint  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")


def pytest_unconfigure(config):
    if _SESSION_CACHE is not None:  # only the process that made it (the controller under xdist)
        shutil.rmtree(_SESSION_CACHE, ignore_errors=True)


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
