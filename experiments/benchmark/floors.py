"""Floors: the time a stage cannot beat, from the work its shapes imply and the device's rates.

A floor is max(FLOPs / matmul rate, bytes / bandwidth); a row's ratio to it says how far the
measured time is from what the hardware allows. The rates are one device's: a row on a mesh has
them on every device, and its floors are a device's share of the work (`per_device_work`).
"""

from __future__ import annotations

import math


def stage_work(
    cfg,
    abstract_state,
    *,
    batch,
    prompt_tokens,
    stages,
    new_tokens,
    itemsize,
    image_tokens=None,
    crops=None,
) -> dict:
    """FLOPs and bytes each stage cannot avoid, from the parameter shapes and the token counts;
    ``stages``: the method's ``(layer, keep)`` pruning steps (empty: unpruned); ``image_tokens``: each
    row's image tokens (default: the config's); ``crops``: LLaVA-NeXT's vision-tower crops per row
    (None: one image, LLaVA-1.5)."""
    import jax

    sizes: dict[str, int] = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(abstract_state)[0]:
        keys = [getattr(k, "key", getattr(k, "idx", None)) for k in path]
        group = "/".join(str(k) for k in keys[:3] if k != "value")
        sizes[group] = sizes.get(group, 0) + math.prod(leaf.shape)

    def total(prefix):
        return sum(n for g, n in sizes.items() if g == prefix or g.startswith(prefix + "/"))

    text, vision = cfg.text, cfg.vision
    n_img = cfg.num_image_tokens if image_tokens is None else image_tokens
    images = batch * (crops or 1)  # the vision tower's passes
    layer_params = [total(f"language_model/layers/{i}") for i in range(text.num_layers)]
    head_params = total("language_model/lm_head") or total("language_model/embed_tokens")
    stream_params = sum(layer_params) + total("language_model/norm") + head_params
    seen = [n_img] * text.num_layers  # image tokens each layer sees
    for layer, keep in stages:
        seen[layer:] = [keep] * (text.num_layers - layer)
    tokens = [prompt_tokens - n_img + count for count in seen]
    attn = 4 * text.num_heads * text.head_dim  # QK^T and PV per (query, key) pair
    kv_per_token = 2 * text.num_kv_heads * text.head_dim * itemsize
    prefill_flops = batch * (
        sum(2 * p * t + attn * t * (t + 1) / 2 for p, t in zip(layer_params, tokens)) + 2 * head_params
    )
    filled = [t + new_tokens / 2 for t in tokens]  # mean cache fill during decoding
    v_tokens, v_layers = vision.num_patches + 1, cfg.vision_layers_needed
    v_layer_params = [total(f"vision_tower/layers/{i}") for i in range(v_layers)]
    v_other = total("vision_tower/patch_embedding") + total("multi_modal_projector")
    vision_flops = images * (
        sum(2 * p * v_tokens for p in v_layer_params)
        + v_layers * 4 * vision.hidden_size * v_tokens**2
        + 2 * v_other * cfg.features_per_crop
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


def mesh_sizes(mesh: str) -> tuple[int, int]:
    """(data, model) sizes of a row's mesh as the worker describes it ('data:2,model:1'; '' = one device)."""
    sizes = dict(item.split(":") for item in mesh.split(",") if item)
    return int(sizes.get("data", 1)), int(sizes.get("model", 1))


def per_device_work(work: dict, mesh: str) -> dict:
    """The work of one device of ``mesh`` (``work`` on one device, '' mesh): the batch's rows split over
    data, the language model's weights, heads and columns over model (models.sharding). So FLOPs and
    KV-cache bytes are divided by the device count, the language model's weight reads by the model
    axis; the CLIP tower is whole on every device: its weights are read whole and a model axis does not
    divide its FLOPs. Perfect scaling, collectives free: a floor, not a prediction."""
    data, model = mesh_sizes(mesh)
    if data * model == 1:
        return work
    devices = data * model

    def split(total, weights):  # weight reads over the model axis, the rest over every device
        return weights / model + (total - weights) / devices

    return dict(
        work,
        vision_flops=work["vision_flops"] / data,
        prefill_flops=work["prefill_flops"] / devices,
        prefill_bytes=split(work["prefill_bytes"], work["llm_stream_bytes"]),
        decode_flops=work["decode_flops"] / devices,
        decode_bytes=split(work["decode_bytes"], work["decode_weight_bytes"]),
        decode_weight_bytes=work["decode_weight_bytes"] / model,
    )


def add_floors_and_ratios(rows: list[dict], ceilings: dict) -> None:
    """Floors of every JAX row (divided by its device count), speedups vs the unpruned row on the same
    mesh, JAX / PyTorch ratios (rows on one device: the PyTorch baseline runs on one)."""
    by_key = {
        (r["framework"], r["method"], r["keep"], r["batch"], r.get("mesh", "")): r
        for r in rows
        if r["status"] == "ok"
    }
    for row in rows:
        if row["framework"] != "jax" or row["status"] != "ok":
            continue
        w, floors, devices = per_device_work(row["work"], row.get("mesh", "")), {}, row.get("devices", 1)
        floors["vision_ms"] = _floor_ms(w["vision_flops"], w["vision_bytes"], ceilings)
        floors["llm_prefill_ms"] = _floor_ms(w["prefill_flops"], w["prefill_bytes"], ceilings)
        floors["llm_prefill_flop_ms"] = _floor_ms(w["prefill_flops"], 0, ceilings)
        floors["decode_ms_per_token"] = _floor_ms(w["decode_flops"], w["decode_bytes"], ceilings)
        floors["decode_weight_read_ms"] = _floor_ms(0, w["decode_weight_bytes"], ceilings)
        if floors["vision_ms"] is not None:
            floors["ttft_ms"] = floors["vision_ms"] + floors["llm_prefill_ms"]
            floors["e2e_ms"] = floors["ttft_ms"] + (row["new_tokens"] - 1) * floors["decode_ms_per_token"]
            floors["ttft_runner_ms"] = floors["ttft_ms"]
        floors["llm_prefill_pipelined_ms"] = floors["llm_prefill_ms"]
        row["floors"] = floors
        row["ratio_to_floor"] = {k: row[k] / f for k, f in floors.items() if f and row.get(k) is not None}
        base = by_key.get(("jax", "none", 0, row["batch"], row.get("mesh", "")))
        if base:
            row["speedup_vs_unpruned"] = {
                k: base[k] / row[k]
                for k in (
                    "llm_prefill_ms",
                    "llm_prefill_pipelined_ms",
                    "ttft_ms",
                    "ttft_runner_ms",
                    "decode_ms_per_token",
                    "e2e_ms",
                )
                if row.get(k) and base.get(k)
            }
            if row.get("peak_bytes") and base.get("peak_bytes"):
                row["memory_saving_vs_unpruned"] = 1 - row["peak_bytes"] / base["peak_bytes"]
        torch_row = by_key.get(
            ("torch", "none" if row["method"] == "none" else "cut", row["keep"], row["batch"], "")
        )
        if torch_row and devices == 1:
            row["jax_over_torch"] = {
                k: row[k] / torch_row[k]
                for k in ("vision_ms", "llm_prefill_ms", "ttft_ms", "decode_ms_per_token", "e2e_ms")
                if row.get(k) and torch_row.get(k)
            }
            row["torch_row"] = torch_row["label"]
