"""What a benchmark run measures: its settings, and the configurations (method, keep, batch) it plans."""

from __future__ import annotations

import dataclasses
from typing import Any

from absl import flags

FLAGS = flags.FLAGS

# The stages jax_worker compiles (each its own executable), the names --stage_compiler_options takes.
COMPILED_STAGES = ("vision", "embed", "prefill", "prefill_fixed", "first_token", "generate", "select")

flags.DEFINE_string("model", "llava-1.5-7b", "Preset name (models.presets) or llava-hf checkpoint directory.")
flags.DEFINE_bool("random_weights", False, "Random weights for a checkpoint directory (presets always are).")
flags.DEFINE_enum("dtype", "bfloat16", ["bfloat16", "float32"], "Parameter and activation dtype.")
flags.DEFINE_list("batch_sizes", ["1"], "Batch sizes.")
flags.DEFINE_list("methods", ["none", "adaptprune"], "Pruning methods (none = unpruned).")
flags.DEFINE_list("keep", ["64"], "Image tokens kept (counts).")
flags.DEFINE_integer("layer", 2, "Pruning layer K (DivPrune always prunes before the LLM).")
flags.DEFINE_list(
    "configs",
    [],
    "Explicit configurations instead of the cross product, in run order: none:BATCH or METHOD:KEEP:BATCH.",
)
flags.DEFINE_integer("text_tokens", 64, "Text tokens per prompt (the image span comes on top).")
flags.DEFINE_integer("new_tokens", 32, "Generated tokens (end-to-end; decode steps = new_tokens - 1).")
flags.DEFINE_integer("repeats", 20, "Timed repeats of vision / prefill / first-token.")
flags.DEFINE_integer("e2e_repeats", 5, "Timed repeats of decode and end-to-end generation.")
flags.DEFINE_bool("selection_overhead", True, "Also time prefill with fixed indices (one more compile).")
flags.DEFINE_string("output_dir", "experiments/results/benchmark", "Where results go (also $OUT/<basename>).")
flags.DEFINE_bool("torch_baseline", False, "Also run transformers' PyTorch LLaVA on the same shapes.")
flags.DEFINE_list("torch_batch_sizes", [], "Batch sizes of the PyTorch baseline (default: every batch).")
flags.DEFINE_bool("max_batch_search", False, "Find the largest batch that fits (--max_batch_configs).")
flags.DEFINE_list(
    "max_batch_configs",
    ["none", "adaptprune:64"],
    "Searched configurations: none or METHOD:KEEP, each optionally @START (first batch probed; "
    "default: predicted from a measured row of this run, else twice its batch).",
)
flags.DEFINE_float("max_batch_growth", 2.0, "Growth factor of the search before the first failure.")
flags.DEFINE_integer("max_batch_probes", 4, "Probes (processes) per searched configuration.")
flags.DEFINE_integer("max_batch_cap", 1024, "Largest batch probed.")
flags.DEFINE_float("max_batch_tolerance", 0.1, "Stop bisecting when (fail - fit) <= tolerance * fit.")
flags.DEFINE_string("compile_cache", ".jax_cache", "Persistent compilation cache directory ('' = off).")
flags.DEFINE_integer(
    "compile_workers", 0, "Parallel pre-compile processes (0 = compile in the measuring process)."
)
flags.DEFINE_float("mem_fraction", 0.92, "XLA_PYTHON_CLIENT_MEM_FRACTION for the workers (allocator limit).")
flags.DEFINE_integer(
    "deadline_s", 0, "Wall-clock budget of the whole run; later jobs are skipped (0 = none)."
)
flags.DEFINE_integer("job_timeout_s", 600, "Per-process timeout.")
flags.DEFINE_integer("seed", 0, "Seed of weights and inputs.")
flags.DEFINE_float(
    "attention_logits_budget_mb",
    0,
    "Largest float32 attention-logits tensor one attention "
    "materialises before its queries run in chunks (models.layers; 0 = the default, 1 GiB).",
)
flags.DEFINE_string(
    "profile_dir",
    "",
    "After timing, trace 3 vision-tower calls, 3 LLM prefills and one "
    "generation of each JAX configuration with jax.profiler into <dir>/<config>/ and put the "
    "per-device-thread summary (busy vs span, heaviest kernels; experiments/benchmark/profiling.py) in "
    "results.json and results.md ('' = off). The traces stay in <dir>.",
)
flags.DEFINE_list(
    "stage_compiler_options",
    [],
    "XLA options for single compiled stages, STAGE:OPTION=VALUE "
    f"(stages: {', '.join(COMPILED_STAGES)}), e.g. generate:xla_gpu_enable_triton_gemm=false tries "
    "cuBLAS GEMVs for the decode loop only. Recorded in each row.",
)
flags.DEFINE_float(
    "reference_bandwidth_tbps",
    0,
    "Memory bandwidth (TB/s) known to be reachable on the device "
    "(e.g. 4.3 on an H200, measured by the workplace); floors use the faster of it and the in-run "
    "copy ceiling (0 = in-run only).",
)
flags.DEFINE_float(
    "reference_matmul_tflops",
    0,
    "Matmul rate (TFLOP/s) known to be reachable (e.g. 788 bf16 on an "
    "H200); floors use the faster of it and the in-run ceiling (0 = in-run only).",
)
flags.DEFINE_string("replot", None, "Rewrite results.md and the plot of this results.json; print its table.")
flags.DEFINE_string("worker", None, "(internal) JSON spec: run one job in this process.")
flags.DEFINE_string("worker_result", None, "(internal) where the worker writes its JSON result.")


@dataclasses.dataclass(frozen=True)
class Config:
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
        stage, _, setting = entry.strip().partition(":")
        name, equals, value = setting.partition("=")
        if stage not in COMPILED_STAGES:
            raise ValueError(
                f"bad --stage_compiler_options entry {entry!r}: unknown stage {stage!r}; stages: "
                f"{', '.join(COMPILED_STAGES)}"
            )
        if not name or not equals:
            raise ValueError(f"bad --stage_compiler_options entry {entry!r}: expected STAGE:OPTION=VALUE")
        parsed: Any = {"true": True, "false": False}.get(value.lower(), value)
        if isinstance(parsed, str) and parsed.lstrip("-").isdigit():
            parsed = int(parsed)
        options.setdefault(stage, {})[name] = parsed
    return options


def parse_search(text: str) -> tuple[Config, int | None]:
    """'none', 'METHOD:KEEP', either with '@START' (the first batch probed)."""
    config, _, start = text.partition("@")
    return parse_config(config, batch=0), int(start) if start else None


def planned_configs() -> list[Config]:
    if FLAGS.configs:
        return [parse_config(c) for c in FLAGS.configs]
    configs = []
    for batch in map(int, FLAGS.batch_sizes):
        for method in FLAGS.methods:
            for keep in [0] if method == "none" else map(int, FLAGS.keep):
                configs.append(Config(method, keep, batch))
    return configs
