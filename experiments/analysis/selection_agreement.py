"""How closely a pre-LLM method's JAX selection follows its released PyTorch selection on real cues:
the testbed checkpoint's vision-tower cues (from transformers, float32), each image's kept tokens
from the torch reference and from the JAX method on the same cues, per budget: rows whose kept sets
are identical, and the mean share of kept tokens both sides keep.

    .venv/bin/python -m experiments.analysis.selection_agreement --method=vispruner [--images=32]

Why: index-for-index parity is tested where the arithmetic is exact; on real float32 features a
method whose picks follow near-ties (VisPruner's duplicate matching) can differ between frameworks,
and a change to its arithmetic is judged by whether it follows the released code as closely as before.
Needs the test split (`make experiments/data/testbed_test/questions.jsonl`).
"""

from __future__ import annotations

import dataclasses
import json
import os

from experiments.flag_config import run_program, setting


@dataclasses.dataclass(frozen=True)
class Config:
    method: str = setting("vispruner", "A registered pre-LLM method with a torch reference and vision cues.")
    checkpoint: str = setting("checkpoints/testbed", "The checkpoint whose vision tower gives the cues.")
    split: str = setting("experiments/data/testbed_test", "Testbed split folder (questions.jsonl, images/).")
    keeps: tuple[int, ...] = setting((192, 64, 32), "Image tokens kept.")
    images: int = setting(32, "Distinct images, in the split's order.")


def run(config: Config) -> dict[int, dict]:
    """keep -> {'rows', 'identical', 'mean_shared'}; printed as it goes."""
    import jax
    import numpy as np
    import torch
    from transformers import LlavaForConditionalGeneration

    import adaptprune_jax as prune
    from models import torch_reference
    from models.preprocess import Preprocessor, load_image

    jax.config.update("jax_default_matmul_precision", "highest")
    torch.backends.cuda.matmul.allow_tf32 = False
    method = prune.methods.get(config.method)
    if not method.has_torch_reference or set(method.reference_cues) != {
        "vision_attention",
        "vision_features",
    }:
        raise ValueError(
            f"{config.method} is not a method whose released selection reads the vision tower's [CLS] "
            "attention and features (vision_attention, vision_features)."
        )
    with open(os.path.join(config.split, "questions.jsonl")) as file:
        names = list(dict.fromkeys(json.loads(line)["image"] for line in file if line.strip()))
    names = names[: config.images]
    preprocessor = Preprocessor.from_checkpoint(config.checkpoint)
    model = LlavaForConditionalGeneration.from_pretrained(
        config.checkpoint, dtype=torch.float32, attn_implementation="eager"
    ).eval()
    images = [load_image(os.path.join(config.split, "images", name)) for name in names]
    pixels = torch.as_tensor(preprocessor.pixel_values(images))
    probe = method(keep=config.keeps[0])
    cues = [torch_reference.vision_reference_cues(model, pixels[i : i + 1], probe) for i in range(len(names))]
    attention = np.stack([c["vision_attention"].numpy() for c in cues])
    features = np.stack([c["vision_features"].numpy() for c in cues])
    # Cues.vision_tokens are the tower's tokens with [CLS] first, (B, 1 + N, d): a zero row stands in
    # for [CLS], which the selection does not read (it takes the last N).
    tokens = np.concatenate([np.zeros_like(features[:, :1]), features], axis=1)
    results = {}
    for keep in config.keeps:
        pruning = method(keep=keep)
        select = jax.jit(
            lambda a, t, p=pruning, k=keep: p.select(prune.Cues(vision_attention=a, vision_tokens=t), k)
        )
        ours = np.asarray(select(attention, tokens))
        shared, identical = [], 0
        for row, cue in enumerate(cues):
            released = torch_reference.reference_select(
                config.method,
                keep=keep,
                vision_attention=cue["vision_attention"],
                vision_features=cue["vision_features"],
            )
            common = len(set(released.tolist()) & set(ours[row].tolist()))
            shared.append(common / keep)
            identical += int(common == keep)
        results[keep] = {"rows": len(cues), "identical": identical, "mean_shared": float(np.mean(shared))}
        print(
            f"{config.method} keep {keep}: {identical} of {len(cues)} rows identical to the released selection, "
            f"{100 * np.mean(shared):.1f}% of kept tokens shared on average (least {100 * min(shared):.1f}%)",
            flush=True,
        )
    return results


if __name__ == "__main__":
    run_program(Config, run)
