"""`TrainOptions`: every setting of a training run, written once with its help text.

`experiments.train_testbed` derives its command-line flags from these fields
(`experiments.flag_config`); tests build the dataclass directly.
"""

from __future__ import annotations

import dataclasses

from experiments.flag_config import setting
from experiments.testbed.model import TESTBED_LANGUAGE_MODELS
from experiments.testbed.words import KINDS

DTYPES = ("bfloat16", "float32")


@dataclasses.dataclass(frozen=True)
class TrainOptions:
    """Every setting of a run: the flags' defaults, and a value the tests can build directly.

    The defaults are the committed checkpoint's first stage (batch 128, 6 questions per image,
    patch-probe weight 1, peak learning rate 5e-4 after 300 warm-up steps, cosine decay on the clock)
    with its last stage's probes (coordinate and relation weights 10); `experiments.train_testbed`
    lists the four stages. A run is normally bounded by max_minutes; steps only caps it.
    """

    model: str = setting(
        "testbed",
        "Which testbed model to train (experiments.testbed.model.TESTBED_LANGUAGE_MODELS).",
        choices=tuple(TESTBED_LANGUAGE_MODELS),
    )
    output_dir: str = setting(
        "checkpoints/testbed",
        "Where the final llava-hf checkpoint (and its training log, curve and test accuracy) is written.",
    )
    work_dir: str = setting("runs/testbed", "Training state (for --resume), validation split and log.")
    steps: int = setting(
        20000,
        "Most optimizer steps (the cosine schedule's length in steps; with --max_minutes the schedule "
        "follows the clock when that is sooner).",
    )
    batch_size: int = setting(128, "Examples per step.")
    learning_rate: float = setting(5e-4, "Peak AdamW learning rate.")
    warmup_steps: int = setting(300, "Linear warm-up steps.")
    weight_decay: float = setting(0.05, "AdamW weight decay (matrices only).")
    grad_clip: float = setting(1.0, "Global gradient-norm clip.")
    patch_loss_weight: float = setting(
        1.0,
        "Weight of the patch probe's loss (per-patch object class and box centre, predicted linearly "
        "from the image features; training-only, not exported). 0 = answer loss only.",
    )
    coordinate_loss_weight: float = setting(
        10.0,
        "Weight of the probe's squared error on the (row, column) centre of the object under each "
        "object patch, in [-1, 1] image units (what the position questions compare; training-only). "
        "0 = off, as the checkpoint's first two stages trained.",
    )
    relation_loss_weight: float = setting(
        10.0,
        "Weight of the relation probe's squared error on the centres of the two objects a position "
        "question names, read linearly from the LLM's residual stream entering its last layer at the "
        "answer slot (training-only). 0 = off.",
    )
    turns: int = setting(
        6,
        "Questions per training image, asked as one multi-turn conversation (LLaVA-1.5's format; the "
        "first turn is the inference prompt).",
    )
    train_kind_weights: tuple[float, ...] | None = setting(
        None,
        f"Question-kind weights of the training batches, one per kind {KINDS} (empty: the testbed's "
        "own mixture; evaluation splits always use it). A warm-started run can put more weight on the "
        "kind that lags.",
    )
    seed: int = setting(0, "Seed of the initial weights and of every training batch.")
    eval_every: int = setting(500, "Validate every this many steps (0 = only at the end).")
    eval_items: int = setting(
        500, "Questions in the fixed validation split (4 per image; 0 = no validation)."
    )
    eval_batch_size: int = setting(250, "Questions per generation batch (validation, test).")
    log_every: int = setting(100, "Print and log training metrics every this many steps.")
    save_every: int = setting(2000, "Save the training state every this many steps (and at the end).")
    max_minutes: float | None = setting(
        None,
        "Wall-clock budget of the training loop, from process start: the learning rate anneals to zero "
        "by then, training stops, the state is saved, the checkpoint exported and the test split "
        "evaluated.",
    )
    stop_at_step: int | None = setting(
        None,
        "Stop after this step as if interrupted (state saved, no export); the schedule still spans "
        "--steps. For splitting a run over several commands.",
    )
    resume: bool = setting(True, "Continue from the training state in --work_dir, if there is one.")
    dtype: str = setting(
        "auto",
        "Compute dtype of training (auto: bfloat16 on an accelerator, float32 on CPU).",
        choices=("auto", *DTYPES),
    )
    eval_dtype: str = setting("float32", "Weights dtype of validation and test.", choices=DTYPES)
    save_dtype: str = setting("float16", "Dtype of the exported weights.", choices=("float16", "float32"))
    test_dir: str = setting(
        "experiments/data/testbed_test",
        "Test split (the eval harness's --questions and --image_dir); written with write_split if absent.",
    )
    test_items: int = setting(
        1000, "Questions in the test split when it has to be written (4 per image; 0 = no test evaluation)."
    )
    init_from: str = setting(
        "",
        "Warm start: initialise the weights from this exported checkpoint (fresh optimizer and "
        "schedule; pass another --seed for unseen batches).",
    )
    init_vision_from: str = setting(
        "",
        "Warm start of the vision tower alone from this exported checkpoint (its tower must have our "
        "shapes): a deeper or narrower LLM starts from a tower that already sees the objects.",
    )
    freeze_vision: bool = setting(
        False,
        "Keep the vision tower's weights fixed (as LLaVA-1.5 keeps CLIP's): no gradient, no update, no "
        "weight decay; the projector and the LLM train.",
    )
    fused_attention: bool = setting(
        False,
        "Train the LLM with fused causal attention (cuDNN on a GPU in bfloat16, no logits in memory; "
        "XLA's implementation of the same call otherwise). Equal to the "
        "inference mask on every real token of the slot-ordered, right-padded training sequences, in "
        "the compute dtype's precision.",
    )
    # Off here, so code (tests) does not write a cache; the command line's default is .jax_cache.
    compilation_cache_dir: str = setting("", "JAX persistent compilation cache ('' = off).")
    prefetch: int = 4  # batches sampled ahead by the host thread (no flag)
    quiet: bool = False  # no printing (tests; no flag)
