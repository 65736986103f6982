"""Contact sheet of sample testbed scenes with their questions and answers, for eyeballing.

A glance tells whether objects are small yet clearly visible, the background is textured, and the
answers match the pictures. Usage:
    PYTHONPATH=. python -m experiments.testbed.preview [out.png] [--grid]
"""

from __future__ import annotations

import sys

import numpy as np

from experiments.testbed.layout import sample_scenes, split_rng
from experiments.testbed.questions import sample_questions
from experiments.testbed.render import render_scenes_numpy
from experiments.testbed.scene_config import DEFAULT_CONFIG, TestbedConfig


def save_contact_sheet(
    path: str,
    num_scenes: int = 8,
    seed: int = 0,
    split: str = "validation",
    questions_per_scene: int = 4,
    config: TestbedConfig = DEFAULT_CONFIG,
    show_patch_grid: bool = False,
) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rng = split_rng(split, seed)
    scenes = sample_scenes(rng, num_scenes, config, split)
    questions = sample_questions(rng, scenes, config, per_scene=questions_per_scene)
    images = render_scenes_numpy(scenes, config)
    columns = min(4, num_scenes)
    rows = -(-num_scenes // columns)
    figure, axes = plt.subplots(rows, columns, figsize=(4.2 * columns, 5.6 * rows), squeeze=False)
    for index, axis in enumerate(axes.flat):
        axis.axis("off")
        if index >= num_scenes:
            continue
        axis.imshow(images[index], interpolation="nearest")
        if show_patch_grid:
            ticks = np.arange(0, config.image_size + 1, config.patch_size) - 0.5
            axis.vlines(ticks, -0.5, config.image_size - 0.5, colors="k", linewidths=0.2, alpha=0.4)
            axis.hlines(ticks, -0.5, config.image_size - 0.5, colors="k", linewidths=0.2, alpha=0.4)
        lines = [f"[{q.category}] {q.text} -> {q.answer}" for q in questions[index]]
        axis.set_title("\n".join(lines), fontsize=6.5, loc="left")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


if __name__ == "__main__":
    arguments = [a for a in sys.argv[1:] if not a.startswith("--")]
    save_contact_sheet(
        arguments[0] if arguments else "/tmp/testbed_samples.png", show_patch_grid="--grid" in sys.argv
    )
