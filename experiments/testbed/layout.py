"""Scene layouts: `SceneParams` (fixed-size per-object arrays, a JAX pytree) and `sample_scenes`.

Layouts are drawn in vectorised NumPy from a split's own generator (`split_rng`); only these small
arrays travel to a device, where `render` turns them into pixels. Every scene also draws its
pixel-noise seed from a split-disjoint range, so no rendered scene can occur in two splits.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import numpy as np

from experiments.testbed.scene_config import DEFAULT_CONFIG, TestbedConfig
from experiments.testbed.words import COLOURS, PALETTE, SHAPES, SPLITS


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
