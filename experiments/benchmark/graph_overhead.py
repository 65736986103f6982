"""How much of a prefill call is host work on its CUDA graph, and what removes it: a LLaMA stack in
plain JAX (`models.layers`' norm, RoPE and cache padding; no modules) at the 7B widths by default,
its layers unrolled (one graph node per kernel, as `models/` runs them) or as one `lax.scan` over
stacked weights (one loop node), each called with the previous call's
outputs alive (new buffer addresses every call: XLA re-records the graph) and with them freed first
(the same addresses: the recorded graph is launched as is).

    python -m experiments.benchmark.graph_overhead --layers=32 --tokens=640 --output_dir=DIR

Why: at batch 1 the 7B prefill's kernels are busy ~13.5 ms of a ~15.9 ms call; the rest is the host
updating and launching a graph of ~1,300 nodes. This separates the two causes (node count, address
changes) on the same shapes before either is built into the models.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app

from experiments.benchmark.configs import parse_compiler_options
from experiments.benchmark.timing import back_to_back, median, run_stamp
from experiments.flag_config import define_flags, from_flags, setting
from models.layers import apply_rope, rms_normalize, with_empty_slots


@dataclasses.dataclass(frozen=True)
class GraphOverheadConfig:
    hidden: int = setting(4096, "Hidden width.")
    heads: int = setting(32, "Attention heads (as many KV heads).")
    intermediate: int = setting(11008, "MLP width.")
    layers: int = setting(32, "Decoder layers.")
    tokens: int = setting(640, "Prompt length.")
    batch: int = setting(1, "Batch size.")
    extra_slots: int = setting(32, "Cache slots past the prompt.")
    repeats: int = setting(30, "Timed calls per variant (median).")
    scan_options: str = setting(
        "", "More scanned programs, one per ';'-separated item: XLA options OPTION=VALUE joined by '+'."
    )
    output_dir: str = setting("runs/graph_overhead", "Where results.json goes.")


def _layer(cfg: GraphOverheadConfig, x, weights, positions):
    batch, length, hidden = x.shape
    head_dim = hidden // cfg.heads
    h = rms_normalize(x, weights["ln1"], 1e-5)
    q, k, v = jnp.split(h @ weights["qkv"], 3, axis=-1)
    shape = (batch, length, cfg.heads, head_dim)
    q, k, v = (
        apply_rope(q.reshape(shape), positions, 1e4),
        apply_rope(k.reshape(shape), positions, 1e4),
        v.reshape(shape),
    )
    out = jax.nn.dot_product_attention(
        q, k, v, is_causal=True, implementation="cudnn" if jax.default_backend() == "gpu" else None
    )
    x = x + out.reshape(batch, length, hidden) @ weights["o"]
    gate, up = jnp.split(rms_normalize(x, weights["ln2"], 1e-5) @ weights["gate_up"], 2, axis=-1)
    x = x + (jax.nn.silu(gate) * up) @ weights["down"]
    return x, (with_empty_slots(k, cfg.extra_slots), with_empty_slots(v, cfg.extra_slots))


def _stacked_weights(cfg: GraphOverheadConfig, key):
    shapes = {
        "ln1": (cfg.hidden,),
        "qkv": (cfg.hidden, 3 * cfg.hidden),
        "o": (cfg.hidden, cfg.hidden),
        "ln2": (cfg.hidden,),
        "gate_up": (cfg.hidden, 2 * cfg.intermediate),
        "down": (cfg.intermediate, cfg.hidden),
    }
    weights = {}
    for index, (name, shape) in enumerate(shapes.items()):
        draw = jax.jit(
            lambda k, shape=shape: (jax.random.normal(k, (cfg.layers, *shape), jnp.float32) * 0.02).astype(
                jnp.bfloat16
            )
        )
        weights[name] = draw(jax.random.fold_in(key, index))
    return weights


def measure(cfg: GraphOverheadConfig, hlo_dir: str | None = None) -> dict:
    """Per program (unrolled, scanned, scanned with each option set): compile time, temp memory,
    while loops and dynamic slices in its HLO, the largest output difference to the unrolled
    program, and median milliseconds per call with the previous outputs alive and freed."""
    stacked = _stacked_weights(cfg, jax.random.key(0))
    per_layer = [jax.tree.map(lambda w, i=i: w[i], stacked) for i in range(cfg.layers)]
    jax.block_until_ready(per_layer)
    x = (jax.random.normal(jax.random.key(1), (cfg.batch, cfg.tokens, cfg.hidden)) * 0.1).astype(jnp.bfloat16)
    positions = jnp.broadcast_to(jnp.arange(cfg.tokens, dtype=jnp.int32), (cfg.batch, cfg.tokens))

    def unrolled(layers, x, positions):
        caches = []
        for weights in layers:
            x, cache = _layer(cfg, x, weights, positions)
            caches.append(cache)
        return x[:, -1], caches

    def scanned(stack, x, positions):
        x, caches = jax.lax.scan(lambda x, weights: _layer(cfg, x, weights, positions), x, stack)
        return x[:, -1], caches

    variants = [("unrolled", unrolled, per_layer, {}), ("scanned", scanned, stacked, {})]
    for index, item in enumerate(filter(None, cfg.scan_options.split(";"))):
        options = parse_compiler_options(item.split("+"), "--scan_options")
        variants.append((f"scanned_{index}", scanned, stacked, options))
    programs = {}
    for name, fn, weights, compile_options in variants:
        start = time.perf_counter()
        try:
            compiled = (
                jax.jit(fn).lower(weights, x, positions).compile(compiler_options=compile_options or None)
            )
        except Exception as error:  # a compiler option this XLA refuses: record it, go on
            programs[name] = {"options": compile_options, "error": f"{type(error).__name__}: {error}"[:400]}
            continue
        memory = compiled.memory_analysis()
        text = compiled.as_text()
        programs[name] = {
            "options": compile_options,
            "compile_s": time.perf_counter() - start,
            "temp_mib": getattr(memory, "temp_size_in_bytes", 0) / 2**20,
            "hlo_while": text.count(" while("),
            "hlo_dynamic_slice": text.count("dynamic-slice"),
            "call": (compiled, weights),
        }
        if hlo_dir is not None:
            with open(os.path.join(hlo_dir, f"{name}.hlo.txt"), "w") as f:
                f.write(text)

    results = {
        "config": dataclasses.asdict(cfg),
        "device": jax.devices()[0].device_kind,
        **run_stamp(__name__),
        "programs": programs,
    }
    reference = None
    for entry in programs.values():
        if "call" not in entry:
            continue
        compiled, weights = entry.pop("call")
        call = functools.partial(compiled, weights, x, positions)
        out = call()
        jax.block_until_ready(out)
        if reference is None:
            reference = np.asarray(out[0], np.float32)
        entry["max_abs_diff_vs_unrolled"] = float(np.max(np.abs(np.asarray(out[0], np.float32) - reference)))
        alive = []  # the previous call's outputs stay alive: new addresses each call
        for _ in range(cfg.repeats):
            start = time.perf_counter()
            new = call()
            jax.block_until_ready(new)
            alive.append((time.perf_counter() - start) * 1e3)
            out = new
        del out, new
        freed = []  # outputs freed before the next call: the same addresses each call
        for _ in range(cfg.repeats):
            start = time.perf_counter()
            jax.block_until_ready(call())
            freed.append((time.perf_counter() - start) * 1e3)
        entry["outputs_alive_ms"] = median(alive)
        entry["outputs_freed_ms"] = median(freed)
        entry["back_to_back_ms"] = back_to_back(call, 3, jax.block_until_ready)
    return results


def main(_):
    cfg = from_flags(GraphOverheadConfig)
    os.makedirs(cfg.output_dir, exist_ok=True)
    results = measure(cfg, hlo_dir=cfg.output_dir)
    with open(os.path.join(cfg.output_dir, "results.json"), "w") as f:
        json.dump(results, f, indent=1)
    print(
        f"{'program':16s} {'alive ms':>9s} {'freed ms':>9s} {'b2b ms':>8s} {'temp MiB':>9s} {'compile s':>9s}"
    )
    for name, entry in results["programs"].items():
        if "error" in entry:
            print(f"{name:16s} {entry['error']}")
            continue
        print(
            f"{name:16s} {entry['outputs_alive_ms']:9.3f} {entry['outputs_freed_ms']:9.3f} "
            f"{entry['back_to_back_ms']:8.3f} {entry['temp_mib']:9.1f} {entry['compile_s']:9.1f} "
            f"while={entry['hlo_while']} dyn={entry['hlo_dynamic_slice']} diff={entry['max_abs_diff_vs_unrolled']:.3g}"
        )


if __name__ == "__main__":
    define_flags(GraphOverheadConfig)
    app.run(main)
