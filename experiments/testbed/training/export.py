"""Export: the trained weights as a llava-hf checkpoint directory, its training curve, and a copy
for a caller that collects files from $OUT.

The eval harness and transformers load the export exactly like a released checkpoint.
"""

from __future__ import annotations

import io
import os
import shutil
import tarfile

from experiments.testbed.encoding import make_tokenizer
from experiments.testbed.training.config import TrainOptions
from experiments.testbed.training.state import LOG_FILE
from experiments.testbed.words import KINDS
from models.checkpoint import save_checkpoint
from models.presets import llava15_image_processor

CURVE_FILE = "training_curve.png"
TEST_RESULT_FILE = "test_accuracy.json"
OUT_TAR = "testbed_checkpoint.tar"
OUT_PART_BYTES = 15 << 20  # parts stay under 16 MiB each


def save_processor(hf_config, directory: str) -> None:
    """Tokenizer + LlavaProcessor (LLaVA-1.5 image processor) next to the weights, as llava-hf ships them."""
    from transformers import LlavaProcessor

    tokenizer = make_tokenizer()
    tokenizer.save_pretrained(directory)
    LlavaProcessor(
        image_processor=llava15_image_processor(hf_config),
        tokenizer=tokenizer,
        patch_size=hf_config.vision_config.patch_size,
        vision_feature_select_strategy=hf_config.vision_feature_select_strategy,
        num_additional_image_tokens=1,
    ).save_pretrained(directory)  # CLIP's [CLS]


def export_checkpoint(model, hf_config, output_dir: str, save_dtype: str) -> str:
    """Write weights + config + tokenizer + processor to a fresh directory, then swap it into place, so
    `output_dir` never mixes files of two exports."""
    output_dir = os.path.abspath(output_dir)
    fresh, old = output_dir + ".new", output_dir + ".old"
    for path in (fresh, old):
        shutil.rmtree(path, ignore_errors=True)
    save_checkpoint(model, hf_config, fresh, dtype=save_dtype)
    save_processor(hf_config, fresh)
    if os.path.exists(output_dir):
        os.rename(output_dir, old)
    os.rename(fresh, output_dir)
    shutil.rmtree(old, ignore_errors=True)
    return output_dir


def directory_bytes(directory: str) -> int:
    return sum(
        os.path.getsize(os.path.join(root, name)) for root, _, names in os.walk(directory) for name in names
    )


def plot_curve(records: list[dict], path: str, title: str = "testbed LLaVA trained from scratch") -> None:
    """Training loss and validation accuracy (overall and per kind) against the step."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train = [r for r in records if r["type"] == "train"]
    evals = [r for r in records if r["type"] == "eval"]
    figure, (loss_axis, accuracy_axis) = plt.subplots(1, 2, figsize=(11, 4))
    if train:
        loss_axis.plot([r["step"] for r in train], [r["loss"] for r in train], label="train loss")
        loss_axis.set_yscale("log")
    loss_axis.set_xlabel("step")
    loss_axis.set_ylabel("cross-entropy (answer word + </s>)")
    loss_axis.grid(alpha=0.3)
    loss_axis.legend()
    if evals:
        steps = [r["step"] for r in evals]
        accuracy_axis.plot(steps, [r["accuracy"] for r in evals], "k-o", label="validation (all)")
        for kind in KINDS:
            key = f"accuracy/{kind}"
            if any(key in r for r in evals):
                accuracy_axis.plot(steps, [r.get(key, float("nan")) for r in evals], "--", label=kind)
    accuracy_axis.set_xlabel("step")
    accuracy_axis.set_ylabel("greedy exact-match accuracy")
    accuracy_axis.set_ylim(0, 1.02)
    accuracy_axis.grid(alpha=0.3)
    if evals:
        accuracy_axis.legend(fontsize=8)
    figure.suptitle(title)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def curve_title(options: TrainOptions) -> str:
    """What the curve shows: a run from scratch, or a warm start (its steps count from the warm start)."""
    if options.init_from:
        return f"testbed LLaVA, warm start from {options.init_from} (seed {options.seed})"
    return "testbed LLaVA trained from scratch"


def copy_to_out(output_dir: str, out_dir: str) -> list[str]:
    """The checkpoint directory as one tar, cut into parts of at most OUT_PART_BYTES (a collector of
    $OUT may cap file sizes), plus the small result files. Reassemble with: cat testbed_checkpoint.tar.part* | tar -x"""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        tar.add(output_dir, arcname=os.path.basename(os.path.normpath(output_dir)))
    data = buffer.getvalue()
    os.makedirs(out_dir, exist_ok=True)
    written = []
    for part, start in enumerate(range(0, len(data), OUT_PART_BYTES)):
        path = os.path.join(out_dir, f"{OUT_TAR}.part{part}")
        with open(path, "wb") as handle:
            handle.write(data[start : start + OUT_PART_BYTES])
        written.append(path)
    for name in (TEST_RESULT_FILE, CURVE_FILE, LOG_FILE):
        if os.path.isfile(os.path.join(output_dir, name)):
            shutil.copy(os.path.join(output_dir, name), out_dir)
            written.append(os.path.join(out_dir, name))
    return written
