"""`.venv/bin/python experiments/results/testbed_gpu/check_divprune_positions.py` (needs the test split).

DivPrune at keep 128 / 64 on the attribute questions: released behaviour (renumbered positions) vs
original positions kept, bfloat16 on CPU, same checkpoint as the sweep."""
import json, sys
sys.path.insert(0, '.')  # run from the repository root
import adaptprune_jax as prune
from models.engine import LlavaEngine
from models.preprocess import load_image
items = [json.loads(l) for l in open('experiments/data/testbed_test/questions.jsonl')]
items = [q for q in items if q['kind'] == 'attribute']
engine = LlavaEngine.from_checkpoint('checkpoints/testbed', dtype='bfloat16')
for keep in (128, 64):
    for renumber in (True, False):
        correct = 0
        for start in range(0, len(items), 55):
            batch = items[start:start + 55]
            images = [load_image(f"experiments/data/testbed_test/images/{q['image']}") for q in batch]
            config = prune.make_config('divprune', keep=keep, renumber_positions=renumber)
            out = engine.answer(images, [q['text'] for q in batch], pruning=config, max_new_tokens=4)
            correct += sum(t.strip() == q['answer'] for t, q in zip(out.texts, batch))
        print(f"keep {keep} renumber_positions={renumber}: attribute accuracy {correct}/{len(items)} = {correct/len(items):.3f}", flush=True)
