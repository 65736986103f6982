"""Procedural scenes and questions for the token-pruning testbed.

No pretrained LVLM can be downloaded here, so the project trains its own small LLaVA. To compare
visual-token pruning methods honestly the task must make the answer depend on SMALL image regions:
a scene is a 336 x 336 textured background (LLaVA-1.5's input size, a 24 x 24 grid of 14 px patches)
with a few objects only 1 to 3 patches wide. Dropping the wrong tokens then loses the answer, while
the background tokens carry nothing.

Layout of the module:

* `TestbedConfig` holds every size and distribution (one source of truth; image and patch size can
  be taken from a LLaVA config with `TestbedConfig.from_llava_config`). `SHAPES`, `COLOURS` and
  `NUMBER_WORDS` are the only word lists.
* `sample_scenes` draws layouts in vectorised NumPy into `SceneParams`, a pytree of fixed-size
  per-object arrays with a validity mask.
* `render_scenes` (jitted JAX) and `render_scenes_numpy` turn `SceneParams` into uint8 pixels. Both
  run the same integer-only formulas (`_render`, written against an array module), so they agree
  bit for bit; no floating point is involved, so XLA's fusion or FMA cannot change a pixel.
* `sample_questions` asks POPE-style existence, counting, attribute and relative-position questions
  whose single-word answers are computed from the object list. Evaluation splits use POPE's
  random / popular / adversarial negatives; training uses frequency-matched negatives so that no
  question text predicts its answer (see TRAINING_NEGATIVE_TYPES).
* `sample_batch` draws layouts + one question per scene + token ids (images rendered on the default
  JAX device, or left to the caller's jitted step via `batch.scenes`). The trainer builds its
  multi-turn conversations from `sample_scenes` / `sample_questions` / `encode_prompt` /
  `encode_followup` directly.
* `write_split` writes a fixed validation/test split in the eval harness's layout.
* `VOCABULARY` / `make_tokenizer` cover every word a prompt, question or answer can contain.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import re
from typing import Any, NamedTuple

import numpy as np

from models.preprocess import build_followup, build_prompt
from models.tokenizer import EOS_TOKEN, PAD_TOKEN, build_word_tokenizer, vocabulary_from_texts

# --------------------------------------------------------------------------------------------------
# Vocabulary of the world: shapes, colours, numbers. Everything else derives from these tables.
# --------------------------------------------------------------------------------------------------

# (singular, plural). The renderer's shape codes are the indices into this tuple.
SHAPES: tuple[tuple[str, str], ...] = (
    ("circle", "circles"),
    ("square", "squares"),
    ("triangle", "triangles"),
    ("diamond", "diamonds"),
    ("cross", "crosses"),
)
SHAPE_NAMES: tuple[str, ...] = tuple(singular for singular, _ in SHAPES)
SHAPE_PLURALS: tuple[str, ...] = tuple(plural for _, plural in SHAPES)
CIRCLE, SQUARE, TRIANGLE, DIAMOND, CROSS = range(len(SHAPES))

# Saturated colours, pairwise far apart in RGB (closest pair >= ~110 apart) and far from the dull
# background range, so a colour word is never ambiguous.
COLOURS: tuple[tuple[str, tuple[int, int, int]], ...] = (
    ("red", (215, 35, 35)),
    ("green", (40, 170, 60)),
    ("blue", (40, 80, 225)),
    ("yellow", (235, 215, 40)),
    ("purple", (150, 50, 205)),
    ("cyan", (40, 205, 215)),
    ("white", (240, 240, 240)),
)
COLOUR_NAMES: tuple[str, ...] = tuple(name for name, _ in COLOURS)
PALETTE = np.array([rgb for _, rgb in COLOURS], dtype=np.int32)  # (num_colours, 3)

NUMBER_WORDS: tuple[str, ...] = (
    "zero",
    "one",
    "two",
    "three",
    "four",
    "five",
    "six",
    "seven",
    "eight",
    "nine",
    "ten",
)
YES, NO = "yes", "no"

KINDS: tuple[str, ...] = ("existence", "counting", "attribute", "position")
# POPE's three ways of picking the absent object of a "no" existence question (evaluation splits).
NEGATIVE_TYPES: tuple[str, ...] = ("random", "popular", "adversarial")
# Training draws the absent pair with probability proportional to its dataset frequency, the same
# distribution the "yes" questions' pairs follow, so the question text alone does not predict the
# answer. Training on POPE's own types would leak: popular negatives always name the few most
# frequent pairs, so "Is there a <frequent pair>?" would mostly mean "no" and a blind model would
# score ~80% on existence/popular. With frequency-matched training a blind model scores ~50% on every
# evaluation subset, and popular / adversarial probe looking and binding, not question priors.
TRAINING_NEGATIVE_TYPES: tuple[str, ...] = ("frequency",)
RELATIONS: tuple[str, ...] = ("left", "right", "above", "below")
SPLITS: tuple[str, ...] = ("train", "validation", "test")

# The vicuna_v1 conversation template LLaVA-1.5 uses; the eval harness and the trainer must agree.
# LLaVA-1.5's short-answer instructions (POPE / MME style); not used by this task's questions, but in
# the vocabulary so a harness that appends one still tokenizes without <unk>.
SHORT_ANSWER_INSTRUCTIONS: tuple[str, ...] = (
    "Answer the question using a single word or phrase.",
    "Answer the question using a single word.",
)

_EXISTENCE_TEMPLATE = "Is there a {colour} {shape} in the image?"
_COUNT_SHAPE_TEMPLATE = "How many {shapes} are there?"
_COUNT_COLOUR_TEMPLATE = "How many {colour} objects are there?"
_ATTRIBUTE_TEMPLATE = "What color is the {shape}?"
_POSITION_TEMPLATES = {
    "left": "Is the {colour} {shape} to the left of the {colour2} {shape2}?",
    "right": "Is the {colour} {shape} to the right of the {colour2} {shape2}?",
    "above": "Is the {colour} {shape} above the {colour2} {shape2}?",
    "below": "Is the {colour} {shape} below the {colour2} {shape2}?",
}


def format_prompt(question: str) -> str:
    """The full LLaVA-1.5 (vicuna_v1) prompt for one question (the harness's template, one source)."""
    return build_prompt(question)


def _all_texts() -> list[str]:
    """Every text the testbed can produce: prompt, instructions, each template filled in every way."""
    texts = [format_prompt(""), *SHORT_ANSWER_INSTRUCTIONS, YES, NO, *NUMBER_WORDS, *COLOUR_NAMES]
    for colour in COLOUR_NAMES:
        texts.append(_COUNT_COLOUR_TEMPLATE.format(colour=colour))
        for shape in SHAPE_NAMES:
            texts.append(_EXISTENCE_TEMPLATE.format(colour=colour, shape=shape))
            texts.extend(
                template.format(colour=colour, shape=shape, colour2=colour, shape2=shape)
                for template in _POSITION_TEMPLATES.values()
            )
    for shape, shapes in SHAPES:
        texts.append(_COUNT_SHAPE_TEMPLATE.format(shapes=shapes))
        texts.append(_ATTRIBUTE_TEMPLATE.format(shape=shape))
    return texts


VOCABULARY: tuple[str, ...] = tuple(vocabulary_from_texts(_all_texts()))
NUM_SPECIAL_TOKENS = 4  # <unk>, <s>, </s>, <pad> (models.tokenizer.SPECIAL_TOKENS)
IMAGE_TOKEN_INDEX = NUM_SPECIAL_TOKENS + len(VOCABULARY)  # `<image>` right after the words
TOKENIZER_SIZE = IMAGE_TOKEN_INDEX + 1  # smallest text vocab_size that holds every id


@functools.cache
def make_tokenizer():
    """The testbed's word-level `PreTrainedTokenizerFast` (`<image>` at IMAGE_TOKEN_INDEX).

    Cached: treat the returned object as read-only (call `save_pretrained` on it, don't mutate it).
    """
    return build_word_tokenizer(VOCABULARY)


# --------------------------------------------------------------------------------------------------
# Configuration.
# --------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class TestbedConfig:
    """Sizes and distributions of the scenes and questions (hashable: a static argument to jit)."""

    __test__ = False  # not a pytest test class despite the name

    image_size: int = 336
    patch_size: int = 14
    min_objects: int = 3
    max_objects: int = 6
    # Object bounding-box side, in patches (1..3 patches = 14..42 px at the defaults).
    min_object_patches: float = 1.0
    max_object_patches: float = 3.0
    # Empty margin between any two objects' boxes, in patches (along at least one axis).
    object_gap_patches: float = 1.0
    # Centres of the two objects of a position question differ by at least this along its axis.
    relation_margin_patches: float = 1.0
    # Per-channel random offset added to an object's palette colour.
    colour_jitter: int = 12
    # Background: grey level, per-channel tint, then bilinear value-noise octaves (cell side in
    # pixels, amplitude), then per-pixel noise over the whole image.
    background_grey: tuple[int, int] = (50, 115)
    background_tint: int = 15
    background_octaves: tuple[tuple[int, int], ...] = ((56, 25), (14, 10))
    pixel_noise: int = 10
    # Mild non-uniform priors over colours and shapes: POPE's "popular" negatives are absent objects
    # that are frequent in the dataset, which only means something when frequencies differ.
    colour_prior: tuple[float, ...] = (0.20, 0.17, 0.15, 0.14, 0.12, 0.12, 0.10)
    shape_prior: tuple[float, ...] = (0.27, 0.23, 0.19, 0.16, 0.15)
    popular_top_k: int = 3
    # Question-kind mixture (existence is split evenly over the negative types in use).
    kind_weights: tuple[float, ...] = (0.4, 0.2, 0.2, 0.2)
    # Probability that a counting question targets an absent shape / colour (answer "zero").
    count_absent_probability: float = 0.15
    placement_candidates: int = 64

    def __post_init__(self):
        if self.image_size % self.patch_size:
            raise ValueError(
                f"image_size {self.image_size} is not a multiple of patch_size {self.patch_size}"
            )
        if not 1 <= self.min_objects <= self.max_objects < len(NUMBER_WORDS):
            raise ValueError(f"need 1 <= min_objects <= max_objects < {len(NUMBER_WORDS)}")
        if len(self.colour_prior) != len(COLOURS) or len(self.shape_prior) != len(SHAPES):
            raise ValueError("colour_prior / shape_prior must have one weight per colour / shape")
        if len(self.kind_weights) != len(KINDS):
            raise ValueError(f"kind_weights needs one weight per kind {KINDS}")
        if not 0 < self.min_object_px <= self.max_object_px <= self.image_size // 2:
            raise ValueError("object sizes must lie in (0, image_size / 2]")

    @classmethod
    def from_llava_config(cls, llava_config, **overrides: Any) -> TestbedConfig:
        """Image and patch size from a transformers LlavaConfig's vision tower."""
        vision = llava_config.vision_config
        return cls(image_size=vision.image_size, patch_size=vision.patch_size, **overrides)

    @property
    def grid_size(self) -> int:
        return self.image_size // self.patch_size

    @property
    def min_object_px(self) -> int:
        return int(round(self.min_object_patches * self.patch_size))

    @property
    def max_object_px(self) -> int:
        return int(round(self.max_object_patches * self.patch_size))

    @property
    def object_gap_px(self) -> int:
        return int(round(self.object_gap_patches * self.patch_size))

    @property
    def relation_margin_px(self) -> int:
        return int(round(self.relation_margin_patches * self.patch_size))

    def octave_grid_points(self, cell: int) -> int:
        """Lattice points per side of a value-noise octave with `cell`-pixel cells."""
        return self.image_size // cell + 2


DEFAULT_CONFIG = TestbedConfig()


# --------------------------------------------------------------------------------------------------
# Scene parameters and layout sampling.
# --------------------------------------------------------------------------------------------------


class SceneParams(NamedTuple):
    """A batch of scenes as fixed-size arrays (a JAX pytree). B scenes, M = config.max_objects slots.

    Object boxes are [top, top + size) x [left, left + size) in pixels; slots with valid=False are
    ignored by the renderer and the questions. `shape_id` / `colour_id` index SHAPES / COLOURS;
    `rgb` is the jittered colour actually painted.
    """

    shape_id: Any  # (B, M) int32
    colour_id: Any  # (B, M) int32
    rgb: Any  # (B, M, 3) int32
    top: Any  # (B, M) int32
    left: Any  # (B, M) int32
    size: Any  # (B, M) int32
    valid: Any  # (B, M) bool
    background: Any  # (B, 3) int32 base colour
    octaves: tuple  # per config.background_octaves: (B, G, G, 3) int32 lattice values in [-amp, amp]
    noise_seed: Any  # (B,) uint32, seeds the per-pixel noise hash


def num_scenes(scenes: SceneParams) -> int:
    return int(scenes.valid.shape[0])


def take_scenes(scenes: SceneParams, index) -> SceneParams:
    """Scenes `index` (an int, slice or index array) of a batch, keeping the batch axis."""
    if isinstance(index, (int, np.integer)):
        index = slice(int(index), int(index) + 1)
    return SceneParams(*(tuple(o[index] for o in f) if isinstance(f, tuple) else f[index] for f in scenes))


def concatenate_scenes(parts: list[SceneParams]) -> SceneParams:
    fields = []
    for i, first in enumerate(parts[0]):
        if isinstance(first, tuple):
            fields.append(tuple(np.concatenate([p[i][j] for p in parts]) for j in range(len(first))))
        else:
            fields.append(np.concatenate([p[i] for p in parts]))
    return SceneParams(*fields)


def split_rng(split: str, seed: int = 0) -> np.random.Generator:
    """The generator of a split: SeedSequence entropy (split index, seed), so splits never share a
    stream. Every scene also draws its pixel-noise seed from a split-disjoint range (_NOISE_SEED_RANGES),
    so no rendered scene can occur in two splits."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; known: {SPLITS}")
    return np.random.default_rng([0x7E57BED, SPLITS.index(split), seed])


# Disjoint uint32 ranges of pixel-noise seeds: train [0, 2^31), validation [2^31, 3 * 2^30), test
# [3 * 2^30, 2^32). The noise is part of every pixel, so equal images across splits are impossible.
_NOISE_SEED_RANGES = {"train": (0, 1 << 31), "validation": (1 << 31, 3 << 30), "test": (3 << 30, 1 << 32)}


def _place_objects(rng: np.random.Generator, sizes: np.ndarray, wanted: np.ndarray, config: TestbedConfig):
    """Rejection placement, vectorised over scenes: each slot tries `placement_candidates` positions
    and takes the first whose box keeps a `gap`-pixel margin to every placed box along some axis."""
    batch, slots = sizes.shape
    trials = config.placement_candidates
    gap = config.object_gap_px
    top = np.zeros((batch, slots), np.int32)
    left = np.zeros((batch, slots), np.int32)
    placed = np.zeros((batch, slots), bool)
    for slot in range(slots):
        size = sizes[:, slot : slot + 1]  # (B, 1)
        span = config.image_size - size + 1
        cand_top = np.floor(rng.random((batch, trials)) * span).astype(np.int32)
        cand_left = np.floor(rng.random((batch, trials)) * span).astype(np.int32)
        ok = np.ones((batch, trials), bool)
        for other in range(slot):
            o_top, o_left = top[:, other : other + 1], left[:, other : other + 1]
            o_size = sizes[:, other : other + 1]
            apart = (
                (cand_top >= o_top + o_size + gap)
                | (o_top >= cand_top + size + gap)
                | (cand_left >= o_left + o_size + gap)
                | (o_left >= cand_left + size + gap)
            )
            ok &= apart | ~placed[:, other : other + 1]
        first = np.argmax(ok, axis=1)
        rows = np.arange(batch)
        top[:, slot] = cand_top[rows, first]
        left[:, slot] = cand_left[rows, first]
        placed[:, slot] = wanted[:, slot] & ok[rows, first]
    return top, left, placed


def sample_scenes(
    rng: np.random.Generator, count: int, config: TestbedConfig = DEFAULT_CONFIG, split: str = "train"
) -> SceneParams:
    """`count` random scene layouts (NumPy arrays). `split` only picks the pixel-noise seed range."""
    slots = config.max_objects
    shape_prior = np.asarray(config.shape_prior, np.float64)
    colour_prior = np.asarray(config.colour_prior, np.float64)
    num_objects = rng.integers(config.min_objects, config.max_objects + 1, size=count)
    wanted = np.arange(slots)[None, :] < num_objects[:, None]
    sizes = rng.integers(config.min_object_px, config.max_object_px + 1, size=(count, slots)).astype(np.int32)
    shape_id = rng.choice(len(SHAPES), size=(count, slots), p=shape_prior / shape_prior.sum()).astype(
        np.int32
    )
    colour_id = rng.choice(len(COLOURS), size=(count, slots), p=colour_prior / colour_prior.sum()).astype(
        np.int32
    )
    jitter = rng.integers(-config.colour_jitter, config.colour_jitter + 1, size=(count, slots, 3))
    rgb = np.clip(PALETTE[colour_id] + jitter, 0, 255).astype(np.int32)
    top, left, valid = _place_objects(rng, sizes, wanted, config)

    grey = rng.integers(config.background_grey[0], config.background_grey[1] + 1, size=(count, 1))
    tint = rng.integers(-config.background_tint, config.background_tint + 1, size=(count, 3))
    background = (grey + tint).astype(np.int32)
    octaves = tuple(
        rng.integers(
            -amplitude,
            amplitude + 1,
            size=(count, config.octave_grid_points(cell), config.octave_grid_points(cell), 3),
        ).astype(np.int32)
        for cell, amplitude in config.background_octaves
    )
    low, high = _NOISE_SEED_RANGES[split]
    noise_seed = rng.integers(low, high, size=count, dtype=np.uint64).astype(np.uint32)

    zero = ~valid  # clear unused slots so equal scenes have equal arrays
    scenes = SceneParams(
        shape_id=np.where(zero, 0, shape_id).astype(np.int32),
        colour_id=np.where(zero, 0, colour_id).astype(np.int32),
        rgb=np.where(zero[..., None], 0, rgb).astype(np.int32),
        top=np.where(zero, 0, top).astype(np.int32),
        left=np.where(zero, 0, left).astype(np.int32),
        size=np.where(zero, 0, sizes).astype(np.int32),
        valid=valid,
        background=background,
        octaves=octaves,
        noise_seed=noise_seed,
    )
    # A slot whose every candidate collided (vanishingly rare at the defaults) leaves its scene short
    # of objects: redraw those scenes so the object count is always what was sampled.
    short = valid.sum(axis=1) < num_objects
    if short.any():
        redrawn = sample_scenes(rng, int(short.sum()), config, split)
        keep = np.flatnonzero(~short)
        merged = concatenate_scenes([take_scenes(scenes, keep), redrawn])
        order = np.empty(count, np.int64)
        order[np.concatenate([keep, np.flatnonzero(short)])] = np.arange(count)
        scenes = take_scenes(merged, order)
    return scenes


# --------------------------------------------------------------------------------------------------
# Rendering: one integer-only implementation, run by NumPy or by jitted JAX.
# --------------------------------------------------------------------------------------------------


def _hash_noise(xp, seed, height: int, width: int, amplitude: int):
    """Per-pixel noise in [-amplitude, amplitude] from a uint32 integer hash of (pixel, channel, seed).

    An integer hash (rather than a PRNG) is a pure function of the coordinates, so NumPy and XLA
    produce identical values and nothing per-pixel has to be stored in SceneParams.
    """
    u32 = xp.uint32
    index = (xp.arange(height * width * 3, dtype=u32)).reshape(1, height, width, 3)
    h = index * u32(0x9E3779B1) + seed.astype(u32).reshape(-1, 1, 1, 1) * u32(0x85EBCA77)
    h = h ^ (h >> u32(15))
    h = h * u32(0x2C1B3C6D)
    h = h ^ (h >> u32(12))
    h = h * u32(0x297A2D39)
    h = h ^ (h >> u32(15))
    return (h >> u32(8)).astype(xp.int32) % (2 * amplitude + 1) - amplitude


def _value_noise(xp, lattice, size: int, cell: int):
    """Bilinear interpolation of a (B, G, G, 3) lattice with `cell`-pixel cells, in integers.

    Returns (B, size, size, 3) int32 = round-down(interpolated value)."""
    coords = np.arange(size)
    cell_index, offset = coords // cell, (coords % cell).astype(np.int32)
    w_next = xp.asarray(offset).reshape(1, size, 1, 1)
    rows = lattice[:, cell_index] * (cell - w_next) + lattice[:, cell_index + 1] * w_next  # (B, S, G, 3)
    w_next = xp.asarray(offset).reshape(1, 1, size, 1)
    values = rows[:, :, cell_index] * (cell - w_next) + rows[:, :, cell_index + 1] * w_next
    return xp.floor_divide(values, cell * cell)


def _object_mask(xp, shape_id, top, left, size, valid, image_size: int):
    """(B, H, W) bool mask of one object slot per scene. Coordinates are doubled so pixel centres
    (2y + 1) and box centres (2 top + size) are integers: d in (-size, size) inside the box."""
    doubled = 2 * xp.arange(image_size, dtype=xp.int32) + 1
    dy = (doubled[None, :] - (2 * top + size)[:, None])[:, :, None]  # (B, H, 1)
    dx = (doubled[None, :] - (2 * left + size)[:, None])[:, None, :]  # (B, 1, W)
    s = size[:, None, None]
    kind = shape_id[:, None, None]
    ady, adx = xp.abs(dy), xp.abs(dx)
    in_box = (ady < s) & (adx < s)
    circle = dy * dy + dx * dx < s * s
    diamond = ady + adx < s
    triangle = in_box & (2 * adx < dy + s)  # apex up, base on the bottom edge
    cross = in_box & ((5 * adx < 2 * s) | (5 * ady < 2 * s))  # arms 40% of the box wide
    mask = xp.where(
        kind == CIRCLE,
        circle,
        xp.where(
            kind == SQUARE,
            in_box,
            xp.where(kind == TRIANGLE, triangle, xp.where(kind == DIAMOND, diamond, cross)),
        ),
    )
    return mask & valid[:, None, None]


def _render(xp, scenes: SceneParams, config: TestbedConfig):
    size = config.image_size
    image = xp.broadcast_to(
        scenes.background.astype(xp.int32)[:, None, None, :], (scenes.background.shape[0], size, size, 3)
    )
    for lattice, (cell, _) in zip(scenes.octaves, config.background_octaves):
        image = image + _value_noise(xp, lattice.astype(xp.int32), size, cell)
    for slot in range(scenes.valid.shape[1]):  # objects never overlap: painting order is irrelevant
        mask = _object_mask(
            xp,
            scenes.shape_id[:, slot],
            scenes.top[:, slot],
            scenes.left[:, slot],
            scenes.size[:, slot],
            scenes.valid[:, slot],
            size,
        )
        image = xp.where(mask[..., None], scenes.rgb[:, slot, None, None, :], image)
    if config.pixel_noise:
        image = image + _hash_noise(xp, scenes.noise_seed, size, size, config.pixel_noise)
    return xp.clip(image, 0, 255).astype(xp.uint8)


def render_scenes_numpy(scenes: SceneParams, config: TestbedConfig = DEFAULT_CONFIG) -> np.ndarray:
    """uint8 (B, H, W, 3) images of a batch of scenes, with NumPy (for writing files)."""
    with np.errstate(over="ignore"):
        return _render(
            np,
            SceneParams(
                *(tuple(np.asarray(o) for o in f) if isinstance(f, tuple) else np.asarray(f) for f in scenes)
            ),
            config,
        )


@functools.cache
def _jitted_renderer():
    import jax
    import jax.numpy as jnp

    return jax.jit(lambda scenes, config: _render(jnp, scenes, config), static_argnums=1)


def render_scenes(scenes: SceneParams, config: TestbedConfig = DEFAULT_CONFIG):
    """uint8 (B, H, W, 3) images of a batch of scenes, jitted JAX (runs on the default device).

    Traceable: it may be called inside a jitted training step (with `scenes` as traced arrays and
    `config` static), so only the small SceneParams travel to the device. Bit-identical to
    `render_scenes_numpy`.
    """
    return _jitted_renderer()(scenes, config)


# --------------------------------------------------------------------------------------------------
# Questions.
# --------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class QuestionItem:
    """One question about one scene. `objects` are the scene's object indices the answer depends on
    (for pruning analyses: which image regions hold the evidence); empty for "no" existence."""

    kind: str
    category: str  # kind, or 'existence/<negative type>'
    text: str
    answer: str
    objects: tuple[int, ...] = ()


class SceneObject(NamedTuple):
    index: int  # slot in SceneParams
    shape: int
    colour: int
    top: int
    left: int
    size: int

    @property
    def centre2(self) -> tuple[int, int]:
        """Doubled (y, x) centre: integers, comparable exactly."""
        return 2 * self.top + self.size, 2 * self.left + self.size

    @property
    def pair(self) -> tuple[int, int]:
        return self.colour, self.shape


def scene_objects(scenes: SceneParams, scene: int) -> list[SceneObject]:
    """The valid objects of one scene of a batch, as plain Python values."""
    valid = np.asarray(scenes.valid[scene])
    columns = [
        np.asarray(a[scene]).tolist()
        for a in (scenes.shape_id, scenes.colour_id, scenes.top, scenes.left, scenes.size)
    ]
    return [SceneObject(i, *(c[i] for c in columns)) for i in range(len(valid)) if valid[i]]


def _all_pairs() -> list[tuple[int, int]]:
    return [(c, s) for c in range(len(COLOURS)) for s in range(len(SHAPES))]


def popular_ranking(config: TestbedConfig = DEFAULT_CONFIG) -> list[tuple[int, int]]:
    """(colour, shape) pairs from most to least frequent under the dataset's priors (ties by index)."""
    return sorted(_all_pairs(), key=lambda p: (-config.colour_prior[p[0]] * config.shape_prior[p[1]], p))


def _pair_words(pair: tuple[int, int]) -> dict[str, str]:
    return {"colour": COLOUR_NAMES[pair[0]], "shape": SHAPE_NAMES[pair[1]]}


def _pick(rng: np.random.Generator, items: list):
    return items[int(rng.integers(len(items)))]


def _existence(rng, objects: list[SceneObject], negative_type: str, config: TestbedConfig):
    category = f"existence/{negative_type}"
    present = {o.pair for o in objects}
    if rng.random() < 0.5:
        target = _pick(rng, objects)
        text = _EXISTENCE_TEMPLATE.format(**_pair_words(target.pair))
        return QuestionItem(
            "existence", category, text, YES, tuple(o.index for o in objects if o.pair == target.pair)
        )
    absent = [p for p in _all_pairs() if p not in present]
    if negative_type == "frequency":
        weights = np.array([config.colour_prior[c] * config.shape_prior[s] for c, s in absent])
        text = _EXISTENCE_TEMPLATE.format(
            **_pair_words(absent[rng.choice(len(absent), p=weights / weights.sum())])
        )
        return QuestionItem("existence", category, text, NO, ())
    if negative_type == "random":
        candidates = absent
    elif negative_type == "popular":
        candidates = [p for p in popular_ranking(config) if p not in present][: config.popular_top_k]
    elif negative_type == "adversarial":
        colours, shapes = {c for c, _ in present}, {s for _, s in present}
        candidates = [p for p in absent if p[0] in colours or p[1] in shapes]
    else:
        raise ValueError(f"unknown negative type {negative_type!r}")
    if not candidates:
        return None
    text = _EXISTENCE_TEMPLATE.format(**_pair_words(_pick(rng, candidates)))
    return QuestionItem("existence", category, text, NO, ())


def _counting(rng, objects: list[SceneObject], config: TestbedConfig):
    by_shape = rng.random() < 0.5
    attribute = (lambda o: o.shape) if by_shape else (lambda o: o.colour)
    values = range(len(SHAPES) if by_shape else len(COLOURS))
    present = sorted({attribute(o) for o in objects})
    absent = [v for v in values if v not in present]
    pool = absent if absent and rng.random() < config.count_absent_probability else present
    target = _pick(rng, pool)
    matching = tuple(o.index for o in objects if attribute(o) == target)
    text = (
        _COUNT_SHAPE_TEMPLATE.format(shapes=SHAPE_PLURALS[target])
        if by_shape
        else _COUNT_COLOUR_TEMPLATE.format(colour=COLOUR_NAMES[target])
    )
    return QuestionItem("counting", "counting", text, NUMBER_WORDS[len(matching)], matching)


def _attribute(rng, objects: list[SceneObject], config: TestbedConfig):
    shapes = [o.shape for o in objects]
    unique = [o for o in objects if shapes.count(o.shape) == 1]
    if not unique:
        return None
    target = _pick(rng, unique)
    return QuestionItem(
        "attribute",
        "attribute",
        _ATTRIBUTE_TEMPLATE.format(shape=SHAPE_NAMES[target.shape]),
        COLOUR_NAMES[target.colour],
        (target.index,),
    )


def relation_holds(relation: str, first: SceneObject, second: SceneObject) -> bool:
    """Whether `first` is `relation` (left / right / above / below) of `second`, by box centres."""
    (y1, x1), (y2, x2) = first.centre2, second.centre2
    return {"left": x1 < x2, "right": x1 > x2, "above": y1 < y2, "below": y1 > y2}[relation]


def _position(rng, objects: list[SceneObject], config: TestbedConfig):
    pairs = [o.pair for o in objects]
    unique = [o for o in objects if pairs.count(o.pair) == 1]
    margin2 = 2 * config.relation_margin_px  # centres are doubled
    options = []
    for first in unique:
        for second in unique:
            if first is second:
                continue
            (y1, x1), (y2, x2) = first.centre2, second.centre2
            if abs(x1 - x2) >= margin2:
                options.append((first, second, ("left", "right")))
            if abs(y1 - y2) >= margin2:
                options.append((first, second, ("above", "below")))
    if not options:
        return None
    first, second, relations = _pick(rng, options)
    relation = relations[int(rng.integers(2))]
    words = _pair_words(first.pair)
    words.update(colour2=COLOUR_NAMES[second.colour], shape2=SHAPE_NAMES[second.shape])
    answer = YES if relation_holds(relation, first, second) else NO
    return QuestionItem(
        "position",
        "position",
        _POSITION_TEMPLATES[relation].format(**words),
        answer,
        (first.index, second.index),
    )


def _category_weights(config: TestbedConfig, negative_types: tuple[str, ...]) -> tuple[list[str], np.ndarray]:
    """Categories (existence split into its negative types) and their sampling probabilities."""
    names, weights = [], []
    for kind, weight in zip(KINDS, config.kind_weights):
        if kind == "existence":
            names += [f"existence/{t}" for t in negative_types]
            weights += [weight / len(negative_types)] * len(negative_types)
        else:
            names.append(kind)
            weights.append(weight)
    weights = np.asarray(weights, np.float64)
    return names, weights / weights.sum()


def ask(
    rng: np.random.Generator,
    objects: list[SceneObject],
    category: str,
    config: TestbedConfig = DEFAULT_CONFIG,
) -> QuestionItem | None:
    """One question of `category` about a scene's objects, or None where the scene cannot support it
    (no uniquely-shaped object, no unambiguous pair, no absent pair of the negative type)."""
    kind, _, negative_type = category.partition("/")
    if kind == "existence":
        return _existence(rng, objects, negative_type, config)
    if kind == "counting":
        return _counting(rng, objects, config)
    if kind == "attribute":
        return _attribute(rng, objects, config)
    if kind == "position":
        return _position(rng, objects, config)
    raise ValueError(f"unknown question category {category!r}")


def sample_questions(
    rng: np.random.Generator,
    scenes: SceneParams,
    config: TestbedConfig = DEFAULT_CONFIG,
    per_scene: int = 1,
    negative_types: tuple[str, ...] = NEGATIVE_TYPES,
) -> list[list[QuestionItem]]:
    """`per_scene` distinct questions for every scene; categories drawn from `config.kind_weights`
    (existence split evenly over `negative_types`), redrawn when a scene cannot support one.
    The default negative types are POPE's (evaluation); training uses TRAINING_NEGATIVE_TYPES."""
    categories, probabilities = _category_weights(config, negative_types)
    result = []
    for scene in range(num_scenes(scenes)):
        objects = scene_objects(scenes, scene)
        items: list[QuestionItem] = []
        seen: set[str] = set()
        for _ in range(100 * per_scene):  # bounded: a scene always supports existence and counting
            if len(items) == per_scene:
                break
            item = ask(rng, objects, categories[rng.choice(len(categories), p=probabilities)], config)
            if item is not None and item.text not in seen:
                seen.add(item.text)
                items.append(item)
        result.append(items)
    return result


# --------------------------------------------------------------------------------------------------
# Token ids and the training sampler.
# --------------------------------------------------------------------------------------------------

_WORD_PATTERN = re.compile(r"\w+|[^\w\s]+")  # what tokenizers' Whitespace pre-tokenizer splits on


@functools.cache
def _token_ids() -> dict[str, int]:
    return make_tokenizer().get_vocab()


@functools.cache
def encode_prompt(question: str) -> tuple[int, ...]:
    """Token ids of `format_prompt(question)` with BOS, exactly as `make_tokenizer()` encodes it."""
    return tuple(make_tokenizer()(format_prompt(question))["input_ids"])


@functools.cache
def encode_followup(question: str) -> tuple[int, ...]:
    """Token ids of a later conversation turn asking `question` (`build_followup`; no BOS)."""
    return tuple(make_tokenizer()(build_followup(question), add_special_tokens=False)["input_ids"])


def answer_token_ids(answer: str) -> tuple[int, int]:
    """The training target of an answer: its word id, then </s>."""
    ids = _token_ids()
    return ids[answer], ids[EOS_TOKEN]


def _longest_questions() -> list[str]:
    """Each template filled with one-token words (every colour and shape name is one token)."""
    templates = [
        _EXISTENCE_TEMPLATE,
        _COUNT_SHAPE_TEMPLATE,
        _COUNT_COLOUR_TEMPLATE,
        _ATTRIBUTE_TEMPLATE,
        *_POSITION_TEMPLATES.values(),
    ]
    fill = dict(colour="red", shape="circle", colour2="red", shape2="circle", shapes="circles")
    return [t.format(**fill) for t in templates]


def max_prompt_length() -> int:
    """Longest `encode_prompt` of any question."""
    return max(len(encode_prompt(q)) for q in _longest_questions())


def max_followup_length() -> int:
    """Longest `encode_followup` of any question."""
    return max(len(encode_followup(q)) for q in _longest_questions())


class TrainingBatch(NamedTuple):
    """One training batch: scene i is asked questions[i].

    images: uint8 (B, H, W, 3) JAX array on the default device, or None if render=False (then call
      `render_scenes(scenes, config)` inside the jitted step).
    prompt_token_ids: int32 (B, L) BOS + vicuna_v1 prompt with one `<image>` id + question +
      'ASSISTANT:', right-padded with <pad> to L = max_prompt_length() (static across batches).
    prompt_lengths: int32 (B,) unpadded lengths.
    answer_token_ids: int32 (B, 2) the answer word id then </s>.
    kind_ids: int32 (B,) index into KINDS.
    """

    images: Any
    prompt_token_ids: np.ndarray
    prompt_lengths: np.ndarray
    answer_token_ids: np.ndarray
    kind_ids: np.ndarray
    scenes: SceneParams
    questions: list[QuestionItem]


def sample_batch(
    rng: np.random.Generator,
    batch_size: int,
    config: TestbedConfig = DEFAULT_CONFIG,
    *,
    render: bool = True,
    split: str = "train",
    negative_types: tuple[str, ...] = TRAINING_NEGATIVE_TYPES,
) -> TrainingBatch:
    """Fresh scenes with one question each, tokenized; images rendered with JAX unless render=False.

    `rng` should come from `split_rng(split, seed)`; `split` picks the pixel-noise seed range."""
    scenes = sample_scenes(rng, batch_size, config, split)
    questions = [
        items[0]
        for items in sample_questions(rng, scenes, config, per_scene=1, negative_types=negative_types)
    ]
    length = max_prompt_length()
    pad = _token_ids()[PAD_TOKEN]
    prompt_ids = np.full((batch_size, length), pad, np.int32)
    prompt_lengths = np.empty(batch_size, np.int32)
    answers = np.empty((batch_size, 2), np.int32)
    for i, item in enumerate(questions):
        ids = encode_prompt(item.text)
        prompt_ids[i, : len(ids)] = ids
        prompt_lengths[i] = len(ids)
        answers[i] = answer_token_ids(item.answer)
    kind_ids = np.array([KINDS.index(q.kind) for q in questions], np.int32)
    images = render_scenes(scenes, config) if render else None
    return TrainingBatch(images, prompt_ids, prompt_lengths, answers, kind_ids, scenes, questions)


# --------------------------------------------------------------------------------------------------
# Fixed evaluation splits on disk.
# --------------------------------------------------------------------------------------------------

QUESTIONS_FILE = "questions.jsonl"
SCENES_FILE = "scenes.jsonl"
IMAGES_DIR = "images"


def image_file_name(split: str, scene: int) -> str:
    return f"{split}_{scene:06d}.png"


def save_png(image: np.ndarray, path: str | os.PathLike) -> None:
    from PIL import Image

    Image.fromarray(np.asarray(image, np.uint8), mode="RGB").save(path, format="PNG")


def write_split(
    directory: str | os.PathLike,
    split: str = "test",
    num_items: int = 1000,
    seed: int = 0,
    config: TestbedConfig = DEFAULT_CONFIG,
    questions_per_image: int = 4,
    render_chunk: int = 32,
) -> list[dict]:
    """Write `num_items` questions of a fixed split: `questions.jsonl`, `images/*.png`, `scenes.jsonl`.

    Scenes and questions are a pure function of (split, seed, config). Each image carries up to
    `questions_per_image` distinct questions (as POPE shares images across questions). questions.jsonl
    has one JSON object per line: question_id, image (file name under images/), text, answer,
    category, plus kind and objects (evidence object indices into the scene's line of scenes.jsonl,
    which lists every object's shape, colour and pixel box). Images are rendered with NumPy.
    Returns the question records.
    """
    rng = split_rng(split, seed)
    images_dir = os.path.join(directory, IMAGES_DIR)
    os.makedirs(images_dir, exist_ok=True)
    records, scene_records = [], []
    scene_index = 0
    while len(records) < num_items:
        scenes = sample_scenes(rng, render_chunk, config, split)
        question_lists = sample_questions(rng, scenes, config, per_scene=questions_per_image)
        used, names = [], []
        for local, items in enumerate(question_lists):
            if len(records) >= num_items:
                break
            name = image_file_name(split, scene_index)
            for q_index, item in enumerate(items[: num_items - len(records)]):
                records.append(
                    dict(
                        question_id=f"{split}-{scene_index:06d}-{q_index}",
                        image=name,
                        text=item.text,
                        answer=item.answer,
                        category=item.category,
                        kind=item.kind,
                        objects=list(item.objects),
                    )
                )
            scene_records.append(
                dict(
                    image=name,
                    objects=[
                        dict(
                            index=o.index,
                            shape=SHAPE_NAMES[o.shape],
                            colour=COLOUR_NAMES[o.colour],
                            top=o.top,
                            left=o.left,
                            size=o.size,
                        )
                        for o in scene_objects(scenes, local)
                    ],
                )
            )
            used.append(local)
            names.append(name)
            scene_index += 1
        pixels = render_scenes_numpy(take_scenes(scenes, np.asarray(used)), config)
        for name, image in zip(names, pixels):
            save_png(image, os.path.join(images_dir, name))
    for file_name, lines in ((QUESTIONS_FILE, records), (SCENES_FILE, scene_records)):
        with open(os.path.join(directory, file_name), "w") as handle:
            handle.writelines(json.dumps(line) + "\n" for line in lines)
    return records
