"""Training-only probes (never exported): dense supervision the answer word alone does not give.

* Patch probe: a linear map from each image feature (the projector's output, what the LLM reads) to
  the (colour, shape) of the object covering that patch and to whether the patch holds an object's
  centre, with cross-entropy balanced between object and background patches. It hands the vision
  tower one label per patch instead of one answer word per question; with the answer loss alone the
  model stayed at the question-text prior.
* Coordinate columns of the same map regress, on object patches, the covering object's box centre
  (row, column): what position questions compare.
* Relation probe: a linear map from the LLM's residual stream entering its last layer, at a position
  question's answer slot, to the two named objects' centres. It supervises the fetch of two
  coordinates from two objects' tokens, the step the answer word alone did not teach for left/right
  (above/below is given away by the raster order of the image tokens).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from experiments.testbed.words import COLOURS, SHAPES


def num_patch_classes() -> int:
    """Classes of the patch probe: background, then one per (colour, shape) pair."""
    return 1 + len(COLOURS) * len(SHAPES)


def patch_targets(scenes, scene_config):
    """Per-patch labels of a batch of layouts, for the patch probe: (classes, centres, coordinates).

    classes (B, N): 0 where no object's box covers the patch centre, else 1 + colour * len(SHAPES) +
    shape of the object that does (boxes never overlap, and every box of >= 1 patch side covers a patch
    centre). centres (B, N): whether the patch holds an object's box centre (one patch per object: what
    counting needs). coordinates (B, N, 2) float32: the covering object's box centre (row, column),
    scaled to [-1, 1] over the image, 0 on the background: the quantity the position questions compare
    (`questions.relation_holds` uses box centres), so the probe asks every object token to carry it linearly.
    Coordinates are doubled so patch and box centres are integers. Patches in row-major order, as the
    image tokens are.
    """
    grid, patch = scene_config.grid_size, scene_config.patch_size
    patch_centre2 = (2 * patch * jnp.arange(grid, dtype=jnp.int32) + patch)[None, None, :]  # (1, 1, G)
    top, left, size = (a.astype(jnp.int32)[..., None] for a in (scenes.top, scenes.left, scenes.size))
    rows = (2 * top <= patch_centre2) & (patch_centre2 < 2 * (top + size))  # (B, M, G)
    cols = (2 * left <= patch_centre2) & (patch_centre2 < 2 * (left + size))
    covered = rows[..., :, None] & cols[..., None, :] & scenes.valid[..., None, None]  # (B, M, G, G)
    label = 1 + scenes.colour_id.astype(jnp.int32) * len(SHAPES) + scenes.shape_id.astype(jnp.int32)
    classes = (covered * label[..., None, None]).sum(axis=1)
    arange = jnp.arange(grid, dtype=jnp.int32)
    centre_row = (2 * top + size) // (2 * patch) == arange  # (B, M, G)
    centre_col = (2 * left + size) // (2 * patch) == arange
    centres = (centre_row[..., :, None] & centre_col[..., None, :] & scenes.valid[..., None, None]).any(
        axis=1
    )
    coordinates = jnp.einsum("bmrc,bmk->brck", covered.astype(jnp.float32), box_centres(scenes, scene_config))
    batch = classes.shape[0]
    return (
        classes.reshape(batch, grid * grid),
        centres.reshape(batch, grid * grid),
        coordinates.reshape(batch, grid * grid, 2),
    )


def box_centres(scenes, scene_config):
    """(B, M, 2) float32 box centres (row, column) of every object slot, scaled to [-1, 1] over the image
    (from doubled integer coordinates, so the centre of an odd-sized box is exact)."""
    top, left, size = (a.astype(jnp.int32) for a in (scenes.top, scenes.left, scenes.size))
    doubled = jnp.stack([2 * top + size, 2 * left + size], axis=-1).astype(jnp.float32)
    return doubled / jnp.float32(scene_config.image_size) - 1.0


def probe_outputs() -> int:
    """Outputs of the patch probe: the class logits, a box-centre logit, the (row, column) coordinates."""
    return num_patch_classes() + 1 + 2


def init_probe(width: int, seed: int) -> dict:
    """The patch probe: one linear map from an image feature (the projector's output, what the LLM
    reads) to the patch-class logits, a box-centre logit and the object's centre coordinates.
    Training-only: not exported. The coordinate columns start at zero (every prediction at the image
    centre), so their weighted squared error starts small instead of swamping the clipped gradient."""
    kernel = jax.random.normal(jax.random.key(seed), (width, probe_outputs()), jnp.float32) * jnp.float32(
        width**-0.5
    )
    kernel = kernel.at[:, num_patch_classes() + 1 :].set(0.0)
    return {"kernel": kernel, "bias": jnp.zeros((probe_outputs(),), jnp.float32)}


RELATION_OUTPUTS = 4  # (row, column) of a position question's subject, then of its reference object


def init_relation_probe(width: int) -> dict:
    """The relation probe: a linear map from the LLM's residual stream at a position question's answer
    slot, entering the last layer, to the two named objects' box centres (`RELATION_OUTPUTS`, in the
    [-1, 1] units of `patch_targets`). Training-only. Zero-initialised, like the coordinate columns."""
    return {
        "kernel": jnp.zeros((width, RELATION_OUTPUTS), jnp.float32),
        "bias": jnp.zeros((RELATION_OUTPUTS,), jnp.float32),
    }


def initial_trainable(model_params, cfg, seed: int) -> dict:
    """What the optimizer updates and a training state saves: {"model": the LLaVA's nnx state, "probe":
    the patch probe, "relation_probe": the relation probe}; only "model" is exported."""
    return {
        "model": model_params,
        "probe": init_probe(cfg.text.hidden_size, seed),
        "relation_probe": init_relation_probe(cfg.text.hidden_size),
    }


def relation_targets(scenes, relation_objects, scene_config):
    """((B, turns, RELATION_OUTPUTS) box centres of the objects each position question names, in
    [-1, 1] units, (B, turns) mask of the position turns): gathered from the layouts by slot."""
    centres = box_centres(scenes, scene_config)
    mask = (relation_objects >= 0).all(-1)
    slots = jnp.clip(relation_objects, 0).reshape(relation_objects.shape[0], -1)  # (B, turns * 2)
    picked = jnp.take_along_axis(centres, slots[..., None], axis=1)  # (B, turns * 2, 2)
    return picked.reshape(*relation_objects.shape[:2], RELATION_OUTPUTS), mask


def relation_probe_loss(relation_probe: dict, hidden, targets, mask):
    """Squared error (summed over the 4 coordinates) of the relation probe, averaged over the
    position turns; float32. A position question is answered by comparing two coordinates the LLM
    must first fetch from two different objects' tokens; this supervises that fetch directly."""
    predicted = hidden.astype(jnp.float32) @ relation_probe["kernel"] + relation_probe["bias"]
    return _masked_mean(((predicted - targets) ** 2).sum(-1), mask)


def _masked_mean(values, mask):
    """Mean of `values` where `mask` holds (0 where it never does)."""
    weight = mask.astype(jnp.float32)
    return (values * weight).sum() / jnp.maximum(weight.sum(), 1.0)


def _balanced_mean(values, positive):
    """Mean over the `positive` entries and mean over the rest, averaged: objects cover a few percent of
    the patches, so a plain mean would be almost all background."""
    return 0.5 * (_masked_mean(values, positive) + _masked_mean(values, jnp.logical_not(positive)))


def patch_probe_losses(probe: dict, image_features, classes, centres, coordinates):
    """(class cross-entropy, centre binary cross-entropy, coordinate squared error, object-patch class
    accuracy), float32. The cross-entropies are balanced between object and background patches
    (`_balanced_mean`); the squared error (summed over row and column, in the [-1, 1] units of
    `patch_targets`) is averaged over the object patches only (the background has no coordinate)."""
    logits = image_features.astype(jnp.float32) @ probe["kernel"] + probe["bias"]
    num_classes = num_patch_classes()
    class_logits, centre_logits = logits[..., :num_classes], logits[..., num_classes]
    predicted_coordinates = logits[..., num_classes + 1 :]
    on_object = classes > 0
    class_nll = _balanced_mean(
        optax.softmax_cross_entropy_with_integer_labels(class_logits, classes), on_object
    )
    centre_nll = _balanced_mean(
        optax.sigmoid_binary_cross_entropy(centre_logits, centres.astype(jnp.float32)), centres
    )
    coordinate_mse = _masked_mean(((predicted_coordinates - coordinates) ** 2).sum(-1), on_object)
    hits = (jnp.argmax(class_logits, axis=-1) == classes) & on_object
    accuracy = hits.sum() / jnp.maximum(on_object.sum(), 1)
    return class_nll, centre_nll, coordinate_mse, accuracy
