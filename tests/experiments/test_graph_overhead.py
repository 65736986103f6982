"""The CUDA-graph overhead experiment on the CPU: its unrolled and scanned stacks compute the same
function, every program is timed both ways, and an option the compiler refuses becomes a row."""

from __future__ import annotations

import numpy as np

from experiments.benchmark import graph_overhead


def test_scanned_stack_equals_unrolled_and_a_refused_option_is_recorded():
    settings = graph_overhead.GraphOverheadConfig(
        hidden=32,
        heads=4,
        intermediate=64,
        layers=3,
        tokens=16,
        extra_slots=4,
        repeats=2,
        scan_options="xla_cpu_enable_fast_math=false;no_such_xla_option=1",
    )
    programs = graph_overhead.measure(settings)["programs"]
    assert list(programs) == ["unrolled", "scanned", "scanned_0", "scanned_1"]
    assert programs["scanned"]["hlo_while"] >= 1 and programs["unrolled"]["hlo_while"] == 0
    for name in ("unrolled", "scanned", "scanned_0"):
        entry = programs[name]
        assert entry["max_abs_diff_vs_unrolled"] <= 1e-2 * (name != "unrolled")
        assert np.isfinite(entry["max_abs_diff_vs_unrolled"])
        assert (
            entry["outputs_alive_ms"] > 0 and entry["outputs_freed_ms"] > 0 and entry["back_to_back_ms"] > 0
        )
    assert "no_such_xla_option" in programs["scanned_1"]["error"]
