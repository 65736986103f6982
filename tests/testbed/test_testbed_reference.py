"""A fresh `make eval`-style run reproduces each testbed checkpoint's recorded answers and accuracy.

The items are regenerated from the seed (not read from disk), so this checks that the scene generator
and the committed checkpoint still agree, end to end through the eval harness.
"""

import json
import os

import pytest

from experiments.testbed.reference import REFERENCE_FILE, evaluate_first_items

pytestmark = pytest.mark.slow  # end to end through the eval harness with the committed checkpoint

CHECKPOINTS = os.path.join(os.path.dirname(__file__), os.pardir, os.pardir, "checkpoints")


@pytest.mark.parametrize("name", ["testbed", "testbed-deep"])
def test_fresh_run_reproduces_the_recorded_unpruned_answers(tmp_path, name):
    checkpoint = os.path.join(CHECKPOINTS, name)
    path = os.path.join(checkpoint, REFERENCE_FILE)
    if not os.path.isfile(path):
        pytest.fail(f"{path} missing: run `python -m experiments.testbed.reference checkpoints/{name}`")
    with open(path) as file:
        recorded = json.load(file)
    fresh = evaluate_first_items(
        checkpoint,
        recorded["num_items"],
        split=recorded["split"],
        seed=recorded["seed"],
        work_dir=str(tmp_path),
    )
    assert fresh["answers"] == recorded["answers"]
    assert fresh["accuracy"] == recorded["accuracy"]
