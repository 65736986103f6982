"""Train the testbed LLaVA from scratch and ship it as a llava-hf checkpoint.

No pretrained LVLM can be downloaded here, so pruning methods are compared on a small LLaVA trained on
the procedural VQA task of `experiments.testbed`. This program trains the project's own Flax modules
(CLIP tower + projector + LLaMA, `experiments.testbed.model.testbed_config`) end to end and exports
them in llava-hf's layout, so the eval harness loads the result exactly like a released checkpoint.
The parts of a run live in `experiments.testbed.training`.

    PYTHONUNBUFFERED=1 PYTHONPATH=. python3 -m experiments.train_testbed --max_minutes=8.5

The committed checkpoint is four such calls, each a warm start from the previous export. The
coordinate and relation probes came in at stages 3 and 4, so stages 1-2 ran without them (the
weights below reproduce that):

    T="PYTHONUNBUFFERED=1 PYTHONPATH=. python3 -m experiments.train_testbed"
    W="--init_from=checkpoints/testbed --learning_rate=3e-4 --warmup_steps=100 --noresume"
    $T --max_minutes=8.5 --coordinate_loss_weight=0 --relation_loss_weight=0
    $T $W --seed=1 --max_minutes=4.6 --train_kind_weights=0.3,0.1,0.1,0.5 \
        --coordinate_loss_weight=0 --relation_loss_weight=0
    $T $W --seed=2 --max_minutes=8.9 --train_kind_weights=0.25,0.1,0.05,0.6 --relation_loss_weight=0
    $T $W --seed=3 --max_minutes=8.9 --train_kind_weights=0.15,0.05,0.05,0.75

writes checkpoints/testbed/ (weights, config, tokenizer, processor, training_log.jsonl,
training_curve.png, test_accuracy.json), and, when $OUT is set, the same directory as a tar cut into
parts under 16 MiB plus the small result files in $OUT. Validation and test are scored by the eval
harness's testbed benchmark, which this entry point hands to the run.
"""

from __future__ import annotations

import dataclasses
import time

# --max_minutes counts from here, so the imports below (JAX, transformers: seconds) are in the budget.
PROCESS_START = time.time()

from absl import app, flags

from experiments.benchmarks.testbed import TestbedBenchmark
from experiments.testbed.training import run
from experiments.testbed.training.config import TrainOptions
from experiments.testbed.words import KINDS

_DEFAULT = TrainOptions()
FLAGS = flags.FLAGS


def define_flags() -> None:
    """Command-line flags, defined only when this file runs as a program: other entry points
    (benchmark, validate) define flags of the same names, and tests import them together."""
    flags.DEFINE_string(
        "output_dir",
        _DEFAULT.output_dir,
        "Where the final llava-hf checkpoint (and its training log, curve and test accuracy) is written.",
    )
    flags.DEFINE_string(
        "work_dir", _DEFAULT.work_dir, "Training state (for --resume), validation split and log."
    )
    flags.DEFINE_integer(
        "steps",
        _DEFAULT.steps,
        "Most optimizer steps (the cosine schedule's length in steps; "
        "with --max_minutes the schedule follows the clock when that is sooner).",
    )
    flags.DEFINE_integer("batch_size", _DEFAULT.batch_size, "Examples per step.")
    flags.DEFINE_float("learning_rate", _DEFAULT.learning_rate, "Peak AdamW learning rate.")
    flags.DEFINE_integer("warmup_steps", _DEFAULT.warmup_steps, "Linear warm-up steps.")
    flags.DEFINE_float("weight_decay", _DEFAULT.weight_decay, "AdamW weight decay (matrices only).")
    flags.DEFINE_float("grad_clip", _DEFAULT.grad_clip, "Global gradient-norm clip.")
    flags.DEFINE_float(
        "patch_loss_weight",
        _DEFAULT.patch_loss_weight,
        "Weight of the patch probe's loss "
        "(per-patch object class and box centre, predicted linearly from the image features; "
        "training-only, not exported). 0 = answer loss only.",
    )
    flags.DEFINE_float(
        "coordinate_loss_weight",
        _DEFAULT.coordinate_loss_weight,
        "Weight of the probe's "
        "squared error on the (row, column) centre of the object under each object patch, in "
        "[-1, 1] image units (what the position questions compare; training-only). 0 = off.",
    )
    flags.DEFINE_float(
        "relation_loss_weight",
        _DEFAULT.relation_loss_weight,
        "Weight of the relation probe's "
        "squared error on the centres of the two objects a position question names, read linearly "
        "from the LLM's residual stream entering its last layer at the answer slot (training-only). "
        "0 = off.",
    )
    flags.DEFINE_integer(
        "turns",
        _DEFAULT.turns,
        "Questions per training image, asked as one multi-turn "
        "conversation (LLaVA-1.5's format; the first turn is the inference prompt).",
    )
    flags.DEFINE_list(
        "train_kind_weights",
        [],
        f"Question-kind weights of the training batches, one per kind "
        f"{KINDS} (empty: the testbed's own mixture; evaluation splits always use it).",
    )
    flags.DEFINE_integer("seed", _DEFAULT.seed, "Seed of the initial weights and of every training batch.")
    flags.DEFINE_integer(
        "eval_every", _DEFAULT.eval_every, "Validate every this many steps (0 = only at the end)."
    )
    flags.DEFINE_integer(
        "eval_items",
        _DEFAULT.eval_items,
        "Questions in the fixed validation split (4 per image; 0 = no validation).",
    )
    flags.DEFINE_integer(
        "eval_batch_size", _DEFAULT.eval_batch_size, "Questions per generation batch (validation, test)."
    )
    flags.DEFINE_integer(
        "log_every", _DEFAULT.log_every, "Print and log training metrics every this many steps."
    )
    flags.DEFINE_integer(
        "save_every", _DEFAULT.save_every, "Save the training state every this many steps (and at the end)."
    )
    flags.DEFINE_float(
        "max_minutes",
        _DEFAULT.max_minutes,
        "Wall-clock budget of the training loop, from process "
        "start: the learning rate anneals to zero by then, training stops, the state is saved, the "
        "checkpoint exported and the test split evaluated (about 15 s more on an H100).",
    )
    flags.DEFINE_integer(
        "stop_at_step",
        _DEFAULT.stop_at_step,
        "Stop after this step as if interrupted (state saved, "
        "no export); the schedule still spans --steps. For splitting a run over several commands.",
    )
    flags.DEFINE_bool(
        "resume", _DEFAULT.resume, "Continue from the training state in --work_dir, if there is one."
    )
    flags.DEFINE_enum(
        "dtype",
        _DEFAULT.dtype,
        ["auto", "bfloat16", "float32"],
        "Compute dtype of training (auto: bfloat16 on an accelerator, float32 on CPU).",
    )
    flags.DEFINE_enum(
        "eval_dtype", _DEFAULT.eval_dtype, ["bfloat16", "float32"], "Weights dtype of validation and test."
    )
    flags.DEFINE_enum(
        "save_dtype", _DEFAULT.save_dtype, ["float16", "float32"], "Dtype of the exported weights."
    )
    flags.DEFINE_string(
        "test_dir",
        _DEFAULT.test_dir,
        "Test split (the eval harness's --questions and --image_dir); written with write_split if absent.",
    )
    flags.DEFINE_integer(
        "test_items",
        _DEFAULT.test_items,
        "Questions in the test split when it has to be written (4 per image; 0 = no test evaluation).",
    )
    flags.DEFINE_string(
        "init_from",
        _DEFAULT.init_from,
        "Warm start: initialise the weights from this exported "
        "checkpoint (fresh optimizer and schedule; pass another --seed for unseen batches).",
    )
    flags.DEFINE_string("compilation_cache_dir", ".jax_cache", "JAX persistent compilation cache ('' = off).")


def options_from_flags() -> TrainOptions:
    names = {field.name for field in dataclasses.fields(TrainOptions)}
    values = {name: FLAGS[name].value for name in names if name in FLAGS}
    if "train_kind_weights" in values:
        values["train_kind_weights"] = tuple(map(float, values["train_kind_weights"])) or None
    return TrainOptions(**values)


def run_training(options: TrainOptions, hf_config=None, scene_config=None, start_time: float | None = None):
    """`training.run.run_training`, validated and tested with the eval harness's testbed benchmark."""
    return run.run_training(options, TestbedBenchmark(), hf_config, scene_config, start_time)


def main(argv):
    del argv
    import warnings

    # The decode loop donates its KV cache; XLA cannot always reuse it in place. Harmless, and noisy.
    warnings.filterwarnings("ignore", message="Some donated buffers were not usable")
    run_training(options_from_flags(), start_time=PROCESS_START)


if __name__ == "__main__":
    define_flags()
    app.run(main)
