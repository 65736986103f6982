"""Reference answers stored with the testbed checkpoint: does a fresh run still give the same result?

The checkpoint and the scene generator must agree: the same seed must render the same test images and
questions, and the checkpoint must answer them as it did when it was exported. The first few test
items' unpruned answers (and their accuracy) are recorded next to the weights; a test regenerates those
items from scratch (the split is prefix-stable: the first n items of any split size are the same) and
reruns them through the eval harness, exactly as `make eval` does.

    python -m experiments.testbed.reference checkpoints/testbed   # after (re)training
"""

from __future__ import annotations

import json
import os
import sys
import tempfile

REFERENCE_FILE = "reference_answers.json"
DEFAULT_ITEMS = 16


def evaluate_first_items(
    checkpoint: str, num_items: int, *, split: str = "test", seed: int = 0, work_dir: str | None = None
) -> dict:
    """Write the first `num_items` of the split, evaluate them unpruned (float32) with experiments.eval."""
    from experiments.eval import EvalConfig, run
    from experiments.testbed.splits import write_split

    work_dir = work_dir or tempfile.mkdtemp(prefix="testbed_reference_")
    split_dir = os.path.join(work_dir, "split")
    write_split(split_dir, split=split, num_items=num_items, seed=seed)
    config = EvalConfig(
        checkpoint=checkpoint,
        benchmark="testbed",
        questions=split_dir,
        output_dir=os.path.join(work_dir, "eval"),
        methods=("none",),
        keep=(),
        batch_size=num_items,
        dtype="float32",
        seed=seed,
        num_overlays=0,
        record_kept=0,
    )
    results = run(config)
    (pair,) = results["pairs"].values()
    predictions_path = os.path.join(config.output_dir, "predictions", "none_" + str(pair["keep"]) + ".jsonl")
    with open(predictions_path) as file:
        answers = {record["question_id"]: record["prediction"] for record in map(json.loads, file)}
    return {
        "split": split,
        "seed": seed,
        "num_items": num_items,
        "dtype": "float32",
        "accuracy": pair["metrics"]["overall"]["accuracy"],
        "answers": answers,
    }


def record(checkpoint: str, num_items: int = DEFAULT_ITEMS) -> dict:
    """Evaluate and store the reference answers in the checkpoint directory."""
    reference = evaluate_first_items(checkpoint, num_items)
    with open(os.path.join(checkpoint, REFERENCE_FILE), "w") as file:
        json.dump(reference, file, indent=1, sort_keys=True)
    return reference


if __name__ == "__main__":
    target = sys.argv[1] if len(sys.argv) > 1 else "checkpoints/testbed"
    result = record(target)
    print(
        f"{target}/{REFERENCE_FILE}: accuracy {result['accuracy']:.4f} on the first {result['num_items']} "
        f"{result['split']} items"
    )
