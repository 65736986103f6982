"""Kept-token pictures of an eval run: for a few questions, which patches each method kept, drawn on
the image exactly as the vision tower saw it (after LLaVA's pad-to-square and resize). The patch grid
is read from the model config, so the pictures stay right for any image or patch size.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence

import matplotlib

matplotlib.use("Agg")  # files only: no display on the machines this runs on
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from experiments.benchmarks.io import read_predictions  # noqa: E402
from experiments.reporting import UNPRUNED, ordered_pairs  # noqa: E402

PRUNED_PATCH_BRIGHTNESS = 0.2  # pruned patches are dimmed to this fraction, kept ones stay as seen


def model_input_image(engine, image) -> np.ndarray:
    """(H, W, 3) floats in [0, 1]: the image as the vision tower sees it (padded, resized, cropped)."""
    pixels = engine.preprocessor.pixel_values([image])[0]  # (3, H, W), normalised
    processor = engine.preprocessor.image_processor
    mean = np.asarray(processor.image_mean, np.float32)[:, None, None]
    std = np.asarray(processor.image_std, np.float32)[:, None, None]
    return np.clip(pixels * std + mean, 0.0, 1.0).transpose(1, 2, 0)


def kept_patch_mask(kept: Sequence[int], config) -> np.ndarray:
    """(grid, grid) bool: which patches of the vision grid were kept.

    Indices count image tokens; with LLaVA's 'full' feature strategy the first token is [CLS], not a
    patch, so the patch grid starts after the tokens that precede it. A token merged inside the LLM
    (index -1) covers no single patch and is not drawn.
    """
    grid = config.vision.grid_size
    offset = config.num_image_tokens - grid * grid
    mask = np.zeros(grid * grid, bool)
    patches = np.asarray([index - offset for index in kept if index >= offset], np.int64)
    mask[patches] = True
    return mask.reshape(grid, grid)


def overlay_kept_patches(image: np.ndarray, mask: np.ndarray, patch_size: int) -> np.ndarray:
    """Dim the pruned patches of a model-input image; kept patches stay as the model saw them."""
    brightness = np.where(mask, 1.0, PRUNED_PATCH_BRIGHTNESS)
    per_pixel = np.kron(brightness, np.ones((patch_size, patch_size)))
    height, width = image.shape[:2]
    return image * per_pixel[:height, :width, None]


def write_kept_token_overlays(
    directory: str, engine, results: dict, questions: Sequence, image_path: Callable
) -> list[str]:
    """One PNG per question: its model-input image, then a panel per (method, keep) with the kept
    patches bright and the rest dimmed. Returns the paths written."""
    from models.preprocess import UnreadableImageError, load_image

    config = engine.config
    patch_size = config.vision.patch_size
    pruned = [(name, result) for name, result in ordered_pairs(results) if result["method"] != UNPRUNED]
    if not questions or not pruned:
        return []
    kept_by_pair = {}
    for name, result in pruned:
        path = os.path.join(os.path.dirname(directory), result["predictions_file"])
        kept_by_pair[name] = read_predictions(path) if os.path.exists(path) else {}
    methods = list(dict.fromkeys(result["method"] for _, result in pruned))
    keeps = sorted({result["keep"] for _, result in pruned}, reverse=True)
    os.makedirs(directory, exist_ok=True)
    written = []
    for index, question in enumerate(questions):
        try:
            image = model_input_image(engine, load_image(image_path(question)))
        except (FileNotFoundError, UnreadableImageError):
            continue
        rows, columns = len(keeps), len(methods) + 1
        figure, grid_axes = plt.subplots(
            rows, columns, figsize=(2.2 * columns, 2.3 * rows + 0.4), squeeze=False
        )
        for axes in grid_axes.flat:
            axes.set_axis_off()
        grid_axes[0][0].imshow(image)
        grid_axes[0][0].set_title("model input", fontsize=8)
        for name, result in pruned:
            record = kept_by_pair[name].get(question.question_id, {})
            axes = grid_axes[keeps.index(result["keep"])][methods.index(result["method"]) + 1]
            if "kept" not in record:
                axes.set_title(f"{name}: not recorded", fontsize=7)
                continue
            axes.imshow(overlay_kept_patches(image, kept_patch_mask(record["kept"], config), patch_size))
            axes.set_title(f"{result['method']} keep {result['keep']}", fontsize=8)
        prompt = question.prompt.splitlines()[0] if question.prompt else ""
        figure.suptitle(f"{question.question_id}: {prompt[:90]}", fontsize=8)
        figure.tight_layout()
        path = os.path.join(directory, f"{index:02d}_{_file_name(question.question_id)}.png")
        figure.savefig(path, dpi=100)
        plt.close(figure)
        written.append(path)
    return written


def _file_name(text: str) -> str:
    safe = "".join(character if character.isalnum() or character in "._-" else "_" for character in text)
    return safe.strip("_") or "question"
