"""Token layouts: non-square and multi-grid geometry, invalid slots, and exact reduction to one square grid."""

import jax
import numpy as np
import pytest

import adaptprune_jax as prune
from adaptprune_jax import methods
from adaptprune_jax.grid import square_row_stride
from tests.helpers import small_model_config


def _two_grids():
    """A 3 x 4 grid (id 0), a newline-like token on no grid, then a 5 x 2 grid (id 1): 23 tokens."""
    return prune.concat_layouts(
        prune.grid_layout(3, 4, grid_id=0), prune.off_grid_layout(1), prune.grid_layout(5, 2, grid_id=1)
    )


@pytest.mark.slow
@pytest.mark.parametrize("side", [1, 2, 5, 6, 23, 24, 25])
@pytest.mark.parametrize("sigma", [3.0, 12.0])
def test_layout_prior_is_the_square_prior_bit_for_bit(side, sigma):
    square = np.asarray(prune.center_prior(side, sigma)).reshape(-1)
    layout = prune.square_layout(side * side)
    np.testing.assert_array_equal(np.asarray(prune.layout_center_prior(layout, sigma)), square)
    jitted = jax.jit(lambda: prune.layout_center_prior(prune.square_layout(side * side), sigma))()
    np.testing.assert_array_equal(np.asarray(jitted), square)


def test_prior_per_grid_on_normalised_coordinates():
    layout = _two_grids()
    prior = np.asarray(prune.layout_center_prior(layout, 2.0))
    first, second = prior[:12].reshape(3, 4), prior[13:].reshape(5, 2)
    assert prior[12] == 1.0  # on no grid: no positional correction
    for grid in (first, second):
        assert grid.max() == pytest.approx(1.0)
        np.testing.assert_allclose(grid, grid[::-1, ::-1], rtol=1e-6)  # symmetric about each grid's centre
    # Normalised coordinates: x spans [-(rows // 2), rows // 2] on each axis, as the released prior.
    x_rows, x_cols = np.linspace(-1, 1, 3), np.linspace(-2, 2, 4)
    expected = np.exp(-(x_rows[:, None] ** 2 + x_cols[None, :] ** 2) / (2 * 2.0**2))
    np.testing.assert_allclose(first, expected / expected.max(), rtol=1e-6)


def test_suppression_only_within_a_grid():
    layout = _two_grids()
    keys = np.ones((23, 4), np.float32)  # identical keys: suppression is decided by geometry alone
    factors = np.asarray(prune.suppression_factors(keys, layout=layout, distance_limit=100.0))
    assert np.all(factors[:12, 13:] == 1.0) and np.all(factors[13:, :12] == 1.0)
    assert np.all(factors[12] == 1.0) and np.all(factors[:, 12] == 1.0)
    assert np.all(factors[:12, :12] < 1.0) and np.all(factors[13:, 13:] < 1.0)


def test_adaptprune_on_two_grids_with_invalid_slots():
    rng = np.random.default_rng(0)
    rows = [_two_grids(), prune.concat_layouts(prune.grid_layout(4, 4), prune.grid_layout(2, 2, grid_id=1))]
    layout = prune.stack_layouts(rows)  # (2, 23); the second row has 20 tokens and 3 invalid slots
    assert layout.valid.shape == (2, 23) and not layout.dense and layout.valid[1].sum() == 20
    attention = rng.uniform(size=(2, 23)).astype(np.float32)
    attention[1, 20:] = 10.0  # invalid slots with the largest scores must still never be kept
    keys = rng.normal(size=(2, 23, 8)).astype(np.float32)
    select = jax.jit(lambda a, k, lay: prune.adaptprune_select(a, k, 12, layout=lay))
    kept = np.asarray(select(attention, keys, layout))
    assert kept.shape == (2, 12) and np.all(np.diff(kept, axis=-1) > 0)
    assert kept[1].max() < 20
    # Each row alone, with its own unpadded layout, selects the same tokens.
    for row, row_layout in enumerate(rows):
        n = row_layout.num_tokens
        alone = select(attention[row, :n], keys[row, :n], row_layout)
        np.testing.assert_array_equal(np.asarray(alone), kept[row])


def test_newline_grid_is_row_major_with_a_newline_after_each_row():
    layout = prune.newline_grid_layout(2, 3, grid_id=1)
    np.testing.assert_array_equal(layout.grid, [1, 1, 1, prune.NO_GRID, 1, 1, 1, prune.NO_GRID])
    np.testing.assert_array_equal(layout.row, [0, 0, 0, 0, 1, 1, 1, 0])
    np.testing.assert_array_equal(layout.col, [0, 1, 2, 0, 0, 1, 2, 0])
    np.testing.assert_array_equal(layout.grid_rows, [2, 2, 2, 0, 2, 2, 2, 0])
    np.testing.assert_array_equal(layout.grid_cols, [3, 3, 3, 0, 3, 3, 3, 0])
    assert layout.dense and layout.valid.all()


def test_a_layout_carries_a_bound_on_its_wide_row_strides():
    """Only a grid wider than square (row stride above isqrt(N) + 1) sets ``wide_row_stride``: the
    largest stride rounded up to a multiple of 16; stacking recomputes it over the batch's rows, and
    tree maps (a layout put on a device, traced, sliced) keep it."""
    square = prune.concat_layouts(prune.grid_layout(24, 24), prune.newline_grid_layout(48, 48, 1))
    wide = prune.concat_layouts(prune.grid_layout(24, 24), prune.newline_grid_layout(22, 72, 1))
    assert square.wide_row_stride is None and prune.grid_layout(1, 500).wide_row_stride is None  # one row
    assert square_row_stride(wide.num_tokens) == 47 and wide.wide_row_stride == 80  # stride 73
    assert prune.grid_layout(3, 60).wide_row_stride == 64  # stride 60 > isqrt(180) + 1 = 14
    assert prune.grid_layout(4, 5).wide_row_stride is None  # stride 5 <= isqrt(20) + 1
    batch = prune.stack_layouts([square, wide])
    assert batch.wide_row_stride == 80  # the wide row sets the batch's bound
    assert prune.stack_layouts([square, square]).wide_row_stride is None
    on_device = jax.tree_util.tree_map(jax.numpy.asarray, batch)
    assert (
        on_device.wide_row_stride == 80
        and jax.tree_util.tree_map(lambda x: x[0], on_device).wide_row_stride == 80
    )


def test_masked_baselines_never_keep_invalid_slots():
    rng = np.random.default_rng(1)
    layout = prune.stack_layouts([prune.grid_layout(4, 5), prune.grid_layout(3, 3)])
    valid = np.asarray(layout.valid)
    scores = rng.uniform(size=(2, 20)).astype(np.float32) + 10.0 * ~valid
    for kept in (  # jitted: one program each instead of one per operation
        jax.jit(prune.topk_select, static_argnums=1)(scores, 8, valid),
        jax.jit(prune.random_select, static_argnums=(1, 2, 3))(jax.random.key(0), 20, 8, (2,), valid),
        jax.jit(prune.divprune_select, static_argnums=1)(
            rng.normal(size=(2, 20, 6)).astype(np.float32), 8, valid=valid
        ),
        jax.jit(prune.uniform_layout_select, static_argnums=1)(layout, 8),
    ):
        kept = np.asarray(kept)
        assert kept.shape == (2, 8) and np.all(np.diff(kept, axis=-1) > 0)
        assert np.all(np.take_along_axis(valid, kept, axis=1))


@pytest.mark.slow
@pytest.mark.parametrize("side", [4, 7, 24])
def test_uniform_on_coordinates_equals_the_square_rule(side):
    layout = prune.square_layout(side * side)
    select = jax.jit(prune.uniform_layout_select, static_argnums=1)  # one program per keep, not per op
    for keep in sorted({1, 2, 3, side, side + 1, (side * side) // 3, side * side - 1, side * side}):
        expected = prune.uniform_grid_indices(side * side, keep)
        np.testing.assert_array_equal(np.asarray(select(layout, keep)), expected)


def test_uniform_on_two_grids_spreads_over_both():
    layout = prune.concat_layouts(prune.grid_layout(6, 8), prune.grid_layout(4, 4, grid_id=1))
    kept = np.asarray(prune.uniform_layout_select(layout, 16))
    assert len(set(kept.tolist())) == 16 and (kept < 48).any() and (kept >= 48).any()


def test_grid_methods_refuse_tokens_on_no_grid():
    layout = _two_grids()
    for name in methods.names():
        config = small_model_config(name, keep=22)  # a count every method can take from 23 tokens
        if config.needs_grid and not config.keeps_off_grid_tokens:
            with pytest.raises(ValueError, match=rf"{name}: needs every image token on a grid, but 1 of"):
                config.validate(23, 8, layout)
        else:
            config.validate(23, 8, layout)
