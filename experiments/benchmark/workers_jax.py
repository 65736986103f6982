"""The JAX worker: compiles every stage of one configuration, then probes or times it; on one device,
or on a mesh (`models.sharding`), its model laid out and split as every runner on a mesh has it."""

from __future__ import annotations

import math
import os
import time

from experiments.benchmark.configs import mesh_job_suffix
from experiments.benchmark.floors import stage_work
from experiments.benchmark.timing import back_to_back, median, timed
from experiments.benchmark.workers import (
    benchmark_image,
    configure_jax,
    llava_hf_config,
    memory_stats,
    method_settings,
    random_pixels,
    random_prompts,
)

# Back-to-back prefills keep their outputs alive until the wait: at most this many bytes of caches.
PIPELINED_CACHE_BYTES = 8 * 2**30

# Text segments of max_position_embeddings tokens a question takes (JointEmbeddings): the benchmark's
# short questions fit one, as the released evaluation's do.
TEXT_SEGMENTS = 1


def _compiled_memory(compiled) -> dict | None:
    """XLA's byte counts of a compiled stage (its temporaries are what a batch adds beside the cache)."""
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
    jax = configure_jax(spec)
    import functools
    import warnings

    import jax.numpy as jnp
    from flax import nnx

    import adaptprune_jax as prune
    from models import sharding
    from models.checkpoint import load_checkpoint
    from models.config import from_hf_config, with_attention
    from models.generate import LlavaRunner, SamplingConfig
    from models.llava import LlavaForConditionalGeneration
    from models.presets import random_state

    warnings.filterwarnings("ignore", message="Some donated buffers were not usable")
    mode, method, batch, new_tokens = spec["mode"], spec["method"], spec["batch"], spec["new_tokens"]
    if new_tokens < 2 or spec["text_tokens"] < 2:
        raise ValueError("need --new_tokens >= 2 (one decode step) and --text_tokens >= 2")
    hf_config = llava_hf_config(spec["model"])
    dtype = jnp.dtype(spec["dtype"])
    cfg = with_attention(from_hf_config(hf_config), spec.get("attention", "auto"), dtype)
    abstract_model = nnx.eval_shape(lambda: LlavaForConditionalGeneration(cfg, dtype=dtype, rngs=nnx.Rngs(0)))
    prune.methods.import_plugins(spec.get("method_modules", ()))
    reads_clip = method != "none" and prune.methods.get(method).needs_text_tower
    if reads_clip:  # the text tower of the CLIP the preset's vision tower comes from, random too
        from models.clip_text import JointSpace, JointSpaceConfig
        from models.presets import clip_config

        joint = JointSpaceConfig.from_hf(clip_config(hf_config))
        abstract_model.joint_space = nnx.eval_shape(lambda: JointSpace(joint, dtype=dtype, rngs=nnx.Rngs(0)))
    random_init = spec["random_weights"] or not os.path.isdir(spec["model"])
    mesh = sharding.make_mesh(spec["mesh"]) if spec.get("mesh") else None
    weights_s = None
    if mesh is None:
        runner = LlavaRunner(abstract_model)
        abstract_weights = runner.weights
    else:  # the weights first: their shardings are what the stages compile for
        if batch % sharding.axis_size(mesh, sharding.DATA):
            raise ValueError(
                f"batch {batch} does not split over the data axis of mesh {spec['mesh']}: give a multiple of it"
            )
        start = time.perf_counter()
        runner = runner_on_mesh(abstract_model, spec, cfg, mesh, random_init)
        jax.block_until_ready(runner.weights)
        weights_s = round(time.perf_counter() - start, 3)
        # From here on this process's one job runs on the mesh (the runner's `on_mesh`, for good); not
        # before: under a mesh new arrays are made on every device, and the model is built on one.
        jax.set_mesh(mesh)
        abstract_weights = tuple(
            jax.ShapeDtypeStruct(w.shape, w.dtype, sharding=w.sharding) for w in runner.weights
        )
    abstract_state = runner.state
    image = benchmark_image(cfg, spec.get("image_size", ""))
    n_img = image.num_tokens
    prompt_tokens = n_img + spec["text_tokens"]
    packed = None  # LLaVA-NeXT: every row's gather index into the crop features, and its layout
    if cfg.anyres:
        from models.anyres import pack_images

        packed = pack_images([image.size] * batch, cfg, image.crops, n_img)
    if method == "none":
        pruning = None
    else:
        pruning = prune.make_config(
            method,
            strict=False,
            keep=spec["keep"],
            layer=spec["layer"],
            **method_settings(spec, method),
        )
    keep = runner.resolve_keep(pruning, None if packed is None else packed.layout)
    stages = () if pruning is None else pruning.stages(n_img, cfg.text.num_layers)
    fixed = None
    # One stage only: a multi-stage schedule has no single fixed-index counterpart to subtract.
    if pruning is not None and len(stages) == 1 and spec["selection_overhead"] and mode != "probe":
        # The same layer and keep with constant indices: no cue, no selection, so prefill minus this is
        # what selecting costs.
        indices = tuple(i * n_img // keep for i in range(keep))
        fixed = prune.FixedIndicesConfig(keep=keep, layer=stages[0].layer, indices=indices)
    sampling = SamplingConfig(
        max_new_tokens=new_tokens,
        eos_token_id=None,
        pad_token_id=int(hf_config.text_config.pad_token_id or 0),
    )

    def vision(weights, pixels, query_ids, query_mask, image_index):
        """The image features (a merging method's tokens in place) and the vision cues it asked for
        (with the questions through CLIP's text tower, for a method that reads it); LLaVA-NeXT: every
        crop through the tower, packed by ``image_index``."""
        inputs = runner.merge(weights).image_inputs(pixels, pruning, query_ids, query_mask, image_index)
        return inputs.features, inputs.vision

    def embed(weights, ids, features):
        x, image_slots = runner.merge(weights).embed_prompt(ids, features[0])
        positions = jnp.broadcast_to(jnp.arange(ids.shape[1], dtype=jnp.int32), ids.shape)
        return x, positions, jnp.full((ids.shape[0],), ids.shape[1] - 1, jnp.int32), image_slots, features[1]

    def prefill(weights, x, positions, last_index, image_slots, vision_cues, rng, layout, *, pruning):
        model = runner.merge(weights)
        result = model.language_model.prefill(
            x,
            positions,
            last_index,
            model.image_tokens(image_slots, layout),
            extra_slots=new_tokens,
            pruning=pruning,
            rng=rng,
            vision=vision_cues,
        )
        return result._replace(caches=runner.constrain_caches(result.caches))  # as the runner's prefill

    # --- compile every stage from abstract shapes (a cache load when the pre-compile phase ran) ----
    compiled, compile_s, memory = {}, {}, {}
    stage_options = spec.get("stage_compiler_options") or {}

    def build(name, fn, *args, **static):
        """Compile one stage; the shapes of its outputs (on a mesh with the shardings XLA chose, which
        the next stage compiles for)."""
        start = time.perf_counter()
        lowered = fn.lower(*args, **static)
        compiled[name] = lowered.compile(compiler_options=stage_options.get(name) or None)
        compile_s[name] = round(time.perf_counter() - start, 3)
        memory[name] = _compiled_memory(compiled[name])
        if mesh is None:
            return lowered.out_info
        return jax.tree.map(lambda x: sds(x.shape, x.dtype, sharding=x.sharding), compiled[name].out_info)

    def sds(shape, dtype, sharding=None):
        return jax.ShapeDtypeStruct(shape, dtype, sharding=sharding)

    def batch_sds(shape, dtype):
        """An input's shape; on a mesh, its rows over the data axis (as `runner.put` places it)."""
        return sds(shape, dtype, None if mesh is None else sharding.batch_sharding(mesh, len(shape)))

    key = jax.eval_shape(lambda: jax.random.key(0))
    ids_shape = (batch, prompt_tokens)
    pixel_shape = (batch, *(() if packed is None else (image.crops,)), 3, *(cfg.vision.image_size,) * 2)
    if random_init and mesh is None:
        start = time.perf_counter()
        random_state(abstract_state, spec["seed"], compile_only=True)
        compile_s["init"] = round(time.perf_counter() - start, 3)
    query_shapes = (None, None)
    if reads_clip:
        segment = (batch, TEXT_SEGMENTS, runner.segment_length)
        query_shapes = (batch_sds(segment, jnp.int32), batch_sds(segment, jnp.int32))
    # LLaVA-NeXT's packing (index and layout) are arguments, as the runner passes them, not constants.
    index_shape, layout_shape = None, None
    if packed is not None:
        index_shape = batch_sds(packed.index.shape, jnp.int32)
        layout_shape = jax.tree.map(lambda x: batch_sds(x.shape, x.dtype), packed.layout)
    features = build(
        "vision",
        jax.jit(vision),
        abstract_weights,
        batch_sds(pixel_shape, jnp.float32),
        *query_shapes,
        index_shape,
    )
    embedded = build("embed", jax.jit(embed), abstract_weights, batch_sds(ids_shape, jnp.int32), features)
    result = build(
        "prefill",
        jax.jit(functools.partial(prefill, pruning=pruning)),
        abstract_weights,
        *embedded,
        key,
        layout_shape,
    )
    build("first_token", jax.jit(lambda logits: jnp.argmax(logits, -1)), result.logits)
    build(
        "generate",
        runner.decode_loop,
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
            jax.jit(functools.partial(prefill, pruning=fixed)),
            abstract_weights,
            *embedded,
            key,
            layout_shape,
        )
    # The first token as the runner computes it for experiments.eval: one program for the vision tower,
    # the embedding and the LLM prefill (the stages above are separate programs, each launched apart),
    # then its own argmax (on a mesh its logits may be laid out apart from the stage prefill's). Not for
    # the largest-batch search's jobs, which time nothing.
    times_runner = spec.get("runner_first_token", False) and mode != "probe" and spec["repeats"] > 0
    if times_runner:
        runner_result = build(
            "runner_prefill",
            runner.prefill_program,
            abstract_weights,
            batch_sds(ids_shape, jnp.int32),
            batch_sds((batch,), jnp.int32),
            batch_sds(pixel_shape, jnp.float32),
            key,
            *query_shapes,
            index_shape,
            layout_shape,
            extra_slots=new_tokens,
            pruning=pruning,
            all_logits=False,
        )
        build("runner_first_token", jax.jit(lambda logits: jnp.argmax(logits, -1)), runner_result.logits)
    cues = None
    # The select stage alone runs on one device: it is left out on a mesh.
    if pruning is not None and mode != "probe" and mesh is None:
        cues = abstract_cues(
            pruning, cfg, batch=batch, length=prompt_tokens, dtype=dtype, rng=key, num_image_tokens=n_img
        )
        layout = cfg.image_layout().broadcast((batch,)) if packed is None else packed.layout
        if pruning.merges_in_llm:  # its first stage's selection and merge
            select = jax.jit(lambda c: pruning.select_and_merge(c.replace(layout=layout), stages[0].keep))
        else:
            select = jax.jit(lambda c: pruning.select(c.replace(layout=layout), keep))
        build("select", select, cues)
    from models.layers import attention_logits_budget

    out = {
        "status": "ok",
        "compile_s": compile_s,
        "compiled_memory": memory,
        "keep": keep,
        "stage_compiler_options": stage_options,
        "attention": cfg.text.attention,  # as resolved: the vision tower's and the LLM prefill's
        "attention_logits_budget_bytes": attention_logits_budget(),
        "layer": None if pruning is None else pruning.layer,
        "method_settings": method_settings(spec, method),
        "prompt_tokens": prompt_tokens,
        "image_tokens": n_img,
        "image_size": "x".join(map(str, image.size)),
        "crops": image.crops,
        "anyres": cfg.anyres,
        "work": stage_work(
            cfg,
            abstract_state,
            batch=batch,
            prompt_tokens=prompt_tokens,
            stages=stages,
            new_tokens=new_tokens,
            itemsize=dtype.itemsize,
            image_tokens=n_img,
            crops=image.crops,
        ),
    }
    out["work"]["kv_cache_bytes_allocated"] = sum(
        math.prod(x.shape) * x.dtype.itemsize for x in jax.tree_util.tree_leaves(result.caches)
    )
    if mode == "compile":
        return out

    # --- weights, inputs, one generation (its peak is the configuration's memory) ------------------
    sync = jax.block_until_ready
    if mesh is None:
        start = time.perf_counter()
        if random_init:
            weights = runner.flatten_weights(random_state(abstract_state, spec["seed"]))
        else:
            weights = runner.flatten_weights(
                nnx.split(load_checkpoint(spec["model"], spec["dtype"], attention=cfg.text.attention)[1])[1]
            )
        sync(weights)
        weights_s = round(time.perf_counter() - start, 3)
    else:
        weights = runner.weights
    out["weights_s"] = weights_s
    out["weights_bytes"] = sum(x.nbytes for x in jax.tree_util.tree_leaves(weights))
    out["weights_bytes_per_device"] = sum(sharding.local_bytes(x) for x in jax.tree_util.tree_leaves(weights))
    out["mesh"] = "" if mesh is None else sharding.describe_mesh(mesh)
    out["devices"] = 1 if mesh is None else mesh.size
    ids, _ = random_prompts(
        batch, spec["text_tokens"], n_img, cfg.text.vocab_size, cfg.image_token_index, spec["seed"]
    )
    ids = runner.put(ids)
    pixels = runner.put(random_pixels(batch, cfg.vision.image_size, spec["seed"], image.crops))
    image_index, layout = (None, None) if packed is None else (runner.put(packed.index), packed.layout)
    if layout is not None:
        layout = jax.tree.map(runner.put, layout)
    queries = (None, None)
    if reads_clip:
        queries = tuple(
            map(runner.put, random_queries(batch, spec["text_tokens"], runner.segment_length, spec["seed"]))
        )
    rng = jax.random.key(spec["seed"] + 2)
    run = compiled

    def vision_stage():
        return run["vision"](weights, pixels, *queries, image_index)

    def first_token():
        embedded = run["embed"](weights, ids, vision_stage())
        result = run["prefill"](weights, *embedded, rng, layout)
        return run["first_token"](result.logits), result

    lengths = runner.put(jnp.full((batch,), prompt_tokens, jnp.int32))

    def runner_first_token():
        result = run["runner_prefill"](weights, ids, lengths, pixels, rng, *queries, image_index, layout)
        return run["runner_first_token"](result.logits)

    def generation():
        _, result = first_token()
        return run["generate"](weights, result.logits, result.caches, result.next_positions, rng)

    start = time.perf_counter()
    generated, _, _ = sync(generation())
    out["first_run_s"] = round(time.perf_counter() - start, 3)
    stats = memory_stats()
    out["peak_bytes"] = stats.get("peak_bytes_in_use")
    out["bytes_limit"] = stats.get("bytes_limit")
    if mesh is not None:  # the first device also held the whole model while it was laid out and split
        out["peak_bytes_first_device"], out["peak_bytes"] = out["peak_bytes"], None
    if mode == "probe":
        out["fits"] = True
        return out
    out.update(greedy_outputs(first_token(), generated))

    # --- timings ---------------------------------------------------------------------------------
    reps, e2e_reps = spec["repeats"], spec["e2e_repeats"]
    samples = {"vision_ms": timed(vision_stage, reps, sync)}
    embedded = sync(run["embed"](weights, ids, vision_stage()))
    prefills = {"llm_prefill_ms": "prefill", "fixed_prefill_ms": "prefill_fixed"}
    prefills = {k: v for k, v in prefills.items() if v in run}
    for name, stage in prefills.items():  # warm-up, then interleave so drift hits both alike
        sync(run[stage](weights, *embedded, rng, layout))
        samples[name] = []
    for _ in range(reps):
        for name, stage in prefills.items():
            samples[name].append(_one(lambda stage=stage: run[stage](weights, *embedded, rng, layout), sync))
    if fixed is not None:
        samples["selection_overhead_ms"] = [
            a - b for a, b in zip(samples["llm_prefill_ms"], samples["fixed_prefill_ms"])
        ]
    if cues is not None:

        def random_like(s):  # random floats; integer cues (slots, positions) and masks in range
            if not hasattr(s, "shape") or jax.dtypes.issubdtype(s.dtype, jax.dtypes.prng_key):
                return s
            if jnp.issubdtype(s.dtype, jnp.floating):
                return jax.random.uniform(jax.random.key(7), s.shape, s.dtype)
            if s.dtype == jnp.bool_:
                return jnp.ones(s.shape, bool)
            return jnp.zeros(s.shape, s.dtype)

        real_cues = jax.tree_util.tree_map(random_like, cues)
        real_cues = real_cues.replace(rng=rng)
        samples["select_only_ms"] = timed(lambda: run["select"](real_cues), reps, sync)
    samples["ttft_ms"] = timed(first_token, reps, sync)
    if times_runner:
        samples["ttft_runner_ms"] = timed(runner_first_token, reps, sync)
    decode = []
    for _ in range(e2e_reps + 1):
        result = sync(run["prefill"](weights, *embedded, rng, layout))
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
    out["peak_bytes_all_stages"] = None if mesh is not None else memory_stats().get("peak_bytes_in_use")
    # Prefills issued back to back, one wait at the end: each call's host work (arguments, the launch
    # of its command buffer) overlaps the previous call's kernels, so this is the device's time per
    # prefill; the gap to llm_prefill_ms is what a single call waits on the host. After the peak is
    # read: the calls' caches stay alive together (at most PIPELINED_CACHE_BYTES); fewer than two
    # calls would time nothing new, and running out of memory here costs this number only.
    calls = min(4, int(PIPELINED_CACHE_BYTES // max(out["work"]["kv_cache_bytes_allocated"], 1)))
    out["pipelined_calls"] = calls
    if calls >= 2:
        try:
            samples["llm_prefill_pipelined_ms"] = [
                back_to_back(lambda: run["prefill"](weights, *embedded, rng, layout), calls, sync)
                for _ in range(3)
            ]
        except Exception as error:  # noqa: BLE001 (only out of memory is this measurement's own result)
            if "RESOURCE_EXHAUSTED" not in str(error):
                raise
            out["pipelined_error"] = f"{type(error).__name__}: {str(error)[:300]}"
    out["samples"] = {k: [round(v, 4) for v in s] for k, s in samples.items()}
    out.update({k: median(s) for k, s in samples.items()})
    if spec.get("profile_dir"):  # after the timings and the peak: the profiler's buffers cost memory
        from experiments.benchmark import profiling

        where = os.path.join(
            spec["profile_dir"], f"{method}-k{keep}-b{batch}{mesh_job_suffix(spec.get('mesh', ''))}"
        )
        # The decode loop updates its caches in place (donated): its one profiled call takes this
        # fresh prefill's, made before the trace so the prefill's kernels stay out of the profile.
        result = sync(run["prefill"](weights, *embedded, rng, layout))
        stages = {
            "vision": lambda: profiling.profile_call(
                vision_stage, os.path.join(where, "vision"), calls=3, sync=sync
            ),
            "llm_prefill": lambda: profiling.profile_call(
                lambda: run["prefill"](weights, *embedded, rng, layout),
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


def runner_on_mesh(abstract_model, spec: dict, cfg, mesh, random_init: bool):
    """The configuration's runner on ``mesh``: the model built whole (the same random draws as a row on
    one device, or the checkpoint), then taken onto the mesh by `LlavaRunner`, as the evaluation and
    the throughput mode take it (fused projections in model-axis blocks, weights split by
    `models.sharding`)."""
    from flax import nnx

    from models.checkpoint import load_checkpoint
    from models.generate import LlavaRunner
    from models.presets import random_state

    if random_init:
        graphdef, abstract_state = nnx.split(abstract_model)
        model = nnx.merge(graphdef, random_state(abstract_state, spec["seed"]))
    else:
        model = load_checkpoint(spec["model"], spec["dtype"], attention=cfg.text.attention)[1]
    return LlavaRunner(model, mesh=mesh)


def greedy_outputs(first_token_result, generated) -> dict:
    """What the model answered, to compare a row on a mesh with one on one device: each row's first
    greedy token and its logit, the first row's kept image tokens and its generated tokens."""
    import jax.numpy as jnp
    import numpy as np

    tokens, result = first_token_result
    out = {
        "first_tokens": np.asarray(tokens).tolist(),
        "first_token_logits": np.asarray(jnp.max(result.logits, axis=-1), np.float64).tolist(),
        "generated_tokens_row0": np.asarray(generated[0]).tolist(),
    }
    if result.kept is not None:
        out["kept_row0"] = np.asarray(result.kept[0]).tolist()
    return out


def random_queries(batch: int, text_tokens: int, segment_length: int, seed: int):
    """(ids, mask) (B, TEXT_SEGMENTS, L) int32 of random questions as long as the prompts' text (at
    most what the segments hold), split as the model's batches split them."""
    import jax.numpy as jnp
    import numpy as np

    from models.clip_text import batch_segments

    rng = np.random.default_rng(seed + 3)
    length = min(text_tokens, segment_length * TEXT_SEGMENTS)
    questions = [rng.integers(1, 256, length).tolist() for _ in range(batch)]
    return tuple(jnp.asarray(a) for a in batch_segments(questions, segment_length, TEXT_SEGMENTS))


def _one(fn, sync) -> float:
    """Milliseconds of one call, waited for (a sample of an interleaved timing loop)."""
    start = time.perf_counter()
    sync(fn())
    return (time.perf_counter() - start) * 1e3


def abstract_cues(pruning, cfg, *, batch: int, length: int, dtype, rng, num_image_tokens: int):
    """The shapes of the cues ``pruning`` asks for, at the first stage (for compiling ``select`` alone),
    over ``num_image_tokens`` image tokens per row."""
    import jax
    import jax.numpy as jnp

    import adaptprune_jax as prune

    sds = jax.ShapeDtypeStruct
    n_img, text = num_image_tokens, cfg.text
    heads = (batch, length, text.num_heads, text.head_dim)
    kv = (batch, length, text.num_kv_heads, text.head_dim)
    shapes = {
        prune.LastTokenAttention: {"attention": sds((batch, n_img), jnp.float32)},
        prune.QueryAttention: {
            "query_attention": sds((batch, length, n_img), jnp.float32),
            "query_mask": sds((batch, length), bool),
        },
        prune.FeatureKeys: {"keys": sds((batch, n_img, text.num_kv_heads * text.head_dim), jnp.float32)},
        prune.Embeddings: {"embeddings": sds((batch, n_img, text.hidden_size), dtype)},
        prune.StageAttention: {"attention": sds((batch, n_img), jnp.float32)},
        prune.VisionClsAttention: {"vision_attention": sds((batch, n_img), jnp.float32)},
        prune.VisionTokens: {
            "vision_tokens": sds((batch, 1 + n_img, cfg.vision.hidden_size), dtype),
            "vision_keys": sds(
                (batch, 1 + n_img, cfg.vision.hidden_size // cfg.vision.num_heads), jnp.float32
            ),
        },
        prune.JointEmbeddings: {
            "image_embeds": sds((batch, n_img, cfg.vision.projection_dim), jnp.float32),
            "text_embeds": sds((batch, TEXT_SEGMENTS, cfg.vision.projection_dim), jnp.float32),
            "text_mask": sds((batch, TEXT_SEGMENTS), bool),
        },
        prune.LayerView: {
            "view": prune.LayerViewArrays(
                sds(heads, dtype),
                sds(kv, dtype),
                sds((batch, length, text.hidden_size), dtype),
                sds((batch, length), jnp.int32),
                sds((batch, n_img), jnp.int32),
            )
        },
        prune.InputEmbeddings: {
            "inputs": prune.InputEmbeddingsArrays(
                sds((batch, length, text.hidden_size), dtype),
                sds((batch, length), jnp.int32),
                sds((batch, n_img), jnp.int32),
                sds((batch, length), jnp.int32),
            )
        },
    }
    fields = {}
    for request in pruning.cue_requests():
        fields.update(shapes[type(request)])
    return prune.Cues(**fields, rng=rng, batch_size=batch, num_image_tokens=n_img)
