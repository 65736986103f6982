"""What every worker process shares: the model config, random inputs, JAX set-up, and the ceilings job."""

from __future__ import annotations

from typing import NamedTuple

from experiments.benchmark.timing import median, timed
from experiments.jax_runtime import use_compilation_cache


def llava_hf_config(model: str):
    """The transformers LlavaConfig of a preset name or a checkpoint directory."""
    from models import presets
    from models.config import load_hf_config

    return presets.llava_config(model) if model in presets.PRESET_NAMES else load_hf_config(model)


def random_prompts(
    batch: int, text_tokens: int, num_image_tokens: int, vocab_size: int, image_token_index: int, seed: int
):
    """(ids (B, S) int32, image_start): random ids, one image span after half the text tokens."""
    import numpy as np

    rng = np.random.default_rng(seed)
    ids = rng.integers(0, vocab_size, (batch, text_tokens + num_image_tokens)).astype(np.int32)
    ids[ids == image_token_index] = (image_token_index + 1) % vocab_size
    start = text_tokens // 2
    ids[:, start : start + num_image_tokens] = image_token_index
    return ids, start


def random_pixels(batch: int, size: int, seed: int, crops: int | None = None):
    """(B, 3, size, size) float32 normal noise, or (B, crops, 3, size, size) for LLaVA-NeXT's crops:
    random pixels, never zeros, so no kernel sees a shortcut."""
    import numpy as np

    shape = (batch, 3, size, size) if crops is None else (batch, crops, 3, size, size)
    return np.random.default_rng(seed + 1).standard_normal(shape, dtype=np.float32)


class BenchmarkImage(NamedTuple):
    """The one image size every row of a configuration has, and what it puts in the prompt."""

    size: tuple[int, int]  # (height, width)
    num_tokens: int  # image tokens per row (LLaVA-NeXT: newlines included)
    crops: int | None  # LLaVA-NeXT's crops per row (base + high resolution); None for LLaVA-1.5


def parse_image_size(text: str) -> tuple[int, int] | None:
    """'HxW' -> (H, W); '' -> None (the model's base image)."""
    if not text:
        return None
    height, x, width = text.strip().lower().partition("x")
    if not (x and height.isdigit() and width.isdigit() and int(height) > 0 and int(width) > 0):
        raise ValueError(f"bad --image_size {text!r}: expected HEIGHTxWIDTH in pixels, e.g. 672x672")
    return int(height), int(width)


def benchmark_image(cfg, image_size: str) -> BenchmarkImage:
    """The image of a run: ``image_size`` 'HxW' ('' = the base crop, cfg.vision.image_size square).
    LLaVA-1.5 resizes every image to its base crop, so only that size is taken; LLaVA-NeXT's token
    and crop counts come from its anyres packing (`models.anyres`)."""
    from models import anyres

    base = (cfg.vision.image_size, cfg.vision.image_size)
    size = parse_image_size(image_size) or base
    if not cfg.anyres:
        if size != base:
            raise ValueError(
                f"--image_size={image_size}: a LLaVA-1.5 model sees every image as one "
                f"{base[0]}x{base[1]} crop; other sizes are for LLaVA-NeXT (anyres) models"
            )
        return BenchmarkImage(size, cfg.num_image_tokens, None)
    return BenchmarkImage(size, anyres.image_token_count(size, cfg), anyres.num_crops(size, cfg))


def method_settings(spec: dict, method: str) -> dict:
    """``method``'s own settings from --method_settings, as the driver parsed them: a tuple travels in
    the job's JSON as a list and is a tuple again here (configs are hashed: they are static to jit)."""

    def restored(value):
        return tuple(restored(item) for item in value) if isinstance(value, list) else value

    return {name: restored(value) for name, value in spec.get("method_settings", {}).get(method, {}).items()}


def configure_jax(spec):
    """JAX with the job's attention-logits budget and compilation cache (call before any tracing)."""
    import jax

    if spec.get("attention_logits_budget_mb"):  # before anything is traced: a trace-time constant
        from models.layers import set_attention_logits_budget

        set_attention_logits_budget(int(spec["attention_logits_budget_mb"] * 2**20))
    use_compilation_cache(spec.get("compile_cache") or "", every_program=True)
    return jax


def memory_stats() -> dict:
    """The allocator's statistics (peak_bytes_in_use, bytes_limit); empty where the backend keeps none."""
    import jax

    return jax.devices()[0].memory_stats() or {}


def ceilings_worker(spec: dict) -> dict:
    """Measured copy bandwidth (read + write bytes) and bf16 matmul rate, plus the device's identity.

    Each ceiling is `iterations` dependent steps inside ONE jitted loop (x <- 3x; p <- (p @ b) / m, each
    step behind an optimization barrier), timed as a whole and divided, so per-call dispatch and
    synchronisation are not charged to the hardware.
    """
    jax = configure_jax(spec)
    import jax.numpy as jnp

    device = jax.devices()[0]
    small = device.platform == "cpu"
    n, m, iterations = (2**22, 512, 4) if small else (2**30, 8192, 20)
    key = jax.random.key(spec["seed"])
    x = jax.random.normal(key, (n,), jnp.bfloat16)
    a, b = (jax.random.normal(jax.random.fold_in(key, i), (m, m), jnp.bfloat16) for i in (1, 2))
    inverse_m = jnp.bfloat16(1.0 / m)
    barrier = jax.lax.optimization_barrier  # no fusing of steps, should XLA unroll the loop

    scale = jax.jit(lambda v: jax.lax.fori_loop(0, iterations, lambda _, u: barrier(u * 3), v))
    matmul = jax.jit(
        lambda p, q: jax.lax.fori_loop(0, iterations, lambda _, u: barrier((u @ q) * inverse_m), p)
    )
    copy_ms = median(timed(lambda: scale(x), 10, jax.block_until_ready)) / iterations
    matmul_ms = median(timed(lambda: matmul(a, b), 10, jax.block_until_ready)) / iterations
    return {
        "status": "ok",
        "device": str(device),
        "device_kind": device.device_kind,
        "platform": device.platform,
        "bytes_limit": memory_stats().get("bytes_limit"),
        "iterations": iterations,
        "copy_bytes": 2 * n * 2,
        "copy_ms": copy_ms,
        "copy_bytes_per_s": 2 * n * 2 / (copy_ms / 1e3),
        "matmul_size": m,
        "matmul_ms": matmul_ms,
        "matmul_flops_per_s": 2 * m**3 / (matmul_ms / 1e3),
    }
