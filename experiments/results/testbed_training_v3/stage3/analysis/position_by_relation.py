"""Position-question accuracy of the stage-3 checkpoint split by relation (and what its answers follow).

    git show 495836d:checkpoints/testbed/model.safetensors > ...   # the stage-3 weights, if needed again
    .venv/bin/python -m experiments.eval --checkpoint=<stage-3 checkpoint> --benchmark=testbed \
        --questions=experiments/data/testbed_test --methods=none --batch_size=50 --output_dir=/tmp/eval_v3
    .venv/bin/python experiments/results/testbed_training_v3/stage3/analysis/position_by_relation.py \
        experiments/results/testbed_training_v3/stage3/analysis/predictions_none_576.jsonl

Needs the test split (`make experiments/data/testbed_test/questions.jsonl`). Found: above / below 100%,
left / right at chance with "no" nearly always (WORKSPACE.md, issue 5, stage 3).
"""

import collections
import json
import re
import sys

SPLIT = "experiments/data/testbed_test"
questions = {q["question_id"]: q for q in map(json.loads, open(f"{SPLIT}/questions.jsonl"))}
by_relation = collections.defaultdict(lambda: [0, 0])
answers = collections.Counter()
for prediction in map(json.loads, open(sys.argv[1])):
    item = questions[prediction["question_id"]]
    if item["kind"] != "position":
        continue
    relation = re.search(r"(left|right|above|below)", item["text"]).group(1)
    right = prediction["prediction"].strip().lower() == item["answer"]
    by_relation[relation][0] += right
    by_relation[relation][1] += 1
    answers[(relation, prediction["prediction"].strip().lower())] += 1
for relation, (correct, count) in sorted(by_relation.items()):
    said = {answer: n for (r, answer), n in answers.items() if r == relation}
    print(f"{relation:6s} {count:4d} questions  accuracy {correct / count:.3f}  answers {said}")
