"""Whether two eval runs gave the same answers: per pair (predictions/<method>_<keep>.jsonl present
in both), how many common questions have identical predictions, and which differ first.

    .venv/bin/python -m experiments.analysis.compare_predictions --first=<run A> --second=<run B>

For checking that a rerun (other code, another machine) reproduces committed predictions.
"""

from __future__ import annotations

import dataclasses
import json
import os

from experiments.flag_config import run_program, setting


@dataclasses.dataclass(frozen=True)
class Config:
    first: str = setting(dataclasses.MISSING, "Output folder of one eval run.", required=True)
    second: str = setting(dataclasses.MISSING, "Output folder of the other eval run.", required=True)
    show: int = setting(3, "How many differing questions to print per pair.")


def _predictions(path: str) -> dict[str, str]:
    with open(path) as file:
        records = [json.loads(line) for line in file if line.strip()]
    return {record["question_id"]: record["prediction"] for record in records}


def run(config: Config) -> dict[str, dict]:
    """pair -> {'common', 'identical', 'differing': [question ids]}; one line per pair is printed."""
    folders = [os.path.join(run_dir, "predictions") for run_dir in (config.first, config.second)]
    pairs = sorted(set(os.listdir(folders[0])) & set(os.listdir(folders[1])))
    if not pairs:
        raise ValueError(f"no predictions file is in both {folders[0]} and {folders[1]}")
    results = {}
    for name in pairs:
        first, second = (_predictions(os.path.join(folder, name)) for folder in folders)
        common = sorted(set(first) & set(second))
        differing = [qid for qid in common if first[qid] != second[qid]]
        results[name.removesuffix(".jsonl")] = {
            "common": len(common),
            "identical": len(common) - len(differing),
            "differing": differing,
        }
        shown = ", ".join(f"{qid}: {first[qid]!r} vs {second[qid]!r}" for qid in differing[: config.show])
        print(
            f"{name}: {len(common) - len(differing)}/{len(common)} identical"
            + (f" ({shown})" if shown else "")
        )
    return results


if __name__ == "__main__":
    run_program(Config, run)
