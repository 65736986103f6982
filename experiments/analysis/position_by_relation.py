"""Position-question accuracy split by relation (left / right / above / below), and what the answers
were, from an eval run's predictions file on the testbed split.

Raster order of the image tokens gives above/below away, left/right not, so a model can look right
on position questions overall while guessing on half of them; this shows which half.

    .venv/bin/python -m experiments.analysis.position_by_relation [--predictions=<eval run>/predictions/none_576.jsonl]

The default is the committed stage-3 predictions (experiments/results/testbed_training_v3/stage3);
needs the test split (`make experiments/data/testbed_test/questions.jsonl`).
"""

from __future__ import annotations

import collections
import dataclasses
import json
import os
import re

from experiments.flag_config import run_program, setting

_STAGE3 = "experiments/results/testbed_training_v3/stage3/analysis/predictions_none_576.jsonl"


@dataclasses.dataclass(frozen=True)
class Config:
    predictions: str = setting(_STAGE3, "Predictions JSONL of an eval run (question_id, prediction).")
    split: str = setting("experiments/data/testbed_test", "Testbed split folder the predictions answer.")


def run(config: Config) -> dict[str, dict]:
    """relation -> {'count', 'accuracy', 'answers': {answer: n}}; one line per relation is printed."""
    with open(os.path.join(config.split, "questions.jsonl")) as file:
        questions = {q["question_id"]: q for q in map(json.loads, file)}
    by_relation = collections.defaultdict(lambda: [0, 0])
    answers = collections.Counter()
    with open(config.predictions) as file:
        for prediction in map(json.loads, file):
            item = questions[prediction["question_id"]]
            if item["kind"] != "position":
                continue
            relation = re.search(r"(left|right|above|below)", item["text"]).group(1)
            right = prediction["prediction"].strip().lower() == item["answer"]
            by_relation[relation][0] += right
            by_relation[relation][1] += 1
            answers[(relation, prediction["prediction"].strip().lower())] += 1
    results = {}
    for relation, (correct, count) in sorted(by_relation.items()):
        said = {answer: n for (r, answer), n in answers.items() if r == relation}
        results[relation] = dict(count=count, accuracy=correct / count, answers=said)
        print(f"{relation:6s} {count:4d} questions  accuracy {correct / count:.3f}  answers {said}")
    return results


if __name__ == "__main__":
    run_program(Config, run)
