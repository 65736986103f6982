"""`.venv/bin/python experiments/results/testbed_gpu/check_divprune_positions.py [kinds] [keeps]` (needs the
test split; defaults: attribute,counting and 192,128,64).

DivPrune's released behaviour (the kept tokens' positions renumbered 0..keep-1) against the same kept
tokens at their original positions, per question kind, bfloat16 on CPU, same checkpoint as the sweep:
what separates DivPrune's token choice from the position shift it applies."""

import json
import sys

sys.path.insert(0, ".")  # run from the repository root
import adaptprune_jax as prune
from models.engine import LlavaEngine
from models.preprocess import load_image

kinds = (sys.argv[1] if len(sys.argv) > 1 else "attribute,counting").split(",")
keeps = [int(k) for k in (sys.argv[2] if len(sys.argv) > 2 else "192,128,64").split(",")]
all_items = [json.loads(line) for line in open("experiments/data/testbed_test/questions.jsonl")]
engine = LlavaEngine.from_checkpoint("checkpoints/testbed", dtype="bfloat16")
batch_size = 64
for kind in kinds:
    items = [q for q in all_items if q["kind"] == kind]
    for keep in keeps:
        for renumber in (True, False):
            correct = 0
            config = prune.make_config("divprune", keep=keep, renumber_positions=renumber)
            for start in range(0, len(items), batch_size):
                batch = items[start : start + batch_size]
                images = [load_image(f"experiments/data/testbed_test/images/{q['image']}") for q in batch]
                out = engine.answer(images, [q["text"] for q in batch], pruning=config, max_new_tokens=4)
                correct += sum(t.strip() == q["answer"] for t, q in zip(out.texts, batch))
            print(
                f"{kind} keep {keep} renumber_positions={renumber}: {correct}/{len(items)} = "
                f"{correct / len(items):.3f}",
                flush=True,
            )
