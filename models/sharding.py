"""Many devices: logical axis names for every weight, cache and batch array, one table mapping them to
the mesh axes `data` and `model`, and a model prepared for a mesh.

The same model runs on one device, on a data-parallel mesh (`data:N`: batch rows split, weights
whole on every device) or on data x model (`data:N,model:M`: each device also holds 1/M of the
language model's attention heads, MLP columns and vocabulary, Megatron-style: column-split q/k/v,
gate/up and the LM head, row-split o_proj and down_proj, the KV cache split by head; the CLIP towers
stay whole, see RULES). Arrays carry GSPMD shardings (`NamedSharding`) into the runner's jitted
prefill and decode loop, which XLA partitions.

The fused projections (`models.layers.FusedDense`: q/k/v as (d, (H + 2 Hkv) D), gate/up as (d, 2 I))
are laid out in M blocks on a model axis of M (`relayout_fused`): block b holds the b-th slice of every
part, so the model axis's plain column split gives each device its own heads' q, k and v (and its
columns of gate and up) and the attention needs no communication. Splitting the fused kernel as it
is would put q on some devices and k / v on others; keeping the parts as separate arrays would undo
the fusion. The blocks are made once, when a runner takes the model onto a mesh, and undone when a
checkpoint is saved (`models.checkpoint.checkpoint_parts`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import numpy as np
from flax import nnx
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

from models.layers import FusedDense, join_blocked, split_blocked

DATA, MODEL = "data", "model"
MESH_AXES = (DATA, MODEL)

# Logical axis -> mesh axis (None: whole on every device). The one place that decides the layout.
RULES: dict[str, str | None] = {
    "batch": DATA,  # rows of a batch: prompts, pixels, caches, logits
    "heads": MODEL,  # attention heads: q/k/v columns (fused, in blocks), o_proj rows
    "kv_heads": MODEL,  # the KV cache's heads
    "mlp": MODEL,  # MLP and projector hidden columns
    "vocab": MODEL,  # token embeddings and the LM head
    "embed": None,  # model width
    "vision_embed": None,  # the projector's input width (the vision features)
    "cache_length": None,
    "head_dim": None,
    # The vision tower (CLIP) stays whole on every device: methods select from its cues, some
    # chaotically in rounding (VisPruner's diverse tokens), and a head-split tower rounds otherwise
    # than one device; it is a small share of the weights (4% of LLaVA-1.5-7B's).
    "vision_tower": None,
    # CLIP's text tower and joint projections (methods reading the joint space): a few short
    # question segments per batch, whole on every device for the same reasons.
    "text_tower": None,
}

# Logical axes of each weight outside WHOLE_SUBTREES, by the name of the module holding it and the
# leaf ('kernel', 'bias', 'scale'), or by the leaf alone for parameters held directly (embeddings).
# Norm scales and biases (any module named *norm*) are ('embed',).
WEIGHT_AXES: dict[tuple[str, ...], tuple[str, ...]] = {
    ("qkv_proj", "kernel"): ("embed", "heads"),
    ("qkv_proj", "bias"): ("heads",),
    ("o_proj", "kernel"): ("heads", "embed"),
    ("o_proj", "bias"): ("embed",),
    ("gate_up_proj", "kernel"): ("embed", "mlp"),
    ("gate_up_proj", "bias"): ("mlp",),
    ("down_proj", "kernel"): ("mlp", "embed"),
    ("down_proj", "bias"): ("embed",),
    ("linear_1", "kernel"): ("vision_embed", "mlp"),
    ("linear_1", "bias"): ("mlp",),
    ("linear_2", "kernel"): ("mlp", "embed"),
    ("linear_2", "bias"): ("embed",),
    ("lm_head", "kernel"): ("embed", "vocab"),
    ("embed_tokens",): ("vocab", "embed"),
}
NORM_AXES = ("embed",)

# Subtrees whose every weight has one logical axis name (see RULES): top-level name -> logical name.
WHOLE_SUBTREES = {"vision_tower": "vision_tower", "joint_space": "text_tower"}

CACHE_AXES: dict[str, tuple[str, ...]] = {
    "k": ("batch", "cache_length", "kv_heads", "head_dim"),
    "v": ("batch", "cache_length", "kv_heads", "head_dim"),
    "positions": ("batch", "cache_length"),
    "end_index": (),
    "shift": ("batch",),
}


# --- meshes -----------------------------------------------------------------------------------
def parse_mesh(spec: str | None) -> dict[str, int]:
    """'data:2,model:4' -> {'data': 2, 'model': 4}; an axis not named has size 1; '' or None: {}
    (every device data-parallel, see `make_mesh`)."""
    sizes: dict[str, int] = {}
    for item in (spec or "").split(","):
        if not item.strip():
            continue
        name, _, size = item.partition(":")
        name = name.strip()
        if name not in MESH_AXES:
            raise ValueError(f"mesh {spec!r}: unknown axis {name!r}; axes: {', '.join(MESH_AXES)}")
        if name in sizes:
            raise ValueError(f"mesh {spec!r}: axis {name!r} given twice")
        if not size.strip().isdigit() or int(size) < 1:
            raise ValueError(f"mesh {spec!r}: axis {name!r} needs a positive size, as {name}:2")
        sizes[name] = int(size)
    return sizes


def make_mesh(spec: str | None = None, devices: Sequence[Any] | None = None) -> jax.sharding.Mesh:
    """A (data, model) mesh over the first data x model of ``devices`` (default: every device of
    every process); ``spec`` as `parse_mesh` reads it, default every device data-parallel."""
    devices = list(jax.devices() if devices is None else devices)
    sizes = parse_mesh(spec)
    if not sizes:
        sizes = {DATA: len(devices)}
    shape = tuple(sizes.get(axis, 1) for axis in MESH_AXES)
    count = int(np.prod(shape))
    if count > len(devices):
        raise ValueError(f"mesh {spec!r} needs {count} devices; {len(devices)} are available")
    return jax.make_mesh(
        shape, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES), devices=devices[:count]
    )


def describe_mesh(mesh: jax.sharding.Mesh) -> str:
    return ",".join(f"{name}:{size}" for name, size in mesh.shape.items())


def axis_size(mesh: jax.sharding.Mesh | None, axis: str) -> int:
    return 1 if mesh is None else int(mesh.shape.get(axis, 1))


# --- logical axes -----------------------------------------------------------------------------
def _path_names(path) -> list[str]:
    names = [str(getattr(key, "key", getattr(key, "name", getattr(key, "idx", key)))) for key in path]
    return names[:-1] if names and names[-1] == "value" else names  # an nnx Variable's own leaf


def weight_axes(path, ndim: int) -> tuple[str, ...]:
    """The logical axes of the weight at ``path`` (a pytree key path of the model's state)."""
    names = [name for name in _path_names(path) if not name.isdigit()]
    if names and names[0] in WHOLE_SUBTREES:
        return (WHOLE_SUBTREES[names[0]],) * ndim
    leaf, module = names[-1], names[-2] if len(names) > 1 else ""
    axes = WEIGHT_AXES.get((module, leaf)) or WEIGHT_AXES.get((leaf,))
    if axes is None and "norm" in module and leaf in ("scale", "bias"):
        axes = NORM_AXES
    if axes is None or len(axes) != ndim:
        raise ValueError(
            f"weight {'.'.join(_path_names(path))} ({ndim} axes) has no logical axes in "
            "models.sharding.WEIGHT_AXES: add its entry there"
        )
    return axes


def spec(axes: Sequence[str]) -> P:
    """The PartitionSpec of logical ``axes`` under RULES."""
    return P(*(RULES[axis] for axis in axes))


def _check_divides(mesh, what: str, shape, axes) -> None:
    for size, axis in zip(shape, axes):
        mesh_axis = RULES[axis]
        count = axis_size(mesh, mesh_axis) if mesh_axis else 1
        if size % count:
            raise ValueError(
                f"{what}: its {axis} axis ({size}) does not split over the mesh's {mesh_axis} axis of "
                f"{count} devices; choose a {mesh_axis} size that divides {size}"
            )


def weight_shardings(state, mesh) -> list[NamedSharding]:
    """One NamedSharding per leaf of the model's ``state`` (flattening order), every split checked."""
    shardings = []
    for path, leaf in jax.tree_util.tree_flatten_with_path(state)[0]:
        axes = weight_axes(path, len(leaf.shape))
        _check_divides(mesh, f"weight {'.'.join(_path_names(path))}", leaf.shape, axes)
        shardings.append(NamedSharding(mesh, spec(axes)))
    return shardings


def cache_shardings(caches, mesh):
    """The NamedShardings of a list of run caches (`models.layers.StageCache`): each leaf's by its
    field's name (a layer's ``k`` in a run's list of them is laid out as ``k``)."""
    return [
        {
            name: jax.tree.map(lambda _, name=name: NamedSharding(mesh, spec(CACHE_AXES[name])), field)
            for name, field in cache.items()
        }
        for cache in caches
    ]


def batch_sharding(mesh, ndim: int) -> NamedSharding:
    """A batch array of ``ndim`` axes: rows over `data`, the other axes whole."""
    return NamedSharding(mesh, P(RULES["batch"], *([None] * (ndim - 1))))


# --- the model on a mesh ----------------------------------------------------------------------
def check_model_fits(config, mesh) -> None:
    """Refuse a model axis that does not divide the language model's KV heads: each device must hold
    whole heads (else the KV cache would silently be replicated on every device, and the collectives
    multiply)."""
    size, heads = axis_size(mesh, MODEL), config.text.num_kv_heads
    if heads % size:
        fits = " / ".join(str(n) for n in range(1, heads + 1) if heads % n == 0)
        raise ValueError(
            f"a model axis of {size} devices does not divide the language model's {heads} KV heads: "
            f"each device must hold whole heads (the KV cache is split by head); use model:{fits}"
        )


def relayout_fused(model: nnx.Module, blocks: int) -> None:
    """Lay every tensor-parallel fused projection of ``model`` (the language model's; the CLIP towers
    stay whole) out in ``blocks`` blocks (`models.layers.FusedDense`), in place."""
    for path, module in nnx.iter_graph(model):
        if not isinstance(module, FusedDense) or (path and str(path[0]) in WHOLE_SUBTREES):
            continue
        if module.blocks == blocks:
            continue
        for name in ("kernel", "bias"):
            param = getattr(module, name)
            if param is None:
                continue
            parts = split_blocked(param.value, module.sizes, module.blocks)
            param.value = join_blocked(parts, blocks)
        module.blocks = blocks


def prepare_model(model: nnx.Module, mesh) -> nnx.Module:
    """A copy of ``model`` ready for ``mesh``: checked to fit it, its fused projections in model-axis
    blocks (the caller's model is left as it is)."""
    check_model_fits(model.config, mesh)
    model = nnx.clone(model)
    relayout_fused(model, axis_size(mesh, MODEL))
    return model


def constrain(tree, shardings):
    """`jax.lax.with_sharding_constraint` of every array of ``tree`` (inside jit)."""
    return jax.tree_util.tree_map(jax.lax.with_sharding_constraint, tree, shardings)


def local_bytes(array: jax.Array) -> int:
    """Bytes of ``array`` held by its largest single-device shard."""
    return max(shard.data.nbytes for shard in array.addressable_shards)


def to_host(array) -> np.ndarray:
    """A (possibly multi-process) array as one numpy array on this host."""
    if isinstance(array, jax.Array) and not array.is_fully_addressable:
        from jax.experimental import multihost_utils

        return np.asarray(multihost_utils.process_allgather(array, tiled=True))
    return np.asarray(array)
