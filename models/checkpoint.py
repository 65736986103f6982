"""Loading llava-hf checkpoints (safetensors, single file or sharded) into the Flax model (LLaVA-1.5 and
LLaVA-NeXT, whose one extra tensor is `image_newline`).

The key table is derived from the model itself: every parameter path of `LlavaForConditionalGeneration`
maps to one transformers name and a transform (Linear weights are transposed, the patch convolution is
flattened), or a fused projection (`models.layers.FusedDense`: q/k/v, gate/up) to the several
transformers tensors it joins, each transformed and concatenated along the output axis; saving splits
it back, so checkpoints stay in llava-hf's layout. Both spellings transformers uses are accepted and
normalised first:
  on disk (save_pretrained):  language_model.model.*, language_model.lm_head.*, vision_tower[.vision_model].*,
                              multi_modal_projector.*
  in memory (state_dict):     model.language_model.*, lm_head.*, model.vision_tower.*, model.multi_modal_projector.*
Missing keys, unexpected keys and shape mismatches are collected and reported together, by name.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from models.config import (
    CheckpointFileError,
    LlavaModelConfig,
    from_hf_config,
    load_hf_config,
    read_json_object,
    with_attention,
)
from models.layers import AUTO, split_blocked
from models.llava import LlavaForConditionalGeneration

SINGLE_FILE = "model.safetensors"
SHARD_INDEX = "model.safetensors.index.json"
# Buffers some checkpoints carry that are recomputed here, not loaded.
IGNORED_SUFFIXES = ("embeddings.position_ids", "rotary_emb.inv_freq")
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


class CheckpointError(ValueError):
    """A checkpoint does not match the model: lists every missing, unexpected and mis-shaped tensor."""


def _open_safetensors(path: str):
    """A numpy safe_open handle; a damaged file raises CheckpointFileError naming it, not SafetensorError."""
    from safetensors import safe_open

    size = os.path.getsize(path)
    if size == 0:
        raise CheckpointFileError(f"{path} is empty (0 bytes); expected a safetensors file")
    try:
        return safe_open(path, framework="numpy")
    except Exception as e:  # SafetensorError is not importable under a stable name across versions
        raise CheckpointFileError(
            f"{path} ({size} bytes) is not a readable safetensors file, truncated or corrupt: {e}"
        ) from e


def canonical_name(name: str) -> str:
    """Map either transformers spelling to one: language_model.*, lm_head.*, vision_tower.*, multi_modal_projector.*."""
    if name.startswith("model."):
        name = name[len("model.") :]
    if name.startswith("language_model.model."):
        name = "language_model." + name[len("language_model.model.") :]
    elif name == "language_model.lm_head.weight":
        name = "lm_head.weight"
    if name.startswith("vision_tower.vision_model."):
        name = "vision_tower." + name[len("vision_tower.vision_model.") :]
    return name


Transform = Callable[[jax.Array], jax.Array]


def _identity(x):
    return x


def _transpose(x):
    return x.T


def _flatten_patch_conv(x):  # torch conv weight (out, C, p, p) -> (C * p * p, out), matching our patchify
    return x.reshape(x.shape[0], -1).T


_VISION_RENAMES = {"fc1": "mlp.fc1", "fc2": "mlp.fc2"}
_VISION_EMBEDDINGS = {
    "patch_embedding": ("embeddings.patch_embedding.weight", _flatten_patch_conv),
    "class_embedding": ("embeddings.class_embedding", _identity),
    "position_embedding": ("embeddings.position_embedding.weight", _identity),
}


# Our fused projections (models.layers.FusedDense) and the transformers modules they join, in order.
JOINED_MODULES = {"qkv_proj": ("q_proj", "k_proj", "v_proj"), "gate_up_proj": ("gate_proj", "up_proj")}

Names = str | tuple[str, ...]
"""The checkpoint name of a parameter, or the names of the tensors a fused parameter joins along its
last axis (each under the same transform)."""


def module_names(module: list[str], suffix: str) -> Names:
    """``module.suffix`` as one dotted name; a fused module (JOINED_MODULES) gives one per part."""
    *parents, last = module
    if last in JOINED_MODULES:
        return tuple(".".join([*parents, part, suffix]) for part in JOINED_MODULES[last])
    return ".".join([*module, suffix])


def hf_name_for(path: tuple[Any, ...]) -> tuple[Names, Transform]:
    """transformers' (canonical) name(s) and the transform for one of our parameter paths."""
    parts = [str(p) for p in path]
    top, rest = parts[0], parts[1:]
    if top == "vision_tower" and rest[0] in _VISION_EMBEDDINGS:
        name, transform = _VISION_EMBEDDINGS[rest[0]]
        return f"vision_tower.{name}", transform
    if top == "image_newline":
        return "image_newline", _identity
    if top == "language_model" and rest == ["embed_tokens"]:
        return "language_model.embed_tokens.weight", _identity
    if top == "language_model" and rest[0] == "lm_head":
        return "lm_head.weight", _transpose
    leaf = rest[-1]
    suffix, transform = {
        "kernel": ("weight", _transpose),
        "bias": ("bias", _identity),
        "scale": ("weight", _identity),
    }[leaf]
    module = rest[:-1]
    if top == "vision_tower" and module[0] == "layers":
        module = ["encoder", "layers"] + [_VISION_RENAMES.get(m, m) for m in module[1:]]
    return module_names([top, *module], suffix), transform


def fused_module(root, path: tuple[Any, ...]):
    """The fused module (`models.layers.FusedDense`) holding the parameter at ``path`` under ``root``."""
    module = root
    for key in path[:-1]:
        module = module[key] if isinstance(key, int) else getattr(module, key)
    return module


def split_sizes(root, path: tuple[Any, ...]) -> tuple[int, ...]:
    """The part widths of the fused module holding the parameter at ``path`` under ``root``."""
    return fused_module(root, path).sizes


class TensorSource:
    """Lazy access to the tensors of a checkpoint directory (one file or a sharded index)."""

    def __init__(self, directory: str | os.PathLike):
        directory = os.fspath(directory)
        self._directory = directory
        index_path = os.path.join(directory, SHARD_INDEX)
        single_path = os.path.join(directory, SINGLE_FILE)
        if os.path.isfile(index_path):
            weight_map = read_json_object(index_path).get("weight_map")
            if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
                raise CheckpointFileError(
                    f'{index_path} has no "weight_map" object mapping tensor names to shard files'
                )
            files = sorted(set(weight_map.values()))
        elif os.path.isfile(single_path):
            weight_map, files = None, [SINGLE_FILE]
        else:
            raise FileNotFoundError(
                f"no {SINGLE_FILE} or {SHARD_INDEX} in checkpoint directory {directory!r}"
            )
        self._handles, self._where = {}, {}
        for file in files:
            path = os.path.join(directory, file)
            if not os.path.isfile(path):
                raise FileNotFoundError(f"shard {file} listed in {SHARD_INDEX} is missing from {directory!r}")
            handle = _open_safetensors(path)
            self._handles[file] = handle
            for key in handle.keys():
                if weight_map is None or weight_map.get(key) == file:
                    self._where[canonical_name(key)] = (file, key)

    def names(self) -> set[str]:
        return set(self._where)

    def shape(self, name: str) -> tuple[int, ...]:
        file, key = self._where[name]
        return tuple(self._handles[file].get_slice(key).get_shape())

    def get(self, name: str) -> np.ndarray:
        """The tensor on the host, as stored (checked for finiteness there before it goes to a device)."""
        file, key = self._where[name]
        try:
            return self._handles[file].get_tensor(key)
        except Exception as e:
            raise CheckpointFileError(f"{self.describe(name)}: cannot read the tensor: {e}") from e

    def describe(self, name: str) -> str:
        file, key = self._where[name]
        return f"tensor {key} in {os.path.join(self._directory, file)}"


class StateDictSource:
    """The same interface over an in-memory mapping name -> array (e.g. a torch state_dict as numpy)."""

    def __init__(self, tensors: Mapping[str, Any]):
        self._tensors = {canonical_name(k): v for k, v in tensors.items()}

    def names(self) -> set[str]:
        return set(self._tensors)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._tensors[name].shape)

    def get(self, name: str) -> np.ndarray:
        return np.asarray(self._tensors[name])

    def describe(self, name: str) -> str:
        return f"tensor {name}"


def _check_finite(array: np.ndarray, source, name: str) -> None:
    """Refuse NaN / inf weights at load, where the tensor can be named, rather than as NaN logits later.
    One pass over the host array; the counts are computed only on failure."""
    if np.isfinite(array).all():
        return
    nan, inf = int(np.isnan(array).sum()), int(np.isinf(array).sum())
    raise CheckpointError(
        f"{source.describe(name)} holds non-finite values ({nan} NaN, {inf} inf of {array.size})"
    )


def _load_tensor(source, name: str) -> jax.Array:
    host = source.get(name)
    _check_finite(host, source, name)
    return jnp.asarray(host)


def _transformed_shape(transform: Transform, shape: tuple[int, ...]) -> tuple[int, ...]:
    return tuple(jax.eval_shape(transform, jax.ShapeDtypeStruct(shape, jnp.float32)).shape)


def _leaf_paths(state) -> tuple[list[tuple[tuple[Any, ...], Any]], Any]:
    """([(parameter path without the trailing '.value', leaf)], treedef) of an nnx state."""
    leaves, treedef = jax.tree_util.tree_flatten_with_path(state)
    return [
        (tuple(getattr(k, "key", getattr(k, "name", None)) for k in key_path)[:-1], leaf)
        for key_path, leaf in leaves
    ], treedef


def fill_module(abstract, source, name_for, dtype, *, ignored=lambda name: False, what: str = "the model"):
    """The nnx module ``abstract`` (from ``nnx.eval_shape``) with every parameter read from ``source``:
    ``name_for(path) -> (checkpoint name or names, transform)``; a parameter with several names (a
    fused projection) is their transformed tensors joined along the last axis, in order, each as wide
    as its part of the fused module (``split_sizes``). Every name and shape is checked before any
    tensor is read, and all problems are reported at once, by transformers' tensor names;
    ``ignored(name)``: checkpoint entries that belong to no parameter (buffers, tied weights)."""
    graphdef, abstract_state = nnx.split(abstract)
    leaves, treedef = _leaf_paths(abstract_state)
    plan, missing, mismatched = [], [], []
    available = source.names()
    used = set()
    for path, leaf in leaves:
        names, transform = name_for(path)
        joined = not isinstance(names, str)
        names = names if joined else (names,)
        widths = split_sizes(abstract, path) if joined else (leaf.shape[-1],)
        used.update(names)
        for name, width in zip(names, widths, strict=True):
            if name not in available:
                missing.append(name)
                continue
            shape = _transformed_shape(transform, source.shape(name))
            expected = tuple(leaf.shape[:-1]) + (width,) if joined else tuple(leaf.shape)
            if shape != expected:
                part = f" (part of {what}'s fused {tuple(leaf.shape)})" if joined else ""
                mismatched.append(
                    f"{name}: checkpoint {source.shape(name)} -> {shape}, {what} expects {expected}{part}"
                )
        plan.append((names, transform))
    unexpected = sorted(n for n in available - used if not ignored(n))
    if missing or unexpected or mismatched:
        problems = []
        if missing:
            problems.append(f"missing keys ({len(missing)}): " + ", ".join(missing))
        if unexpected:
            problems.append(f"unexpected keys ({len(unexpected)}): " + ", ".join(unexpected))
        if mismatched:
            problems.append(f"shape mismatches ({len(mismatched)}): " + "; ".join(mismatched))
        raise CheckpointError(f"checkpoint does not match {what}'s config:\n  " + "\n  ".join(problems))
    arrays = [
        jnp.concatenate([transform(_load_tensor(source, name)).astype(dtype) for name in names], axis=-1)
        if len(names) > 1
        else transform(_load_tensor(source, names[0])).astype(dtype)
        for names, transform in plan
    ]
    return nnx.merge(graphdef, jax.tree_util.tree_unflatten(treedef, arrays))


def checkpoint_parts(module, name_for) -> list[tuple[str, Transform, np.ndarray]]:
    """(checkpoint name, transform, float32 array in our layout) of every parameter of ``module``, a
    fused one cut into the tensors it joins: apply the inverse transform to get transformers' layout
    (the inverse of `fill_module`)."""
    parts = []
    for path, leaf in _leaf_paths(nnx.state(module, nnx.Param))[0]:
        names, transform = name_for(path)
        array = np.asarray(jnp.asarray(leaf, jnp.float32))
        if isinstance(names, str):
            parts.append((names, transform, array))
            continue
        fused = fused_module(module, path)  # its columns may be in tensor-parallel blocks
        pieces = split_blocked(array, fused.sizes, fused.blocks)
        parts.extend((name, transform, np.asarray(piece)) for name, piece in zip(names, pieces))
    return parts


def load_params(
    cfg: LlavaModelConfig, source, dtype: str = "float32", attention: str = AUTO
) -> LlavaForConditionalGeneration:
    """Build the model from `source` (TensorSource / StateDictSource), checking every name and shape;
    ``attention``: how both towers attend (`models.config.with_attention`; ``auto`` resolved here)."""
    if dtype not in DTYPES:
        raise ValueError(f"unsupported dtype {dtype!r}; supported: {', '.join(DTYPES)}")
    jdtype = DTYPES[dtype]
    cfg = with_attention(cfg, attention, jdtype)
    abstract = nnx.eval_shape(lambda: LlavaForConditionalGeneration(cfg, dtype=jdtype, rngs=nnx.Rngs(0)))
    return fill_module(
        abstract,
        source,
        hf_name_for,
        jdtype,
        ignored=lambda n: n.endswith(IGNORED_SUFFIXES) or (cfg.tie_word_embeddings and n == "lm_head.weight"),
    )


def load_checkpoint(
    directory: str | os.PathLike,
    dtype: str = "float32",
    text_tower: str | os.PathLike | None = None,
    attention: str = AUTO,
):
    """(hf_config, model) from a llava-hf checkpoint directory (config.json + safetensors); with
    ``text_tower``, a CLIPModel directory, the model also gets CLIP's text tower and visual
    projection (``model.joint_space``), for methods that read CLIP's joint space. ``attention``: how
    the towers attend (``auto``: cuDNN on a GPU in bfloat16 / float16, einsum otherwise)."""
    directory = os.fspath(directory)
    if not os.path.isdir(directory):
        raise FileNotFoundError(f"checkpoint directory {directory!r} does not exist")
    hf_config = load_hf_config(directory)
    cfg = from_hf_config(hf_config)
    model = load_params(cfg, TensorSource(directory), dtype, attention)
    if text_tower is not None:
        attach_text_tower(model, text_tower, dtype)
    return hf_config, model


def attach_text_tower(model: LlavaForConditionalGeneration, directory: str | os.PathLike, dtype: str) -> None:
    """Give ``model`` CLIP's text tower and visual projection from a CLIPModel directory."""
    from models.clip_text import load_joint_space

    model.joint_space = load_joint_space(directory, model.config.vision.hidden_size, DTYPES[dtype])


def state_dict_to_numpy(state_dict: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """A torch state_dict as float32 numpy arrays (bfloat16 has no numpy dtype), for StateDictSource."""
    return {name: tensor.detach().float().cpu().numpy() for name, tensor in state_dict.items()}


_INVERSE = {_identity: _identity, _transpose: _transpose}


def _inverse_transform(transform: Transform, patch_conv_shape: tuple[int, ...]) -> Transform:
    """The torch-layout array for one of ours (`patch_conv_shape`: the torch shape of the patch
    convolution, the one transform that loses a shape)."""
    if transform is _flatten_patch_conv:
        return lambda x: x.T.reshape(patch_conv_shape)
    return _INVERSE[transform]


def _disk_name(name: str) -> str:
    """Canonical name -> llava-hf's on-disk spelling (as the released llava-1.5-*-hf files have it)."""
    if name == "lm_head.weight":
        return "language_model.lm_head.weight"
    if name.startswith("language_model."):
        return "language_model.model." + name[len("language_model.") :]
    if name.startswith("vision_tower."):
        return "vision_tower.vision_model." + name[len("vision_tower.") :]
    return name


def save_checkpoint(
    model: LlavaForConditionalGeneration, hf_config, directory: str | os.PathLike, *, dtype: str = "float32"
) -> str:
    """Write config.json + model.safetensors in llava-hf's layout (loadable by transformers and here)."""
    from safetensors.numpy import save_file

    if dtype not in ("float32", "float16"):
        raise ValueError(f"save dtype must be float32 or float16 (numpy has no bfloat16), got {dtype!r}")
    directory = os.fspath(directory)
    os.makedirs(directory, exist_ok=True)
    vision = model.config.vision
    patch_conv_shape = (vision.hidden_size, 3, vision.patch_size, vision.patch_size)
    tensors = {
        _disk_name(name): np.ascontiguousarray(_inverse_transform(transform, patch_conv_shape)(array)).astype(
            dtype
        )
        for name, transform, array in checkpoint_parts(model, hf_name_for)
    }
    hf_config.save_pretrained(directory)
    save_file(tensors, os.path.join(directory, SINGLE_FILE), metadata={"format": "pt"})
    return directory
