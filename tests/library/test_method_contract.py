"""The contract every registered method keeps, parametrized over the registry (a new method, even one
defined in a test module, is tested here by default): int32 (B, keep), distinct, sorted, in range;
the same under jit and under vmap; a batch equals its rows one by one; keeping all keeps all (except
for a method that merges inside the LLM: it prunes and merges at least one token at every stage)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import adaptprune_jax as prune
from adaptprune_jax import methods
from tests.helpers import random_cues, small_model_config

LAYOUT = prune.grid_layout(6, 6)
NUM_TOKENS = LAYOUT.num_tokens


def _config(name, keep):
    return small_model_config(name, keep=keep, layer=2)


# Selection jitted once per (config, shapes), shared by the tests below: eagerly, a method's loops
# compile anew on every call. The eager path itself is held to the jitted one in
# test_jit_and_vmap_select_the_same.
_select = jax.jit(lambda config, cues, keep: config.select(cues, keep), static_argnums=(0, 2))


def test_registry_lists_the_builtin_methods_and_the_test_method():
    assert {"adaptprune", "divprune", "fastv", "random", "uniform", "keynorm_fastv"} <= set(methods.names())
    assert methods.names() == sorted(methods.names())
    with pytest.raises(ValueError, match="already registered"):
        methods.register(type("Clash", (prune.PruneConfig,), {"name": "fastv"}))


@pytest.mark.parametrize("name", methods.names())
def test_selection_is_distinct_sorted_in_range(name):
    config = _config(name, 9)
    cues = random_cues(config, batch=4, layout=LAYOUT)
    kept = np.asarray(_select(config, cues, 9))
    assert kept.dtype == np.int32 and kept.shape == (4, 9)
    assert np.all(np.diff(kept, axis=-1) > 0) and kept.min() >= 0 and kept.max() < NUM_TOKENS


@pytest.mark.slow
@pytest.mark.parametrize("name", methods.names())
def test_jit_and_vmap_select_the_same(name):
    config = _config(name, 9)
    cues = random_cues(config, batch=4, layout=LAYOUT)
    eager = np.asarray(config.select(cues, 9))
    np.testing.assert_array_equal(np.asarray(_select(config, cues, 9)), eager)
    stacked = jax.tree_util.tree_map(lambda x: jnp.stack([x, x]), cues)
    mapped = jax.jit(jax.vmap(lambda c: config.select(c, 9)))(stacked)
    np.testing.assert_array_equal(np.asarray(mapped), np.stack([eager, eager]))


@pytest.mark.slow
@pytest.mark.parametrize("name", methods.names())
def test_a_batch_equals_its_rows_one_by_one(name):
    config = _config(name, 9)
    cues = random_cues(config, batch=4, layout=LAYOUT)
    batched = np.asarray(_select(config, cues, 9))
    if config.takes_seed:  # one key per row: a row's draw is its own key's, in any batch
        np.testing.assert_array_equal(np.asarray(_select(config, cues, 9)), batched)
        other = cues.replace(rng=jax.random.key(99))
        assert not np.array_equal(np.asarray(_select(config, other, 9)), batched)
        cues = cues.replace(rng=jax.vmap(jax.random.key)(np.arange(4, dtype=np.uint32)))
        batched = np.asarray(_select(config, cues, 9))
    for row in range(4):
        one = jax.tree_util.tree_map(lambda x, row=row: x[row : row + 1] if jnp.ndim(x) else x, cues)
        if config.takes_seed:  # a single key's draw for a batch of one is its row's draw
            one = one.replace(rng=one.rng[0])
        one = one.replace(batch_size=1)
        np.testing.assert_array_equal(np.asarray(_select(config, one, 9))[0], batched[row])


@pytest.mark.parametrize("name", [n for n in methods.names() if not methods.get(n).merges_in_llm])
def test_keeping_every_token_keeps_every_token(name):
    config = _config(name, 1.0)
    cues = random_cues(config, batch=2, layout=LAYOUT)
    kept = np.asarray(_select(config, cues, config.resolve_keep(NUM_TOKENS)))
    np.testing.assert_array_equal(kept, np.broadcast_to(np.arange(NUM_TOKENS), (2, NUM_TOKENS)))


@pytest.mark.parametrize("name", methods.names())
def test_config_declarations_are_consistent(name):
    config_class = methods.get(name)
    config = _config(name, 9)
    assert config_class.name == name and isinstance(config, config_class)
    assert all(isinstance(request, prune.CUE_TYPES) for request in config.cue_requests())
    text_tower = any(getattr(request, "needs_text_tower", False) for request in config.cue_requests())
    assert config_class.needs_text_tower == text_tower
    assert ("layer" in methods.setting_names(name)) == config_class.has_layer
    assert ("seed" in methods.setting_names(name)) == config_class.takes_seed
    assert config.equivalent_tokens(NUM_TOKENS, 4) <= NUM_TOKENS
    config.validate(NUM_TOKENS, 4, LAYOUT)
