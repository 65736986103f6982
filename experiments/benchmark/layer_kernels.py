"""Which kernels each layer runs on the device: the ordered kernel list of a few-layer model with a
preset's widths (vision tower, LLM prefill unpruned and pruned, and a few greedy decoding steps after
each prefill), each kernel with its time and what XLA fused into it.

    python -m experiments.benchmark.layer_kernels --model=llava-1.5-7b --layers=4 --output_dir=DIR

Why: the stage benchmark says how far a stage is from its floor and which kernels weigh most; a
stage made of many small kernels loses its time between them, and this says what they are, layer by
layer, so a change can be aimed at the ones it would remove. A layer's kernels are the same in a
4-layer and a 32-layer model of the same widths, so only a few layers are built (random bfloat16
weights on the device: seconds, not a 14 GB model). Writes kernels.json (per program: the kernel
sequence of one call, with each fusion's HLO opcodes) and each program's optimised HLO, gzipped.
``--option_sets`` compiles every program under several sets of XLA options on the one model build.
"""

from __future__ import annotations

import dataclasses
import gzip
import json
import os
import re
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app
from flax import nnx

import adaptprune_jax as prune
from experiments.benchmark import profiling
from experiments.benchmark.configs import parse_compiler_options
from experiments.benchmark.timing import back_to_back, median, timed
from experiments.flag_config import define_flags, from_flags, setting
from models.presets import llava_config, random_model


@dataclasses.dataclass(frozen=True)
class LayerKernelsConfig:
    """The model widths, depth and budget whose kernels are listed."""

    model: str = setting("llava-1.5-7b", "Preset name (models.presets): its widths are kept.")
    layers: int = setting(
        4,
        "Decoder layers built, and as many vision layers up to the tower's own (pruning happens at --layer).",
    )
    layer: int = setting(2, "Pruning layer K.")
    keep: int = setting(64, "Image tokens kept by the pruned prefill (AdaptPrune).")
    batch: int = setting(1, "Batch size.")
    text_tokens: int = setting(64, "Text tokens per prompt (the image span comes on top).")
    compiler_options: tuple[str, ...] = setting(
        (), "XLA options for every program, OPTION=VALUE (e.g. xla_gpu_cublas_fallback=false)."
    )
    option_sets: tuple[str, ...] = setting(
        (),
        "Compile and list every program once per set, TAG or TAG:OPTION=VALUE[;OPTION=VALUE...] (on top "
        "of --compiler_options; a bare TAG adds nothing): several XLA settings compared on one model "
        "build, each program listed as TAG/NAME. Empty: one listing per program, as NAME. XLA keeps its "
        "autotuning results for the whole process, so an option that only widens the autotuner's search "
        "(xla_gpu_exhaustive_tiling_search) may get the first set's picks: compare those in separate runs.",
    )
    extra_slots: int = setting(
        32, "Cache slots past the prompt, as the benchmark's prefill allocates for its --new_tokens."
    )
    decode_steps: int = setting(
        4,
        "Greedy decoding steps in each decode program (one while loop over the prefill's caches, as the "
        "runner's decode loop runs; 0: no decode programs).",
    )
    programs: tuple[str, ...] = setting(
        (),
        "Which programs to list, by kind: vision, prefill, decode (empty: all). A vision-only census at "
        "--batch=16 compiles one program instead of five.",
    )
    calls: int = setting(3, "Profiled calls per program (after a warm-up); the last one is listed.")
    wall_repeats: int = setting(
        20,
        "Timed calls per program, wall clock from dispatch to result (median), beside the trace's busy and "
        "span: what the trace does not see (dispatch, gaps before the first kernel).",
    )
    output_dir: str = setting("runs/layer_kernels", "Where kernels.json and the HLO files go.")


_INSTRUCTION = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*(\S+)\s+(\w[\w\-]*)\(")
_CALLS = re.compile(r"calls=%?([\w.\-]+)")
_COMPUTATION = re.compile(r"^\s*(?:ENTRY\s+)?%?([\w.\-]+)\s.*\{\s*$")


def fused_ops(hlo_text: str) -> dict[str, dict]:
    """Per fusion or custom-call instruction of an optimised HLO module, under the name its kernel
    carries in a trace ('.' -> '_'): its output shape and the opcodes of the computation it calls."""
    bodies: dict[str, list[str]] = {}
    current = None
    for line in hlo_text.splitlines():
        header = _COMPUTATION.match(line)
        if header and "=" not in line.split("{")[0]:
            current = header.group(1)
            bodies[current] = []
            continue
        if line.strip() == "}":
            current = None
            continue
        instruction = _INSTRUCTION.match(line)
        if instruction and current is not None:
            bodies[current].append(instruction.group(3))
    ops = {}
    for line in hlo_text.splitlines():
        instruction = _INSTRUCTION.match(line)
        if not instruction or instruction.group(3) not in ("fusion", "custom-call"):
            continue
        name, shape, opcode = instruction.groups()
        called = _CALLS.search(line)
        body = bodies.get(called.group(1), []) if called else []
        target = re.search(r'custom_call_target="([^"]+)"', line)
        ops[name.replace(".", "_")] = {
            "shape": shape[:120],
            "ops": sorted(set(body) - {"parameter"}) if body else [],
            "custom_call": target.group(1) if target else None,
            "kind": (re.search(r"kind=(\w+)", line) or [None, None])[1] if opcode == "fusion" else None,
        }
    return ops


PROGRAM_KINDS = ("vision", "prefill", "decode")

# Kernel names of the libraries XLA calls for a dot (cuBLAS's nvjet / cutlass / sm80-sm90 kernels, XLA's
# own Triton GEMM fusions) and for attention (cuDNN).
_GEMM_PREFIXES = ("nvjet", "cutlass", "sm80", "sm90", "ampere", "gemm_fusion", "triton_gemm")
_LAYOUT_OPS = {"slice", "bitcast", "copy", "transpose"}


def kernel_kind(kernel: dict) -> str:
    """What a listed kernel does, from its name and the opcodes XLA fused into it: gemm, attention,
    norm (an rsqrt: RMSNorm / LayerNorm), activation (an exp: SiLU, GELU), layout (slices, copies and
    transposes only), memory (memsets and memcpys) or other (adds, selects, RoPE, ...)."""
    name, ops = kernel["name"], set(kernel.get("ops") or ())
    if name.startswith(_GEMM_PREFIXES) or "dot" in ops:
        return "gemm"
    if name.startswith("cudnn"):
        return "attention"
    if "rsqrt" in ops:
        return "norm"
    if "exponential" in ops:
        return "activation"
    if ops and ops <= _LAYOUT_OPS:
        return "layout"
    if name.lower().startswith(("memset", "memcpy")):
        return "memory"
    return "other"


def busy_by_kind(kernels: list[dict]) -> dict[str, dict]:
    """kind -> {"kernels": count, "busy_us": their summed time}, heaviest kind first."""
    kinds: dict[str, dict] = {}
    for kernel in kernels:
        entry = kinds.setdefault(kernel_kind(kernel), {"kernels": 0, "busy_us": 0.0})
        entry["kernels"] += 1
        entry["busy_us"] += kernel["us"]
    return dict(sorted(kinds.items(), key=lambda item: -item[1]["busy_us"]))


def _programs(settings: LayerKernelsConfig):
    """(name, jitted fn, args) for the vision tower, the LLM prefill and the decoding steps after it,
    unpruned and pruned."""
    unknown = set(settings.programs) - set(PROGRAM_KINDS)
    if unknown:
        raise ValueError(f"unknown --programs {sorted(unknown)}; valid: {', '.join(PROGRAM_KINDS)}")
    if settings.decode_steps > settings.extra_slots:
        raise ValueError(
            f"--decode_steps={settings.decode_steps} needs as many cache slots past the prompt, "
            f"--extra_slots={settings.extra_slots}"
        )
    hf_config = llava_config(settings.model)
    hf_config.text_config.num_hidden_layers = settings.layers
    vision = hf_config.vision_config
    vision.num_hidden_layers = min(settings.layers, vision.num_hidden_layers)  # full depth at most
    model = random_model(hf_config, dtype="bfloat16")
    graphdef, state = nnx.split(model)
    # The weights travel as a flat tuple of arrays, as the runner passes them (an nnx.State costs the
    # host ~1 ms more per call to flatten).
    weights, treedef = jax.tree.flatten(state)

    def merged(weights):
        return nnx.merge(graphdef, jax.tree.unflatten(treedef, weights))

    rng = np.random.default_rng(0)
    size = hf_config.vision_config.image_size
    pixels = jnp.asarray(rng.standard_normal((settings.batch, 3, size, size)), jnp.bfloat16)
    num_image = model.config.num_image_tokens
    length = num_image + settings.text_tokens
    ids = rng.integers(4, 1000, (settings.batch, length)).astype(np.int32)
    ids[:, 1 : 1 + num_image] = hf_config.image_token_index
    ids = jnp.asarray(ids)

    @jax.jit
    def vision(weights, pixels):
        return merged(weights).image_features(pixels)

    wanted = set(settings.programs or PROGRAM_KINDS)
    programs = [("vision", vision, (weights, pixels))] if "vision" in wanted else []
    if not wanted & {"prefill", "decode"}:
        return programs  # the prompt is embedded (another compile of the tower) only for the LLM's programs
    x, image_slots = jax.jit(lambda w, i, p: merged(w).embed_prompt(i, vision(w, p)))(weights, ids, pixels)
    positions = jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32), (settings.batch, length))
    last_index = jnp.full((settings.batch,), length - 1, jnp.int32)

    def prefill(pruning):
        @jax.jit
        def step(weights, x):
            m = merged(weights)
            out = m.language_model.prefill(
                x,
                positions,
                last_index,
                m.image_tokens(image_slots),
                extra_slots=settings.extra_slots,
                pruning=pruning,
            )
            return out.logits, out.caches

        return step

    @jax.jit
    def decode(weights, first_logits, caches):
        """``decode_steps`` greedy steps in a while loop, as the runner's decode loop runs them. The
        caches are not donated (every call starts from the prefill's), so the loop begins with one copy of
        them: a memcpy per cache array before the first step."""
        language_model = merged(weights).language_model
        next_positions = positions[:, -1] + 1

        def step(index, carry):
            tokens, caches = carry
            logits, caches = language_model.decode(tokens[:, index], next_positions + index, caches)
            return tokens.at[:, index + 1].set(jnp.argmax(logits, axis=-1).astype(jnp.int32)), caches

        tokens = jnp.zeros((settings.batch, settings.decode_steps + 1), jnp.int32)
        tokens = tokens.at[:, 0].set(jnp.argmax(first_logits, axis=-1).astype(jnp.int32))
        return jax.lax.fori_loop(0, settings.decode_steps, step, (tokens, caches))[0]

    pruned = prune.AdaptPruneConfig(keep=settings.keep, layer=settings.layer)
    for name, pruning in (("unpruned", None), (f"adaptprune{settings.keep}", pruned)):
        prefill_program = prefill(pruning)
        if "prefill" in wanted:
            programs.append((f"llm_prefill_{name}", prefill_program, (weights, x)))
        if settings.decode_steps and "decode" in wanted:
            first_logits, caches = prefill_program(weights, x)
            programs.append(
                (f"llm_decode{settings.decode_steps}_{name}", decode, (weights, first_logits, caches))
            )
    return programs


# Calls issued back to back by host_times (each keeps its outputs until the wait).
BACK_TO_BACK_CALLS = 4


def host_times(fn, args, repeats: int) -> dict:
    """Host time until a call returns (dispatch: arguments, buffers, kernel or graph launches), and the
    time per call of up to BACK_TO_BACK_CALLS calls issued back to back with one wait at the end, where each call's
    host work overlaps the previous one's kernels: a wall time above that is per-call host latency."""
    if repeats < 1:
        raise ValueError(f"--wall_repeats must be at least 1, got {repeats}")
    dispatch = []
    for _ in range(repeats):
        start = time.perf_counter()
        out = fn(*args)
        dispatch.append((time.perf_counter() - start) * 1e3)
        jax.block_until_ready(out)
    calls = min(repeats, BACK_TO_BACK_CALLS)  # their outputs (caches included) stay alive together
    return {
        "dispatch_ms_median": median(dispatch),
        "pipelined_ms_per_call": back_to_back(lambda: fn(*args), calls, jax.block_until_ready),
        "pipelined_calls": calls,
    }


def parse_option_sets(entries) -> dict[str, dict]:
    """TAG[:OPTION=VALUE[;OPTION=VALUE...]] entries -> {tag: options}, in order; ``{"": {}}`` for none."""
    sets: dict[str, dict] = {}
    for entry in entries:
        tag, _, spec = entry.partition(":")
        if not tag or "/" in tag:
            raise ValueError(
                f"bad --option_sets entry {entry!r}: expected TAG[:OPTION=VALUE[;...]], a TAG without '/'"
            )
        if tag in sets:
            raise ValueError(f"--option_sets names {tag!r} twice")
        sets[tag] = parse_compiler_options(
            [item for item in spec.split(";") if item], f"--option_sets ({tag})"
        )
    return sets or {"": {}}


def run(settings: LayerKernelsConfig) -> dict:
    os.makedirs(settings.output_dir, exist_ok=True)
    results = {
        "model": settings.model,
        "layers": settings.layers,
        "layer": settings.layer,
        "keep": settings.keep,
        "batch": settings.batch,
        "extra_slots": settings.extra_slots,
        "device": jax.devices()[0].device_kind,
        "jax": jax.__version__,
        "date": time.strftime("%Y-%m-%d"),
        "programs": {},
    }
    base_options = parse_compiler_options(settings.compiler_options, "--compiler_options")
    option_sets = parse_option_sets(settings.option_sets)
    results["compiler_options"] = base_options
    if settings.option_sets:
        results["option_sets"] = option_sets
    listings = [
        (f"{tag}/{program}" if tag else program, jitted, args, {**base_options, **extra})
        for program, jitted, args in _programs(settings)
        for tag, extra in option_sets.items()
    ]
    for name, jitted, args, options in listings:
        try:
            compiled = jitted.lower(*args).compile(compiler_options=options or None)
        except Exception as error:  # noqa: BLE001 (a set the compiler refuses is that set's result)
            if not settings.option_sets:
                raise
            results["programs"][name] = {"error": f"{type(error).__name__}: {str(error)[:500]}"}
            print(f"{name}: not compiled: {results['programs'][name]['error']}", flush=True)
            continue
        hlo = compiled.as_text()
        fn = compiled
        hlo_path = os.path.join(settings.output_dir, f"{name}.hlo.txt.gz")  # TAG/NAME: in TAG's folder
        os.makedirs(os.path.dirname(hlo_path), exist_ok=True)
        with gzip.open(hlo_path, "wt") as handle:
            handle.write(hlo)
        jax.block_until_ready(fn(*args))
        wall_ms = median(
            timed(lambda fn=fn, args=args: fn(*args), settings.wall_repeats, jax.block_until_ready)
        )
        host_ms = host_times(fn, args, settings.wall_repeats)
        trace_dir = os.path.join(settings.output_dir, "traces", name)
        profiling.profile_call(lambda fn=fn, args=args: fn(*args), trace_dir, calls=settings.calls)
        events = profiling.load_events(profiling.find_trace(trace_dir))
        sequence = profiling.kernel_sequence(events, calls=settings.calls)
        host_summary = profiling.summarize_events(events, calls=settings.calls, top=25, prefixes=("/host:",))
        ops = fused_ops(hlo)
        kernels = [dict(kernel, **ops.get(kernel["name"], {})) for kernel in sequence]
        results["programs"][name] = {
            "kernels": len(kernels),
            "busy_us": sum(k["us"] for k in kernels),
            "span_us": (kernels[-1]["end_us"] - kernels[0]["start_us"]) if kernels else 0.0,
            "wall_ms_median": wall_ms,
            **host_ms,
            "host_threads": host_summary["device_threads"],
            "by_kind": busy_by_kind(kernels),
            "sequence": kernels,
        }
        summary = results["programs"][name]
        for thread in host_summary["device_threads"]:
            if thread["sum_ms_per_call"] > 0.2:
                heaviest = "; ".join(f"{t['name'][:60]} {t['ms_per_call']:.3f}" for t in thread["top"][:12])
                print(f"  host {thread['thread']}: span {thread['span_ms_per_call']:.3f} ms: {heaviest}")
        print(
            f"{name}: {len(kernels)} kernels, busy {summary['busy_us'] / 1e3:.3f} ms, span "
            f"{summary['span_us'] / 1e3:.3f} ms, wall {wall_ms:.3f} ms, dispatch "
            f"{host_ms['dispatch_ms_median']:.3f} ms, back to back {host_ms['pipelined_ms_per_call']:.3f} ms per call",
            flush=True,
        )
        kinds = ", ".join(
            f"{kind} {entry['kernels']}x {entry['busy_us'] / 1e3:.2f}"
            for kind, entry in summary["by_kind"].items()
        )
        print(f"  busy ms by kind: {kinds}", flush=True)
    with open(os.path.join(settings.output_dir, "kernels.json"), "w") as handle:
        json.dump(results, handle, indent=1)
    return results


def main(argv):
    del argv
    run(from_flags(LayerKernelsConfig))


if __name__ == "__main__":
    define_flags(LayerKernelsConfig)
    app.run(main)
