"""DivPrune's token choice against the position shift it applies, per question kind, on the testbed.

DivPrune as released renumbers the kept tokens' positions 0..keep-1; this runs the same kept tokens
both renumbered and at their original positions, so the two effects can be told apart. Needs the test
split (`make experiments/data/testbed_test/questions.jsonl`).

    .venv/bin/python -m experiments.analysis.divprune_positions [--kinds=attribute,counting] [--keeps=192,128,64]
"""

from __future__ import annotations

import dataclasses
import json
import os

from experiments.flag_config import run_program, setting


@dataclasses.dataclass(frozen=True)
class Config:
    checkpoint: str = setting("checkpoints/testbed", "The testbed checkpoint to prune.")
    split: str = setting("experiments/data/testbed_test", "Testbed split folder (questions.jsonl, images/).")
    kinds: tuple[str, ...] = setting(("attribute", "counting"), "Question kinds to run.")
    keeps: tuple[int, ...] = setting((192, 128, 64), "Visual tokens DivPrune keeps.")
    batch_size: int = setting(64, "Questions per generation batch.")
    dtype: str = setting("bfloat16", "Weights dtype.", choices=("bfloat16", "float32"))


def run(config: Config) -> dict[tuple[str, int, bool], tuple[int, int]]:
    """(kind, keep, renumbered) -> (correct, questions); each line is printed as it is done."""
    import adaptprune_jax as prune
    from models.engine import LlavaEngine
    from models.preprocess import load_image

    with open(os.path.join(config.split, "questions.jsonl")) as file:
        all_items = [json.loads(line) for line in file]
    engine = LlavaEngine.from_checkpoint(config.checkpoint, dtype=config.dtype)
    results = {}
    for kind in config.kinds:
        items = [q for q in all_items if q["kind"] == kind]
        for keep in config.keeps:
            for renumber in (True, False):
                correct = 0
                pruning = prune.make_config("divprune", keep=keep, renumber_positions=renumber)
                for start in range(0, len(items), config.batch_size):
                    batch = items[start : start + config.batch_size]
                    images = [load_image(os.path.join(config.split, "images", q["image"])) for q in batch]
                    out = engine.answer(images, [q["text"] for q in batch], pruning=pruning, max_new_tokens=4)
                    correct += sum(t.strip() == q["answer"] for t, q in zip(out.texts, batch))
                results[kind, keep, renumber] = (correct, len(items))
                print(
                    f"{kind} keep {keep} renumber_positions={renumber}: {correct}/{len(items)} = "
                    f"{correct / len(items):.3f}",
                    flush=True,
                )
    return results


if __name__ == "__main__":
    run_program(Config, run)
