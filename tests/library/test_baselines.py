"""FastV top-k, random, uniform and DivPrune selections."""

import math

import jax
import numpy as np
import pytest

from adaptprune_jax import divprune_select, random_select, topk_select, uniform_grid_indices, uniform_select


def assert_valid_selection(selected, num_tokens, keep):
    selected = np.asarray(selected)
    assert selected.dtype == np.int32 and selected.shape[-1] == keep
    assert selected.min() >= 0 and selected.max() < num_tokens
    assert np.all(np.diff(selected, axis=-1) > 0)  # sorted and distinct


# ----------------------------------------------------------------------------- FastV top-k


def test_topk_matches_stable_argsort_with_ties_to_lower_index():
    rng = np.random.default_rng(0)
    scores = (rng.integers(0, 6, size=(4, 49)) / 5).astype(np.float32)  # many exact ties
    keep = 11
    got = np.asarray(jax.jit(topk_select, static_argnums=1)(scores, keep))
    expected = np.sort(np.argsort(-scores, axis=-1, kind="stable")[:, :keep], axis=-1)
    np.testing.assert_array_equal(got, expected)
    assert_valid_selection(got, 49, keep)
    np.testing.assert_array_equal(topk_select(np.zeros(9, np.float32), 4), [0, 1, 2, 3])


# ----------------------------------------------------------------------------- random


def test_random_is_seeded_distinct_and_independent_per_row():
    key = jax.random.key(7)
    first = np.asarray(random_select(key, 576, 57, (8,)))
    assert first.shape == (8, 57)
    assert_valid_selection(first, 576, 57)
    np.testing.assert_array_equal(first, random_select(key, 576, 57, (8,)))
    assert len({row.tobytes() for row in first}) == 8  # rows differ
    assert not np.array_equal(first, random_select(jax.random.key(8), 576, 57, (8,)))
    assert_valid_selection(random_select(key, 576, 576), 576, 576)


def test_random_is_uniform_over_tokens():
    counts = np.bincount(np.asarray(random_select(jax.random.key(0), 16, 4, (4000,))).ravel(), minlength=16)
    np.testing.assert_allclose(counts / 4000, 4 / 16, atol=0.03)  # 1000 expected; 4.5 sigma ~ 0.03


# ----------------------------------------------------------------------------- uniform


def test_uniform_exact_count_for_every_keep_on_24x24():
    for keep in range(1, 577):
        assert_valid_selection(uniform_grid_indices(576, keep), 576, keep)
    for keep in (1, 57, 100, 576):
        np.testing.assert_array_equal(uniform_select(576, keep), uniform_grid_indices(576, keep))


@pytest.mark.parametrize("grid", [1, 2, 3, 5, 7])
def test_uniform_exact_count_on_small_grids(grid):
    for keep in range(1, grid * grid + 1):
        assert_valid_selection(uniform_grid_indices(grid * grid, keep), grid * grid, keep)


@pytest.mark.parametrize("keep,stride,offset", [(64, 3, 1), (144, 2, 1), (576, 1, 0), (16, 6, 3)])
def test_uniform_square_keep_is_a_regular_stride_grid(keep, stride, offset):
    rows, cols = np.divmod(uniform_grid_indices(576, keep), 24)
    side = math.isqrt(keep)
    lines = offset + stride * np.arange(side)
    np.testing.assert_array_equal(rows, np.repeat(lines, side))
    np.testing.assert_array_equal(cols, np.tile(lines, side))


def test_uniform_rejects_non_square_and_bad_keep():
    with pytest.raises(ValueError, match=r"num_image_tokens=575 is not a perfect square"):
        uniform_select(575, 10)
    with pytest.raises(ValueError, match=r"keep=577 is out of range: allowed 1\.\.576"):
        uniform_select(576, 577)


# ----------------------------------------------------------------------------- DivPrune


def reference_divprune(embeddings, keep):
    """The released DivPrune loop in float64, plus each pick's margin over the runner-up (exact ties,
    from duplicated embeddings, tie in float32 too and are excluded: argmax takes the first)."""
    unit = embeddings / np.linalg.norm(embeddings, axis=1, keepdims=True)
    distance = 1.0 - unit @ unit.T
    selected, margins = [], []
    for step in range(keep):
        if step == 0:
            scores = np.sort(distance, axis=0)[1, :]  # torch.topk(m, 2, dim=0, largest=False).values[1]
        else:
            scores = distance[selected].min(axis=0)
        chosen = int(np.argmax(scores))
        assert chosen not in selected, "reference inputs must not exhaust distinct tokens"
        others = np.delete(scores, [chosen] + selected)
        runner_up = np.max(others[others != scores[chosen]], initial=-np.inf)
        margins.append(scores[chosen] - runner_up)
        selected.append(chosen)
    return np.sort(selected), np.array(margins)


def test_divprune_matches_released_loop():
    rng = np.random.default_rng(11)
    well_conditioned = 0
    for grid, keep, batch in [(6, 5, 6), (6, 30, 6), (12, 14, 6), (12, 100, 6), (24, 57, 4)]:
        num_tokens = grid * grid
        embeddings = rng.normal(size=(batch, num_tokens, 24))
        embeddings[:, 1::7] = embeddings[:, 0::7][:, : embeddings[:, 1::7].shape[1]]  # exact duplicates
        embeddings += rng.normal(size=(batch, 1, 24)) * 0.5  # a shared component, as in real features
        embeddings = embeddings.astype(np.float32)
        got = np.asarray(jax.jit(divprune_select, static_argnums=1)(embeddings, keep))
        assert_valid_selection(got, num_tokens, keep)
        for row in range(batch):
            expected, margins = reference_divprune(embeddings[row].astype(np.float64), keep)
            if margins.min() > 1e-5:  # float32 distances are good to ~1e-7; below this it's a coin flip
                well_conditioned += 1
                np.testing.assert_array_equal(got[row], expected, err_msg=f"{grid=} {keep=} {row=}")
    assert well_conditioned >= 24


def test_divprune_never_repeats_on_identical_embeddings():
    embeddings = np.ones((2, 16, 4), np.float32)
    for keep in (1, 8, 16):
        np.testing.assert_array_equal(divprune_select(embeddings, keep), np.tile(np.arange(keep), (2, 1)))
