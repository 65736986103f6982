"""Method configs: validation messages, keep resolution, equivalent tokens, registry, select()."""

import dataclasses

import jax
import numpy as np
import pytest

from adaptprune_jax import (
    METHODS,
    AdaptPruneConfig,
    Cues,
    DivPruneConfig,
    Embeddings,
    FastVConfig,
    FeatureKeys,
    LastTokenAttention,
    RandomConfig,
    Stage,
    UniformConfig,
    adaptprune_select,
    divprune_select,
    make_config,
    topk_select,
    uniform_select,
)

IMAGE_TOKENS = 576
NUM_LAYERS = 32
ALL_CONFIGS = (AdaptPruneConfig, FastVConfig, RandomConfig, UniformConfig, DivPruneConfig)


def test_registry_names_and_make_config():
    builtin = {"adaptprune", "fastv", "random", "uniform", "divprune"}
    assert builtin <= set(METHODS)  # plus what the tests register (tests/keynorm_method.py)
    for name, config_class in METHODS.items():
        assert config_class.name == name
        assert isinstance(make_config(name, keep=64), config_class)
    assert make_config("adaptprune", keep=0.25, distance_limit=3.0).distance_limit == 3.0
    with pytest.raises(
        ValueError,
        match=r"unknown pruning method 'tome'; known methods: "
        r"adaptprune, cdpruner, dart, divprune, fastv, keynorm_fastv, pyramiddrop, random, sparsevlm, uniform, "
        r"visionzip, vispruner\.",
    ):
        make_config("tome")
    with pytest.raises(
        ValueError,
        match=r"unknown setting\(s\) layer for divprune; known settings: keep, renumber_positions",
    ):
        make_config("divprune", layer=2)
    # Harness-wide settings go only to the methods that have them.
    assert make_config("divprune", strict=False, keep=64, layer=2, seed=None) == DivPruneConfig(keep=64)
    assert make_config("random", strict=False, keep=64, layer=3, seed=5) == RandomConfig(
        keep=64, layer=3, seed=5
    )


def test_cue_requests_and_layers():
    requests = {c.name: c().cue_requests() for c in ALL_CONFIGS}
    assert requests == {
        "adaptprune": (LastTokenAttention(), FeatureKeys(normalized=False)),
        "fastv": (LastTokenAttention(),),
        "random": (),
        "uniform": (),
        "divprune": (Embeddings(),),
    }
    assert AdaptPruneConfig(normalize_keys=True).cue_requests()[1] == FeatureKeys(normalized=True)
    assert [c().layer for c in ALL_CONFIGS] == [2, 2, 2, 2, 0]
    assert [c().min_layer for c in ALL_CONFIGS] == [1, 1, 0, 0, 0]
    assert DivPruneConfig(keep=64).layer == 0
    assert [c.has_layer for c in ALL_CONFIGS] == [True, True, True, True, False]
    assert [c.takes_seed for c in ALL_CONFIGS] == [False, False, True, False, False]
    assert [c().renumber_positions for c in ALL_CONFIGS] == [False, False, False, False, True]
    assert FastVConfig(keep=64, layer=3).stages(576) == (Stage(3, 64),)


def test_resolve_keep_counts_and_ratios():
    assert AdaptPruneConfig().resolve_keep(IMAGE_TOKENS) == 57  # int(576 * 0.1), as released
    assert FastVConfig(keep=64).resolve_keep(IMAGE_TOKENS) == 64
    assert FastVConfig(keep=np.int64(64)).resolve_keep(IMAGE_TOKENS) == 64
    assert RandomConfig(keep=1.0).resolve_keep(IMAGE_TOKENS) == IMAGE_TOKENS
    assert UniformConfig(keep=1).resolve_keep(IMAGE_TOKENS) == 1
    assert DivPruneConfig(keep=1 / 3).resolve_keep(IMAGE_TOKENS) == 192


@pytest.mark.parametrize("config_class", ALL_CONFIGS)
def test_keep_errors(config_class):
    with pytest.raises(ValueError, match=r"keep=0 must be >= 1"):
        config_class(keep=0)
    with pytest.raises(ValueError, match=r"keep=-3 must be >= 1"):
        config_class(keep=-3)
    with pytest.raises(ValueError, match=r"keep ratio 1\.5 is outside \(0, 1\]"):
        config_class(keep=1.5)
    with pytest.raises(ValueError, match=r"keep ratio 0\.0 is outside \(0, 1\]"):
        config_class(keep=0.0)
    with pytest.raises(
        ValueError,
        match=r"keep must be an int count or a float ratio in \(0, 1\], "
        r"got bool True",
    ):
        config_class(keep=True)
    with pytest.raises(ValueError, match=r"got str '64'"):
        config_class(keep="64")
    with pytest.raises(
        ValueError,
        match=r"keep=577 exceeds num_image_tokens=576: allowed counts "
        r"are 1\.\.576",
    ):
        config_class(keep=577).resolve_keep(IMAGE_TOKENS)
    with pytest.raises(
        ValueError,
        match=r"keep ratio 0\.001 of num_image_tokens=576 gives "
        r"int\(576 \* 0\.001\) = 0 tokens",
    ):
        config_class(keep=0.001).validate(IMAGE_TOKENS, NUM_LAYERS)


@pytest.mark.parametrize("config_class", [AdaptPruneConfig, FastVConfig])
def test_layer_range_for_attention_methods(config_class):
    with pytest.raises(
        ValueError,
        match=rf"layer=0 is too small for {config_class.name}: allowed "
        r"layer >= 1 \(the attention cue is read at layer K - 1\)",
    ):
        config_class(layer=0)
    config_class(layer=1).validate(IMAGE_TOKENS, NUM_LAYERS)
    config_class(layer=31).validate(IMAGE_TOKENS, NUM_LAYERS)
    with pytest.raises(
        ValueError,
        match=rf"layer=32 is out of range for {config_class.name} with "
        r"num_layers=32: allowed 1\.\.31",
    ):
        config_class(layer=32).validate(IMAGE_TOKENS, NUM_LAYERS)


@pytest.mark.parametrize("config_class", [RandomConfig, UniformConfig])
def test_layer_range_for_score_free_methods(config_class):
    config_class(layer=0).validate(IMAGE_TOKENS, NUM_LAYERS)
    with pytest.raises(ValueError, match=r"layer=-1 is too small for .*: allowed layer >= 0\."):
        config_class(layer=-1)
    with pytest.raises(
        ValueError,
        match=r"layer=40 is out of range for .* with num_layers=32: "
        r"allowed 0\.\.31",
    ):
        config_class(layer=40).validate(IMAGE_TOKENS, NUM_LAYERS)
    with pytest.raises(ValueError, match=r"layer must be an int, got float 2\.0"):
        config_class(layer=2.0)


def test_square_grid_required_only_where_spatial():
    for config_class in (AdaptPruneConfig, UniformConfig):
        with pytest.raises(
            ValueError,
            match=rf"{config_class.name}: num_image_tokens=577 is not a "
            r"perfect square",
        ):
            config_class(keep=64).validate(577, NUM_LAYERS)
    for config_class in (FastVConfig, RandomConfig, DivPruneConfig):
        config_class(keep=64).validate(577, NUM_LAYERS)


def test_adaptprune_hyperparameter_errors():
    with pytest.raises(ValueError, match=r"similarity_sigma must be a positive number, got 0"):
        AdaptPruneConfig(similarity_sigma=0)
    with pytest.raises(ValueError, match=r"prior_sigma must be a positive number, got -1\.0"):
        AdaptPruneConfig(prior_sigma=-1.0)
    with pytest.raises(ValueError, match=r"normalize_keys must be a bool"):
        AdaptPruneConfig(normalize_keys=1)
    with pytest.raises(dataclasses.FrozenInstanceError):
        AdaptPruneConfig().keep = 3


def test_similarity_precision_by_name():
    from jax import lax

    from adaptprune_jax.nms import matmul_precision

    assert matmul_precision("highest") is lax.Precision.HIGHEST
    assert matmul_precision("BF16_bf16_f32_x6") is lax.DotAlgorithmPreset.BF16_BF16_F32_X6
    # one name per precision, so equal settings are equal configs (one compiled program)
    assert AdaptPruneConfig(similarity_precision="BF16_BF16_F32_X6") == AdaptPruneConfig(
        similarity_precision="bf16_bf16_f32_x6"
    )
    with pytest.raises(
        ValueError, match=r"unknown matmul precision 'fast'; known: highest, .*bf16_bf16_f32_x6"
    ):
        AdaptPruneConfig(similarity_precision="fast")
    with pytest.raises(ValueError, match=r"named by a string, got 6"):
        AdaptPruneConfig(similarity_precision=6)
    # The setting reaches the cosines' matmul: off the GPU, XLA refuses TF32 there by name.
    if jax.default_backend() == "cpu":
        with pytest.raises(ValueError, match=r"'TF32_TF32_F32' is not supported by dot_general on CPU"):
            AdaptPruneConfig(keep=16, similarity_precision="tf32_tf32_f32").select(_cues(), 16)


def test_equivalent_tokens():
    # (K * N + (L - K) * M) / L
    assert AdaptPruneConfig().equivalent_tokens(IMAGE_TOKENS, NUM_LAYERS) == (2 * 576 + 30 * 57) / 32
    assert FastVConfig(keep=64, layer=3).equivalent_tokens(IMAGE_TOKENS, 40) == (3 * 576 + 37 * 64) / 40
    assert DivPruneConfig(keep=64).equivalent_tokens(IMAGE_TOKENS, NUM_LAYERS) == 64.0
    assert RandomConfig(keep=1.0).equivalent_tokens(IMAGE_TOKENS, NUM_LAYERS) == 576.0


def _cues(batch=3, grid=8, dim=12, seed=0):
    rng = np.random.default_rng(seed)
    num_tokens = grid * grid
    return Cues(
        attention=rng.uniform(size=(batch, num_tokens)).astype(np.float32),
        keys=rng.normal(size=(batch, num_tokens, dim)).astype(np.float32),
        embeddings=rng.normal(size=(batch, num_tokens, dim)).astype(np.float32),
        rng=jax.random.key(seed),
    )


@pytest.mark.slow
@pytest.mark.parametrize("config_class", ALL_CONFIGS)
def test_select_under_jit_on_a_batch(config_class):
    cues = _cues()
    config = config_class(keep=0.25)
    keep = config.resolve_keep(64)
    selected = np.asarray(jax.jit(config.select, static_argnames="keep")(cues, keep=keep))
    assert selected.shape == (3, keep) and selected.dtype == np.int32
    assert np.all(np.diff(selected, axis=-1) > 0) and selected.min() >= 0 and selected.max() < 64
    # Same answer eagerly, and the method's own function underneath.
    np.testing.assert_array_equal(config.select(cues, keep), selected)
    expected = {
        "adaptprune": lambda: adaptprune_select(cues.attention, cues.keys, keep),
        "fastv": lambda: topk_select(cues.attention, keep),
        "uniform": lambda: np.tile(uniform_select(64, keep), (3, 1)),
        "divprune": lambda: divprune_select(cues.embeddings, keep),
        "random": lambda: selected,
    }[config.name]()
    np.testing.assert_array_equal(selected, expected)


def test_select_only_needs_the_cues_it_asks_for():
    full = _cues()
    bare = Cues(batch_size=2, num_image_tokens=64)
    assert UniformConfig(keep=16).select(bare, 16).shape == (2, 16)
    from_seed = RandomConfig(keep=16, seed=3).select(bare, 16)
    np.testing.assert_array_equal(from_seed, RandomConfig(keep=16, seed=3).select(bare, 16))
    assert not np.array_equal(from_seed, RandomConfig(keep=16, seed=4).select(bare, 16))
    assert not np.array_equal(
        RandomConfig().select(full, 16),
        RandomConfig().select(Cues(attention=full.attention, rng=jax.random.key(99)), 16),
    )
    with pytest.raises(ValueError, match=r"adaptprune needs cues.keys, which is None"):
        AdaptPruneConfig().select(Cues(attention=full.attention), 6)
    with pytest.raises(ValueError, match=r"divprune needs cues.embeddings, which is None"):
        DivPruneConfig().select(bare, 6)
    with pytest.raises(ValueError, match=r"batch_size and num_image_tokens must be set"):
        RandomConfig().select(Cues(), 6)
    assert len(jax.tree_util.tree_leaves(Cues(attention=full.attention))) == 1
