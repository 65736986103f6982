"""Join the method tables of eval runs over the same checkpoint and questions into one report: e.g.
a run of newly added methods beside an earlier run of the others, without recomputing those.

    python -m experiments.analysis.merge_results \
        --runs=experiments/results/testbed_deep_gpu,experiments/results/testbed_deep_gpu_new \
        --output_dir=experiments/results/testbed_deep_gpu_merged

Refused, naming the difference: runs over other benchmarks, question counts, dtypes, generation
lengths or seeds, or over other checkpoint files (by the digests in each run's run_fingerprint.json,
where both runs have one). A pair in several runs is taken from the first; its primary metric in the
others is reported beside it (the unpruned pair, run in both, checks that the runs agree). The
merged results.json lists every run's directory and command under ``merged_from``.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence

from absl import app, flags

from experiments import reporting

AGREEING_SETTINGS = ("benchmark", "num_questions", "num_image_tokens", "num_layers")
AGREEING_RUN_SETTINGS = ("dtype", "max_new_tokens", "seed")


def _checkpoint_digests(run_dir: str) -> dict | None:
    path = os.path.join(run_dir, "run_fingerprint.json")
    if not os.path.exists(path):
        return None
    with open(path) as file:
        pairs = json.load(file)["pairs"]
    first = next(iter(pairs.values()), None)
    if first is None:
        return None
    return {
        name: digest for name, digest in first["checkpoint"].items() if not name.startswith("text_tower/")
    }


def merge(run_dirs: Sequence[str]) -> tuple[dict, list[str]]:
    """(the merged results, notes on pairs found in several runs)."""
    if len(run_dirs) < 2:
        raise ValueError("give at least two runs to merge")
    runs = [reporting.load_results(run_dir) for run_dir in run_dirs]
    first, first_digests = runs[0], _checkpoint_digests(run_dirs[0])
    for run_dir, results in zip(run_dirs[1:], runs[1:]):
        for key in AGREEING_SETTINGS:
            if results.get(key) != first.get(key):
                raise ValueError(
                    f"{run_dir}: {key} is {results.get(key)!r}, {run_dirs[0]} has {first.get(key)!r}"
                )
        for key in AGREEING_RUN_SETTINGS:
            if results["settings"].get(key) != first["settings"].get(key):
                raise ValueError(
                    f"{run_dir}: setting {key} is {results['settings'].get(key)!r}, "
                    f"{run_dirs[0]} has {first['settings'].get(key)!r}"
                )
        digests = _checkpoint_digests(run_dir)
        if digests is not None and first_digests is not None and digests != first_digests:
            changed = sorted(
                name
                for name in set(digests) | set(first_digests)
                if digests.get(name) != first_digests.get(name)
            )
            raise ValueError(
                f"{run_dir} ran on other checkpoint files than {run_dirs[0]}: {', '.join(changed)}"
            )
    merged = {key: value for key, value in first.items() if key != "pairs"}
    merged["pairs"], notes = {}, []
    for run_dir, results in zip(run_dirs, runs):
        for name, pair in results["pairs"].items():
            if name in merged["pairs"]:
                notes.append(
                    f"{name}: kept from the first run ({merged['pairs'][name]['primary']}); {run_dir} has {pair['primary']}"
                )
            else:
                merged["pairs"][name] = pair
    merged["merged_from"] = [
        {"run": run_dir, "command": results.get("command")} for run_dir, results in zip(run_dirs, runs)
    ]
    merged["command"] = " + ".join(f"`{results.get('command')}`" for results in runs).strip("`")
    return merged, notes


def write(merged: dict, output_dir: str) -> None:
    os.makedirs(output_dir, exist_ok=True)
    with open(os.path.join(output_dir, "results.json"), "w") as file:
        json.dump(merged, file, indent=1)
    reporting.write_report(output_dir, merged)
    reporting.plot_accuracy_vs_tokens(os.path.join(output_dir, "accuracy_vs_tokens.png"), merged)


def main(argv):
    del argv
    merged, notes = merge(flags.FLAGS.runs)
    write(merged, flags.FLAGS.output_dir)
    for note in notes:
        print(note)
    print(f"{len(merged['pairs'])} pairs from {len(flags.FLAGS.runs)} runs -> {flags.FLAGS.output_dir}")


if __name__ == "__main__":
    flags.DEFINE_list(
        "runs", None, "Eval output directories (results.json each), the first one's pairs first."
    )
    flags.DEFINE_string("output_dir", None, "Where the merged results.json, results.md and plot go.")
    flags.mark_flags_as_required(["runs", "output_dir"])
    app.run(main)
