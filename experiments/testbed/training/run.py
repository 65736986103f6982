"""One training run: train (or resume), validate, export and test.

The host stays at most two steps ahead of the device (it reads each step's metrics two steps later),
so the clock it checks is the device's. The schedule follows that clock as well as the step count:
progress = max(step / steps, fraction of the max_minutes budget used), so a run cut short by its
wall-clock budget still anneals to zero before it stops, saves and exports.
"""

from __future__ import annotations

import functools
import json
import os
import time
from collections import defaultdict, deque
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from experiments.jax_runtime import use_compilation_cache
from experiments.testbed.encoding import make_tokenizer
from experiments.testbed.model import testbed_config
from experiments.testbed.scene_config import TestbedConfig
from experiments.testbed.training.batches import Prefetcher, host_batch, training_sequence_length
from experiments.testbed.training.config import TrainOptions
from experiments.testbed.training.export import (
    CURVE_FILE,
    TEST_RESULT_FILE,
    copy_to_out,
    curve_title,
    directory_bytes,
    export_checkpoint,
    plot_curve,
)
from experiments.testbed.training.probes import RELATION_OUTPUTS, initial_trainable
from experiments.testbed.training.state import (
    LOG_FILE,
    config_fingerprint,
    initial_vision_weights,
    initial_weights,
    load_state,
    read_log,
    save_state,
    write_log,
)
from experiments.testbed.training.step import (
    PixelNormalization,
    learning_rate_at,
    make_optimizer,
    make_train_step,
)
from experiments.testbed.training.validation import (
    VALIDATION_DIR,
    EvalSplit,
    SplitWriter,
    evaluate,
    in_memory_engine,
    summarize_scores,
)
from experiments.testbed.words import KINDS
from models.config import from_hf_config
from models.engine import LlavaEngine
from models.llava import LlavaForConditionalGeneration


def _print(options: TrainOptions, *args) -> None:
    if not options.quiet:
        print(*args, flush=True)


def _compute_dtype(name: str):
    if name == "auto":
        name = "float32" if jax.default_backend() == "cpu" else "bfloat16"
    return {"bfloat16": jnp.bfloat16, "float32": jnp.float32}[name]


def _accumulate(sums: dict, metrics) -> int:
    """Add one step's device metrics to the host sums (waits for that step); returns 1."""
    for key, value in jax.device_get(metrics).items():
        sums[key] = sums[key] + value
    return 1


def _train_record(
    sums: dict,
    steps: int,
    step: int,
    lr: float,
    progress: float,
    rate: float,
    start_time: float,
    grid_size: int,
) -> dict:
    """One log line: metrics averaged over the last `steps` steps; `rate` in examples per second; the
    probes' coordinate errors as RMS per coordinate in patches (of the `grid_size`-patch side)."""
    record = dict(
        type="train",
        step=step,
        loss=float(sums["loss"] / steps),
        accuracy=float(sums["accuracy"] / steps),
        first_turn_accuracy=float(sums["first_turn_accuracy"] / steps),
        grad_norm=float(sums["grad_norm"] / steps),
        patch_loss=float(sums["patch_loss"] / steps),
        patch_accuracy=float(sums["patch_accuracy"] / steps),
        coordinate_rms_patches=float(np.sqrt(sums["coordinate_mse"] / steps / 2) * grid_size / 2),
        relation_rms_patches=float(np.sqrt(sums["relation_mse"] / steps / RELATION_OUTPUTS) * grid_size / 2),
        lr=lr,
        progress=round(progress, 5),
        examples_per_second=round(rate, 1),
        wall_seconds=round(time.time() - start_time, 1),
    )
    for kind, correct, count in zip(KINDS, sums["kind_correct"], sums["kind_count"]):
        record[f"accuracy/{kind}"] = float(correct / max(count, 1))
    return record


def _format_train(record: dict) -> str:
    kinds = " ".join(f"{kind[:4]} {record[f'accuracy/{kind}']:.2f}" for kind in KINDS)
    return (
        f"step {record['step']:6d}  loss {record['loss']:.4f}  acc {record['accuracy']:.3f} ({kinds})  "
        f"patch {record['patch_loss']:.3f}/{record['patch_accuracy']:.2f}/{record['coordinate_rms_patches']:.2f}p  "
        f"rel {record['relation_rms_patches']:.2f}p  "
        f"gnorm {record['grad_norm']:.2f}  lr {record['lr']:.2e}  {record['examples_per_second']:7.0f} ex/s  "
        f"t {record['wall_seconds']:.0f}s"
    )


def run_training(
    options: TrainOptions,
    benchmark,
    hf_config=None,
    scene_config=None,
    start_time: float | None = None,
) -> dict:
    """Train (or resume), validate, export and test. Returns a summary dict (also printed).

    benchmark: reads and scores the validation and test splits (the eval harness's testbed benchmark,
    passed in because the testbed's modules sit below the harness's); hf_config: a transformers
    LlavaConfig (default: `testbed_config()`); scene_config: the TestbedConfig (default: image and
    patch size from hf_config); start_time: when the max_minutes budget started (default: now).
    """
    start_time = time.time() if start_time is None else start_time
    use_compilation_cache(options.compilation_cache_dir)
    hf_config = hf_config if hf_config is not None else testbed_config(options.model)
    scene_config = scene_config if scene_config is not None else TestbedConfig.from_llava_config(hf_config)
    cfg = from_hf_config(hf_config)
    if (scene_config.image_size, scene_config.patch_size) != (cfg.vision.image_size, cfg.vision.patch_size):
        raise ValueError(
            f"scenes are {scene_config.image_size} px / patch {scene_config.patch_size}, the vision "
            f"tower takes {cfg.vision.image_size} px / patch {cfg.vision.patch_size}"
        )
    tokenizer = make_tokenizer()
    if cfg.text.vocab_size < len(tokenizer):
        raise ValueError(f"vocab_size {cfg.text.vocab_size} < tokenizer size {len(tokenizer)}")
    if options.turns < 1:
        raise ValueError(f"turns must be >= 1, got {options.turns}")
    if options.train_kind_weights is not None and len(options.train_kind_weights) != len(KINDS):
        raise ValueError(
            f"train_kind_weights needs one weight per kind {KINDS}, got {options.train_kind_weights}"
        )
    sequence_length = training_sequence_length(cfg, options.turns)
    if sequence_length + 1 > cfg.text.max_position_embeddings:
        raise ValueError(
            f"{sequence_length} training tokens do not fit {cfg.text.max_position_embeddings} positions"
        )
    compute_dtype = _compute_dtype(options.dtype)
    eval_dtype = jnp.dtype(options.eval_dtype)
    deadline = start_time + 60 * options.max_minutes if options.max_minutes else None
    os.makedirs(options.work_dir, exist_ok=True)
    log_path = os.path.join(options.work_dir, LOG_FILE)
    validation_dir = os.path.join(options.work_dir, VALIDATION_DIR)
    splits = SplitWriter(
        [
            job
            for job in (
                (validation_dir, "validation", options.eval_items),
                (options.test_dir, "test", options.test_items),
            )
            if job[2] > 0
        ],
        scene_config,
    )

    # Model, optimizer, state (fresh, warm-started from a checkpoint, or resumed).
    model = LlavaForConditionalGeneration(cfg, dtype=jnp.float32, rngs=nnx.Rngs(options.seed))
    graphdef, params = nnx.split(model)
    del model
    if options.init_from and options.init_vision_from:
        raise ValueError("--init_from already sets every weight; give it or --init_vision_from, not both")
    if options.init_from:
        params = initial_weights(options.init_from, cfg, params)
    if options.init_vision_from:
        params = initial_vision_weights(options.init_vision_from, cfg, params)
    trainable = initial_trainable(params, cfg, options.seed)
    del params
    optimizer = make_optimizer(options)
    opt_state = optimizer.init(trainable)
    fingerprint = config_fingerprint(hf_config, options, scene_config)
    step, progress, log = 0, 0.0, []
    loaded = load_state(options.work_dir, trainable, opt_state) if options.resume else None
    if loaded is not None:
        trainable, opt_state, meta = loaded
        if meta["fingerprint"] != fingerprint:
            raise ValueError(
                f"the training state in {options.work_dir} belongs to another configuration "
                f"(model, data or optimizer settings differ); use a fresh --work_dir or --noresume"
            )
        step, progress = meta["step"], meta["progress"]
        log = read_log(log_path, up_to_step=step)
        _print(options, f"resumed from {options.work_dir} at step {step} (schedule progress {progress:.3f})")
    write_log(log_path, log)
    num_params = sum(int(np.prod(p.shape)) for p in jax.tree.leaves(trainable["model"]))
    _print(
        options,
        f"device {jax.devices()[0].device_kind} ({jax.default_backend()}); {num_params / 1e6:.2f}M params; "
        f"{sequence_length} LLM tokens + {cfg.vision.num_patches + 1} CLIP tokens per example; "
        f"compute {jnp.dtype(compute_dtype).name}, batch {options.batch_size}",
    )

    normalization = PixelNormalization.from_hf_config(hf_config)
    train_step = make_train_step(
        graphdef,
        optimizer,
        scene_config,
        normalization,
        compute_dtype,
        options.patch_loss_weight,
        options.coordinate_loss_weight,
        options.relation_loss_weight,
        options.freeze_vision,
        options.fused_attention,
    )
    make_batch = functools.partial(
        host_batch,
        options.seed,
        batch_size=options.batch_size,
        cfg=cfg,
        scene_config=scene_config,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        turns=options.turns,
        kind_weights=options.train_kind_weights,
    )

    def save(reason: str) -> None:
        save_state(
            options.work_dir,
            trainable,
            opt_state,
            dict(step=step, progress=progress, seed=options.seed, fingerprint=fingerprint, reason=reason),
        )
        write_log(log_path, log)

    engine = validation = None

    def validate() -> dict:
        nonlocal engine, validation
        eval_start = time.time()
        weights = jax.tree.map(lambda p: p.astype(eval_dtype), trainable["model"])
        if engine is None:
            engine = in_memory_engine(hf_config, graphdef, weights)
            validation = EvalSplit(splits.wait(validation_dir), engine.preprocessor, benchmark)
        engine.runner.state = weights  # same tree and shapes: the compiled prefill/decode are reused
        summary = summarize_scores(evaluate(engine, validation, options.eval_batch_size))
        engine.runner.state = None  # the next step donates the training weights
        record = dict(type="eval", step=step, seconds=round(time.time() - eval_start, 2), **summary)
        log.append(record)
        kinds = " ".join(f"{k.split('/')[1]} {v:.3f}" for k, v in summary.items() if "/" in k)
        _print(
            options,
            f"  validation @ {step}: accuracy {summary['accuracy']:.4f} ({kinds}) [{record['seconds']:.1f}s]",
        )
        return summary

    # Training loop. The host stays at most two steps ahead of the device (it reads each step's
    # metrics two steps later), so the clock it checks is the device's.
    status = "complete"
    if step < options.steps and progress < 1.0:
        prefetcher = Prefetcher(make_batch, step, options.prefetch)
        try:
            batch = prefetcher.get(step)
            compile_start = time.time()
            loop_start, progress_at_start = None, progress
            pending: deque = deque()
            sums: dict[str, Any] = defaultdict(float)
            window_start, window_steps, timed_steps = time.time(), 0, 0
            while True:
                progress = step / options.steps
                if deadline is not None and loop_start is not None:
                    clock = (time.time() - loop_start) / max(1e-9, deadline - loop_start)
                    progress = max(progress, progress_at_start + (1 - progress_at_start) * clock)
                if progress >= 1.0 or (deadline is not None and time.time() >= deadline):
                    status = "complete" if step >= options.steps else "time budget reached"
                    break
                lr = learning_rate_at(step, progress, options)
                trainable, opt_state, metrics = train_step(trainable, opt_state, batch, np.float32(lr))
                step += 1
                pending.append(metrics)
                timed_steps += 1
                if loop_start is None:  # the first step compiled; the clock schedule starts now
                    jax.block_until_ready(metrics)
                    loop_start = window_start = time.time()
                    timed_steps = 0
                    _print(options, f"compiled and ran the first step in {loop_start - compile_start:.1f}s")
                while len(pending) > 2:
                    window_steps += _accumulate(sums, pending.popleft())
                if step % options.log_every == 0 or step == options.steps:
                    while pending:
                        window_steps += _accumulate(sums, pending.popleft())
                    rate = timed_steps * options.batch_size / max(time.time() - window_start, 1e-9)
                    log.append(
                        _train_record(
                            sums, window_steps, step, lr, progress, rate, start_time, scene_config.grid_size
                        )
                    )
                    _print(options, _format_train(log[-1]))
                    sums, window_start, window_steps, timed_steps = defaultdict(float), time.time(), 0, 0
                if (
                    options.eval_every
                    and options.eval_items
                    and step % options.eval_every == 0
                    and step < options.steps
                ):
                    validate()
                    window_start, timed_steps = time.time(), 0
                if options.save_every and step % options.save_every == 0:
                    save("periodic")
                    window_start, timed_steps = time.time(), 0
                if options.stop_at_step is not None and step >= options.stop_at_step:
                    status = "interrupted"
                    break
                if step < options.steps:
                    batch = prefetcher.get(step)
        finally:
            prefetcher.close()
        jax.block_until_ready(trainable)
        save(status)
        if status == "interrupted":
            _print(options, f"stopped at step {step} as asked; state saved in {options.work_dir}")
            return dict(status=status, step=step)
        _print(options, f"training stopped at step {step} ({status}); state saved")

    summary: dict[str, Any] = dict(status=status, step=step, parameters=num_params)
    if options.eval_items and (not log or log[-1]["type"] != "eval" or log[-1]["step"] != step):
        summary["validation"] = validate()

    # Export, reload through the harness's path, test.
    model = nnx.merge(graphdef, trainable["model"])
    export_checkpoint(model, hf_config, options.output_dir, options.save_dtype)
    engine = None
    if options.test_items:
        test_start = time.time()
        reloaded = LlavaEngine.from_checkpoint(options.output_dir, dtype=options.eval_dtype)
        test_split = EvalSplit(splits.wait(options.test_dir), reloaded.preprocessor, benchmark)
        scores = evaluate(reloaded, test_split, options.eval_batch_size)
        summary["test"] = summarize_scores(scores)
        result = dict(
            checkpoint=options.output_dir,
            test_dir=options.test_dir,
            step=step,
            status=status,
            eval_dtype=options.eval_dtype,
            save_dtype=options.save_dtype,
            **scores,
        )
        with open(os.path.join(options.output_dir, TEST_RESULT_FILE), "w") as handle:
            json.dump(result, handle, indent=1)
        kinds = " ".join(f"{k.split('/')[1]} {v:.3f}" for k, v in summary["test"].items() if "/" in k)
        _print(
            options,
            f"test accuracy {summary['test']['accuracy']:.4f} ({kinds}) on "
            f"{len(test_split.questions)} questions of {options.test_dir} "
            f"[reload + preprocess + generate {time.time() - test_start:.1f}s]",
        )
    for path in (log_path, os.path.join(options.output_dir, LOG_FILE)):
        write_log(path, log)
    plot_curve(log, os.path.join(options.output_dir, CURVE_FILE), curve_title(options))
    summary["checkpoint_bytes"] = directory_bytes(options.output_dir)
    _print(options, f"checkpoint {options.output_dir}: {summary['checkpoint_bytes'] / 1e6:.1f} MB")
    if os.environ.get("OUT"):
        summary["out_files"] = copy_to_out(options.output_dir, os.environ["OUT"])
        _print(options, f"copied to $OUT: {', '.join(os.path.basename(p) for p in summary['out_files'])}")
    summary["wall_seconds"] = round(time.time() - start_time, 1)
    _print(options, json.dumps(summary))
    return summary
