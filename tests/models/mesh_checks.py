"""The model on several meshes of fake CPU devices against one device, run as a program of its own
(the device count is fixed before JAX starts; `tests/models/test_mesh.py` runs it and asserts on the
JSON it prints). One process, so every mesh shares the loaded checkpoint and the one-device baselines.

    XLA_FLAGS=--xla_force_host_platform_device_count=8 python -m tests.models.mesh_checks WORK [--all_methods]

WORK receives the checkpoint, a testbed question split, the evaluations' output folders and
checks.json (what the test reads).
"""

from __future__ import annotations

import json
import sys
import time
import types

import jax
import numpy as np

jax.config.update("jax_default_matmul_precision", "highest")

import adaptprune_jax as prune  # noqa: E402
from adaptprune_jax import methods  # noqa: E402
from models import presets, sharding  # noqa: E402
from models.checkpoint import load_checkpoint  # noqa: E402
from models.generate import LlavaRunner, SamplingConfig  # noqa: E402
from tests.helpers import (  # noqa: E402
    InterruptAfter,
    make_prompt,
    make_queries,
    random_pixels,
    small_model_config,
)

MESHES = ("data:8", "data:2,model:4", "model:2")
NMS_MESH = "data:2,model:4"  # where AdaptPrune with the Pallas NMS runs (the others: unpruned only)
REFUSED_MESH = "model:8"  # more devices than KV heads
NEW_TOKENS = 3
HEADS, KV_HEADS = 8, 4
IMAGE_SIZE, KEEP = 112, 16  # an 8 x 8 grid of image tokens: short prompts
EVAL_QUESTIONS, EVAL_BATCH = 11, 5  # batches of 5, 5 and 1 (padded to 5 by the evaluation, 8 by the mesh)
INTERRUPT_AFTER = 1  # one batch answered, then the run is stopped


def gqa_checkpoint(directory: str):
    """tiny-gqa with 4 KV heads (8 query heads) and a small image, and the CLIP its tower would
    come from."""
    config = presets.llava_config("tiny-gqa")
    config.vision_config.image_size = IMAGE_SIZE
    config.text_config.num_attention_heads = HEADS
    config.text_config.num_key_value_heads = KV_HEADS
    presets.write_random_checkpoint(config, directory)
    presets.write_random_clip(config, f"{directory}/clip", seed=1)
    return config, load_checkpoint(directory, text_tower=f"{directory}/clip")[1]


class Inputs:
    """Three prompts of different lengths (three rows: a padded batch on every data axis here)."""

    def __init__(self, model, pad_token_id):
        rng = np.random.default_rng(5)
        self.prompts = [make_prompt(model.config, rng, b, a) for b, a in ((2, 5), (14, 30), (7, 1))]
        self.pixels = random_pixels(rng, len(self.prompts), model.config.vision.image_size)
        self.pad_token_id = pad_token_id
        self.model = model

    def batch(self, runner, pruning):
        queries = None
        if pruning is not None and pruning.needs_text_tower:  # (make_queries reads ckpt.jax_model)
            queries = make_queries(
                types.SimpleNamespace(jax_model=self.model), np.random.default_rng(3), [3, 20, 9]
            )
        return runner.make_batch(
            self.prompts,
            self.pixels,
            pad_token_id=self.pad_token_id,
            max_new_tokens=NEW_TOKENS,
            queries=queries,
        )


def run(runner, inputs, pruning):
    """(first-token logits, kept indices, greedy tokens)."""
    batch = inputs.batch(runner, pruning)
    sampling = SamplingConfig(max_new_tokens=NEW_TOKENS, eos_token_id=None, pad_token_id=inputs.pad_token_id)
    generated = runner.generate(batch, sampling, pruning=pruning)
    logits = sharding.to_host(runner.prefill(batch, extra_slots=NEW_TOKENS, pruning=pruning).logits)
    return logits, generated.kept, generated.tokens


def layout_report(runner, cache):
    """Per weight: its spec and the share of it on one device; the cache's spec and share."""
    report = {}
    for (path, _), weight in zip(jax.tree_util.tree_flatten_with_path(runner.state)[0], runner.weights):
        name = ".".join(sharding._path_names(path))
        report[name] = {
            "spec": str(weight.sharding.spec),
            "bytes": int(weight.nbytes),
            "device_bytes": sharding.local_bytes(weight),
        }
    k = cache["k"][0]
    report["cache.k"] = {
        "spec": str(k.sharding.spec),
        "bytes": int(k.nbytes),
        "device_bytes": sharding.local_bytes(k),
    }
    return report


def nms_in_shard_map(mesh) -> bool:
    """Whether the Pallas NMS, traced under ``mesh``, runs inside a shard_map."""
    scores, keys = np.ones((4, 64), np.float32), np.ones((4, 64, 8), np.float32)
    with jax.set_mesh(mesh):
        jaxpr = jax.make_jaxpr(lambda s, k: prune.adaptive_nms(s, k, 8, implementation="pallas"))(
            scores, keys
        )
    return "shard_map" in str(jaxpr)


def window_nms_checks(mesh, baseline: dict) -> dict:
    """AdaptPrune's window-form selection (XLA and Pallas loops) on rows of two LLaVA-NeXT-shaped
    layouts, sharded over ``mesh`` with the band gathered in small groups of blocks, against one
    device (computed once into ``baseline``): whether each loop's kept tokens are the same, and how
    many tokens suppression moved; then the same batch with half its rows' tokens shuffled (not
    row-major: the run-time check sends the batch to the dense fallback, row by row), against one
    device and the dense form."""
    from adaptprune_jax import nms_window

    layouts = [
        prune.concat_layouts(prune.grid_layout(12, 12), prune.newline_grid_layout(rows, 30, grid_id=1))
        for rows in (30, 22)
    ]
    rng = np.random.default_rng(0)
    order = rng.permutation(layouts[0].num_tokens)
    shuffled = jax.tree_util.tree_map(lambda x: np.asarray(x)[order], layouts[0])
    cases = {
        "row_major": prune.stack_layouts(layouts * 4),
        "shuffled": prune.stack_layouts([layouts[1], shuffled] * 4),
    }
    rows, num_tokens, dim, keep = 8, cases["row_major"].num_tokens, 16, 120
    # near-duplicate keys (cosines ~0.9) so that suppression acts; dirichlet attention
    keys = rng.standard_normal((rows, 1, dim)) + 0.3 * rng.standard_normal((rows, num_tokens, dim))
    keys = keys.astype(np.float32)
    attention = rng.dirichlet(np.ones(num_tokens), size=rows).astype(np.float32)

    def select(case, implementation, form="window"):
        def run(a, k, lay):
            return prune.adaptprune_select(a, k, keep, layout=lay, form=form, implementation=implementation)

        return np.asarray(jax.jit(run)(attention, keys, cases[case]))  # the layout traced, as models pass it

    variants = [(case, impl) for case in cases for impl in ("xla", "pallas")]
    default_group = nms_window.BAND_GROUP_BYTES
    nms_window.BAND_GROUP_BYTES = 4 * rows * 480 * dim * 4  # 4 blocks of every row per step, of 9
    try:
        if "window_nms" not in baseline:
            baseline["window_nms"] = {variant: select(*variant) for variant in variants}
            baseline["window_nms"]["shuffled", "dense"] = select("shuffled", "xla", form="dense")
        one = baseline["window_nms"]
        with jax.set_mesh(mesh):
            sharded = {variant: select(*variant) for variant in variants}
    finally:
        nms_window.BAND_GROUP_BYTES = default_group
    scores = prune.nms.adaptprune_scores(attention, cases["row_major"], 12.0)
    top_k = np.sort(np.argsort(-np.asarray(scores), axis=-1)[:, :keep], axis=-1)
    kept = one["row_major", "xla"]
    return {
        "kept_equal": {
            f"{case} {impl}": bool(np.array_equal(sharded[case, impl], one[case, impl]))
            for case, impl in variants
        },
        "loops_equal": {case: bool(np.array_equal(one[case, "xla"], one[case, "pallas"])) for case in cases},
        "fallback_equals_dense": bool(np.array_equal(one["shuffled", "xla"], one["shuffled", "dense"])),
        "kept_differing_from_top_k": int(sum(len(np.setdiff1d(a, b)) for a, b in zip(kept, top_k))),
    }


def compare(runner, one, inputs, pruning, baseline, key):
    if key not in baseline:
        baseline[key] = run(one, inputs, pruning)
    logits, kept, tokens = run(runner, inputs, pruning)
    base_logits, base_kept, base_tokens = baseline[key]
    return {
        "logits_max_abs_diff": float(np.abs(logits - base_logits).max()),
        "logits_scale": float(np.abs(base_logits).max()),
        "kept_equal": None if kept is None else bool(np.array_equal(kept, base_kept)),
        "tokens_equal": bool(np.array_equal(tokens, base_tokens)),
    }


def eval_checks(work: str, checkpoint: str) -> dict:
    """`experiments.eval` on one device, then on the 8-device mesh interrupted after its first
    batches and rerun in the same output folder (the test compares the prediction files)."""
    import dataclasses

    from experiments import eval as eval_lib
    from experiments.testbed.splits import write_split
    from models.engine import LlavaEngine

    write_split(f"{work}/testbed_test", "test", num_items=EVAL_QUESTIONS, questions_per_image=4)
    one = eval_lib.EvalConfig(
        checkpoint=checkpoint,
        benchmark="testbed",
        questions=f"{work}/testbed_test",
        output_dir=f"{work}/one_device",
        methods=("none",),
        keep=(KEEP,),
        batch_size=EVAL_BATCH,
        mesh="data:1",
        num_overlays=0,
    )
    eval_lib.run(one)
    mesh = dataclasses.replace(one, output_dir=f"{work}/mesh", mesh="data:8")
    engine = LlavaEngine.from_checkpoint(checkpoint, mesh=sharding.make_mesh(mesh.mesh))
    try:
        eval_lib.run(mesh, engine=InterruptAfter(engine, calls=INTERRUPT_AFTER))
        interrupted = False
    except KeyboardInterrupt:
        interrupted = True
    eval_lib.run(mesh, engine=engine)
    return {"interrupted": interrupted, "one_device": one.output_dir, "mesh": mesh.output_dir}


def main(work: str, all_methods: bool) -> None:
    """``all_methods``: every registered method on every mesh (the recorded acceptance run); else
    the unpruned model on every mesh and AdaptPrune with the Pallas NMS (under shard_map) on
    NMS_MESH (the test suite's run)."""
    results = {"devices": len(jax.devices()), "meshes": {}}
    directory = f"{work}/checkpoint"
    hf_config, model = gqa_checkpoint(directory)
    inputs = Inputs(model, hf_config.text_config.pad_token_id)
    one = LlavaRunner(model)
    configs = {"none": None}
    configs["adaptprune-pallas"] = small_model_config(
        "adaptprune", keep=KEEP, layer=2, nms_implementation="pallas"
    )
    if all_methods:
        configs.update({name: small_model_config(name, keep=KEEP, layer=2) for name in methods.names()})
    baseline = {}
    for mesh_spec in MESHES:
        runner = LlavaRunner(model, mesh=sharding.make_mesh(mesh_spec))
        entry = {"methods": {}}
        for name, pruning in configs.items():
            if not all_methods and name != "none" and mesh_spec != NMS_MESH:
                continue
            tic = time.perf_counter()
            entry["methods"][name] = compare(runner, one, inputs, pruning, baseline, name)
            print(f"{mesh_spec} {name}: {time.perf_counter() - tic:.1f} s", file=sys.stderr, flush=True)
        # The caches as generation gets them (padding rows included: rows over the data axis).
        prefill = runner._prefill_rows(inputs.batch(runner, None), NEW_TOKENS, None, None, False)
        entry["layout"] = layout_report(runner, prefill.caches[0])
        entry["nms_in_shard_map"] = nms_in_shard_map(runner.mesh)
        entry["window_nms"] = window_nms_checks(runner.mesh, baseline)
        results["meshes"][mesh_spec] = entry
    try:
        LlavaRunner(model, mesh=sharding.make_mesh(REFUSED_MESH))
        results["refused"] = None
    except ValueError as error:
        results["refused"] = str(error)
    tic = time.perf_counter()
    results["eval"] = eval_checks(work, directory)
    print(f"eval: {time.perf_counter() - tic:.1f} s", file=sys.stderr, flush=True)
    with open(f"{work}/checks.json", "w") as file:
        json.dump(results, file, indent=1)


if __name__ == "__main__":
    main(sys.argv[1], "--all_methods" in sys.argv[2:])
