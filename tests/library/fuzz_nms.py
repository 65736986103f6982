"""Random multi-grid layouts against every NMS form and loop, and against the float64 reference.

Not collected by pytest (a long run); ``python -m tests.library.fuzz_nms --cases=100``. Each case: two
rows of one to three parts (a grid, a grid with a newline after each row, tokens on no grid), padded
to a common width with invalid slots; keys near one direction, so suppression acts; a random window
limit and keep. Every (form, loop, layout static or traced) must select what the dense XLA form with
a static layout selects, and that must equal the float64 reference wherever the reference's picks
are clear of float32 rounding (margin above ``CLEAR_MARGIN``). Prints each case that differs, then the count.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

import adaptprune_jax as prune
from tests.library.test_nms_window import FIELDS
from tests.nms_reference import reference_adaptprune

CLEAR_MARGIN = 1e-5
"""Relative margin of a reference pick over its runner-up above which float32 must pick as float64 does;
tighter than the tests' ``FLOAT32_RESOLUTION`` (1e-4), so more rows meet the reference."""

_CASES = flags.DEFINE_integer("cases", 30, "Random cases (seeds first_seed .. first_seed + cases - 1).")
_FIRST_SEED = flags.DEFINE_integer("first_seed", 0, "Seed of the first case.")


def random_row(rng) -> prune.TokenLayout:
    parts, grid_id = [], 0
    for _ in range(rng.integers(1, 4)):
        kind, rows, cols = rng.integers(0, 3), int(rng.integers(1, 14)), int(rng.integers(1, 14))
        if kind == 2:
            parts.append(prune.off_grid_layout(int(rng.integers(1, 4))))
            continue
        make = prune.grid_layout if kind == 0 else prune.newline_grid_layout
        parts.append(make(rows, cols, grid_id=grid_id))
        grid_id += 1
    return prune.concat_layouts(*parts)


def run_case(seed: int) -> str | None:
    """A description of how the case differs, or None."""
    rng = np.random.default_rng(seed)
    rows = [random_row(rng) for _ in range(2)]
    width = max(row.num_tokens for row in rows) + int(rng.integers(0, 5))
    layout = prune.stack_layouts(rows, width)
    valid = np.asarray(layout.valid)
    off_grid = ((np.asarray(layout.grid) == prune.NO_GRID) & valid).sum(-1).max()
    if off_grid + 1 > valid.sum(-1).min():
        return None  # keep must exceed the tokens on no grid and fit every row
    keep = int(rng.integers(off_grid + 1, valid.sum(-1).min() + 1))
    attention = rng.uniform(0.1, 1, size=(2, width)).astype(np.float32)
    keys = np.zeros((2, width, 6), np.float32)
    for b, row in enumerate(rows):
        keys[b, : row.num_tokens] = rng.normal(size=(1, 6)) + 0.3 * rng.normal(size=(row.num_tokens, 6))
    limit = float(rng.choice([0.5, 1.5, 2.0, 3.0, 5.0]))
    traced_layout = jax.tree_util.tree_map(jnp.asarray, layout)
    kept = {}
    for form in ("dense", "window"):
        for implementation in ("xla", "pallas"):
            options = dict(distance_limit=limit, form=form, implementation=implementation)
            static = jax.jit(lambda a, k, o=options: prune.adaptprune_select(a, k, keep, layout=layout, **o))
            traced = jax.jit(
                lambda a, k, lay, o=options: prune.adaptprune_select(a, k, keep, layout=lay, **o)
            )
            kept[form, implementation, "static"] = np.asarray(static(attention, keys))
            kept[form, implementation, "traced"] = np.asarray(traced(attention, keys, traced_layout))
    first = kept["dense", "xla", "static"]
    differ = [name for name, value in kept.items() if not np.array_equal(value, first)]
    off_reference = []
    for b, row in enumerate(rows):
        fields = {name: np.asarray(getattr(row, name)) for name in FIELDS}
        order, margins = reference_adaptprune(
            attention[b, : row.num_tokens], keys[b, : row.num_tokens], keep, fields, distance_limit=limit
        )
        clear = margins.min() > CLEAR_MARGIN if len(margins) else True
        if clear and not np.array_equal(np.sort(order), first[b]):
            off_reference.append(b)
    if differ or off_reference:
        return f"tokens {[row.num_tokens for row in rows]} keep {keep} limit {limit}: {differ} rows {off_reference}"
    return None


def main(argv):
    del argv
    failures = 0
    for seed in range(_FIRST_SEED.value, _FIRST_SEED.value + _CASES.value):
        outcome = run_case(seed)
        if outcome is not None:
            failures += 1
            print(f"seed {seed}: {outcome}", flush=True)
    print(f"{_CASES.value} cases, {failures} with a difference")


if __name__ == "__main__":
    app.run(main)
