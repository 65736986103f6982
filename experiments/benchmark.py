"""Speed and memory of the jitted JAX LLaVA-1.5, pruned and unpruned, against the floor and PyTorch.

    python -m experiments.benchmark --flagfile=experiments/flags/benchmark_h200_latency.flags
    python -m experiments.benchmark --model=tiny --batch_sizes=1 --methods=none,adaptprune --keep=64
    python -m experiments.benchmark --replot=experiments/results/h200_latency/results.json

The acceptance run on the lent H200 is three commands (flagfiles benchmark_h200_{latency,batch,max_batch}), each
inside one device call; each prints its table and pass/fail lines last.

Why it is built this way:
- One configuration (model, method, keep, batch) per process: each gets its own allocator, so
  `peak_bytes_in_use` is that configuration's peak and an out-of-memory error kills one row, not the
  run. Workers are this module re-run with --worker=<json>; they hand back JSON.
- Compilation is the expensive part of a 7B run (tens of seconds per program), so every worker shares
  a persistent compilation cache, and a pre-compile phase fills it from abstract shapes in parallel
  processes (no weights needed) before the serial, GPU-exclusive measuring phase; a measuring worker
  then mostly loads executables. Compile time is reported separately from every timing.
- Timings are medians of repeated runs after warm-up, each closed by block_until_ready. Stages:
  vision tower (+ projector); LLM prefill from embeddings; selection overhead = prefill with the
  method minus prefill pruned at the same layer to FIXED indices (no cue, no selection work); time to
  first token (vision + embed + prefill with selection + argmax, dispatched asynchronously); decode
  per token (the project's while_loop generation, no early EOS stop, divided by its steps);
  end-to-end for --new_tokens tokens. The KV cache is sized to prompt + new tokens.
- Floors come from the config's shapes and two ceilings measured in the same run (a large device
  copy, a large bf16 matmul): time >= max(FLOPs / matmul rate, bytes / copy bandwidth). An in-run
  ceiling can come out below what the device does (XLA's copy reads and writes at 3.1 TB/s on an
  H200 whose GEMVs read at up to 3.9 TB/s), which would flatter every ratio: --reference_bandwidth_tbps
  and --reference_matmul_tflops give rates known to be reachable there, and each floor then uses the
  faster of the two. --replot with them re-judges a finished run.
- Random weights are drawn on the device (eval_shape, then a small compiled generator per leaf
  shape), so a 7B model exists in seconds; inputs are random token ids with one image span, and
  random pixels (never zeros).
- --torch_baseline runs transformers' LlavaForConditionalGeneration (sdpa, random weights built on
  the device) on the same shapes, in separate processes. Its "pruned" rows cut image tokens BEFORE
  the language model (inputs_embeds with keep image tokens, no selection work), as anchors.md did.
- A --deadline_s budget skips (and records) what no longer fits, so a capped device command still
  writes results.json, results.md and the plot.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import json
import math
import os
import subprocess
import sys
import tempfile
import time
import traceback
from importlib import metadata
from typing import Any, ClassVar

from absl import app, flags

from experiments.timing import median, run_stamp, timed

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
    "per-device-thread summary (busy vs span, heaviest kernels; experiments/profiling.py) in "
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

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GIB = 2**30
# Acceptance targets of the issue "Speed and memory on the H100".
ACCEPT_METHOD, ACCEPT_KEEP = "adaptprune", 64
TARGETS = dict(
    decode_vs_weight_floor=1.25,
    prefill_vs_flop_floor=1.5,
    ttft_speedup_b1=2.0,
    ttft_speedup_b16=3.0,
    memory_saving_b64=0.40,
    max_batch_ratio=2.0,
    selection_overhead_ms=0.5,
)


# ================================================================================================
# Worker side: everything below until the driver runs inside one subprocess per job.
# ================================================================================================


def _hf_config(model: str):
    from models import presets
    from models.config import load_hf_config

    return presets.llava_config(model) if model in presets.PRESET_NAMES else load_hf_config(model)


def _random_prompts(
    batch: int, text_tokens: int, num_image_tokens: int, vocab_size: int, image_token_index: int, seed: int
):
    """(ids (B, S) int32, image_start): random ids, one image span after half the text tokens."""
    import numpy as np

    rng = np.random.default_rng(seed)
    ids = rng.integers(0, vocab_size, (batch, text_tokens + num_image_tokens)).astype(np.int32)
    ids[ids == image_token_index] = (image_token_index + 1) % vocab_size
    start = text_tokens // 2
    ids[:, start : start + num_image_tokens] = image_token_index
    return ids, start


def _random_pixels(batch: int, size: int, seed: int):
    import numpy as np

    return np.random.default_rng(seed + 1).standard_normal((batch, 3, size, size), dtype=np.float32)


@dataclasses.dataclass(frozen=True)
class FixedSelection:
    """A pruning config with constant kept indices: the pruning step's cost without cues or selection.

    Implements the model's interface to `adaptprune_jax` configs; asks for no cue, so the model skips
    the attention row at layer K - 1 and the key projection, and `select` is a broadcast constant.
    """

    layer: int
    indices: tuple[int, ...]
    needs_attention: ClassVar[bool] = False
    needs_features: ClassVar[bool] = False
    needs_embeddings: ClassVar[bool] = False

    def validate(self, num_image_tokens: int, num_layers: int) -> None:
        if not 0 <= self.layer < num_layers or max(self.indices) >= num_image_tokens:
            raise ValueError(f"fixed selection does not fit {num_image_tokens} tokens / {num_layers} layers")

    def resolve_keep(self, num_image_tokens: int) -> int:
        return len(self.indices)

    def select(self, cues, keep: int):
        import jax.numpy as jnp

        batch, _ = cues.batch_and_tokens()
        return jnp.broadcast_to(jnp.asarray(self.indices, jnp.int32), (batch, keep))


def _work(cfg, abstract_state, *, batch, prompt_tokens, keep, layer, new_tokens, itemsize) -> dict:
    """FLOPs and bytes each stage cannot avoid, from the parameter shapes and the token counts."""
    import jax

    sizes: dict[str, int] = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(abstract_state)[0]:
        keys = [getattr(k, "key", getattr(k, "idx", None)) for k in path]
        group = "/".join(str(k) for k in keys[:3] if k != "value")
        sizes[group] = sizes.get(group, 0) + math.prod(leaf.shape)

    def total(prefix):
        return sum(n for g, n in sizes.items() if g == prefix or g.startswith(prefix + "/"))

    text, vision, n_img = cfg.text, cfg.vision, cfg.num_image_tokens
    layer_params = [total(f"language_model/layers/{i}") for i in range(text.num_layers)]
    head_params = total("language_model/lm_head") or total("language_model/embed_tokens")
    stream_params = sum(layer_params) + total("language_model/norm") + head_params
    tokens = [
        prompt_tokens if (keep == 0 or i < layer) else prompt_tokens - n_img + keep
        for i in range(text.num_layers)
    ]
    attn = 4 * text.num_heads * text.head_dim  # QK^T and PV per (query, key) pair
    kv_per_token = 2 * text.num_kv_heads * text.head_dim * itemsize
    prefill_flops = batch * (
        sum(2 * p * t + attn * t * (t + 1) / 2 for p, t in zip(layer_params, tokens)) + 2 * head_params
    )
    filled = [t + new_tokens / 2 for t in tokens]  # mean cache fill during decoding
    v_tokens, v_layers = vision.num_patches + 1, cfg.vision_layers_needed
    v_layer_params = [total(f"vision_tower/layers/{i}") for i in range(v_layers)]
    v_other = total("vision_tower/patch_embedding") + total("multi_modal_projector")
    vision_flops = batch * (
        sum(2 * p * v_tokens for p in v_layer_params)
        + v_layers * 4 * vision.hidden_size * v_tokens**2
        + 2 * v_other * n_img
    )
    return {
        "llm_params": sum(layer_params)
        + head_params
        + total("language_model/embed_tokens") * (not cfg.tie_word_embeddings),
        "llm_stream_bytes": stream_params * itemsize,
        "prefill_tokens_per_layer": tokens,
        "prefill_flops": prefill_flops,
        "prefill_bytes": stream_params * itemsize + batch * sum(tokens) * kv_per_token,
        "vision_flops": vision_flops,
        "vision_bytes": (sum(v_layer_params) + v_other) * itemsize,
        "decode_flops": batch * (2 * stream_params + attn * sum(filled)),
        "decode_weight_bytes": stream_params * itemsize,
        "decode_bytes": stream_params * itemsize + batch * sum(filled) * kv_per_token,
        "kv_cache_bytes": batch * sum(t + new_tokens for t in tokens) * kv_per_token,
    }


def _configure_jax(spec):
    import jax

    if spec.get("attention_logits_budget_mb"):  # before anything is traced: a trace-time constant
        from models.layers import set_attention_logits_budget

        set_attention_logits_budget(int(spec["attention_logits_budget_mb"] * 2**20))
    if spec.get("compile_cache"):
        jax.config.update("jax_compilation_cache_dir", os.path.abspath(spec["compile_cache"]))
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
        jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    return jax


def _memory_stats() -> dict:
    import jax

    return jax.devices()[0].memory_stats() or {}


def _compiled_memory(compiled) -> dict | None:
    try:
        stats = compiled.memory_analysis()
    except Exception:  # noqa: BLE001 - not every backend implements it
        return None
    if stats is None:
        return None
    fields = (
        "argument_size_in_bytes",
        "output_size_in_bytes",
        "alias_size_in_bytes",
        "temp_size_in_bytes",
        "generated_code_size_in_bytes",
    )
    return {f: int(getattr(stats, f, 0)) for f in fields}


def jax_worker(spec: dict) -> dict:
    """Compile (mode compile), or compile + run once (probe), or compile + time everything (measure)."""
    jax = _configure_jax(spec)
    import functools
    import warnings

    import jax.numpy as jnp
    from flax import nnx

    import adaptprune_jax as prune
    from models.checkpoint import load_checkpoint
    from models.config import from_hf_config
    from models.generate import LlavaRunner, SamplingConfig
    from models.llava import LlavaForConditionalGeneration
    from models.presets import random_state

    warnings.filterwarnings("ignore", message="Some donated buffers were not usable")
    mode, method, batch, new_tokens = spec["mode"], spec["method"], spec["batch"], spec["new_tokens"]
    if new_tokens < 2 or spec["text_tokens"] < 2:
        raise ValueError("need --new_tokens >= 2 (one decode step) and --text_tokens >= 2")
    hf_config = _hf_config(spec["model"])
    cfg = from_hf_config(hf_config)
    dtype = jnp.dtype(spec["dtype"])
    abstract_model = nnx.eval_shape(lambda: LlavaForConditionalGeneration(cfg, dtype=dtype, rngs=nnx.Rngs(0)))
    runner = LlavaRunner(abstract_model)
    abstract_state, abstract_weights = runner.state, runner.weights
    n_img = cfg.num_image_tokens
    prompt_tokens = n_img + spec["text_tokens"]
    if method == "none":
        pruning = None
    else:
        settings = {} if method == "divprune" else {"layer": spec["layer"]}
        pruning = prune.make_config(method, keep=spec["keep"], **settings)
    keep = runner.resolve_keep(pruning)
    fixed = None
    if pruning is not None and spec["selection_overhead"] and mode != "probe":
        fixed = FixedSelection(pruning.layer, tuple(i * n_img // keep for i in range(keep)))
    sampling = SamplingConfig(
        max_new_tokens=new_tokens,
        eos_token_id=None,
        pad_token_id=int(hf_config.text_config.pad_token_id or 0),
    )

    def vision(weights, pixels):
        return runner.merge(weights).image_features(pixels)

    def embed(weights, ids, features):
        x, image_start = runner.merge(weights).embed_prompt(ids, features)
        positions = jnp.broadcast_to(jnp.arange(ids.shape[1], dtype=jnp.int32), ids.shape)
        return x, positions, jnp.full((ids.shape[0],), ids.shape[1] - 1, jnp.int32), image_start

    def prefill(weights, x, positions, last_index, image_start, rng, *, pruning, keep):
        return runner.merge(weights).language_model.prefill(
            x,
            positions,
            last_index,
            image_start=image_start,
            num_image_tokens=n_img,
            extra_slots=new_tokens,
            pruning=pruning,
            keep=keep,
            rng=rng,
        )

    # --- compile every stage from abstract shapes (a cache load when the pre-compile phase ran) ----
    compiled, compile_s, memory = {}, {}, {}
    stage_options = spec.get("stage_compiler_options") or {}

    def build(name, fn, *args, **static):
        start = time.perf_counter()
        lowered = fn.lower(*args, **static)
        compiled[name] = lowered.compile(compiler_options=stage_options.get(name) or None)
        compile_s[name] = round(time.perf_counter() - start, 3)
        memory[name] = _compiled_memory(compiled[name])
        return lowered.out_info

    sds = jax.ShapeDtypeStruct
    key = jax.eval_shape(lambda: jax.random.key(0))
    ids_shape, pixel_shape = (batch, prompt_tokens), (batch, 3, cfg.vision.image_size, cfg.vision.image_size)
    random_init = spec["random_weights"] or not os.path.isdir(spec["model"])
    if random_init:
        start = time.perf_counter()
        random_state(abstract_state, spec["seed"], compile_only=True)
        compile_s["init"] = round(time.perf_counter() - start, 3)
    features = build("vision", jax.jit(vision), abstract_weights, sds(pixel_shape, jnp.float32))
    embedded = build("embed", jax.jit(embed), abstract_weights, sds(ids_shape, jnp.int32), features)
    result = build(
        "prefill",
        jax.jit(functools.partial(prefill, pruning=pruning, keep=keep)),
        abstract_weights,
        *embedded,
        key,
    )
    build("first_token", jax.jit(lambda logits: jnp.argmax(logits, -1)), result.logits)
    build(
        "generate",
        runner._generate,
        abstract_weights,
        result.logits,
        result.caches,
        result.next_positions,
        key,
        sampling=sampling,
    )
    if fixed is not None:
        build(
            "prefill_fixed",
            jax.jit(functools.partial(prefill, pruning=fixed, keep=keep)),
            abstract_weights,
            *embedded,
            key,
        )
    cues = None
    if pruning is not None and mode != "probe":
        kv_width = cfg.text.num_kv_heads * cfg.text.head_dim
        cues = prune.Cues(
            attention=sds((batch, n_img), jnp.float32) if pruning.needs_attention else None,
            keys=sds((batch, n_img, kv_width), jnp.float32) if pruning.needs_features else None,
            embeddings=sds((batch, n_img, cfg.text.hidden_size), dtype) if pruning.needs_embeddings else None,
            rng=key,
            batch_size=batch,
            num_image_tokens=n_img,
        )
        build("select", jax.jit(lambda c: pruning.select(c, keep)), cues)
    from models.layers import attention_logits_budget

    out = {
        "status": "ok",
        "compile_s": compile_s,
        "compiled_memory": memory,
        "keep": keep,
        "stage_compiler_options": stage_options,
        "attention_logits_budget_bytes": attention_logits_budget(),
        "layer": None if pruning is None else pruning.layer,
        "prompt_tokens": prompt_tokens,
        "image_tokens": n_img,
        "work": _work(
            cfg,
            abstract_state,
            batch=batch,
            prompt_tokens=prompt_tokens,
            keep=keep,
            layer=0 if pruning is None else pruning.layer,
            new_tokens=new_tokens,
            itemsize=dtype.itemsize,
        ),
    }
    out["work"]["kv_cache_bytes_allocated"] = sum(
        math.prod(x.shape) * x.dtype.itemsize for x in jax.tree_util.tree_leaves(result.caches)
    )
    if mode == "compile":
        return out

    # --- weights, inputs, one generation (its peak is the configuration's memory) ------------------
    start = time.perf_counter()
    if random_init:
        weights = runner.flatten_weights(random_state(abstract_state, spec["seed"]))
    else:
        weights = runner.flatten_weights(nnx.split(load_checkpoint(spec["model"], spec["dtype"])[1])[1])
    sync = jax.block_until_ready
    sync(weights)
    out["weights_s"] = round(time.perf_counter() - start, 3)
    out["weights_bytes"] = sum(x.nbytes for x in jax.tree_util.tree_leaves(weights))
    ids, _ = _random_prompts(
        batch, spec["text_tokens"], n_img, cfg.text.vocab_size, cfg.image_token_index, spec["seed"]
    )
    ids, pixels = jnp.asarray(ids), jnp.asarray(_random_pixels(batch, cfg.vision.image_size, spec["seed"]))
    rng = jax.random.key(spec["seed"] + 2)
    run = compiled

    def first_token():
        embedded = run["embed"](weights, ids, run["vision"](weights, pixels))
        result = run["prefill"](weights, *embedded, rng)
        return run["first_token"](result.logits), result

    def generation():
        _, result = first_token()
        return run["generate"](weights, result.logits, result.caches, result.next_positions, rng)

    start = time.perf_counter()
    sync(generation())
    out["first_run_s"] = round(time.perf_counter() - start, 3)
    stats = _memory_stats()
    out["peak_bytes"] = stats.get("peak_bytes_in_use")
    out["bytes_limit"] = stats.get("bytes_limit")
    if mode == "probe":
        out["fits"] = True
        return out

    # --- timings ---------------------------------------------------------------------------------
    reps, e2e_reps = spec["repeats"], spec["e2e_repeats"]
    samples = {"vision_ms": timed(lambda: run["vision"](weights, pixels), reps, sync)}
    embedded = sync(run["embed"](weights, ids, run["vision"](weights, pixels)))
    prefills = {"llm_prefill_ms": "prefill", "fixed_prefill_ms": "prefill_fixed"}
    prefills = {k: v for k, v in prefills.items() if v in run}
    for name, stage in prefills.items():  # warm-up, then interleave so drift hits both alike
        sync(run[stage](weights, *embedded, rng))
        samples[name] = []
    for _ in range(reps):
        for name, stage in prefills.items():
            samples[name].append(_one(lambda stage=stage: run[stage](weights, *embedded, rng), sync))
    if fixed is not None:
        samples["selection_overhead_ms"] = [
            a - b for a, b in zip(samples["llm_prefill_ms"], samples["fixed_prefill_ms"])
        ]
    if cues is not None:
        real_cues = jax.tree_util.tree_map(
            lambda s: (
                jax.random.uniform(jax.random.key(7), s.shape, s.dtype)
                if hasattr(s, "shape") and not jax.dtypes.issubdtype(s.dtype, jax.dtypes.prng_key)
                else s
            ),
            cues,
        )
        real_cues = real_cues.replace(rng=rng)
        samples["select_only_ms"] = timed(lambda: run["select"](real_cues), reps, sync)
    samples["ttft_ms"] = timed(first_token, reps, sync)
    decode = []
    for _ in range(e2e_reps + 1):
        result = sync(run["prefill"](weights, *embedded, rng))
        decode.append(
            _one(
                lambda result=result: run["generate"](
                    weights, result.logits, result.caches, result.next_positions, rng
                ),
                sync,
            )
            / (new_tokens - 1)
        )
    samples["decode_ms_per_token"] = decode[1:]
    samples["e2e_ms"] = timed(generation, e2e_reps, sync)
    out["samples"] = {k: [round(v, 4) for v in s] for k, s in samples.items()}
    out.update({k: median(s) for k, s in samples.items()})
    out["peak_bytes_all_stages"] = _memory_stats().get("peak_bytes_in_use")
    if spec.get("profile_dir"):  # after the timings and the peak: the profiler's buffers cost memory
        from experiments import profiling

        where = os.path.join(spec["profile_dir"], f"{method}-k{keep}-b{batch}")
        result = sync(run["prefill"](weights, *embedded, rng))
        stages = {
            "vision": lambda: profiling.profile_call(
                lambda: run["vision"](weights, pixels), os.path.join(where, "vision"), calls=3, sync=sync
            ),
            "llm_prefill": lambda: profiling.profile_call(
                lambda: run["prefill"](weights, *embedded, rng),
                os.path.join(where, "llm_prefill"),
                calls=3,
                sync=sync,
            ),
            "decode_step": lambda: profiling.profile_call(
                lambda result=result: run["generate"](
                    weights, result.logits, result.caches, result.next_positions, rng
                ),
                os.path.join(where, "decode"),
                units_per_call=new_tokens - 1,
                sync=sync,
            ),
        }
        out["profile"] = {}
        for stage, take in stages.items():  # a failed trace (e.g. no CUPTI) must not cost the timings
            try:
                out["profile"][stage] = take()
            except Exception as error:  # noqa: BLE001 - recorded in the row, the run goes on
                out["profile"][stage] = {
                    "error": f"{type(error).__name__}: {error}"[:500],
                    "device_threads": [],
                }
    return out


def _one(fn, sync) -> float:
    start = time.perf_counter()
    sync(fn())
    return (time.perf_counter() - start) * 1e3


def ceilings_worker(spec: dict) -> dict:
    """Measured copy bandwidth (read + write bytes) and bf16 matmul rate, plus the device's identity.

    Each ceiling is `iterations` dependent steps inside ONE jitted loop (x <- 3x; p <- (p @ b) / m, each
    step behind an optimization barrier),
    timed as a whole and divided, so per-call dispatch and synchronisation are not charged to the
    hardware: a single timed call per step read the H200's copy bandwidth as 2.6 TB/s, where PyTorch's
    device copy reaches about 4.3 TB/s on the same GPU (see WORKSPACE.md).
    """
    jax = _configure_jax(spec)
    import jax.numpy as jnp

    device = jax.devices()[0]
    small = device.platform == "cpu"
    n, m, iterations = (2**22, 512, 4) if small else (2**30, 8192, 20)
    key = jax.random.key(spec["seed"])
    x = jax.random.normal(key, (n,), jnp.bfloat16)
    a, b = (jax.random.normal(jax.random.fold_in(key, i), (m, m), jnp.bfloat16) for i in (1, 2))
    inverse_m = jnp.bfloat16(1.0 / m)
    barrier = jax.lax.optimization_barrier  # no fusing of steps, should XLA unroll the loop

    scale = jax.jit(lambda v: jax.lax.fori_loop(0, iterations, lambda _, u: barrier(u * 3), v))
    matmul = jax.jit(
        lambda p, q: jax.lax.fori_loop(0, iterations, lambda _, u: barrier((u @ q) * inverse_m), p)
    )
    copy_ms = median(timed(lambda: scale(x), 10, jax.block_until_ready)) / iterations
    matmul_ms = median(timed(lambda: matmul(a, b), 10, jax.block_until_ready)) / iterations
    return {
        "status": "ok",
        "device": str(device),
        "device_kind": device.device_kind,
        "platform": device.platform,
        "bytes_limit": _memory_stats().get("bytes_limit"),
        "iterations": iterations,
        "copy_bytes": 2 * n * 2,
        "copy_ms": copy_ms,
        "copy_bytes_per_s": 2 * n * 2 / (copy_ms / 1e3),
        "matmul_size": m,
        "matmul_ms": matmul_ms,
        "matmul_flops_per_s": 2 * m**3 / (matmul_ms / 1e3),
    }


def torch_worker(spec: dict) -> dict:
    """transformers' PyTorch LLaVA (sdpa), random weights built on the device, same shapes as JAX."""
    import numpy as np
    import torch
    import transformers
    from transformers import LlavaForConditionalGeneration

    from models.config import from_hf_config

    transformers.logging.set_verbosity_error()
    hf_config = _hf_config(spec["model"])
    cfg = from_hf_config(hf_config)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    cuda = device == "cuda"
    if not cuda:
        torch.set_num_threads(1)  # CPU runs are tests on shared cores: spinning thread pools stall there
    torch.manual_seed(spec["seed"])
    with torch.device(device):
        model = LlavaForConditionalGeneration._from_config(
            hf_config, dtype=getattr(torch, spec["dtype"]), attn_implementation="sdpa"
        ).eval()
    batch, n_img, keep, new_tokens = spec["batch"], cfg.num_image_tokens, spec["keep"], spec["new_tokens"]
    if not 0 <= keep <= n_img:
        raise ValueError(f"keep={keep} is outside 0..{n_img} image tokens")
    ids, start = _random_prompts(
        batch, spec["text_tokens"], n_img, cfg.text.vocab_size, cfg.image_token_index, spec["seed"]
    )
    ids = torch.from_numpy(ids).long().to(device)
    pixels = torch.from_numpy(_random_pixels(batch, cfg.vision.image_size, spec["seed"])).to(
        device, model.dtype
    )
    mask = torch.ones_like(ids)
    kept = torch.tensor(np.arange(keep) * n_img // keep if keep else np.arange(n_img), device=device)

    def sync(_):
        if cuda:
            torch.cuda.synchronize()

    def embeddings():
        """Text embeddings with the image span replaced by the (kept) image features."""
        features = torch.stack(model.get_image_features(pixel_values=pixels).pooler_output)
        text = model.get_input_embeddings()(ids)
        return torch.cat([text[:, :start], features[:, kept].to(text.dtype), text[:, start + n_img :]], dim=1)

    def first_token():
        if keep:
            x = embeddings()
            logits = model(inputs_embeds=x, attention_mask=mask[:, : x.shape[1]], logits_to_keep=1).logits
        else:
            logits = model(input_ids=ids, pixel_values=pixels, attention_mask=mask, logits_to_keep=1).logits
        return logits[:, -1].argmax(-1)

    generate_kwargs = dict(
        max_new_tokens=new_tokens,
        min_new_tokens=new_tokens,
        do_sample=False,
        pad_token_id=int(hf_config.text_config.pad_token_id or 0),
    )

    def generation():
        if keep:
            x = embeddings()
            return model.generate(inputs_embeds=x, attention_mask=mask[:, : x.shape[1]], **generate_kwargs)
        return model.generate(input_ids=ids, pixel_values=pixels, attention_mask=mask, **generate_kwargs)

    reps, e2e_reps = spec["repeats"], spec["e2e_repeats"]
    out = {
        "status": "ok",
        "device": device,
        "keep": keep,
        "prompt_tokens": ids.shape[1],
        "image_tokens": n_img,
    }
    with torch.inference_mode():
        start_time = time.perf_counter()
        sync(first_token())
        out["first_call_s"] = round(time.perf_counter() - start_time, 3)
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        samples = {
            "vision_ms": timed(
                lambda: model.get_image_features(pixel_values=pixels).pooler_output, reps, sync
            )
        }
        x = embeddings()
        samples["llm_prefill_ms"] = timed(
            lambda: model(inputs_embeds=x, attention_mask=mask[:, : x.shape[1]], logits_to_keep=1).logits,
            reps,
            sync,
        )
        samples["ttft_ms"] = timed(first_token, reps, sync)
        samples["e2e_ms"] = timed(generation, e2e_reps, sync)
        generated = generation()
    out["generated_tokens"] = int(generated.shape[1] - (0 if keep else ids.shape[1]))
    out["samples"] = {k: [round(v, 4) for v in s] for k, s in samples.items()}
    out.update({k: median(s) for k, s in samples.items()})
    if out["e2e_ms"] is not None and out["ttft_ms"] is not None:
        out["decode_ms_per_token"] = (out["e2e_ms"] - out["ttft_ms"]) / (new_tokens - 1)  # derived
    out["peak_bytes"] = torch.cuda.max_memory_allocated() if cuda else None
    return out


def worker_main() -> None:
    spec = json.loads(FLAGS.worker)
    try:
        result = {"ceilings": ceilings_worker, "jax": jax_worker, "torch": torch_worker}[spec["kind"]](spec)
    except Exception as error:  # noqa: BLE001 - reported to the driver as a failed row
        text = f"{type(error).__name__}: {error}"
        oom = any(s in text for s in ("RESOURCE_EXHAUSTED", "out of memory", "OutOfMemory", "Out of memory"))
        result = {
            "status": "oom" if oom else "failed",
            "error": text[:2000],
            "traceback": traceback.format_exc()[-4000:],
        }
        if spec.get("mode") == "probe":
            result["fits"] = False
    with open(FLAGS.worker_result, "w") as f:
        json.dump(result, f)


# ================================================================================================
# Driver: plans the jobs, runs each in a subprocess, adds floors and ratios, writes the report.
# ================================================================================================


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


class Runner:
    """Runs worker subprocesses under the run's deadline; keeps their logs."""

    def __init__(self):
        self.start = time.monotonic()
        self.logs: list[str] = []  # one section per worker: few files, since $OUT returns at most 8

    def remaining(self) -> float:
        return FLAGS.deadline_s - (time.monotonic() - self.start) if FLAGS.deadline_s else float("inf")

    def run(self, name: str, spec: dict, *, budget: float | None = None) -> dict:
        budget = self.remaining() if budget is None else budget
        if budget < 5:
            print(f"[{time.monotonic() - self.start:6.0f} s] {name}: skipped (deadline)", flush=True)
            return {"status": "skipped", "error": "deadline reached before this job started"}
        budget = min(FLAGS.job_timeout_s, budget)
        env = dict(
            os.environ,
            XLA_PYTHON_CLIENT_PREALLOCATE="false",
            XLA_PYTHON_CLIENT_MEM_FRACTION=str(FLAGS.mem_fraction),
            PYTHONPATH=os.pathsep.join(p for p in (REPO_ROOT, os.environ.get("PYTHONPATH")) if p),
        )
        with tempfile.TemporaryDirectory() as tmp:
            result_path = os.path.join(tmp, "result.json")
            command = [
                sys.executable,
                "-m",
                "experiments.benchmark",
                "--worker=" + json.dumps(spec),
                "--worker_result=" + result_path,
            ]
            start = time.monotonic()
            # Same process group as the driver: whoever stops the driver's group stops the workers too.
            process = subprocess.Popen(
                command, cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
            )
            try:
                output, _ = process.communicate(timeout=budget)
                timed_out = False
            except subprocess.TimeoutExpired:
                process.kill()
                output, _ = process.communicate()
                timed_out = True
            wall = time.monotonic() - start
            keep = 6000 if os.path.exists(result_path) and "Traceback" not in output else 20000
            self.logs.append(
                f"===== {name} (exit {process.returncode}, {time.monotonic() - start:.1f} s)\n"
                + output[-keep:]
            )
            if os.path.exists(result_path):
                with open(result_path) as f:
                    result = json.load(f)
            else:
                why = f"timed out after {budget:.0f} s" if timed_out else f"exited {process.returncode}"
                result = {"status": "failed", "error": f"worker {why} without a result: {output[-800:]}"}
        result["wall_s"] = round(wall, 2)
        print(
            f"[{time.monotonic() - self.start:6.0f} s] {name}: {result['status']} ({wall:.1f} s)"
            + (f" - {result.get('error', '')[:300]}" if result["status"] != "ok" else ""),
            flush=True,
        )
        return result


def set_floor_rates(ceilings: dict | None, bandwidth_tbps: float = 0.0, matmul_tflops: float = 0.0) -> None:
    """The rates floors are drawn against: per ceiling, the faster of the in-run measurement and a
    reference known to be reachable on the device (0 = none). Recorded in the ceilings."""
    if not ceilings or ceilings.get("status") != "ok":
        return
    for name, measured, reference in (
        ("bytes", "copy_bytes_per_s", bandwidth_tbps),
        ("flops", "matmul_flops_per_s", matmul_tflops),
    ):
        if reference < 0:
            raise ValueError(f"a reference rate must be >= 0, got {reference}")
        ceilings[f"reference_{name}_per_s"] = reference * 1e12 or None
        ceilings[f"floor_{name}_per_s"] = max(ceilings[measured], reference * 1e12)
        ceilings[f"floor_{name}_source"] = "reference" if reference * 1e12 > ceilings[measured] else "in-run"


def floor_rates(ceilings: dict) -> tuple[float, float]:
    """(bytes/s, FLOP/s) the floors use: set_floor_rates' choice, or the in-run ceilings of a run without it."""
    return (
        ceilings.get("floor_bytes_per_s") or ceilings.get("copy_bytes_per_s", 0),
        ceilings.get("floor_flops_per_s") or ceilings.get("matmul_flops_per_s", 0),
    )


def _floor_ms(flops, num_bytes, ceilings) -> float | None:
    if not ceilings or ceilings.get("status") != "ok":
        return None
    bandwidth, matmul = floor_rates(ceilings)
    return max(flops / matmul, num_bytes / bandwidth) * 1e3


def add_floors_and_ratios(rows: list[dict], ceilings: dict) -> None:
    """Floors of every JAX row, speedups vs the unpruned row, JAX / PyTorch ratios."""
    by_key = {(r["framework"], r["method"], r["keep"], r["batch"]): r for r in rows if r["status"] == "ok"}
    for row in rows:
        if row["framework"] != "jax" or row["status"] != "ok":
            continue
        w, floors = row["work"], {}
        floors["vision_ms"] = _floor_ms(w["vision_flops"], w["vision_bytes"], ceilings)
        floors["llm_prefill_ms"] = _floor_ms(w["prefill_flops"], w["prefill_bytes"], ceilings)
        floors["llm_prefill_flop_ms"] = _floor_ms(w["prefill_flops"], 0, ceilings)
        floors["decode_ms_per_token"] = _floor_ms(w["decode_flops"], w["decode_bytes"], ceilings)
        floors["decode_weight_read_ms"] = _floor_ms(0, w["decode_weight_bytes"], ceilings)
        if floors["vision_ms"] is not None:
            floors["ttft_ms"] = floors["vision_ms"] + floors["llm_prefill_ms"]
            floors["e2e_ms"] = floors["ttft_ms"] + (row["new_tokens"] - 1) * floors["decode_ms_per_token"]
        row["floors"] = floors
        row["ratio_to_floor"] = {k: row[k] / f for k, f in floors.items() if f and row.get(k) is not None}
        base = by_key.get(("jax", "none", 0, row["batch"]))
        if base:
            row["speedup_vs_unpruned"] = {
                k: base[k] / row[k]
                for k in ("llm_prefill_ms", "ttft_ms", "decode_ms_per_token", "e2e_ms")
                if row.get(k) and base.get(k)
            }
            if row.get("peak_bytes") and base.get("peak_bytes"):
                row["memory_saving_vs_unpruned"] = 1 - row["peak_bytes"] / base["peak_bytes"]
        torch_row = by_key.get(
            ("torch", "none" if row["method"] == "none" else "cut", row["keep"], row["batch"])
        )
        if torch_row:
            row["jax_over_torch"] = {
                k: row[k] / torch_row[k]
                for k in ("vision_ms", "llm_prefill_ms", "ttft_ms", "decode_ms_per_token", "e2e_ms")
                if row.get(k) and torch_row.get(k)
            }
            row["torch_row"] = torch_row["label"]


def predicted_max_batch(row: dict) -> int | None:
    """Where a line through (0, weights) and this row's measured peak meets the allocator limit."""
    if not (row.get("peak_bytes") and row.get("bytes_limit") and row.get("weights_bytes")):
        return None
    per_row = (row["peak_bytes"] - row["weights_bytes"]) / row["batch"]
    batch = int((row["bytes_limit"] - row["weights_bytes"]) / per_row)
    return batch // 8 * 8 if batch >= 16 else batch


class BatchSearch:
    """Largest batch that fits for one configuration: growth (x --max_batch_growth, doubling by default)
    until a probe fails, then bisection (shrinking by the same factor while nothing is known to fit).

    Start: the one given (none@START), else the prediction of this configuration's largest measured
    row (`predicted_max_batch`), else twice the largest known fit. Measured rows count as known fits;
    a probe that fails (OOM or otherwise) does not fit.
    """

    def __init__(self, config: Config, rows: list[dict], start: int | None = None):
        self.config, self.probes, self.smallest_failure = config, [], None
        measured = [
            r
            for r in rows
            if r["framework"] == "jax"
            and r["method"] == config.method
            and r["keep"] == config.keep
            and r["status"] == "ok"
        ]
        self.largest_fit = max((r["batch"] for r in measured), default=0)
        if not start and measured:
            start = predicted_max_batch(max(measured, key=lambda r: r["batch"]))
        self.start = start if start and start > self.largest_fit else max(2 * self.largest_fit, 1)
        self.next = min(self.start, FLAGS.max_batch_cap)

    def pending(self) -> int | None:
        """The next batch to probe, or None when done (converged, capped, or out of probes)."""
        lo, hi = self.largest_fit, self.smallest_failure
        if len(self.probes) >= FLAGS.max_batch_probes or self.next in (None, lo, hi) or self.next < 1:
            return None
        if hi is None and lo >= FLAGS.max_batch_cap:
            return None
        if hi is not None and hi - lo <= max(1, FLAGS.max_batch_tolerance * lo):
            return None
        return self.next

    def record(self, batch: int, result: dict) -> None:
        fits = bool(result.get("fits"))
        self.probes.append(
            {
                "batch": batch,
                "fits": fits,
                "status": result["status"],
                "peak_bytes": result.get("peak_bytes"),
                "error": result.get("error", "")[:300],
                "wall_s": result.get("wall_s"),
            }
        )
        if fits:
            self.largest_fit = batch
        else:
            self.smallest_failure = batch
        lo, hi, growth = self.largest_fit, self.smallest_failure, FLAGS.max_batch_growth
        if hi is None:
            self.next = min(max(batch + 1, int(batch * growth)), FLAGS.max_batch_cap)
        else:
            self.next = (lo + hi) // 2 if lo else min(batch - 1, int(batch / growth))

    def summary(self) -> dict:
        return {
            "config": self.config.name,
            "method": self.config.method,
            "keep": self.config.keep,
            "largest_fit": self.largest_fit,
            "smallest_failure": self.smallest_failure,
            "start": self.start,
            "probes": self.probes,
        }


def max_batch_search(
    runner: Runner,
    configs: list[tuple[Config, int | None]],
    common: dict,
    rows: list[dict],
    report: dict,
    save,
) -> None:
    """All searches in lockstep: each round compiles every search's next probe in parallel processes
    (compile-only; whether it fits is decided by running it), then runs the probes one at a time."""
    searches = [BatchSearch(config, rows, start) for config, start in configs]
    report["max_batch"] = [s.summary() for s in searches]

    def spec(search, batch, mode):
        return dict(
            common,
            kind="jax",
            mode=mode,
            method=search.config.method,
            keep=search.config.keep,
            batch=batch,
            repeats=0,
            e2e_repeats=0,
            selection_overhead=False,
        )

    while True:
        round_ = [(search, search.pending()) for search in searches if search.pending() is not None]
        if not round_ or runner.remaining() < 5:
            break
        if FLAGS.compile_workers > 0 and len(round_) > 1:
            with concurrent.futures.ThreadPoolExecutor(FLAGS.compile_workers) as pool:
                list(
                    pool.map(
                        lambda item: runner.run(
                            f"compile-probe-{item[0].config.method}-k{item[0].config.keep}-b{item[1]}",
                            spec(item[0], item[1], "compile"),
                        ),
                        round_,
                    )
                )
        for search, batch in round_:
            result = runner.run(
                f"probe-{search.config.method}-k{search.config.keep}-b{batch}", spec(search, batch, "probe")
            )
            if result["status"] == "skipped":
                return
            search.record(batch, result)
            report["max_batch"] = [s.summary() for s in searches]
            save()


def acceptance(rows: list[dict], searches: list[dict]) -> list[dict]:
    """The issue's targets, each with its value, pass/fail and the gap; n/a when not measured here."""

    def row(method, keep, batch):
        return next(
            (
                r
                for r in rows
                if r["framework"] == "jax"
                and r["method"] == method
                and r["keep"] == keep
                and r["batch"] == batch
                and r["status"] == "ok"
            ),
            None,
        )

    base1, acc1 = row("none", 0, 1), row(ACCEPT_METHOD, ACCEPT_KEEP, 1)
    base16, acc16 = row("none", 0, 16), row(ACCEPT_METHOD, ACCEPT_KEEP, 16)
    base64, acc64 = row("none", 0, 64), row(ACCEPT_METHOD, ACCEPT_KEEP, 64)
    checks = []

    def check(name, value, target, at_most, unit="", note="", decided=True):
        if value is None:
            checks.append(
                {
                    "name": name,
                    "value": None,
                    "target": target,
                    "pass": None,
                    "detail": "n/a (not measured in this run)",
                }
            )
            return
        ok = (value <= target if at_most else value >= target) if decided else None
        verdict = {True: "PASS", False: "FAIL", None: "INCONCLUSIVE"}[ok]
        checks.append(
            {
                "name": name,
                "value": value,
                "target": target,
                "pass": ok,
                "detail": f"{value:.3f}{unit} {'<=' if at_most else '>='} {target}{unit}: {verdict} "
                f"(gap {value - target:+.3f}{unit}){note}",
            }
        )

    def ratio(num, den, key):
        return num[key] / den[key] if num and den and num.get(key) and den.get(key) else None

    weight_floor = base1 and base1.get("floors", {}).get("decode_weight_read_ms")
    check(
        "decode b1 / weight-read floor",
        base1["decode_ms_per_token"] / weight_floor if weight_floor else None,
        TARGETS["decode_vs_weight_floor"],
        True,
        "x",
    )
    flop_floor = base1 and base1.get("floors", {}).get("llm_prefill_flop_ms")
    check(
        f"unpruned LLM prefill b1 ({base1['prompt_tokens'] if base1 else '?'} tokens) / FLOP floor",
        base1["llm_prefill_ms"] / flop_floor if flop_floor else None,
        TARGETS["prefill_vs_flop_floor"],
        True,
        "x",
    )
    check(
        f"TTFT speedup {ACCEPT_METHOD}@{ACCEPT_KEEP} b1",
        ratio(base1, acc1, "ttft_ms"),
        TARGETS["ttft_speedup_b1"],
        False,
        "x",
    )
    check(
        f"TTFT speedup {ACCEPT_METHOD}@{ACCEPT_KEEP} b16",
        ratio(base16, acc16, "ttft_ms"),
        TARGETS["ttft_speedup_b16"],
        False,
        "x",
    )
    saving = None
    if base64 and acc64 and base64.get("peak_bytes") and acc64.get("peak_bytes"):
        saving = 1 - acc64["peak_bytes"] / base64["peak_bytes"]
    check(
        f"peak memory saving {ACCEPT_METHOD}@{ACCEPT_KEEP} b64", saving, TARGETS["memory_saving_b64"], False
    )
    search = {(s["method"], s["keep"]): s for s in searches}
    s_base, s_acc = search.get(("none", 0)), search.get((ACCEPT_METHOD, ACCEPT_KEEP))
    value, note, decided = None, "", True
    if s_base and s_acc and s_base["largest_fit"] and s_acc["largest_fit"]:
        value = s_acc["largest_fit"] / s_base["largest_fit"]
        base_fail, acc_fail = s_base["smallest_failure"], s_acc["smallest_failure"]
        # True largest batches lie in [largest_fit, smallest_failure - 1]: decide only what the bounds prove.
        proven_pass = bool(base_fail) and s_acc["largest_fit"] >= TARGETS["max_batch_ratio"] * (base_fail - 1)
        proven_fail = bool(acc_fail) and acc_fail - 1 < TARGETS["max_batch_ratio"] * s_base["largest_fit"]
        decided = proven_pass or proven_fail
        note = (
            f"; fits {s_acc['largest_fit']} vs {s_base['largest_fit']}, first failures {acc_fail} vs "
            f"{base_fail}"
        )
    check(
        f"largest batch {ACCEPT_METHOD}@{ACCEPT_KEEP} / unpruned",
        value,
        TARGETS["max_batch_ratio"],
        False,
        "x",
        note,
        decided,
    )
    check(
        f"selection overhead {ACCEPT_METHOD}@{ACCEPT_KEEP} b1",
        acc1 and acc1.get("selection_overhead_ms"),
        TARGETS["selection_overhead_ms"],
        True,
        " ms",
    )
    return checks


# ------------------------------------------------------------------------------------------------
# Report: results.json, results.md, time_memory_vs_tokens.png, and the short table printed last.
# ------------------------------------------------------------------------------------------------

METRICS = (
    ("vision_ms", "vision"),
    ("llm_prefill_ms", "LLM prefill"),
    ("selection_overhead_ms", "selection"),
    ("ttft_ms", "first token"),
    ("decode_ms_per_token", "decode/token"),
    ("e2e_ms", "end-to-end"),
)


def _fmt(value, spec=".2f", suffix=""):
    return "-" if value is None else f"{value:{spec}}{suffix}"


def _gib(value):
    return None if value is None else value / GIB


def results_markdown(report: dict) -> str:
    meta, ceilings = report["meta"], report["ceilings"] or {}
    lines = [
        f"# Benchmark: {meta['flags']['model']} on {ceilings.get('device_kind', '?')} ({meta['date']})",
        "",
        f"`{meta['command']}`",
        "",
    ]
    if meta.get("rejudged"):
        lines += [
            f"Floors and acceptance re-judged against reference rates ({meta['rejudged']['date'][:10]}): "
            f"`{meta['rejudged']['command']}`",
            "",
        ]
    bandwidth, matmul = floor_rates(ceilings)
    lines += [
        f"Versions: {', '.join(f'{k} {v}' for k, v in meta['versions'].items())}. "
        f"Ceilings measured in this run: copy {_fmt(ceilings.get('copy_bytes_per_s', 0) / 1e12, '.2f')} TB/s, "
        f"{meta['flags']['dtype']} matmul {_fmt(ceilings.get('matmul_flops_per_s', 0) / 1e12, '.3g')} "
        f"TFLOP/s. Floors use {_fmt(bandwidth / 1e12)} TB/s ({ceilings.get('floor_bytes_source', 'in-run')}) "
        f"and {_fmt(matmul / 1e12, '.3g')} TFLOP/s ({ceilings.get('floor_flops_source', 'in-run')}): "
        f"floor = max(FLOPs / matmul rate, bytes / bandwidth); decode/token floor includes the KV "
        f"read, the weight-read floor alone is in results.json.",
        "",
    ]
    jax_rows = [r for r in report["rows"] if r["framework"] == "jax" and r["status"] == "ok"]
    if jax_rows:  # a max-batch search alone has no timed rows
        lines += [
            "## JAX",
            "",
            "| config | metric | ms | floor ms | x floor | speedup vs unpruned | peak GiB | JAX / PyTorch |",
            "|---|---|---|---|---|---|---|---|",
        ]
    for row in jax_rows:
        for key, name in METRICS:
            if row.get(key) is None:
                continue
            lines.append(
                f"| {row['label']} | {name} | {row[key]:.3f} | {_fmt(row.get('floors', {}).get(key), '.3f')} | "
                f"{_fmt(row.get('ratio_to_floor', {}).get(key), '.2f')} | "
                f"{_fmt(row.get('speedup_vs_unpruned', {}).get(key), '.2f', 'x')} | "
                f"{_fmt(_gib(row.get('peak_bytes')), '.2f') if key == 'e2e_ms' else ''} | "
                f"{_fmt(row.get('jax_over_torch', {}).get(key), '.2f')} |"
            )
    if jax_rows:
        lines += [
            "",
            "| config | compile s (pre-compile / measuring process) | weights GiB | KV cache GiB | "
            "peak GiB | XLA temp GiB, prefill / generate |",
            "|---|---|---|---|---|---|",
        ]
        for r in jax_rows:
            pre = ((r.get("precompile") or {}).get("compile_s") or {}).values()
            pre = sum(pre) if pre else None
            temp = [
                (r["compiled_memory"].get(k) or {}).get("temp_size_in_bytes") for k in ("prefill", "generate")
            ]
            lines.append(
                f"| {r['label']} | {_fmt(pre, '.1f')} / {sum(r['compile_s'].values()):.1f} | "
                f"{_gib(r['weights_bytes']):.2f} | {_gib(r['work']['kv_cache_bytes_allocated']):.3f} | "
                f"{_fmt(_gib(r.get('peak_bytes')))} | {_fmt(_gib(temp[0]), '.3f')} / "
                f"{_fmt(_gib(temp[1]), '.3f')} |"
            )
    torch_rows = [r for r in report["rows"] if r["framework"] == "torch" and r["status"] == "ok"]
    if torch_rows:
        lines += [
            "",
            f"## PyTorch (transformers, sdpa, {meta['flags']['dtype']})",
            "",
            "`cut@K`: image tokens cut BEFORE the language model (inputs_embeds with K image tokens, no "
            "selection work), as anchors.md measured; decode/token is derived: (end-to-end - first token) "
            "/ (new tokens - 1).",
            "",
            "| config | vision | LLM prefill | first token | decode/token | end-to-end | peak GiB |",
            "|---|---|---|---|---|---|---|",
        ]
        for r in torch_rows:
            lines.append(
                f"| {r['label']} | {_fmt(r.get('vision_ms'))} | {_fmt(r.get('llm_prefill_ms'))} | "
                f"{_fmt(r.get('ttft_ms'))} | {_fmt(r.get('decode_ms_per_token'))} | "
                f"{_fmt(r.get('e2e_ms'), '.1f')} | {_fmt(_gib(r.get('peak_bytes')))} |"
            )
    if report["max_batch"]:
        lines += [
            "",
            "## Largest batch that fits",
            "",
            "| config | largest fit | smallest failure | probes |",
            "|---|---|---|---|",
        ]
        for s in report["max_batch"]:
            probes = ", ".join(f"{p['batch']}:{'fit' if p['fits'] else p['status']}" for p in s["probes"])
            lines.append(
                f"| {s['config']} | {s['largest_fit']} | {_fmt(s['smallest_failure'], 'd')} | {probes} |"
            )
    profiled = [r for r in jax_rows if r.get("profile")]
    if profiled:
        from experiments.profiling import main_thread

        lines += [
            "",
            "## Profile (jax.profiler, busiest device thread)",
            "",
            "busy = union of the thread's events, span = first start to last end, per prefill / per decode "
            "step; a low busy fraction means the device waited (launches, host), not the memory.",
            "",
            "| config | stage | events | busy ms | span ms | busy fraction | heaviest (share of time) |",
            "|---|---|---|---|---|---|---|",
        ]
        for r in profiled:
            for stage, summary in r["profile"].items():
                thread = main_thread(summary)
                if thread is None:
                    why = summary.get("error") or "no device events"
                    lines.append(f"| {r['label']} | {stage} | {why[:120]} | | | | |")
                    continue
                heaviest = "; ".join(
                    f"{t['name'][:48]} ({100 * t['share_of_sum']:.0f}%)" for t in thread["top"][:3]
                )
                lines.append(
                    f"| {r['label']} | {stage} | {thread['events_per_call']:.0f} | "
                    f"{thread['busy_ms_per_call']:.3f} | {thread['span_ms_per_call']:.3f} | "
                    f"{_fmt(thread['busy_fraction'], '.2f')} | {heaviest} |"
                )
    lines += ["", "## Acceptance", ""] + [f"- {c['name']}: {c['detail']}" for c in report["acceptance"]]
    failed = [r for r in report["rows"] if r["status"] != "ok"]
    if failed:
        lines += ["", "## Failed or skipped", ""] + [
            f"- {r['label']}: {r['status']}: {r.get('error', '')[:300]}" for r in failed
        ]
    return "\n".join(lines) + "\n"


def plot(report: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in report["rows"] if r["status"] == "ok"]
    fig, (ax_time, ax_memory) = plt.subplots(1, 2, figsize=(12, 4.5))
    jax_rows = [r for r in rows if r["framework"] == "jax"]
    for method in dict.fromkeys(r["method"] for r in jax_rows if r["method"] != "none"):
        for batch in sorted({r["batch"] for r in jax_rows}):
            line = sorted(
                (r for r in jax_rows if r["batch"] == batch and r["method"] in (method, "none")),
                key=lambda r: r["keep"] or r["image_tokens"],
            )
            if not any(r["method"] == method for r in line):
                continue
            x = [r["keep"] or r["image_tokens"] for r in line]
            (handle,) = ax_time.plot(
                x, [r["ttft_ms"] for r in line], "o-", label=f"{method} b{batch} first token"
            )
            ax_time.plot(
                x,
                [r["llm_prefill_ms"] for r in line],
                "s--",
                color=handle.get_color(),
                label=f"{method} b{batch} LLM prefill",
            )
            if all(r.get("peak_bytes") for r in line):
                ax_memory.plot(
                    x,
                    [r["peak_bytes"] / GIB for r in line],
                    "o-",
                    color=handle.get_color(),
                    label=f"{method} b{batch} peak",
                )
            ax_memory.plot(
                x,
                [r["work"]["kv_cache_bytes_allocated"] / GIB for r in line],
                ":",
                color=handle.get_color(),
                label=f"{method} b{batch} KV cache",
            )
    for r in (r for r in rows if r["framework"] == "torch"):
        ax_time.plot(r["keep"] or r["image_tokens"], r["ttft_ms"], "kx")
    if any(r["framework"] == "torch" for r in rows):
        ax_time.plot([], [], "kx", label="PyTorch first token (cut before LLM)")
    ax_time.set(xlabel="kept image tokens", ylabel="ms", yscale="log", title="time (median)")
    ax_memory.set(xlabel="kept image tokens", ylabel="GiB", title="device memory (peak of one generation)")
    for ax in (ax_time, ax_memory):
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
    fig.suptitle(
        f"{report['meta']['flags']['model']} on {(report['ceilings'] or {}).get('device_kind', '?')}"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_outputs(report: dict, out_dirs: list[str], *, final: bool = False, logs: list[str] = ()) -> None:
    for directory in out_dirs:
        os.makedirs(directory, exist_ok=True)
        if logs:
            with open(os.path.join(directory, "worker_logs.txt"), "w") as f:
                f.write("\n".join(logs))
        with open(os.path.join(directory, "results.json"), "w") as f:
            json.dump(report, f, indent=1, default=str)
        try:  # results.json is complete already; a rendering bug must not lose the run
            markdown = results_markdown(report)
        except Exception:  # noqa: BLE001
            markdown = "results.md could not be rendered:\n\n```\n" + traceback.format_exc() + "```\n"
        with open(os.path.join(directory, "results.md"), "w") as f:
            f.write(markdown)
        if final:
            try:
                plot(report, os.path.join(directory, "time_memory_vs_tokens.png"))
            except Exception as error:  # noqa: BLE001 - e.g. no matplotlib there: --replot draws it here
                print(
                    f"no plot ({type(error).__name__}: {error}); "
                    f"run --replot={os.path.join(directory, 'results.json')}"
                )


def summary(report: dict) -> str:
    head = (
        f"{'config':<18}{'vision':>8}{'prefill':>9}{'x flr':>7}{'select':>8}{'1st tok':>9}{'speedup':>8}"
        f"{'dec/tok':>9}{'x flr':>7}{'e2e':>9}{'GiB':>7}{'JAX/PT':>8}"
    )
    lines = [head] if report["rows"] else []
    for r in report["rows"]:
        if r["status"] != "ok":
            lines.append(f"{r['label']:<18}  {r['status']}: {r.get('error', '')[:90]}")
            continue
        floor, speed = r.get("ratio_to_floor", {}), r.get("speedup_vs_unpruned", {})
        lines.append(
            f"{r['label']:<18}{_fmt(r.get('vision_ms')):>8}{_fmt(r.get('llm_prefill_ms')):>9}"
            f"{_fmt(floor.get('llm_prefill_ms')):>7}{_fmt(r.get('selection_overhead_ms'), '.3f'):>8}"
            f"{_fmt(r.get('ttft_ms')):>9}{_fmt(speed.get('ttft_ms'), '.2f', 'x'):>8}"
            f"{_fmt(r.get('decode_ms_per_token')):>9}{_fmt(floor.get('decode_ms_per_token')):>7}"
            f"{_fmt(r.get('e2e_ms'), '.1f'):>9}{_fmt(_gib(r.get('peak_bytes'))):>7}"
            f"{_fmt(r.get('jax_over_torch', {}).get('ttft_ms')):>8}"
        )
    for s in report["max_batch"]:
        lines.append(
            f"largest batch {s['config']}: fits {s['largest_fit']}, fails {s['smallest_failure']} "
            f"(probes {', '.join(str(p['batch']) + ('+' if p['fits'] else '-') for p in s['probes'])})"
        )
    seeds = {}
    for r in report["rows"]:  # the largest measured batch of each configuration predicts its limit
        if r["framework"] == "jax" and r["status"] == "ok" and predicted_max_batch(r):
            name = r["method"] + (f":{r['keep']}" if r["keep"] else "")
            if r["batch"] >= seeds.get(name, (0, 0))[0]:
                seeds[name] = (r["batch"], predicted_max_batch(r))
    if seeds:
        lines.append(
            "predicted largest batches (seeds for a search): --max_batch_configs="
            + ",".join(f"{name}@{batch}" for name, (_, batch) in seeds.items())
        )
    checks = report["acceptance"]
    tags = {True: "PASS", False: "FAIL", None: "n/a "}
    lines += [
        f"[{tags[c['pass']] if c['pass'] is not None or c['value'] is None else '????'}] {c['name']}: "
        f"{c['detail']}"
        for c in checks
    ]
    count = {tag: sum(c["pass"] is value for c in checks) for value, tag in tags.items()}
    lines.append(
        f"acceptance: {count['PASS']} pass, {count['FAIL']} fail, {count['n/a ']} not measured here "
        f"or inconclusive (of {len(checks)})"
    )
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------


def _meta() -> dict:
    versions = {}
    for package in ("jax", "jaxlib", "flax", "torch", "transformers", "numpy"):
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            versions[package] = None
    own = {
        f.name: f.value for f in FLAGS.get_flags_for_module(sys.argv[0]) if not f.name.startswith("worker")
    }
    return {
        **run_stamp("experiments.benchmark"),
        "argv": sys.argv,
        "flags": own,
        "versions": versions,
        "python": sys.version.split()[0],
        # the workers inherit the environment: compiler flags change the numbers, so they are recorded
        "env": {
            k: os.environ.get(k) for k in ("XLA_FLAGS", "JAX_PLATFORMS", "XLA_PYTHON_CLIENT_MEM_FRACTION")
        },
    }


def precompile(runner: Runner, configs: list[Config], common: dict) -> dict:
    """Fill the compilation cache from abstract shapes, in parallel processes: when there are more
    jobs than workers, the first runs alone (its autotuning results serve the shapes the later programs
    share, and parallel autotuning times kernels on a shared GPU); unpruned first, then method by
    method, so that two methods at one keep (same fixed-index prefill, same decode program) do not
    compile the same program side by side. Stops at 60% of the deadline."""
    methods = list(dict.fromkeys(["none"] + [c.method for c in configs]))
    ordered = sorted(configs, key=lambda c: methods.index(c.method))  # same-keep programs not side by side
    jobs = [
        (
            f"compile-{c.method}-k{c.keep}-b{c.batch}",
            c,
            dict(common, kind="jax", mode="compile", method=c.method, keep=c.keep, batch=c.batch),
        )
        for c in ordered
    ]
    results = {}

    def one(job):
        name, config, spec = job
        budget = runner.remaining() - 0.4 * FLAGS.deadline_s if FLAGS.deadline_s else None
        results[config] = runner.run(name, spec, budget=budget)

    if len(jobs) > FLAGS.compile_workers:
        one(jobs.pop(0))
    with concurrent.futures.ThreadPoolExecutor(FLAGS.compile_workers) as pool:
        list(pool.map(one, jobs))
    return results


def main(argv):
    del argv
    if FLAGS.worker:
        worker_main()
        return
    if FLAGS.replot:
        with open(FLAGS.replot) as f:
            report = json.load(f)
        if FLAGS.reference_bandwidth_tbps or FLAGS.reference_matmul_tflops:  # re-judge against references
            set_floor_rates(report["ceilings"], FLAGS.reference_bandwidth_tbps, FLAGS.reference_matmul_tflops)
            add_floors_and_ratios(report["rows"], report["ceilings"])
            report["acceptance"] = acceptance(report["rows"], report["max_batch"])
            report["meta"]["rejudged"] = run_stamp("experiments.benchmark")
        write_outputs(report, [os.path.dirname(os.path.abspath(FLAGS.replot))], final=True)
        print(summary(report))
        return
    configs = planned_configs()
    name = os.path.basename(os.path.normpath(FLAGS.output_dir))
    out_dirs = [FLAGS.output_dir] + ([os.path.join(os.environ["OUT"], name)] if os.environ.get("OUT") else [])
    runner = Runner()
    common = dict(
        model=FLAGS.model,
        random_weights=FLAGS.random_weights,
        dtype=FLAGS.dtype,
        layer=FLAGS.layer,
        text_tokens=FLAGS.text_tokens,
        new_tokens=FLAGS.new_tokens,
        repeats=FLAGS.repeats,
        e2e_repeats=FLAGS.e2e_repeats,
        selection_overhead=FLAGS.selection_overhead,
        seed=FLAGS.seed,
        compile_cache=FLAGS.compile_cache and os.path.abspath(FLAGS.compile_cache),
        profile_dir=FLAGS.profile_dir and os.path.abspath(FLAGS.profile_dir),
        attention_logits_budget_mb=FLAGS.attention_logits_budget_mb,
        stage_compiler_options=parse_stage_compiler_options(FLAGS.stage_compiler_options),
    )
    report = {"meta": _meta(), "ceilings": None, "rows": [], "max_batch": [], "acceptance": []}

    def save(final=False):  # after every job, so a run cut short still leaves its report
        add_floors_and_ratios(report["rows"], report["ceilings"])
        report["acceptance"] = acceptance(report["rows"], report["max_batch"])
        report["meta"]["wall_s"] = round(time.monotonic() - runner.start, 1)
        write_outputs(report, out_dirs, final=final, logs=runner.logs)

    report["ceilings"] = runner.run("ceilings", dict(common, kind="ceilings"))
    set_floor_rates(report["ceilings"], FLAGS.reference_bandwidth_tbps, FLAGS.reference_matmul_tflops)
    compiled = precompile(runner, configs, common) if FLAGS.compile_workers > 0 else {}
    rows, torch_done = report["rows"], set()
    for config in configs:
        result = runner.run(
            f"jax-{config.method}-k{config.keep}-b{config.batch}",
            dict(
                common, kind="jax", mode="measure", method=config.method, keep=config.keep, batch=config.batch
            ),
        )
        if config in compiled:
            result["precompile"] = {
                k: compiled[config].get(k) for k in ("status", "compile_s", "wall_s", "error")
            }
        rows.append(
            dict(
                result,
                framework="jax",
                method=config.method,
                keep=config.keep,
                batch=config.batch,
                label=config.label,
                new_tokens=FLAGS.new_tokens,
                text_tokens=FLAGS.text_tokens,
            )
        )
        torch_key = (config.keep if config.method != "none" else 0, config.batch)
        torch_batches = set(map(int, FLAGS.torch_batch_sizes)) or {config.batch}
        if FLAGS.torch_baseline and torch_key not in torch_done and config.batch in torch_batches:
            torch_done.add(torch_key)
            keep, batch = torch_key
            method = "cut" if keep else "none"
            result = runner.run(
                f"torch-{method}-k{keep}-b{batch}", dict(common, kind="torch", keep=keep, batch=batch)
            )
            rows.append(
                dict(
                    result,
                    framework="torch",
                    method=method,
                    keep=keep,
                    batch=batch,
                    label=f"pytorch {method}{f'@{keep}' if keep else ''} b{batch}",
                    new_tokens=FLAGS.new_tokens,
                    text_tokens=FLAGS.text_tokens,
                )
            )
        save()
    if FLAGS.max_batch_search:
        max_batch_search(
            runner, [parse_search(text) for text in FLAGS.max_batch_configs], common, rows, report, save
        )
    save(final=True)
    print(summary(report), flush=True)


if __name__ == "__main__":
    app.run(main)
