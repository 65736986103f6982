"""The selection benchmark on the CPU: a smoke run of the precision comparison, and its input checks."""

from __future__ import annotations

import dataclasses

import jax
import numpy as np
import pytest

from experiments.benchmark import select_speed


def test_precision_rows_compare_each_precision_with_float64_and_the_first():
    settings = select_speed.SelectSpeedConfig(
        layouts=("4x4+6x6n",),
        batch_sizes=(2,),
        keep=12,
        dim=16,
        forms=("auto",),
        implementations=("xla",),
        cosine_precisions=("highest", "tf32_tf32_f32"),
        key_mean_cosine=0.9,
        repeats=1,
    )
    rows = select_speed.measure(settings)
    highest = [r for r in rows if r.get("precision") == "highest"]
    assert [r["part"] for r in highest] == ["dense cosines", "band cosines", "selection"]
    checked = highest[-1]
    assert checked["band_cosines_differing_from_dense"] == 0 and checked["cosines_listed"] > 0
    assert 0 < checked["max_abs_error_vs_float64"] < 1e-5
    assert checked["kept_shared_with_first_precision"] == 1.0
    refused = [r for r in rows if r.get("precision") == "tf32_tf32_f32"]
    if jax.default_backend() == "cpu":  # XLA's CPU backend has no TF32: a row that says so, then on
        assert len(refused) == 1 and "not supported" in refused[0]["error"]


def test_synthetic_keys_centre_their_cosines_and_refuse_a_mean_outside_0_1():
    keys = np.asarray(select_speed.synthetic_keys(np.random.default_rng(0), 1, 64, 512, 0.9))[0]
    unit = keys / np.linalg.norm(keys, axis=-1, keepdims=True)
    cosines = (unit @ unit.T)[np.triu_indices(64, 1)]
    assert abs(cosines.mean() - 0.9) < 0.02
    for bad in (1.0, -0.1):
        with pytest.raises(ValueError, match=r"--key_mean_cosine must be in \[0, 1\)"):
            select_speed.synthetic_keys(np.random.default_rng(0), 1, 4, 8, bad)


def test_repeats_zero_reports_each_programs_temporaries_without_running_it():
    settings = select_speed.SelectSpeedConfig(
        layouts=("4x4+6x6n", "4x4+3x20n"),  # the second a wide grid (row stride 21, bound 32)
        batch_sizes=(1, 3),
        keep=12,
        dim=16,
        forms=("dense", "auto"),
        implementations=("xla",),
        repeats=0,
    )
    assert select_speed.parse_layout("4x4+3x20n").wide_row_stride == 32
    rows = select_speed.measure(settings)
    assert len(rows) == 2 * 2 * 2
    for row in rows:
        assert row["select_ms"] is None and row["min_ms"] is None
        assert row["temp_bytes"] > 0 and row["compile_s"] > 0
    with pytest.raises(ValueError, match=r"--repeats=0 reports memory only: drop --factor_parts"):
        select_speed.measure(dataclasses.replace(settings, factor_parts=True))
