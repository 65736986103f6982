"""What a benchmark run measures: its settings, and the configurations (method, keep, batch) it plans."""

from __future__ import annotations

import dataclasses
from typing import Any

from experiments.flag_config import attention_setting, setting

# The stages jax_worker compiles (each its own executable), the names --stage_compiler_options takes.
COMPILED_STAGES = (
    "vision",
    "embed",
    "prefill",
    "prefill_fixed",
    "first_token",
    "generate",
    "select",
    "runner_prefill",
    "runner_first_token",
)


@dataclasses.dataclass(frozen=True)
class BenchmarkConfig:
    """Every setting of a benchmark run; the command line fills it from flags, tests build it directly.

    What is measured: model, dtype, the configurations (configs, else batch_sizes x methods x keep),
    the shapes (text_tokens, new_tokens) and repeats; torch_baseline and max_batch_search add jobs.
    mode=throughput measures questions per second instead (answer_tokens, distinct_questions,
    timed_batches, min_timed_questions; experiments.benchmark.throughput).
    The run's budget: deadline_s, job_timeout_s, compile_workers. worker / worker_result are how the
    driver starts a worker process (this package re-run), not for the command line.
    """

    model: str = setting("llava-1.5-7b", "Preset name (models.presets) or llava-hf checkpoint directory.")
    random_weights: bool = setting(False, "Random weights for a checkpoint directory (presets always are).")
    dtype: str = setting("bfloat16", "Parameter and activation dtype.", choices=("bfloat16", "float32"))
    attention: str = attention_setting(
        " Every JAX configuration is measured with it; each row records what it resolved to."
    )
    batch_sizes: tuple[int, ...] = setting((1,), "Batch sizes.")
    methods: tuple[str, ...] = setting(("none", "adaptprune"), "Pruning methods (none = unpruned).")
    method_modules: tuple[str, ...] = setting(
        (), "Modules to import first that register pruning methods of their own (e.g. tests.keynorm_method)."
    )
    method_settings: tuple[str, ...] = setting(
        (),
        "Settings of single methods for every configuration of that method, as method.setting=value "
        "(e.g. adaptprune.similarity_precision='bf16_bf16_f32_x6'), as experiments.eval takes them.",
    )
    keep: tuple[int, ...] = setting((64,), "Image tokens kept (counts).")
    layer: int = setting(2, "Pruning layer K (DivPrune always prunes before the LLM).")
    configs: tuple[str, ...] = setting(
        (),
        "Explicit configurations instead of the cross product, in run order: none:BATCH or METHOD:KEEP:BATCH.",
    )
    image_size: str = setting(
        "",
        "Stages mode: every row's image, HEIGHTxWIDTH in pixels ('' = the model's base crop, e.g. 336x336). "
        "LLaVA-NeXT (anyres) models pack it into crops and image tokens as their processor would "
        "(672x672: 5 crops, 2,928 image tokens); LLaVA-1.5 takes only its base crop.",
    )
    text_tokens: int = setting(64, "Text tokens per prompt (the image span comes on top).")
    new_tokens: int = setting(32, "Generated tokens (end-to-end; decode steps = new_tokens - 1).")
    repeats: int = setting(
        20,
        "Timed repeats of vision / prefill / first token (staged and through the runner's program); the "
        "back-to-back prefill takes 3 samples of up to 4 calls.",
    )
    e2e_repeats: int = setting(5, "Timed repeats of decode and end-to-end generation.")
    selection_overhead: bool = setting(True, "Also time prefill with fixed indices (one more compile).")
    runner_first_token: bool = setting(
        False,
        "Also time the first token through the runner's one prefill program (vision, embedding and LLM "
        "prefill, as experiments.eval runs it): one more compile of the whole model per configuration.",
    )
    output_dir: str = setting(
        "experiments/results/benchmark", "Where results go (also $OUT/<basename> when $OUT is set)."
    )
    torch_baseline: bool = setting(False, "Also run transformers' PyTorch LLaVA on the same shapes.")
    torch_batch_sizes: tuple[int, ...] = setting(
        (), "Batch sizes of the PyTorch baseline (default: every batch)."
    )
    max_batch_search: bool = setting(False, "Find the largest batch that fits (--max_batch_configs).")
    max_batch_configs: tuple[str, ...] = setting(
        ("none", "adaptprune:64"),
        "Searched configurations: none or METHOD:KEEP, each optionally @START (first batch probed; "
        "default: predicted from a measured row of this run, else twice its batch).",
    )
    max_batch_growth: float = setting(2.0, "Growth factor of the search before the first failure.")
    max_batch_probes: int = setting(4, "Probes (processes) per searched configuration.")
    max_batch_cap: int = setting(1024, "Largest batch probed.")
    max_batch_tolerance: float = setting(0.1, "Stop bisecting when (fail - fit) <= tolerance * fit.")
    mode: str = setting(
        "stages",
        "stages: time each stage on random token ids (the settings above); throughput: questions per "
        "second of the evaluation's answer path (preprocess, generate, decode to text) on POPE-style "
        "questions and COCO-sized images, JAX per configuration and, with --torch_baseline, "
        "transformers' generate at --torch_batch_sizes (unpruned).",
        choices=("stages", "throughput"),
    )
    answer_tokens: int = setting(
        4,
        "Throughput mode: tokens generated per answer, exactly (no stop at EOS; transformers with "
        "min_new_tokens = max_new_tokens): random weights stand in for a short answer and its EOS.",
    )
    distinct_questions: int = setting(
        300, "Throughput mode: distinct questions (six per image, as POPE asks), cycled through the batches."
    )
    timed_batches: int = setting(
        5, "Throughput mode: warm batches timed per configuration, after the batch that compiles."
    )
    min_timed_questions: int = setting(
        64, "Throughput mode: time more batches where timed_batches would answer fewer questions."
    )
    overlap_preprocessing: bool = setting(
        True,
        "Throughput mode: JAX prepares the next batch (tokenize, images) while one generates, as the "
        "eval harness does (LlavaEngine.answer_stream); false: one batch after another.",
    )
    mesh: str = setting(
        "",
        "The device meshes every JAX configuration runs on, separated by ';', each as experiments.eval's "
        "--mesh takes it (data:N,model:M; models.sharding), e.g. 'data:1;model:2' or "
        "'data:1;data:2;data:2,model:2': a row per configuration and mesh, the meshes of a configuration "
        "one after another, each compiled in its measuring process (no pre-compile phase). Throughput "
        "mode adds questions/s per device. Stages mode: speedups over unpruned within a mesh, floors "
        "divided by the row's device count; the PyTorch baseline, the max-batch search and the select-only "
        "timing stay on one device. '' = the default device alone.",
    )
    batch_per_device: bool = setting(
        False,
        "With --mesh: a configuration's batch is per device of each mesh's data axis (a row's batch, "
        "the whole batch, is batch x data size); false: it is the whole batch, split over the data axis.",
    )
    compile_cache: str = setting(".jax_cache", "Persistent compilation cache directory ('' = off).")
    compile_workers: int = setting(
        0, "Parallel pre-compile processes (0 = compile in the measuring process)."
    )
    mem_fraction: float = setting(0.92, "XLA_PYTHON_CLIENT_MEM_FRACTION for the workers (allocator limit).")
    deadline_s: int = setting(0, "Wall-clock budget of the whole run; later jobs are skipped (0 = none).")
    job_timeout_s: int = setting(600, "Per-process timeout.")
    seed: int = setting(0, "Seed of weights and inputs.")
    attention_logits_budget_mb: float = setting(
        0.0,
        "Largest float32 attention-logits tensor one attention "
        "materialises before its queries run in chunks (models.layers; 0 = the default, 1 GiB).",
    )
    profile_dir: str = setting(
        "",
        "After timing, trace 3 vision-tower calls, 3 LLM prefills and one "
        "generation of each JAX configuration with jax.profiler into <dir>/<config>/ and put the "
        "per-device-thread summary (busy vs span, heaviest kernels; experiments/benchmark/profiling.py) in "
        "results.json and results.md ('' = off). The traces stay in <dir>.",
    )
    stage_compiler_options: tuple[str, ...] = setting(
        (),
        "XLA options for single compiled stages, STAGE:OPTION=VALUE "
        f"(stages: {', '.join(COMPILED_STAGES)}), e.g. generate:xla_gpu_enable_triton_gemm=false tries "
        "cuBLAS GEMVs for the decode loop only. Recorded in each row.",
    )
    reference_bandwidth_tbps: float = setting(
        0.0,
        "Memory bandwidth (TB/s) known to be reachable on the device "
        "(e.g. 4.3 on an H200); floors use the faster of it and the in-run "
        "copy ceiling (0 = in-run only).",
    )
    reference_matmul_tflops: float = setting(
        0.0,
        "Matmul rate (TFLOP/s) known to be reachable (e.g. 788 bf16 on an "
        "H200); floors use the faster of it and the in-run ceiling (0 = in-run only).",
    )
    replot: str | None = setting(
        None, "Rewrite results.md and the plot of this results.json; print its table."
    )
    worker: str | None = setting(None, "(internal) JSON spec: run one job in this process.")
    worker_result: str | None = setting(None, "(internal) where the worker writes its JSON result.")


@dataclasses.dataclass(frozen=True)
class Config:
    """One measured configuration: a method (none = unpruned) keeping `keep` image tokens, at a batch."""

    method: str
    keep: int
    batch: int

    @property
    def name(self) -> str:
        return self.method + (f"@{self.keep}" if self.method != "none" else "")

    @property
    def label(self) -> str:
        return f"{self.name} b{self.batch}"


def parse_config(text: str, batch: int | None = None) -> Config:
    """'none:BATCH' or 'METHOD:KEEP:BATCH' (without BATCH when `batch` is given)."""
    parts = text.strip().split(":")
    if batch is not None:
        parts.append(str(batch))
    try:
        if parts[0] == "none" and len(parts) == 2:
            return Config("none", 0, int(parts[1]))
        if len(parts) == 3:
            return Config(parts[0], int(parts[1]), int(parts[2]))
    except ValueError:
        pass
    raise ValueError(f"bad configuration {text!r}: expected none:BATCH or METHOD:KEEP:BATCH")


def parse_stage_compiler_options(entries: list[str]) -> dict[str, dict[str, Any]]:
    """['generate:xla_gpu_enable_triton_gemm=false', ...] -> {'generate': {...: False}} (bools, ints, strings)."""
    options: dict[str, dict[str, Any]] = {}
    for entry in entries:
        stage, _, assignment = entry.strip().partition(":")
        name, equals, value = assignment.partition("=")
        if stage not in COMPILED_STAGES:
            raise ValueError(
                f"bad --stage_compiler_options entry {entry!r}: unknown stage {stage!r}; stages: "
                f"{', '.join(COMPILED_STAGES)}"
            )
        if not name or not equals:
            raise ValueError(f"bad --stage_compiler_options entry {entry!r}: expected STAGE:OPTION=VALUE")
        options.setdefault(stage, {})[name] = compiler_option_value(value)
    return options


def parse_compiler_options(entries, flag: str) -> dict[str, Any]:
    """OPTION=VALUE entries -> {option: value} as the compiler takes them; ``flag`` names them in errors."""
    options: dict[str, Any] = {}
    for entry in entries:
        option, equals, value = entry.partition("=")
        if not option or not equals:
            raise ValueError(f"bad {flag} entry {entry!r}: expected OPTION=VALUE")
        options[option] = compiler_option_value(value)
    return options


def compiler_option_value(value: str) -> Any:
    """An XLA option's value as the compiler takes it: 'true' / 'false' -> bool, digits -> int."""
    parsed: Any = {"true": True, "false": False}.get(value.lower(), value)
    if isinstance(parsed, str) and parsed.lstrip("-").isdigit():
        parsed = int(parsed)
    return parsed


def parse_search(text: str) -> tuple[Config, int | None]:
    """'none', 'METHOD:KEEP', either with '@START' (the first batch probed)."""
    config, _, start = text.partition("@")
    return parse_config(config, batch=0), int(start) if start else None


def planned_meshes(settings: BenchmarkConfig) -> list[str]:
    """The --mesh list ('' = the default device alone), each checked."""
    from models.sharding import parse_mesh

    listed = [mesh.strip() for mesh in settings.mesh.split(";") if mesh.strip()]
    for mesh in listed:
        parse_mesh(mesh)
    return listed or [""]


def planned_runs(settings: BenchmarkConfig) -> list[tuple[Config, str]]:
    """Every (configuration, mesh) a run measures, in run order: each configuration on every mesh before
    the next configuration, so a deadline cuts whole comparisons; with --batch_per_device a batch
    grows with the mesh's data axis."""
    from models.sharding import DATA, parse_mesh

    runs = []
    for config in planned_configs(settings):
        for mesh in planned_meshes(settings):
            data = parse_mesh(mesh).get(DATA, 1) if settings.batch_per_device else 1
            runs.append((dataclasses.replace(config, batch=config.batch * data), mesh))
    return runs


def mesh_label(config: Config, mesh: str) -> str:
    """A row's label: the configuration's, with its mesh when it ran on one."""
    return config.label + (f" [{mesh}]" if mesh else "")


def mesh_job_suffix(mesh: str) -> str:
    """The mesh in a job's name ('data:1,model:2' -> '-data1-model2')."""
    return f"-{mesh.replace(':', '').replace(',', '-')}" if mesh else ""


def planned_configs(settings: BenchmarkConfig) -> list[Config]:
    """--configs in their order, else batch x method x keep (one unpruned row per batch)."""
    if settings.configs:
        return [parse_config(c) for c in settings.configs]
    configs = []
    for batch in settings.batch_sizes:
        for method in settings.methods:
            for keep in [0] if method == "none" else settings.keep:
                configs.append(Config(method, keep, batch))
    return configs
