"""--mode=throughput: questions per second of the evaluation's answer path, JAX against transformers.

    python -m experiments.benchmark --flagfile=experiments/flags/benchmark_h200_throughput.flags
    python -m experiments.benchmark --mode=throughput --model=tiny --dtype=float32 --batch_sizes=1,4 \\
        --methods=none,adaptprune --keep=64 --torch_baseline --torch_batch_sizes=1 --compile_cache=

The stage timings (the default mode) say what a prefill costs on random token ids; a researcher waits
for something else: an evaluation answering questions about images, with the image preprocessing,
the prompt padding and the decoding to text around the model. This mode times that path on
POPE-shaped work (`workload`: questions about COCO-sized images, answers of exactly --answer_tokens
tokens) in the workers of `workers_throughput`:
- JAX: LlavaEngine.answer per batch, each configuration (method, keep, batch) in its own process,
  after a pre-compile phase fills the compilation cache (--compile_workers) and a warm-up batch;
- transformers: LlavaProcessor + LlavaForConditionalGeneration.generate + batch_decode (LLaVA-NeXT:
  LlavaNextProcessor + LlavaNextForConditionalGeneration), unpruned, at --torch_batch_sizes (batch 1
  is how lmms-eval and the released PyTorch codes answer).
--model is a preset (random weights, a word-level tokenizer) or a llava-hf checkpoint directory (its
tokenizer and image processor; its weights, or random ones with --random_weights), LLaVA-1.5 or
LLaVA-NeXT; on LLaVA-NeXT each photo keeps its aspect ratio and its own image-token count.
Each row reports questions per second over its timed batches, ms per question, the stages' share and
the image tokens per question; the report adds the speedups over transformers at batch 1 and over
unpruned JAX at the same batch, and the acceptance lines (`acceptance.throughput_acceptance`).
"""

from __future__ import annotations

import os
import time

from experiments.benchmark.acceptance import TORCH_REFERENCE_BATCH, throughput_acceptance
from experiments.benchmark.configs import (
    BenchmarkConfig,
    mesh_job_suffix,
    mesh_label,
    planned_configs,
    planned_meshes,
    planned_runs,
)
from experiments.benchmark.jobs import Runner, common_spec, output_dirs, precompile
from experiments.benchmark.report import summary, write_outputs


def check_settings(settings: BenchmarkConfig) -> None:
    """Refuse, before any job, what the throughput mode cannot run."""
    from models.presets import PRESET_NAMES

    if settings.model not in PRESET_NAMES and not os.path.isfile(os.path.join(settings.model, "config.json")):
        raise ValueError(
            f"--mode=throughput runs a preset with random weights ({', '.join(PRESET_NAMES)}) or a llava-hf "
            f"checkpoint directory; got --model={settings.model}"
        )
    for name in ("answer_tokens", "distinct_questions", "timed_batches"):
        if getattr(settings, name) < 1:
            raise ValueError(f"--{name} must be >= 1, got {getattr(settings, name)}")
    batches = list(settings.batch_sizes) + list(settings.torch_batch_sizes)
    batches += [config.batch for config, _ in planned_runs(settings)]
    if any(batch < 1 for batch in batches):
        raise ValueError(f"batch sizes must be >= 1, got {sorted(set(batches))}")


def workload_description(settings: BenchmarkConfig) -> dict:
    """What every worker of the run answers (the workers build the same from the same settings), and
    the image tokens each image puts in the model's prompt (LLaVA-NeXT: its own, by aspect ratio)."""
    from experiments.benchmark.workers import llava_hf_config
    from experiments.benchmark.workload import QUESTIONS_PER_IMAGE, build_workload
    from models import anyres
    from models.config import from_hf_config
    from models.preprocess import build_prompt
    from models.presets import PRESET_NAMES

    hf_config = llava_hf_config(settings.model)
    cfg = from_hf_config(hf_config)
    workload = build_workload(settings.distinct_questions, settings.seed)
    sizes = {f"{image.width}x{image.height}": (image.height, image.width) for image in workload.images}
    return {
        "distinct_questions": len(workload.questions),
        "questions_per_image": QUESTIONS_PER_IMAGE,
        "images": len(workload.images),
        "image_sizes": sorted(sizes),
        "image_source": workload.image_source,
        "preset": settings.model in PRESET_NAMES,  # else a checkpoint: its tokenizer and processor
        "random_weights": settings.model in PRESET_NAMES or settings.random_weights,
        "anyres": cfg.anyres,
        "image_tokens": {
            name: anyres.image_token_count(size, cfg) if cfg.anyres else cfg.num_image_tokens
            for name, size in sorted(sizes.items())
        },
        "answer_tokens": settings.answer_tokens,
        "example_prompt": build_prompt(workload.questions[0].prompt, hf_config.text_config.model_type),
    }


def add_speedups(rows: list[dict]) -> None:
    """Each measured row's questions per second over transformers' at batch TORCH_REFERENCE_BATCH
    (`speedup_vs_transformers`) and over unpruned JAX at the row's batch on the row's mesh
    (`speedup_vs_unpruned`)."""
    measured = {
        (r["framework"], r["method"], r["keep"], r["batch"], r.get("mesh", "")): r
        for r in rows
        if r["status"] == "ok" and r.get("questions_per_s")
    }
    reference = measured.get(("torch", "none", 0, TORCH_REFERENCE_BATCH, ""))
    for row in measured.values():
        unpruned = measured.get(("jax", "none", 0, row["batch"], row.get("mesh", "")))
        if reference:
            row["speedup_vs_transformers"] = row["questions_per_s"] / reference["questions_per_s"]
        if unpruned:
            row["speedup_vs_unpruned"] = row["questions_per_s"] / unpruned["questions_per_s"]


def run_on(report: dict) -> tuple[str, str]:
    """(model, platform) of a throughput report, for judging its acceptance lines: the platform its
    measured rows ran on, else the one its failed workers got as far as (a run whose every row failed
    still ran somewhere)."""
    rows = report["rows"]
    platforms = [r["platform"] for r in rows if r["status"] == "ok" and r.get("platform")]
    platforms += [r["platform"] for r in rows if r.get("platform")]
    return report["meta"]["flags"]["model"], platforms[0] if platforms else "unknown"


def run_throughput(settings: BenchmarkConfig, meta: dict) -> None:
    """Pre-compile, the transformers rows, then the JAX rows in --configs order; the report after each."""
    check_settings(settings)
    configs = planned_configs(settings)
    device_meshes = planned_meshes(settings)
    out_dirs = output_dirs(settings)
    runner = Runner(settings)
    common = dict(
        common_spec(settings),
        random_weights=settings.random_weights,
        answer_tokens=settings.answer_tokens,
        distinct_questions=settings.distinct_questions,
        timed_batches=settings.timed_batches,
        min_timed_questions=settings.min_timed_questions,
        overlap_preprocessing=settings.overlap_preprocessing,
    )
    report = {
        "mode": "throughput",
        "meta": meta,
        "workload": workload_description(settings),
        "rows": [],
        "acceptance": [],
    }

    def save(final=False):  # after every job, so a run cut short still leaves its report
        add_speedups(report["rows"])
        report["acceptance"] = throughput_acceptance(report["rows"], run_on(report))
        report["meta"]["wall_s"] = round(time.monotonic() - runner.start, 1)
        write_outputs(report, out_dirs, final=final, logs=runner.logs)

    compiled = {}
    # (A run on meshes compiles in its measuring processes: the pre-compile phase has no devices.)
    if settings.compile_workers > 0 and device_meshes == [""]:
        compiled = precompile(runner, configs, common, kind="jax_throughput")
    torch_batches = list(dict.fromkeys(settings.torch_batch_sizes or [c.batch for c in configs]))
    for batch in torch_batches if settings.torch_baseline else []:
        result = runner.run(f"torch-throughput-b{batch}", dict(common, kind="torch_throughput", batch=batch))
        label = f"transformers b{batch}"
        report["rows"].append(
            dict(result, framework="torch", method="none", keep=0, batch=batch, label=label)
        )
        save()
    for config, mesh in planned_runs(settings):
        spec = dict(
            common,
            kind="jax_throughput",
            mode="measure",
            method=config.method,
            keep=config.keep,
            batch=config.batch,
            mesh=mesh,
        )
        name = f"jax-throughput-{config.method}-k{config.keep}-b{config.batch}{mesh_job_suffix(mesh)}"
        result = runner.run(name, spec)
        if config in compiled:
            result["precompile"] = {
                k: compiled[config].get(k) for k in ("status", "compile_s", "wall_s", "attention", "error")
            }
        report["rows"].append(
            dict(
                result,
                framework="jax",
                method=config.method,
                keep=config.keep,
                batch=config.batch,
                label=mesh_label(config, mesh),
            )
        )
        save()
    save(final=True)
    print(summary(report), flush=True)
