"""The neighbour-window form of the adaptive NMS selects what the dense form selects, and AdaptPrune's
multi-grid rule matches a float64 NumPy reference on anyres-shaped layouts."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import adaptprune_jax as prune
from adaptprune_jax import nms, nms_window
from adaptprune_jax.nms_window import window_offsets
from tests.nms_reference import reference_adaptprune, reference_prior

FIELDS = ("row", "col", "grid", "grid_rows", "grid_cols", "valid")
FLOAT32_RESOLUTION = 1e-4  # as in test_nms.py: a float64 margin float32 arithmetic cannot flip


def anyres_layout(rows: int, cols: int, base: int = 24) -> prune.TokenLayout:
    """LLaVA-NeXT's packing: a base x base grid (id 0), then a rows x cols grid (id 1) with a newline
    token after each of its rows."""
    return prune.concat_layouts(
        prune.grid_layout(base, base), prune.newline_grid_layout(rows, cols, grid_id=1)
    )


def smooth_keys(rng, layout, dim):
    """Keys blurred over each grid's cells, so neighbours are near-duplicates and suppression acts."""
    fields = {name: np.asarray(getattr(layout, name)) for name in FIELDS}
    keys = rng.normal(size=(fields["grid"].size, dim))
    for grid_id in set(fields["grid"].tolist()) - {prune.NO_GRID}:
        members = np.flatnonzero(fields["grid"] == grid_id)
        shape = (int(fields["grid_rows"][members[0]]), int(fields["grid_cols"][members[0]]), dim)
        field = rng.normal(size=shape)
        for _ in range(3):
            for axis in (0, 1):
                field = sum(
                    w * np.roll(field, t, axis) for t, w in zip(range(-2, 3), (0.1, 0.2, 0.4, 0.2, 0.1))
                )
        keys[members] = (field / field.std() + 0.1 * rng.normal(size=shape)).reshape(-1, dim)
    return keys.astype(np.float32)


def _orders(layout, keep, forms=("dense", "window"), limits=(5.0,), implementation="xla"):
    """One jitted program: the selection order of every (form, limit) for AdaptPrune's scores."""

    def run(attention, keys):
        scores = nms.adaptprune_scores(attention, layout, 12.0)
        return {
            (form, limit): nms.adaptive_nms_order(
                scores,
                keys,
                keep,
                layout=layout,
                distance_limit=limit,
                form=form,
                implementation=implementation,
            )
            for form in forms
            for limit in limits
        }

    return jax.jit(run)


# ----------------------------------------------------------------------------- the factors


def test_window_factors_are_the_dense_factors_bit_for_bit():
    """Every pair the dense form suppresses is a listed neighbour with the same float32 factor; every
    other dense factor is exactly 1 (an anyres row: base grid, 48 x 48 grid, newlines)."""
    layout = anyres_layout(48, 48)
    keys = smooth_keys(np.random.default_rng(0), layout, 16)
    num_tokens = layout.num_tokens
    dense, (neighbours, window, layout_ok, band_ok) = jax.jit(
        lambda k: (
            prune.suppression_factors(k, layout=layout),
            prune.window_suppression_factors(k, layout=layout),
        )
    )(keys)
    dense, neighbours, window = map(np.asarray, (dense, neighbours, window))
    assert bool(layout_ok) and bool(band_ok)
    assert neighbours.shape == window.shape == (num_tokens, len(window_offsets(5.0))) == (num_tokens, 81)
    listed = neighbours < num_tokens
    rows = np.broadcast_to(np.arange(num_tokens)[:, None], neighbours.shape)
    np.testing.assert_array_equal(window[listed], dense[rows[listed], neighbours[listed]])
    assert np.all(window[~listed] == 1.0)
    unlisted = np.ones_like(dense, bool)
    unlisted[rows[listed], neighbours[listed]] = False
    assert np.all(dense[unlisted] == 1.0) and (dense < 1.0).sum() > 10 * num_tokens  # not vacuous


def test_band_factors_are_the_dense_factors_bit_for_bit():
    """Each band position holds the dense factor of its partner token, bit for bit (1 where the band
    overhangs the row), and every dense factor below 1 is in the band; with the layout static (as
    here) and traced alike."""
    layout = anyres_layout(48, 48)
    keys = smooth_keys(np.random.default_rng(0), layout, 16)
    num_tokens = layout.num_tokens
    block, reach = nms_window.band_geometry(5.0, num_tokens, layout.wide_row_stride)
    partner = np.asarray(nms_window.band_partners(num_tokens, block, reach))
    is_token = (partner >= 0) & (partner < num_tokens)
    rows = np.broadcast_to(np.arange(num_tokens)[:, None], partner.shape)
    static = jax.jit(
        lambda k: (
            prune.suppression_factors(k, layout=layout),
            nms.band_suppression_factors(k, layout=layout),
        )
    )
    traced = jax.jit(
        lambda k, lay: (prune.suppression_factors(k, layout=lay), nms.band_suppression_factors(k, layout=lay))
    )
    for dense, band in (static(keys), traced(keys, jax.tree_util.tree_map(jnp.asarray, layout))):
        dense, band = np.asarray(dense), np.asarray(band)
        assert band.shape == (num_tokens, block + 2 * reach)
        np.testing.assert_array_equal(band[is_token], dense[rows[is_token], partner[is_token]])
        assert np.all(band[~is_token] == 1.0)
        in_band = np.zeros_like(dense, bool)
        in_band[rows[is_token], partner[is_token]] = True
        assert np.all(dense[~in_band] == 1.0) and (band < 1.0).sum() > 10 * num_tokens  # not vacuous


def test_factors_of_a_batch_equal_each_rows_own():
    """The factor functions take a batch of rows (layouts of different token counts, padded; the
    band gathered in groups of blocks over all rows at once): each row's factors equal its own call,
    bit for bit, and the checks hold over the batch."""
    layouts = [anyres_layout(48, 48), anyres_layout(37, 48)]
    batch_layout = prune.stack_layouts(layouts)
    rng = np.random.default_rng(5)
    single = [jax.tree_util.tree_map(lambda x, row=row: x[row], batch_layout) for row in range(len(layouts))]
    keys = np.stack([smooth_keys(rng, lay, 16) for lay in single])

    def both(k, lay):
        return prune.window_suppression_factors(k, layout=lay), nms.band_suppression_factors(k, layout=lay)

    (neighbours, window, layout_ok, band_ok), band = jax.jit(both)(keys, batch_layout)
    assert bool(layout_ok) and bool(band_ok)
    assert window.shape[0] == band.shape[0] == len(layouts)
    for row, lay in enumerate(single):
        (row_neighbours, row_window, _, _), row_band = jax.jit(both)(keys[row], lay)
        np.testing.assert_array_equal(neighbours[row], row_neighbours)
        np.testing.assert_array_equal(window[row], row_window)
        np.testing.assert_array_equal(band[row], row_band)
    assert (np.asarray(window[1]) < 1.0).sum() > 10 * int(np.asarray(layouts[1].valid).sum())  # not vacuous


# ----------------------------------------------------------------------------- selections


def _hard_cases(rng, num_tokens, dim):
    """Rows of (attention, keys): random; coarse tied scores; smooth keys; all-zero keys; every key
    identical; all-zero scores."""
    side = int(np.sqrt(num_tokens))
    layout = prune.grid_layout(side, side)
    attention = [
        rng.uniform(size=num_tokens),
        rng.integers(1, 5, num_tokens) / 4.0,
        rng.uniform(size=num_tokens),
        rng.uniform(size=num_tokens),
        rng.integers(1, 3, num_tokens) / 2.0,
        np.zeros(num_tokens),
    ]
    keys = [
        rng.normal(size=(num_tokens, dim)),
        smooth_keys(rng, layout, dim),
        smooth_keys(rng, layout, dim),
        np.zeros((num_tokens, dim)),
        np.tile(rng.normal(size=(1, dim)), (num_tokens, 1)),
        smooth_keys(rng, layout, dim),
    ]
    return np.stack(attention).astype(np.float32), np.stack(keys).astype(np.float32)


def test_window_selects_what_dense_selects_on_the_24x24_grid():
    """Pick for pick, on LLaVA-1.5's grid (the band, 388 tokens wide, is narrower than its 576), at limits
    3 / 5 / 7 and below one cell (then both are the top-k of the prior-weighted scores)."""
    rng = np.random.default_rng(1)
    attention, keys = _hard_cases(rng, 576, 32)
    limits = (3.0, 5.0, 7.0)
    orders = {
        key: np.asarray(order) for key, order in _orders(None, 64, limits=limits)(attention, keys).items()
    }
    for limit in limits:
        np.testing.assert_array_equal(orders["window", limit], orders["dense", limit], err_msg=str(limit))
    below_one_cell = _orders(None, 64, forms=("window",), limits=(0.5,))(attention, keys)["window", 0.5]
    scores = np.asarray(nms.adaptprune_scores(attention, None, 12.0))
    topk = np.asarray(prune.topk_select(scores, 64))
    np.testing.assert_array_equal(np.sort(below_one_cell, axis=-1), topk)
    for row in orders["window", 5.0]:
        assert len(set(row.tolist())) == 64
    np.testing.assert_array_equal(orders["window", 5.0][-1], np.arange(64))  # all-zero scores: first indices
    assert not np.array_equal(np.sort(orders["window", 5.0][2]), topk[2])  # suppression acted


def test_pallas_window_kernel_selects_what_the_xla_loops_select():
    """The window form's Pallas kernel (band rows), on a multi-grid layout with newline tokens and a
    padded row with invalid slots (a band as wide as the row), and on the 24 x 24 grid (a narrower
    band); Pallas' interpreter on the CPU, Triton on a GPU."""
    rng = np.random.default_rng(2)
    layout = prune.stack_layouts([anyres_layout(9, 12, base=6), anyres_layout(7, 10, base=6)])
    num_tokens = layout.num_tokens
    attention = rng.uniform(size=(2, num_tokens)).astype(np.float32)
    keys = np.stack([smooth_keys(rng, anyres_layout(9, 12, base=6), 8)] * 2)
    xla = _orders(layout, 24, limits=(2.0,))(attention, keys)
    pallas = _orders(layout, 24, forms=("window",), limits=(2.0,), implementation="pallas")(attention, keys)
    np.testing.assert_array_equal(xla["window", 2.0], xla["dense", 2.0])
    np.testing.assert_array_equal(pallas["window", 2.0], xla["dense", 2.0])
    attention, keys = _hard_cases(rng, 576, 8)
    xla = _orders(None, 32, forms=("dense",))(attention[:2], keys[:2])
    pallas = _orders(None, 32, forms=("window",), implementation="pallas")(attention[:2], keys[:2])
    np.testing.assert_array_equal(pallas["window", 5.0], xla["dense", 5.0])


def test_window_below_one_cell_keeps_the_top_k():
    """A negative limit: not even the kept token itself is in the window; no token is kept twice."""
    rng = np.random.default_rng(5)
    scores = rng.integers(0, 3, (2, 64)).astype(np.float32)  # many exact ties
    keys = rng.normal(size=(2, 64, 4)).astype(np.float32)
    kept = jax.jit(lambda s, k: prune.adaptive_nms(s, k, 40, distance_limit=-1.0, form="window"))(
        scores, keys
    )
    np.testing.assert_array_equal(kept, prune.topk_select(scores, 40))


# ----------------------------------------------------------------------------- when the window form cannot run


def test_a_layout_that_is_not_row_major_raises_or_takes_the_dense_form():
    rng = np.random.default_rng(3)
    layout = anyres_layout(8, 10, base=6)
    num_tokens = layout.num_tokens
    shuffled = jax.tree_util.tree_map(lambda x: np.asarray(x)[rng.permutation(num_tokens)], layout)
    attention = rng.uniform(size=(2, num_tokens)).astype(np.float32)
    keys = np.tile(rng.normal(size=(1, 1, 8)), (2, num_tokens, 1)).astype(np.float32)  # geometry decides
    with pytest.raises(ValueError, match=r"form='window' needs every grid of the layout row-major"):
        prune.adaptive_nms(attention, keys, 10, layout=shuffled, form="window")
    # Traced under jit, the layout is checked at run time: the dense form for the shuffled one (run
    # row by row there), with either loop.
    dense = jax.jit(lambda a, k, lay: prune.adaptive_nms(a, k, 10, layout=lay, form="dense"))
    for implementation in ("xla", "pallas"):
        window = jax.jit(
            lambda a, k, lay, implementation=implementation: prune.adaptive_nms(
                a, k, 10, layout=lay, form="window", implementation=implementation
            )
        )
        for case in (shuffled, layout):
            kept = np.asarray(dense(attention, keys, case))
            np.testing.assert_array_equal(window(attention, keys, case), kept, err_msg=implementation)
            assert not np.array_equal(kept, prune.topk_select(attention, 10))  # suppression acted


def test_auto_takes_the_dense_form_where_a_static_layout_rules_the_window_out():
    """'auto' picks the window by token count; a layout known at trace time that the window cannot
    run (a wide grid whose row stride the layout does not carry, as one made in a traced program
    would not; or tokens out of row-major order) must then select as the dense form does, not raise
    the errors meant for an explicit form='window'."""
    rng = np.random.default_rng(5)
    wide = anyres_layout(22, 72)  # a photo 300 px tall, 1,000 wide: stride 73 > isqrt(2182) + 1
    unknown_stride = wide.replace(wide_row_stride=None)
    assert nms.resolve_form("auto", 5.0, wide.num_tokens) == "window"
    order = rng.permutation(wide.num_tokens)
    permuted = jax.tree_util.tree_map(lambda x: np.asarray(x)[order], wide)
    wide_keys = smooth_keys(rng, wide, 8)
    attention = rng.uniform(size=wide.num_tokens).astype(np.float32)
    for layout, keys in ((unknown_stride, wide_keys), (permuted, wide_keys[order])):
        kept = prune.adaptprune_select(attention, keys, 200, layout=layout, form="auto")
        dense = prune.adaptprune_select(attention, keys, 200, layout=layout, form="dense")
        np.testing.assert_array_equal(kept, dense)
        with pytest.raises(ValueError, match=r"form='window'"):
            prune.adaptprune_select(attention, keys, 200, layout=layout, form="window")


def test_window_form_errors_name_the_problem():
    # a row stride of 200 > isqrt(1200) + 1, the layout not saying so: beyond the band
    wide = prune.grid_layout(6, 200).replace(wide_row_stride=None)
    scores, keys = np.ones(1200, np.float32), np.ones((1200, 2), np.float32)
    with pytest.raises(ValueError, match=r"row stride exceeds the reach of the window form's band"):
        prune.adaptive_nms(scores, keys, 3, layout=wide, form="window")
    with pytest.raises(ValueError, match=r"unknown NMS form 'sparse'"):
        prune.adaptive_nms(scores[:16], keys[:16], 3, form="sparse")
    with pytest.raises(ValueError, match=r"form='window' needs distance_limit as a finite static number"):
        jax.jit(
            lambda limit: prune.adaptive_nms(scores[:16], keys[:16], 3, distance_limit=limit, form="window")
        )(5.0)
    assert nms.resolve_form("auto", jnp.float32(5.0), 576) == "dense"  # a traced-able limit
    assert nms.resolve_form("auto", 5.0, 2928) == "window" and nms.resolve_form("auto", 5.0, 576) == "dense"
    with pytest.raises(ValueError, match=r"nms_form must be one of auto, dense, window"):
        prune.AdaptPruneConfig(keep=8, nms_form="banded")


# ----------------------------------------------------------------------------- the multi-grid rule


def _reference_batch(rows, keep, rng):
    """Attention, keys and the float64 reference's picks for rows of anyres layouts, padded to the
    longest row (padding slots get the largest attention: they must stay unkept).

    Inputs where float32 rounding cannot flip a pick: the prior-weighted scores are 0.98^k for a
    random permutation of k (2% apart), and the reference asserts every pick's margin over the
    runner-up exceeds float32's resolution; smooth keys make suppression change the kept set.
    """
    layout = prune.stack_layouts(rows)
    attention = np.zeros((len(rows), layout.num_tokens), np.float32)
    keys = np.zeros((len(rows), layout.num_tokens, 16), np.float32)
    references = []
    for b, row in enumerate(rows):
        fields = {name: np.asarray(getattr(row, name)) for name in FIELDS}
        prior = reference_prior(*(fields[name] for name in FIELDS))
        target = 0.98 ** rng.permutation(row.num_tokens)
        attention[b, : row.num_tokens] = target / np.where(prior > 0, prior, 1.0)
        keys[b, : row.num_tokens] = smooth_keys(rng, row, 16)
        order, margins = reference_adaptprune(
            attention[b, : row.num_tokens], keys[b, : row.num_tokens], keep, fields
        )
        assert margins.min() > FLOAT32_RESOLUTION, (b, margins.min())
        newlines = np.flatnonzero(fields["grid"] == prune.NO_GRID)
        np.testing.assert_array_equal(order[: newlines.size], newlines)  # kept first, counted in keep
        topk = np.argsort(
            -np.where(fields["grid"] == prune.NO_GRID, np.inf, attention[b, : row.num_tokens] * prior)
        )
        assert len(set(order.tolist()) - set(topk[:keep].tolist())) >= 5  # suppression changed the set
        references.append(order)
    attention[~np.asarray(layout.valid)] = 10.0
    return layout, attention, keys, references


def test_multi_grid_rule_matches_the_float64_reference_on_anyres_layouts():
    """A batch of three anyres rows (48 x 48, 37 x 48, 30 x 40 high-res grids with newlines; the
    shorter rows padded with invalid slots to 2,928), both forms, pick for pick against the float64
    reference (see ``_reference_batch``); the 37 x 48 row also alone, unpadded."""
    rows = [anyres_layout(48, 48), anyres_layout(37, 48), anyres_layout(30, 40)]
    keep = 300
    layout, attention, keys, references = _reference_batch(rows, keep, np.random.default_rng(1))
    assert layout.num_tokens == 2928 and [row.num_tokens for row in rows] == [2928, 2389, 1806]
    assert layout.wide_row_stride is None  # no grid wider than square: the default band
    orders = _orders(layout, keep)(attention, keys)
    for form in ("dense", "window"):
        for b in range(3):
            np.testing.assert_array_equal(
                np.asarray(orders[form, 5.0])[b], references[b], err_msg=f"{form} row {b}"
            )
    # The 2,389-token row alone, unpadded: there this CPU's two matmuls round some cosines differently
    # in the last bit, and the margins above keep every pick the reference's all the same.
    length = rows[1].num_tokens
    alone = _orders(rows[1], keep)(attention[1, :length], keys[1, :length])
    for form in ("dense", "window"):
        np.testing.assert_array_equal(np.asarray(alone[form, 5.0]), references[1], err_msg=f"{form} alone")
    config = prune.AdaptPruneConfig(keep=keep)
    kept = jax.jit(lambda a, k: config.select(prune.Cues(attention=a, keys=k, layout=layout), keep))(
        attention, keys
    )
    np.testing.assert_array_equal(kept, np.sort(np.stack(references), axis=-1))


def test_wide_photos_run_the_window_form_and_match_the_float64_reference():
    """A wide photo's high-resolution grid (22 x 72: 300 px tall, 1,000 wide; row stride 73, beyond a
    square layout's isqrt(N) + 1) in a batch with a 48 x 48 row: the layout carries its row stride,
    the band reaches that far (80, the next multiple of 16), and the window form (the XLA and Pallas loops, the layout static and
    traced) picks what the dense form and the float64 reference pick; the wide row alone too."""
    rows = [anyres_layout(22, 72), anyres_layout(48, 48)]
    keep = 300
    layout, attention, keys, references = _reference_batch(rows, keep, np.random.default_rng(2))
    assert rows[0].wide_row_stride == layout.wide_row_stride == 80 and rows[1].wide_row_stride is None
    block, reach = nms_window.band_geometry(5.0, layout.num_tokens, layout.wide_row_stride)
    assert reach == 5 * 81 and 2 * (block + 2 * reach) <= layout.num_tokens  # 'auto' takes the window
    assert nms.resolve_form("auto", 5.0, layout.num_tokens, layout.wide_row_stride) == "window"
    assert jax.tree_util.tree_map(jnp.asarray, layout).wide_row_stride == 80  # static: kept by tree maps
    for implementation in ("xla", "pallas"):

        def run(a, k, lay, implementation=implementation):
            scores = nms.adaptprune_scores(a, lay, 12.0)
            return {
                form: nms.adaptive_nms_order(
                    scores, k, keep, layout=lay, form=form, implementation=implementation
                )
                for form in ("dense", "window")
            }

        static = jax.jit(lambda a, k, run=run: run(a, k, layout))(attention, keys)
        traced = jax.jit(run)(attention, keys, layout)  # the layout's arrays traced, its stride not
        for where, orders in (("static", static), ("traced", traced)):
            for form in ("dense", "window"):
                for b in range(len(rows)):
                    np.testing.assert_array_equal(
                        np.asarray(orders[form])[b],
                        references[b],
                        err_msg=f"{implementation} {where} {form} {b}",
                    )
    length = rows[0].num_tokens
    alone = _orders(rows[0], keep)(attention[0, :length], keys[0, :length])  # form='window': no raise
    for form in ("dense", "window"):
        np.testing.assert_array_equal(np.asarray(alone[form, 5.0]), references[0], err_msg=f"{form} alone")


def test_cls_token_of_full_features_is_always_kept():
    """LLaVA-1.5's 'full' features: [CLS] (on no grid) and the 24 x 24 grid. [CLS] is kept and counts
    in keep; the grid tokens are what AdaptPrune keeps of the grid alone with one token fewer."""
    layout = prune.concat_layouts(prune.off_grid_layout(1), prune.grid_layout(24, 24))
    rng = np.random.default_rng(4)
    attention = rng.dirichlet(np.ones(577), size=2).astype(np.float32)
    attention[:, 0] = 0.0  # even with no attention at all
    keys = rng.normal(size=(2, 577, 16)).astype(np.float32)
    config = prune.AdaptPruneConfig(keep=57)
    config.validate(577, 32, layout)
    kept = np.asarray(
        jax.jit(lambda a, k: config.select(prune.Cues(attention=a, keys=k, layout=layout), 57))(
            attention, keys
        )
    )
    grid_alone = np.asarray(
        jax.jit(lambda a, k: prune.adaptprune_select(a, k, 56))(attention[:, 1:], keys[:, 1:])
    )
    np.testing.assert_array_equal(kept[:, 0], 0)
    np.testing.assert_array_equal(kept[:, 1:], grid_alone + 1)
    with pytest.raises(ValueError, match=r"keep=1 must exceed the 1 such tokens of a row"):
        prune.AdaptPruneConfig(keep=1).validate(577, 32, layout)


def test_every_pallas_kernel_and_pick_selects_the_same_order():
    """The kernels' variants (dense rows or band rows; one argmax or a max then an index reduction) on
    tied scores, all-zero scores and a padded row: one order."""
    from adaptprune_jax.nms_pallas import (
        PICKS,
        greedy_order_pallas,
        greedy_order_pallas_band,
    )

    rng = np.random.default_rng(7)
    layout = anyres_layout(16, 20, base=6)
    keys = jnp.asarray(smooth_keys(rng, layout, 8))
    dense, band = jax.jit(
        lambda k: (
            prune.suppression_factors(k, layout=layout, distance_limit=2.0),
            nms.band_suppression_factors(k, layout=layout, distance_limit=2.0),
        )
    )(keys)
    scores = np.stack(
        [
            rng.integers(1, 4, layout.num_tokens) / 4.0,
            rng.uniform(size=layout.num_tokens),
            np.zeros(layout.num_tokens),
        ]
    ).astype(np.float32)
    rows = len(scores)
    dense, band = (jnp.stack([factors] * rows) for factors in (dense, band))
    keep = 30
    block, reach = nms_window.band_geometry(2.0, layout.num_tokens, layout.wide_row_stride)
    assert block + 2 * reach < layout.num_tokens  # a band narrower than the row
    interpret = jax.default_backend() != "gpu"  # on a GPU the Triton kernels themselves
    expected = np.asarray(greedy_order_pallas(dense, scores, keep, interpret=interpret))
    np.testing.assert_array_equal(expected[-1], np.arange(keep))  # all-zero scores: first indices
    for pick in PICKS:
        dense_order = greedy_order_pallas(dense, scores, keep, interpret=interpret, pick=pick)
        np.testing.assert_array_equal(dense_order, expected, err_msg=pick)
        band_order = greedy_order_pallas_band(
            band, scores, block, reach, keep, interpret=interpret, pick=pick
        )
        np.testing.assert_array_equal(band_order, expected, err_msg=f"band {pick}")


@pytest.mark.parametrize("blocks", nms_window.BAND_BLOCKS)
def test_every_band_block_mode_gives_the_dense_cosines(blocks):
    """Blocks in a loop, unrolled, or batched in groups (a group size that leaves a remainder), over
    a batch of two rows with their own keys, normalised as gathered: the dense matmul of
    ``l2_normalize``'d keys at every listed neighbour, bit for bit, row by row."""
    layout = anyres_layout(48, 48)
    rng = np.random.default_rng(3)
    keys = jnp.stack([jnp.asarray(smooth_keys(rng, layout, 16)) for _ in range(2)])
    num_tokens = layout.num_tokens
    block, reach = nms_window.band_geometry(5.0, num_tokens, layout.wide_row_stride)
    neighbours, _, same_grid, _, band_ok = nms_window.window_neighbours(
        layout, window_offsets(5.0), block, reach
    )
    assert bool(band_ok)
    five_bands = 5 * (block + 2 * reach) * 16 * 4  # two rows: groups of 2 blocks over 23, one left
    cosines, dense = jax.jit(
        lambda k: (
            nms_window.band_cosines(
                k, neighbours, block, reach, "highest", blocks=blocks, group_bytes=five_bands
            ),
            jnp.einsum("bid,bjd->bij", nms.l2_normalize(k), nms.l2_normalize(k), precision="highest"),
        )
    )(keys)
    assert cosines.shape == (2,) + neighbours.shape
    listed = np.asarray(same_grid)
    safe_neighbours = np.minimum(np.asarray(neighbours), num_tokens - 1)
    for row in range(2):
        at_neighbours = np.take_along_axis(np.asarray(dense[row]), safe_neighbours, 1)
        np.testing.assert_array_equal(np.asarray(cosines[row])[listed], at_neighbours[listed])
    with pytest.raises(ValueError, match="unknown band blocks 'scan'"):
        nms_window.band_cosines(keys, neighbours, block, reach, "highest", blocks="scan")


def test_band_cosines_of_bfloat16_keys_are_the_dense_cosines():
    """Keys as a model in bfloat16 hands them over: gathered, then widened and normalised, they give
    the dense matmul of ``l2_normalize``'d keys bit for bit (widening is exact, so the order of the
    gather and the conversion cannot change a bit)."""
    layout = anyres_layout(48, 48)
    keys = jnp.asarray(smooth_keys(np.random.default_rng(11), layout, 32)).astype(jnp.bfloat16)
    num_tokens = layout.num_tokens
    block, reach = nms_window.band_geometry(5.0, num_tokens)
    neighbours, _, same_grid, _, _ = nms_window.window_neighbours(layout, window_offsets(5.0), block, reach)
    cosines, dense = jax.jit(
        lambda k: (
            nms_window.band_cosines(k, neighbours, block, reach, "highest"),
            jnp.einsum("id,jd->ij", nms.l2_normalize(k), nms.l2_normalize(k), precision="highest"),
        )
    )(keys)
    listed = np.asarray(same_grid)
    at_neighbours = np.take_along_axis(
        np.asarray(dense), np.minimum(np.asarray(neighbours), num_tokens - 1), 1
    )
    np.testing.assert_array_equal(np.asarray(cosines)[listed], at_neighbours[listed])
    assert cosines.dtype == jnp.float32 and listed.sum() > 50 * num_tokens


def test_an_unknown_pallas_pick_is_refused():
    from adaptprune_jax.nms_pallas import greedy_order_pallas

    with pytest.raises(ValueError, match="unknown pick 'median'"):
        greedy_order_pallas(jnp.ones((1, 8, 8)), jnp.ones((1, 8)), 2, interpret=True, pick="median")
