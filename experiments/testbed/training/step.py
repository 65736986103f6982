"""The jitted training step: pixels, the teacher-forced forward, the loss, AdamW, the schedule.

* Pixels are rendered inside the step (`render_scenes`, integer-exact) and normalised like LLaVA-1.5's
  image processor. The scenes are already squares of the tower's input size, so the processor's pad /
  resize / crop are identities and it reduces to a 1/255 rescale and the CLIP mean/std normalisation.
* The forward reuses the inference modules (image_features -> embed_prompt -> each layer's `prefill`
  -> logits), no KV cache; the loss is cross-entropy on the answer words and their `</s>`.
* Mixed precision: float32 master weights and AdamW state, bfloat16 compute (the weights are cast
  inside the step); norms, softmax and logits stay float32 inside the modules.
* One compilation: static shapes (fixed batch, prompts padded to the longest template), and the step
  donates the parameters and optimizer state.
* The learning rate is an argument of the step, so the schedule can follow the clock as well as the
  step count (`learning_rate_at`).
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from experiments.testbed.render import render_scenes
from experiments.testbed.training.batches import DeviceBatch
from experiments.testbed.training.config import TrainOptions
from experiments.testbed.training.probes import (
    patch_probe_losses,
    patch_targets,
    relation_probe_loss,
    relation_targets,
)
from experiments.testbed.words import KINDS
from models.layers import AUTO, CUDNN, EMPTY_POSITION, XLA, resolve_attention
from models.presets import llava15_image_processor


class PixelNormalization(NamedTuple):
    """LLaVA-1.5's processor on an image already of the tower's size: x * rescale, then (x - mean) / std."""

    rescale_factor: float
    mean: tuple[float, ...]
    std: tuple[float, ...]

    @classmethod
    def from_hf_config(cls, hf_config) -> PixelNormalization:
        """Read from the LLaVA-1.5 image processor the checkpoint is saved with (one source of truth)."""
        processor = llava15_image_processor(hf_config)
        return cls(
            float(processor.rescale_factor),
            tuple(map(float, processor.image_mean)),
            tuple(map(float, processor.image_std)),
        )


def normalize_pixels(images, normalization: PixelNormalization):
    """uint8 (B, H, W, 3) -> float32 (B, 3, H, W), as `Preprocessor.pixel_values` computes it."""
    x = images.astype(jnp.float32) * jnp.float32(normalization.rescale_factor)
    x = (x - jnp.asarray(normalization.mean, jnp.float32)) / jnp.asarray(normalization.std, jnp.float32)
    return x.transpose(0, 3, 1, 2)


def scene_pixels(scenes, scene_config, normalization: PixelNormalization):
    """The tower's pixel values of `scenes`, rendered on the device: what the step trains on."""
    return normalize_pixels(render_scenes(scenes, scene_config), normalization)


def answer_logits_and_hidden(model, image_features, input_ids, lengths, target_positions, attention=None):
    """Float32 logits (B, J, V) at `target_positions` of the teacher-forced sequences, and the residual
    stream (B, J, D) there entering the LAST decoder layer (what the relation probe reads: the last
    layer is left to compare what it holds).

    Runs the inference modules (embed_prompt, then each layer's `prefill`) over the whole sequence, so
    training and inference share one forward. `image_features` is `model.image_features(pixel_values)`
    (computed once by the caller, which also feeds it to the patch probe). Slots at or after `lengths`
    are padding (empty positions). `attention`: the LLM's attention implementation for this forward
    (default: the model config's); `fused_attention_implementation` gives the fused one, equal on
    every real token (the sequences are slot-ordered with their padding at the end; see
    `models.layers.self_attention`)."""
    slots = jnp.arange(input_ids.shape[1], dtype=jnp.int32)[None]
    positions = jnp.where(slots < lengths[:, None], slots, EMPTY_POSITION)
    x, _ = model.embed_prompt(input_ids, image_features)
    layers = model.language_model.layers
    for layer in layers[:-1]:
        x = layer.prefill(x, positions, attention=attention)[0]
    before_last = jnp.take_along_axis(x, target_positions[..., None], axis=1)
    x = layers[-1].prefill(x, positions, attention=attention)[0]
    hidden = jnp.take_along_axis(x, target_positions[..., None], axis=1)
    return model.language_model.logits(hidden), before_last


def fused_attention_implementation(dtype) -> str:
    """The trainer's fused causal attention in ``dtype``: cuDNN's flash kernel where `auto` would take it
    (a GPU, bfloat16 / float16: no logits in memory), XLA's implementation of the same call elsewhere
    (cuDNN's kernel takes no float32)."""
    return CUDNN if resolve_attention(AUTO, dtype) == CUDNN else XLA


def make_optimizer(options: TrainOptions):
    """Clip -> Adam moments -> decoupled weight decay on matrices. The step scales by -lr itself (the
    learning rate is an argument of the step, so the schedule can follow the clock). With
    freeze_vision the tower's leaves get no moments and no decay: their update is their (stopped,
    zero) gradient."""
    return _optimizer(options.grad_clip, options.weight_decay, options.freeze_vision)


def is_vision_tower(path) -> bool:
    """Whether a leaf path of `initial_trainable`'s pytree lies in the LLaVA's vision tower."""
    keys = [getattr(entry, "key", None) for entry in path[:2]]
    return keys == ["model", "vision_tower"]


def without_vision_gradient(trainable):
    return jax.tree_util.tree_map_with_path(
        lambda path, p: jax.lax.stop_gradient(p) if is_vision_tower(path) else p, trainable
    )


@functools.cache
def _optimizer(grad_clip: float, weight_decay: float, freeze_vision: bool = False):
    def decay_mask(params):
        return jax.tree.map(lambda p: p.ndim >= 2, params)

    chain = optax.chain(
        optax.clip_by_global_norm(grad_clip),
        optax.scale_by_adam(b1=0.9, b2=0.98, eps=1e-8),
        optax.add_decayed_weights(weight_decay, mask=decay_mask),
    )
    if not freeze_vision:
        return chain

    def trained(params):
        return jax.tree_util.tree_map_with_path(lambda path, _: not is_vision_tower(path), params)

    return optax.masked(chain, trained)


def learning_rate_at(step: int, progress: float, options: TrainOptions) -> float:
    """Linear warm-up over steps, then cosine decay to zero over `progress` in [0, 1]."""
    warmup = min(1.0, (step + 1) / max(1, options.warmup_steps))
    return options.learning_rate * warmup * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


@functools.cache
def make_train_step(
    graphdef,
    optimizer,
    scene_config,
    normalization: PixelNormalization,
    compute_dtype,
    patch_loss_weight: float,
    coordinate_loss_weight: float,
    relation_loss_weight: float,
    freeze_vision: bool = False,
    fused_attention: bool = False,
):
    """The jitted step (trainable, opt_state, batch, lr) -> (trainable, opt_state, metrics); donates the
    state. `trainable` is `initial_trainable(...)`'s pytree.

    Loss: answer cross-entropy + patch_loss_weight * (patch-class + box-centre cross-entropy of the
    probe on the image features) + coordinate_loss_weight * (squared error of the probe's object-centre
    coordinates on object patches) + relation_loss_weight * (squared error of the relation probe's
    coordinates of the two objects a position question names, read at its answer slot); the probes'
    reasons are in `probes`. freeze_vision: the tower's weights get no gradient (pair it with an
    optimizer made with the same setting); fused_attention: the LLM's attention through
    `fused_attention_implementation(compute_dtype)`. Memoised on its (hashable) arguments, so runs in
    one process share one compilation.
    """

    def loss_fn(trainable, batch: DeviceBatch):
        if freeze_vision:  # no gradient: XLA drops the tower's backward pass
            trainable = without_vision_gradient(trainable)
        compute = jax.tree.map(lambda p: p.astype(compute_dtype), trainable["model"])
        model = nnx.merge(graphdef, compute)
        pixels = scene_pixels(batch.scenes, scene_config, normalization)
        features = model.image_features(pixels)
        logits, before_last = answer_logits_and_hidden(
            model,
            features,
            batch.input_ids,
            batch.lengths,
            batch.target_positions,
            fused_attention_implementation(compute_dtype) if fused_attention else None,
        )
        log_probs = jax.nn.log_softmax(logits, axis=-1)
        nll = -jnp.take_along_axis(log_probs, batch.target_ids[..., None], axis=-1)[..., 0]
        mask = batch.target_mask.astype(jnp.float32)
        answer_loss = (nll * mask).sum() / jnp.maximum(mask.sum(), 1.0)
        correct = jnp.argmax(logits[:, 0::2], axis=-1) == batch.target_ids[:, 0::2]  # (B, turns) answers
        classes, centres, coordinates = patch_targets(batch.scenes, scene_config)
        class_nll, centre_nll, coordinate_mse, patch_accuracy = patch_probe_losses(
            trainable["probe"], features, classes, centres, coordinates
        )
        targets, relation_mask = relation_targets(batch.scenes, batch.relation_objects, scene_config)
        relation_mse = relation_probe_loss(
            trainable["relation_probe"], before_last[:, 0::2], targets, relation_mask
        )
        total = (
            answer_loss
            + patch_loss_weight * (class_nll + centre_nll)
            + coordinate_loss_weight * coordinate_mse
            + relation_loss_weight * relation_mse
        )
        return total, dict(
            correct=correct,
            answer_loss=answer_loss,
            patch_loss=class_nll + centre_nll,
            patch_accuracy=patch_accuracy,
            coordinate_mse=coordinate_mse,
            relation_mse=relation_mse,
        )

    @functools.partial(jax.jit, donate_argnums=(0, 1))
    def train_step(trainable, opt_state, batch: DeviceBatch, learning_rate):
        (_, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(trainable, batch)
        updates, opt_state = optimizer.update(grads, opt_state, trainable)
        trainable = jax.tree.map(lambda p, u: p - learning_rate * u.astype(p.dtype), trainable, updates)
        asked = batch.kind_ids >= 0
        kinds = jax.nn.one_hot(batch.kind_ids, len(KINDS), dtype=jnp.float32)  # -1 -> all zeros
        correct = aux["correct"].astype(jnp.float32)
        metrics = {
            "loss": aux["answer_loss"],
            "accuracy": (correct * asked).sum() / jnp.maximum(asked.sum(), 1),
            "first_turn_accuracy": correct[:, 0].mean(),
            "grad_norm": optax.global_norm(grads),
            "patch_loss": aux["patch_loss"],
            "patch_accuracy": aux["patch_accuracy"],
            "coordinate_mse": aux["coordinate_mse"],
            "relation_mse": aux["relation_mse"],
            "kind_correct": (kinds * correct[..., None]).sum((0, 1)),
            "kind_count": kinds.sum((0, 1)),
        }
        return trainable, opt_state, metrics

    return train_step
