"""The training state on disk: everything needed to continue a run, in --work_dir.

Params, optimizer state, step, schedule progress and log are saved atomically; a resumed run checks
the configuration's fingerprint first. On a fresh machine, where only the export came back,
`initial_weights` warm-starts from an exported checkpoint instead.
"""

from __future__ import annotations

import hashlib
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from experiments.testbed.training.config import TrainOptions
from models.checkpoint import load_checkpoint
from models.config import from_hf_config

# Files of a training state in --work_dir (the log is also copied next to the export).
STATE_ARRAYS = "state.npz"
STATE_META = "state.json"
LOG_FILE = "training_log.jsonl"


def config_fingerprint(hf_config, options: TrainOptions, scene_config) -> str:
    """What must match for a saved state to be continued: model, data, batch, optimizer, schedule."""
    keys = (
        "steps",
        "batch_size",
        "learning_rate",
        "warmup_steps",
        "weight_decay",
        "grad_clip",
        "seed",
        "init_from",
        "init_vision_from",
        "freeze_vision",
        "fused_attention",
        "patch_loss_weight",
        "coordinate_loss_weight",
        "relation_loss_weight",
        "turns",
        "train_kind_weights",
    )
    text = json.dumps(
        [hf_config.to_dict(), repr(scene_config), {k: getattr(options, k) for k in keys}],
        sort_keys=True,
        default=str,
    )
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def initial_weights(directory: str, cfg, params):
    """Float32 weights of an exported checkpoint, for a warm start (e.g. to continue training in a later
    command on a fresh machine, where only the export came back). The configs must agree."""
    hf_config, model = load_checkpoint(directory, dtype="float32")
    if from_hf_config(hf_config) != cfg:
        raise ValueError(
            f"--init_from checkpoint {directory} has another model configuration than the one trained"
        )
    weights = nnx.state(model)
    if jax.tree.structure(weights) != jax.tree.structure(params):
        raise ValueError(f"--init_from checkpoint {directory} does not match the model's parameter tree")
    return jax.tree.map(jnp.asarray, weights)


def initial_vision_weights(directory: str, cfg, params):
    """`params` with the vision tower's weights taken from an exported checkpoint whose tower has the
    same configuration (the LLM and projector may differ: a warm start of another language model)."""
    hf_config, model = load_checkpoint(directory, dtype="float32")
    if from_hf_config(hf_config).vision != cfg.vision:
        raise ValueError(
            f"--init_vision_from checkpoint {directory} has another vision tower configuration than "
            f"the one trained"
        )
    params["vision_tower"] = jax.tree.map(jnp.asarray, nnx.state(model.vision_tower))
    return params


def save_state(work_dir: str, params, opt_state, meta: dict) -> None:
    """Atomically write the arrays (params then optimizer leaves, in tree order) and the metadata."""
    leaves = jax.tree.leaves((params, opt_state))
    os.makedirs(work_dir, exist_ok=True)
    arrays_tmp = os.path.join(work_dir, STATE_ARRAYS + ".tmp")
    with open(arrays_tmp, "wb") as handle:
        np.savez(handle, **{f"{i:05d}": np.asarray(leaf) for i, leaf in enumerate(jax.device_get(leaves))})
    meta_tmp = os.path.join(work_dir, STATE_META + ".tmp")
    with open(meta_tmp, "w") as handle:
        json.dump(meta, handle, indent=1)
    os.replace(arrays_tmp, os.path.join(work_dir, STATE_ARRAYS))
    os.replace(meta_tmp, os.path.join(work_dir, STATE_META))


def load_state(work_dir: str, params, opt_state):
    """(params, opt_state, meta) from `work_dir`, shaped like the given templates; None if no state."""
    meta_path = os.path.join(work_dir, STATE_META)
    if not os.path.isfile(meta_path):
        return None
    with open(meta_path) as handle:
        meta = json.load(handle)
    templates, treedef = jax.tree.flatten((params, opt_state))
    with np.load(os.path.join(work_dir, STATE_ARRAYS)) as arrays:
        if len(arrays.files) != len(templates):
            raise ValueError(
                f"training state in {work_dir} has {len(arrays.files)} arrays, the model and "
                f"optimizer need {len(templates)}"
            )
        leaves = []
        for i, template in enumerate(templates):
            array = arrays[f"{i:05d}"]
            if array.shape != template.shape or array.dtype != template.dtype:
                raise ValueError(
                    f"training state array {i} is {array.dtype}{array.shape}, expected "
                    f"{template.dtype}{template.shape}"
                )
            leaves.append(jnp.asarray(array))  # uncommitted, like fresh arrays: the same jit cache entry
    params, opt_state = jax.tree.unflatten(treedef, leaves)
    return params, opt_state, meta


def read_log(path: str, up_to_step: int | None = None) -> list[dict]:
    if not os.path.isfile(path):
        return []
    with open(path) as handle:
        records = [json.loads(line) for line in handle if line.strip()]
    return [r for r in records if up_to_step is None or r["step"] <= up_to_step]


def write_log(path: str, records: list[dict]) -> None:
    with open(path + ".tmp", "w") as handle:
        handle.writelines(json.dumps(r) + "\n" for r in records)
    os.replace(path + ".tmp", path)
