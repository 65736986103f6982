"""`EvalConfig` and the names of what an evaluation run writes under its output directory."""

from __future__ import annotations

import dataclasses

from adaptprune_jax import methods as pruning_methods
from experiments.benchmarks import benchmark_names
from experiments.flag_config import attention_setting, mesh_setting, setting

UNPRUNED = "none"  # method name of the unpruned run, always evaluated once
PREDICTIONS_DIR = "predictions"
RESULTS_JSON = "results.json"
RUN_FINGERPRINT_JSON = "run_fingerprint.json"  # what decided each pair's answers (fingerprint.py)


@dataclasses.dataclass(frozen=True)
class EvalConfig:
    """Everything one evaluation run needs; the command line fills it from flags, tests build it directly.

    The important ones: checkpoint, benchmark, questions, output_dir, methods, keep.
    To tinker with: layer (None = each method's default), batch_size, max_new_tokens (None = the
    benchmark's), limit (first N questions), num_overlays / record_kept (how many questions get
    kept-token pictures / kept indices in the prediction files).
    """

    checkpoint: str = setting(
        dataclasses.MISSING,
        "llava-hf checkpoint directory (config.json, safetensors, tokenizer).",
        required=True,
    )
    benchmark: str = setting(
        dataclasses.MISSING, f"Benchmark name; one of {', '.join(benchmark_names())}.", required=True
    )
    questions: str = setting(
        dataclasses.MISSING,
        "Question file, or directory of them (POPE splits, a testbed split).",
        required=True,
    )
    output_dir: str = setting(
        dataclasses.MISSING, "Where predictions/, results.json, results.md and the plots go.", required=True
    )
    text_tower: str | None = setting(
        None,
        "CLIP checkpoint directory (CLIPModel: text tower, visual_projection, tokenizer) for methods "
        "that read CLIP's joint space (cdpruner): the CLIP the vision tower came from, e.g. "
        "openai/clip-vit-large-patch14-336, or a testbed's <checkpoint>/clip.",
    )
    image_dir: str | None = setting(
        None,
        "Folder of the images the questions name (default: the benchmark's own, e.g. <testbed split>/images).",
    )
    methods: tuple[str, ...] = setting(
        ("adaptprune", "fastv"),
        f"Pruning methods, of: {', '.join(pruning_methods.names())} (and those of --method_modules); "
        f"'{UNPRUNED}' (unpruned) is always evaluated once whether listed or not.",
    )
    method_modules: tuple[str, ...] = setting(
        (), "Modules to import first that register pruning methods of their own (e.g. tests.keynorm_method)."
    )
    keep: tuple[int | float, ...] = setting(
        (64,), "Budgets: image-token counts (192) or ratios of all image tokens (0.25)."
    )
    layer: int | None = setting(None, "Pruning layer K for the in-LLM methods (default: each method's own).")
    method_settings: tuple[str, ...] = setting(
        (),
        "Settings of single methods, as method.setting=value (e.g. pyramiddrop.layers=2/8/16, "
        "visionzip.contextual=5): values are Python literals, '/' separates the items of a tuple.",
    )
    batch_size: int = setting(8, "Questions per generation call (the last batch is padded).")
    max_new_tokens: int | None = setting(None, "Tokens to generate per answer (default: the benchmark's).")
    limit: int | None = setting(None, "Evaluate only the first N questions.")
    seed: int = setting(
        0, "Seed of random pruning (each question draws from a seed derived from it and its question_id)."
    )
    dtype: str = setting("float32", "Compute dtype of the model.", choices=("float32", "bfloat16"))
    attention: str = attention_setting(
        " In the fingerprint as resolved: cudnn and einsum may differ in bfloat16's last bits."
    )
    mesh: str = mesh_setting(" Answers do not depend on it (not in the fingerprint).")
    coordinator_address: str | None = setting(
        None,
        "Several processes (one per host): HOST:PORT of process 0, where jax.distributed's coordinator "
        "listens; with --num_processes and --process_id, the same other flags on every process.",
    )
    num_processes: int = setting(1, "Processes of a multi-process run; 1: this process alone.")
    process_id: int = setting(
        0, "This process's index, 0 .. num_processes - 1; process 0 reads and writes --output_dir."
    )
    model_name: str | None = setting(
        None, "Model name for published-number lookup (default: checkpoint folder name)."
    )
    overwrite: bool = setting(
        False,
        "Recompute the pairs of this run whose predictions are already in --output_dir (otherwise they "
        "are reused when their fingerprint matches and refused when it does not).",
    )
    compile_cache: str = setting(
        "",
        "Persistent compilation cache directory ('' = off; the command line's default is .jax_cache), so a "
        "rerun of the same pairs does not compile again.",
    )
    num_overlays: int = setting(3, "How many images get kept-token pictures.")
    record_kept: int = setting(8, "How many questions keep their kept-token indices in predictions.")
    command: str | None = None  # the command line, recorded in results.md when run from the CLI
