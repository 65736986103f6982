"""Rendering: one integer-only implementation (`_render`, written against an array module), run by
NumPy (`render_scenes_numpy`, for files) or by jitted JAX (`render_scenes`, inside a training step).

No floating point is involved, so the two agree bit for bit and XLA's fusion or FMA cannot change a
pixel.
"""

from __future__ import annotations

import functools

import numpy as np

from experiments.testbed.layout import SceneParams
from experiments.testbed.scene_config import DEFAULT_CONFIG, TestbedConfig
from experiments.testbed.words import CIRCLE, DIAMOND, SQUARE, TRIANGLE


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
