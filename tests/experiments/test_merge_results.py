"""Merging eval runs: a table split over two runs merges back into the same pairs and report; runs
that disagree on what they ran are refused, naming the difference."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from experiments.analysis import merge_results

COMMITTED = Path(__file__).resolve().parents[2] / "experiments" / "results" / "testbed_deep_gpu"


def _split_run(tmp_path, name, keep_method):
    """A copy of the committed deep-testbed run holding the unpruned pair and the methods
    ``keep_method`` accepts."""
    results = json.loads((COMMITTED / "results.json").read_text())
    results["pairs"] = {
        pair: value
        for pair, value in results["pairs"].items()
        if value["method"] == "none" or keep_method(value["method"])
    }
    results["command"] = f"run {name}"
    run = tmp_path / name
    run.mkdir()
    (run / "results.json").write_text(json.dumps(results))
    shutil.copy(COMMITTED / "run_fingerprint.json", run / "run_fingerprint.json")
    return run


def test_a_split_table_merges_back(tmp_path):
    first = _split_run(tmp_path, "first", lambda method: method < "g")
    second = _split_run(tmp_path, "second", lambda method: method >= "g")
    merged, notes = merge_results.merge([str(first), str(second)])
    whole = json.loads((COMMITTED / "results.json").read_text())
    assert merged["pairs"] == whole["pairs"]
    assert [entry["command"] for entry in merged["merged_from"]] == ["run first", "run second"]
    (note,) = notes
    assert note.startswith("none_576: kept from the first run")
    merge_results.write(merged, str(tmp_path / "merged"))
    report = (tmp_path / "merged" / "results.md").read_text()
    assert "`run first` + `run second`" in report and "| dart" in report.lower()
    assert (tmp_path / "merged" / "accuracy_vs_tokens.png").read_bytes()[:4] == b"\x89PNG"


def test_runs_that_disagree_are_refused(tmp_path):
    first = _split_run(tmp_path, "first", lambda method: method < "g")
    second = _split_run(tmp_path, "second", lambda method: method >= "g")
    results = json.loads((second / "results.json").read_text())
    results["settings"]["dtype"] = "float32"
    (second / "results.json").write_text(json.dumps(results))
    with pytest.raises(ValueError, match="setting dtype is 'float32'"):
        merge_results.merge([str(first), str(second)])
    results["settings"]["dtype"] = "bfloat16"
    (second / "results.json").write_text(json.dumps(results))
    fingerprint = json.loads((second / "run_fingerprint.json").read_text())
    for pair in fingerprint["pairs"].values():
        pair["checkpoint"]["model.safetensors"] = "0" * 64
    (second / "run_fingerprint.json").write_text(json.dumps(fingerprint))
    with pytest.raises(ValueError, match="ran on other checkpoint files than .*: model.safetensors"):
        merge_results.merge([str(first), str(second)])
    with pytest.raises(ValueError, match="at least two runs"):
        merge_results.merge([str(first)])
