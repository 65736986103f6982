"""The testbed's CLIP joint space: a small CLIP text tower and a visual projection, trained contrastively
against a testbed LVLM's frozen vision tower.

CDPruner's relevance compares each patch with the question in CLIP's joint image-text space. On a real
LLaVA-1.5 that space is openai CLIP's; the testbeds were trained from scratch and have no text tower,
so this program gives each one a stand-in (not the released model):

    PYTHONPATH=. python -m experiments.testbed.training.joint_space \
        --checkpoint=checkpoints/testbed-deep --output=checkpoints/testbed-deep/clip

* Images: TRAIN-split scenes rendered as the trainer renders them; the frozen tower's output at
  CDPruner's feature layer goes through its post_layernorm once, cached in a temporary directory.
* Texts: the testbed's question templates filled with what IS in the scene (an object's colour and
  shape, a present shape or colour, a true relation), kinds drawn by the testbed's question mixture,
  so the tower has read every question form CDPruner will feed it.
* Loss: CLIP's symmetric InfoNCE with a learned logit scale (clamped at 100), AdamW.
* Ours: the pooled features are ~99% one shared direction (their mean), and through it a random
  projection maps every image to one embedding, where the loss sits at log(batch) with every caption
  collapsed too. visual_projection is trained on the features with that direction removed and exported
  as (I - m m^T) W, so it is still one linear map, blind to the shared component of every patch.
* Image side of the loss: [CLS] or the patch mean at the feature layer (`--pooling=auto` trains both
  and keeps the one with the better held-out text->image retrieval): the LLM reads that layer, so the
  last layer and its [CLS], which CLIP would pool, may be untrained.

The output is a transformers CLIPConfig directory: config.json (the trained text tower, the LVLM's own
vision config), the tower's word-level tokenizer, model.safetensors with only `text_model.*`,
`text_projection.weight` and `visual_projection.weight` (the vision tower stays in the LVLM's
checkpoint), and training_log.json (settings and held-out numbers).
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import math
import os
import tempfile
import time
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from adaptprune_jax.methods.cdpruner import FEATURE_LAYER
from experiments.flag_config import run_program, setting
from experiments.testbed.encoding import VOCABULARY
from experiments.testbed.layout import sample_scenes, split_rng, take_scenes
from experiments.testbed.questions import SceneObject, relation_holds, relation_pairs, scene_objects
from experiments.testbed.scene_config import TestbedConfig
from experiments.testbed.training.step import PixelNormalization, scene_pixels
from experiments.testbed.words import (
    ATTRIBUTE_TEMPLATE,
    COLOUR_NAMES,
    COUNT_COLOUR_TEMPLATE,
    COUNT_SHAPE_TEMPLATE,
    EXISTENCE_TEMPLATE,
    KINDS,
    POSITION_TEMPLATES,
    SHAPE_NAMES,
    SHAPE_PLURALS,
    SHORT_ANSWER_INSTRUCTIONS,
)
from models.checkpoint import _INVERSE, SINGLE_FILE, checkpoint_parts, load_checkpoint
from models.clip_text import JointSpace, JointSpaceConfig, _hf_name, load_joint_space
from models.presets import clip_config
from models.tokenizer import build_clip_word_tokenizer

POOLINGS = ("cls", "patch_mean")
LOG_FILE = "training_log.json"
MAX_LOGIT_SCALE = math.log(100.0)  # CLIP's clamp
INITIAL_LOGIT_SCALE = math.log(1 / 0.07)  # CLIP's initial temperature
# Bumped when what the image cache holds changes, so an old cache is never read as a new one.
CACHE_VERSION = 1


@dataclasses.dataclass(frozen=True)
class JointSpaceOptions:
    checkpoint: str = setting(dataclasses.MISSING, "Testbed LVLM checkpoint (its vision tower is frozen).")
    output: str = setting(dataclasses.MISSING, "Directory to write (a CLIPConfig directory).")
    train_images: int = setting(2048, "TRAIN-split scenes to train on.")
    validation_images: int = setting(1024, "VALIDATION-split scenes for the held-out retrieval.")
    seed: int = setting(0, "Seed of the scenes, the captions and the initial weights.")
    hidden_size: int = setting(64, "Text tower width.")
    num_layers: int = setting(2, "Text tower layers.")
    num_heads: int = setting(2, "Text tower attention heads.")
    intermediate_size: int = setting(256, "Text tower MLP width.")
    max_position_embeddings: int = setting(77, "Text tower positions (CLIP's segment length).")
    projection_dim: int = setting(64, "Joint-space width.")
    steps: int = setting(2000, "Training steps.")
    batch_size: int = setting(128, "Image-caption pairs per step (distinct images).")
    learning_rate: float = setting(1e-3, "Peak learning rate (linear warm-up, cosine decay to 0).")
    warmup_steps: int = setting(100, "Warm-up steps.")
    weight_decay: float = setting(0.1, "AdamW decoupled weight decay on matrices.")
    null_mean_direction: bool = setting(
        True,
        "Train and export visual_projection orthogonal to the training features' mean direction "
        "(the pooled features are ~99% that one direction, through which the loss collapses).",
    )
    pooling: str = setting(
        "auto", "Image side of the loss; auto trains both and keeps the better.", choices=("auto", *POOLINGS)
    )
    retrieval_batch: int = setting(64, "Images per held-out retrieval batch.")
    retrieval_rounds: int = setting(4, "Captions drawn per held-out image for the retrieval.")
    alignment_scenes: int = setting(64, "Held-out scenes of the patch-to-question cosine measurement.")
    render_chunk: int = setting(32, "Scenes per vision-tower call.")
    cache_dir: str = setting("", "Cache of the frozen image features; default: under the temp dir.")
    quiet: bool = setting(False, "No progress lines.")


# ---------------------------------------------------------------------------------------------
# The text tower's config, the directory's weights.
# ---------------------------------------------------------------------------------------------


def text_config(options: JointSpaceOptions, tokenizer):
    """transformers' CLIPTextConfig of the tower (ids from the tokenizer)."""
    from transformers import CLIPTextConfig

    return CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=options.hidden_size,
        intermediate_size=options.intermediate_size,
        num_hidden_layers=options.num_layers,
        num_attention_heads=options.num_heads,
        max_position_embeddings=options.max_position_embeddings,
        projection_dim=options.projection_dim,
        hidden_act="quick_gelu",
        layer_norm_eps=1e-5,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )


def save_joint_space(model: JointSpace, config, tokenizer, directory: str) -> str:
    """config.json, the tokenizer and model.safetensors (float32, torch layout, the names
    `models.clip_text.load_joint_space` reads) into `directory`."""
    from safetensors.numpy import save_file

    os.makedirs(directory, exist_ok=True)
    tensors = {}
    for name, transform, array in checkpoint_parts(model, _hf_name):
        tensors[name] = np.ascontiguousarray(_INVERSE[transform](array))
    config.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    save_file(tensors, os.path.join(directory, SINGLE_FILE), metadata={"format": "pt"})
    return directory


# ---------------------------------------------------------------------------------------------
# Captions.
# ---------------------------------------------------------------------------------------------


def _position_captions(objects: list[SceneObject], margin_px: int) -> list[str]:
    """Every true relation between two objects of unique (colour, shape), centres `margin_px` apart
    along the relation's axis (as the position questions pick them)."""
    return [
        POSITION_TEMPLATES[relation].format(
            colour=COLOUR_NAMES[first.colour],
            shape=SHAPE_NAMES[first.shape],
            colour2=COLOUR_NAMES[second.colour],
            shape2=SHAPE_NAMES[second.shape],
        )
        for first, second, relations in relation_pairs(objects, margin_px)
        for relation in relations
        if relation_holds(relation, first, second)
    ]


def scene_captions(objects: list[SceneObject], scene_config: TestbedConfig) -> dict[str, list[str]]:
    """kind -> the distinct texts of that question kind that are true of the scene's content."""
    shapes = sorted({o.shape for o in objects})
    colours = sorted({o.colour for o in objects})
    pairs = sorted({o.pair for o in objects})
    captions = {
        "existence": [
            EXISTENCE_TEMPLATE.format(colour=COLOUR_NAMES[c], shape=SHAPE_NAMES[s]) for c, s in pairs
        ],
        "counting": [COUNT_SHAPE_TEMPLATE.format(shapes=SHAPE_PLURALS[s]) for s in shapes]
        + [COUNT_COLOUR_TEMPLATE.format(colour=COLOUR_NAMES[c]) for c in colours],
        "attribute": [ATTRIBUTE_TEMPLATE.format(shape=SHAPE_NAMES[s]) for s in shapes],
        "position": _position_captions(objects, scene_config.relation_margin_px),
    }
    assert set(captions) == set(KINDS)
    return captions


class CaptionTable(NamedTuple):
    """Every caption of a set of scenes, tokenized once, and what each scene may be captioned with."""

    texts: list[str]
    input_ids: np.ndarray  # (C, L) int32, padded with the end-of-text token
    attention_mask: np.ndarray  # (C, L) int32
    choices: np.ndarray  # (S, K, M) int32 caption indices per scene and kind, -1 padding
    counts: np.ndarray  # (S, K) int32
    kind_of: np.ndarray  # (C,) int32 index into KINDS

    def holds(self, scene: int) -> set[int]:
        return set(self.choices[scene][self.choices[scene] >= 0].tolist())


def caption_table(scenes, scene_config: TestbedConfig, tokenizer) -> CaptionTable:
    per_scene = [scene_captions(scene_objects(scenes, i), scene_config) for i in range(len(scenes.valid))]
    index: dict[str, int] = {}
    kind_of: list[int] = []
    for captions in per_scene:
        for k, kind in enumerate(KINDS):
            for text in captions[kind]:
                if text not in index:
                    index[text] = len(index)
                    kind_of.append(k)
    width = max(len(c[kind]) for c in per_scene for kind in KINDS)
    choices = np.full((len(per_scene), len(KINDS), width), -1, np.int32)
    counts = np.zeros((len(per_scene), len(KINDS)), np.int32)
    for s, captions in enumerate(per_scene):
        for k, kind in enumerate(KINDS):
            ids = [index[text] for text in captions[kind]]
            choices[s, k, : len(ids)] = ids
            counts[s, k] = len(ids)
    texts = list(index)
    encoded = tokenizer(texts, padding="longest", return_tensors="np")
    return CaptionTable(
        texts,
        encoded["input_ids"].astype(np.int32),
        encoded["attention_mask"].astype(np.int32),
        choices,
        counts,
        np.asarray(kind_of, np.int32),
    )


def draw_captions(
    rng: np.random.Generator, table: CaptionTable, scenes: np.ndarray, kind_weights: tuple[float, ...]
) -> np.ndarray:
    """One caption index per scene: a kind by the question mixture (among the kinds the scene has
    captions of), then one of its captions uniformly."""
    rows = np.arange(len(scenes))
    counts = table.counts[scenes]
    cumulative = np.cumsum(np.asarray(kind_weights, np.float64)[None] * (counts > 0), axis=1)
    kinds = np.argmax(cumulative > rng.random((len(scenes), 1)) * cumulative[:, -1:], axis=1)
    # Round-off can leave the draw at the total: then the last kind the scene has captions of.
    last = len(KINDS) - 1 - np.argmax(counts[:, ::-1] > 0, axis=1)
    kinds = np.where(counts[rows, kinds] > 0, kinds, last)
    picks = np.floor(rng.random(len(scenes)) * counts[rows, kinds]).astype(np.int64)
    return table.choices[scenes, kinds, picks]


# ---------------------------------------------------------------------------------------------
# Frozen image features.
# ---------------------------------------------------------------------------------------------


@functools.cache
def _vision_readout(graphdef, layer: int, scene_config: TestbedConfig, normalization: PixelNormalization):
    """jit (vision state, scenes) -> post_layernorm(hidden_states[layer]) (B, 1 + N, W), [CLS] first."""

    @jax.jit
    def readout(state, scenes):
        tower = nnx.merge(graphdef, state)
        hidden = tower.encode(scene_pixels(scenes, scene_config, normalization), (layer,))[0][0]
        return tower.post_layernorm(hidden)

    return readout


class ImageFeatures(NamedTuple):
    pooled: dict[str, np.ndarray]  # pooling -> (S, W) float32, before visual_projection
    patches: np.ndarray  # (A, N, W) post-layernorm patches of the first A scenes


def image_features(
    tower, scenes, scene_config, normalization, chunk: int, keep_patches: int
) -> ImageFeatures:
    """[CLS] and patch mean of post_layernorm at CDPruner's feature layer (the mean of the per-patch
    inputs of its image embeds; visual_projection is linear), and the first scenes' patches."""
    layer = FEATURE_LAYER % (tower.cfg.num_layers + 1)
    graphdef, state = nnx.split(tower)
    readout = _vision_readout(graphdef, layer, scene_config, normalization)
    count = len(scenes.valid)
    cls, mean, patches = [], [], []
    for start in range(0, count, chunk):
        index = np.arange(start, min(start + chunk, count))
        if len(index) < chunk:  # one compiled shape: pad the last chunk with its first scene
            index = np.concatenate([index, np.full(chunk - len(index), index[0])])
        states = np.asarray(readout(state, take_scenes(scenes, index)))[: min(chunk, count - start)]
        cls.append(states[:, 0])
        mean.append(states[:, 1:].mean(1))
        if start < keep_patches:
            patches.append(states[: keep_patches - start, 1:])
    patches = np.concatenate(patches) if patches else np.zeros((0, *states[:, 1:].shape[1:]), np.float32)
    return ImageFeatures({"cls": np.concatenate(cls), "patch_mean": np.concatenate(mean)}, patches)


def _fingerprint(tower, *parts) -> str:
    digest = hashlib.sha256(json.dumps([CACHE_VERSION, *map(repr, parts)]).encode())
    for leaf in jax.tree.leaves(nnx.state(tower, nnx.Param)):
        digest.update(np.asarray(leaf, np.float32).tobytes())
    return digest.hexdigest()[:20]


def cached_image_features(tower, scenes, scene_config, normalization, options, split, keep_patches, log):
    """`image_features`, read from or written to the cache (keyed by the tower's weights and the
    scenes' settings, so testbeds sharing a tower share the entry)."""
    directory = options.cache_dir or os.path.join(tempfile.gettempdir(), "adaptprune-joint-space")
    key = _fingerprint(
        tower,
        split,
        options.seed,
        len(scenes.valid),
        keep_patches,
        options.render_chunk,
        scene_config,
        normalization,
    )
    path = os.path.join(directory, f"{split}-{key}.npz")
    if os.path.isfile(path):
        with np.load(path) as stored:
            log(f"{split}: image features from the cache {path}")
            return ImageFeatures({p: stored[p] for p in POOLINGS}, stored["patches"])
    start = time.time()
    features = image_features(tower, scenes, scene_config, normalization, options.render_chunk, keep_patches)
    log(f"{split}: image features of {len(scenes.valid)} scenes in {time.time() - start:.0f} s")
    os.makedirs(directory, exist_ok=True)
    fresh = f"{path}.{os.getpid()}.npz"
    np.savez(fresh, patches=features.patches, **features.pooled)
    os.replace(fresh, path)
    return features


# ---------------------------------------------------------------------------------------------
# Training.
# ---------------------------------------------------------------------------------------------


def _unit(x):
    return x / jnp.linalg.norm(x, axis=-1, keepdims=True)


def embed_pairs(model: JointSpace, features, input_ids, attention_mask):
    """Unit image and text embeddings (B, P) each."""
    images = _unit(model.visual_projection(features))
    texts = _unit(model.text_tower(input_ids, attention_mask))
    return images, texts


def contrastive_loss(model: JointSpace, logit_scale, features, input_ids, attention_mask):
    """CLIP's symmetric InfoNCE over a batch of (image, caption) pairs, pair i the i-th positive."""
    images, texts = embed_pairs(model, features, input_ids, attention_mask)
    logits = jnp.exp(logit_scale) * images @ texts.T
    labels = jnp.arange(logits.shape[0])
    image_to_text = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
    text_to_image = optax.softmax_cross_entropy_with_integer_labels(logits.T, labels).mean()
    return (image_to_text + text_to_image) / 2


@functools.cache
def _optimizer(learning_rate: float, warmup_steps: int, steps: int, weight_decay: float):
    schedule = optax.warmup_cosine_decay_schedule(
        0.0, learning_rate, min(warmup_steps, max(steps - 1, 1)), max(steps, 2), 0.0
    )
    return optax.adamw(
        schedule,
        b1=0.9,
        b2=0.98,
        eps=1e-6,
        weight_decay=weight_decay,
        mask=lambda params: jax.tree.map(lambda p: p.ndim >= 2, params),
    )


@functools.cache
def _train_step(graphdef, optimizer):
    def loss_fn(params, features, input_ids, attention_mask):
        model = nnx.merge(graphdef, params["model"])
        return contrastive_loss(model, params["logit_scale"], features, input_ids, attention_mask)

    @jax.jit
    def step(params, opt_state, features, input_ids, attention_mask):
        loss, grads = jax.value_and_grad(loss_fn)(params, features, input_ids, attention_mask)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        params = optax.apply_updates(params, updates)
        params["logit_scale"] = jnp.minimum(params["logit_scale"], MAX_LOGIT_SCALE)
        return params, opt_state, loss

    return step


@functools.cache
def _evaluate_loss(graphdef):
    return jax.jit(
        lambda params, features, ids, mask: contrastive_loss(
            nnx.merge(graphdef, params["model"]), params["logit_scale"], features, ids, mask
        )
    )


def _mean_direction(features: np.ndarray) -> np.ndarray:
    mean = features.astype(np.float64).mean(0)
    return mean / np.linalg.norm(mean)


class TrainResult(NamedTuple):
    model: JointSpace
    logit_scale: float
    losses: list[float]  # per step
    fixed_batch_loss: tuple[float, float]  # before, after: one fixed training batch


def train(
    options: JointSpaceOptions,
    cfg: JointSpaceConfig,
    features: np.ndarray,
    table: CaptionTable,
    kind_weights,
    log=print,
) -> TrainResult:
    """The text tower and visual projection from `features` (S, W) and their caption table."""
    count = len(features)
    batch = min(options.batch_size, count)
    model = JointSpace(cfg, rngs=nnx.Rngs(options.seed))
    null = _mean_direction(features) if options.null_mean_direction else None
    if null is not None:
        features = (features - np.outer(features @ null, null)).astype(np.float32)
    graphdef, state = nnx.split(model)
    params = {"model": state, "logit_scale": jnp.float32(INITIAL_LOGIT_SCALE)}
    optimizer = _optimizer(options.learning_rate, options.warmup_steps, options.steps, options.weight_decay)
    opt_state = optimizer.init(params)
    step = _train_step(graphdef, optimizer)
    evaluate = _evaluate_loss(graphdef)
    rng = np.random.default_rng([options.seed, 1])
    fixed = np.arange(batch)
    fixed_captions = draw_captions(np.random.default_rng([options.seed, 2]), table, fixed, kind_weights)

    def fixed_loss(params):
        ids, mask = table.input_ids[fixed_captions], table.attention_mask[fixed_captions]
        return float(evaluate(params, features[fixed], ids, mask))

    before = fixed_loss(params)
    order, cursor, losses = rng.permutation(count), 0, []
    for index in range(options.steps):
        if cursor + batch > count:
            order, cursor = rng.permutation(count), 0
        scenes = order[cursor : cursor + batch]
        cursor += batch
        captions = draw_captions(rng, table, scenes, kind_weights)
        params, opt_state, loss = step(
            params, opt_state, features[scenes], table.input_ids[captions], table.attention_mask[captions]
        )
        losses.append(loss)
        if (index + 1) % max(1, options.steps // 10) == 0:
            recent = float(np.mean(jax.device_get(losses[-max(1, options.steps // 10) :])))
            log(f"  step {index + 1}/{options.steps}: loss {recent:.4f}")
    losses = [float(x) for x in jax.device_get(losses)]
    after = fixed_loss(params)
    model = nnx.merge(graphdef, params["model"])
    if null is not None:  # x @ (P W) = (P x) @ W with P = I - m m^T: the trained map on any input
        kernel = np.asarray(model.visual_projection.kernel[...], np.float64)
        model.visual_projection.kernel[...] = jnp.asarray(kernel - np.outer(null, null @ kernel), jnp.float32)
    return TrainResult(model, float(params["logit_scale"]), losses, (before, after))


# ---------------------------------------------------------------------------------------------
# Held-out measurements.
# ---------------------------------------------------------------------------------------------


def _text_embeds(model: JointSpace, input_ids, attention_mask) -> np.ndarray:
    return np.asarray(jax.jit(lambda m, i, a: _unit(m.text_tower(i, a)))(model, input_ids, attention_mask))


def _image_embeds(model: JointSpace, features) -> np.ndarray:
    return np.asarray(jax.jit(lambda m, f: _unit(m.visual_projection(f)))(model, features))


def retrieval(
    model: JointSpace, features: np.ndarray, table: CaptionTable, kind_weights, options: JointSpaceOptions
) -> dict:
    """Text->image and image->text top-1 within consecutive batches of `retrieval_batch` held-out
    images, one drawn caption per image per round: exact (the caption's own image) and, for
    text->image, content (the retrieved image makes the caption true); with their chance levels."""
    size = options.retrieval_batch
    groups = len(features) // size
    if groups == 0:
        raise ValueError(f"{len(features)} held-out images are fewer than one retrieval batch of {size}")
    images = _image_embeds(model, features)
    texts = _text_embeds(model, table.input_ids, table.attention_mask)
    holds = [table.holds(s) for s in range(groups * size)]
    rng = np.random.default_rng([options.seed, 3])
    t2i, i2t, content, content_chance, kinds = [], [], [], [], []
    for _ in range(options.retrieval_rounds):
        for group in range(groups):
            scenes = np.arange(group * size, (group + 1) * size)
            captions = draw_captions(rng, table, scenes, kind_weights)
            similarity = texts[captions] @ images[scenes].T  # (texts, images)
            best_image = similarity.argmax(1)
            t2i.append(best_image == np.arange(size))
            i2t.append(similarity.argmax(0) == np.arange(size))
            true = np.array([[c in holds[s] for s in scenes] for c in captions])
            content.append(true[np.arange(size), best_image])
            content_chance.append(true.mean(1))
            kinds.append(table.kind_of[captions])
    t2i, kinds = np.concatenate(t2i), np.concatenate(kinds)
    result = {
        "queries": int(t2i.size),
        "batch": size,
        "text_to_image_top1": float(t2i.mean()),
        "image_to_text_top1": float(np.concatenate(i2t).mean()),
        "chance_top1": 1.0 / size,
        "text_to_image_content_top1": float(np.concatenate(content).mean()),
        "chance_content_top1": float(np.concatenate(content_chance).mean()),
    }
    for k, kind in enumerate(KINDS):
        if (kinds == k).any():
            result[f"text_to_image_top1/{kind}"] = float(t2i[kinds == k].mean())
    return result


def patch_alignment(
    model: JointSpace, patches: np.ndarray, scenes, scene_config: TestbedConfig, tokenizer
) -> dict:
    """Mean cosine between the existence question of each object of the first held-out scenes and the
    patches (CDPruner's image embeds): the cells the object's box overlaps, other objects' cells, the
    background; and how often the object's cells have the higher mean than the rest."""
    grid, patch = scene_config.grid_size, scene_config.patch_size
    image = _image_embeds(model, patches.reshape(-1, patches.shape[-1])).reshape(
        len(patches), grid * grid, -1
    )
    named, others, background, wins = [], [], [], []
    for s in range(len(patches)):
        objects = scene_objects(scenes, s)
        cells = []
        for o in objects:
            mask = np.zeros((grid, grid), bool)
            mask[
                o.top // patch : (o.top + o.size - 1) // patch + 1,
                o.left // patch : (o.left + o.size - 1) // patch + 1,
            ] = True
            cells.append(mask.reshape(-1))
        any_object = np.any(cells, axis=0)
        texts = [
            EXISTENCE_TEMPLATE.format(colour=COLOUR_NAMES[o.colour], shape=SHAPE_NAMES[o.shape])
            for o in objects
        ]
        encoded = tokenizer(texts, padding="longest", return_tensors="np")
        question = _text_embeds(
            model, encoded["input_ids"].astype(np.int32), encoded["attention_mask"].astype(np.int32)
        )
        cosine = question @ image[s].T  # (objects, cells)
        for j, o in enumerate(objects):
            same = np.any([cells[i] for i, p in enumerate(objects) if p.pair == o.pair], axis=0)
            other = any_object & ~same
            named.append(cosine[j, cells[j]].mean())
            if other.any():
                others.append(cosine[j, other].mean())
            background.append(cosine[j, ~any_object].mean())
            wins.append(cosine[j, cells[j]].mean() > cosine[j, ~cells[j]].mean())
    return {
        "scenes": len(patches),
        "objects": len(named),
        "named_object_cells": float(np.mean(named)),
        "other_object_cells": float(np.mean(others)),
        "background_cells": float(np.mean(background)),
        "named_above_rest": float(np.mean(wins)),
    }


# ---------------------------------------------------------------------------------------------
# Checks of the written directory.
# ---------------------------------------------------------------------------------------------


def unknown_words(tokenizer, texts) -> list[str]:
    """Texts that tokenize to `<unk>` anywhere."""
    unk = tokenizer.unk_token_id
    return [t for t, ids in zip(texts, tokenizer(list(texts))["input_ids"]) if unk in ids]


def testbed_questions() -> list[str]:
    """Every question text the testbed asks (every template filled every way)."""
    fills = [(c, s) for c in COLOUR_NAMES for s in SHAPE_NAMES]
    texts = [EXISTENCE_TEMPLATE.format(colour=c, shape=s) for c, s in fills]
    texts += [COUNT_SHAPE_TEMPLATE.format(shapes=s) for s in SHAPE_PLURALS]
    texts += [COUNT_COLOUR_TEMPLATE.format(colour=c) for c in COLOUR_NAMES]
    texts += [ATTRIBUTE_TEMPLATE.format(shape=s) for s in SHAPE_NAMES]
    texts += [
        template.format(colour=c, shape=s, colour2=c2, shape2=s2)
        for template in POSITION_TEMPLATES.values()
        for c, s in fills
        for c2, s2 in fills
    ]
    return texts


def transformers_parity(directory: str, model: JointSpace, texts: list[str]) -> dict:
    """transformers' CLIPTextModelWithProjection from the directory: its missing text keys and the
    largest gap between its text_embeds and the Flax tower's on `texts`."""
    import torch
    from transformers import AutoTokenizer, CLIPTextModelWithProjection

    tokenizer = AutoTokenizer.from_pretrained(directory)
    theirs, info = CLIPTextModelWithProjection.from_pretrained(directory, output_loading_info=True)
    encoded = tokenizer(texts, padding="longest", return_tensors="np")
    ids, mask = encoded["input_ids"], encoded["attention_mask"]
    with torch.no_grad():
        reference = theirs.eval()(
            input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask)
        ).text_embeds.numpy()
    with jax.default_matmul_precision("highest"):
        ours = np.asarray(jax.jit(lambda m, i, a: m.text_tower(i, a))(model, ids, mask))
    return {
        "missing_keys": sorted(info["missing_keys"]),
        "unexpected_keys": sorted(info["unexpected_keys"]),
        "max_abs_err": float(np.abs(ours - reference).max()),
        "max_abs": float(np.abs(reference).max()),
    }


def directory_bytes(directory: str) -> int:
    return sum(os.path.getsize(os.path.join(directory, name)) for name in os.listdir(directory))


# ---------------------------------------------------------------------------------------------
# The run.
# ---------------------------------------------------------------------------------------------


def run(options: JointSpaceOptions) -> dict:
    """Train, pick the pooling, write `options.output`; returns the log it writes there."""
    start = time.time()
    log = (lambda *args: None) if options.quiet else (lambda *args: print(*args, flush=True))
    hf_config, lvlm = load_checkpoint(options.checkpoint, dtype="float32")
    tower = lvlm.vision_tower
    scene_config = TestbedConfig.from_llava_config(hf_config)
    normalization = PixelNormalization.from_hf_config(hf_config)
    tokenizer = build_clip_word_tokenizer(VOCABULARY)
    config = clip_config(hf_config, text_config(options, tokenizer))
    cfg = JointSpaceConfig.from_hf(config)
    missing_words = unknown_words(tokenizer, testbed_questions() + list(SHORT_ANSWER_INSTRUCTIONS))
    if missing_words:
        raise ValueError(
            f"the text tokenizer has no word for {len(missing_words)} testbed texts, e.g. {missing_words[0]!r}"
        )
    kind_weights = scene_config.kind_weights

    splits = {}
    for split, count, keep in (
        ("train", options.train_images, 0),
        ("validation", options.validation_images, options.alignment_scenes),
    ):
        scenes = sample_scenes(split_rng(split, options.seed), count, scene_config, split)
        table = caption_table(scenes, scene_config, tokenizer)
        features = cached_image_features(
            tower, scenes, scene_config, normalization, options, split, keep, log
        )
        splits[split] = (scenes, table, features)
    (_, train_table, train_features), (val_scenes, val_table, val_features) = (
        splits["train"],
        splits["validation"],
    )
    del lvlm, tower

    poolings = POOLINGS if options.pooling == "auto" else (options.pooling,)
    results = {}
    for pooling in poolings:
        log(f"pooling {pooling}: training")
        trained = train(options, cfg, train_features.pooled[pooling], train_table, kind_weights, log)
        results[pooling] = (
            trained,
            retrieval(trained.model, val_features.pooled[pooling], val_table, kind_weights, options),
            patch_alignment(trained.model, val_features.patches, val_scenes, scene_config, tokenizer)
            if len(val_features.patches)
            else None,
        )
        log(f"pooling {pooling}: held-out {json.dumps(results[pooling][1])}")
        log(f"pooling {pooling}: patch cosines {json.dumps(results[pooling][2])}")
    chosen = max(poolings, key=lambda p: results[p][1]["text_to_image_top1"])
    trained = results[chosen][0]

    save_joint_space(trained.model, config, tokenizer, options.output)
    record = {
        "checkpoint": options.checkpoint,
        "options": dataclasses.asdict(options),
        "feature_layer": FEATURE_LAYER,
        "pooling": chosen,
        "vocab_size": len(tokenizer),
        "train_captions": len(train_table.texts),
        "logit_scale_exp": math.exp(trained.logit_scale),
        "final_loss": float(np.mean(trained.losses[-max(1, options.steps // 10) :])),
        "fixed_batch_loss": dict(zip(("before", "after"), trained.fixed_batch_loss)),
        "poolings": {
            p: {
                "held_out": r[1],
                "patch_cosine": r[2],
                "final_loss": float(np.mean(r[0].losses[-max(1, options.steps // 10) :])),
            }
            for p, r in results.items()
        },
    }
    reloaded = load_joint_space(options.output, cfg.vision_width)
    for a, b in zip(jax.tree.leaves(nnx.state(reloaded)), jax.tree.leaves(nnx.state(trained.model))):
        if not np.array_equal(np.asarray(a), np.asarray(b)):
            raise AssertionError("the written joint space does not read back as trained")
    try:
        record["transformers_parity"] = transformers_parity(
            options.output, trained.model, testbed_questions()[::97]
        )
    except ImportError:  # the evaluation environment has no torch
        record["transformers_parity"] = None
    record["wall_seconds"] = round(time.time() - start, 1)
    with open(os.path.join(options.output, LOG_FILE), "w") as handle:
        json.dump(record, handle, indent=1)
        handle.write("\n")
    record["output_bytes"] = directory_bytes(options.output)
    log(
        f"pooling {chosen} kept; wrote {options.output} ({record['output_bytes']} bytes) in {record['wall_seconds']} s"
    )
    return record


if __name__ == "__main__":
    jax.config.update("jax_default_matmul_precision", "highest")
    run_program(JointSpaceOptions, run)
