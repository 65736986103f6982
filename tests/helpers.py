"""Test helpers shared across folders: tiny llava-hf checkpoints written by transformers, prompts, pixels.

torch and transformers are imported only when a checkpoint is written, so test folders that never ask
for one (the pruning library, the benchmark readers) run without loading them.
"""

from __future__ import annotations

import os

import numpy as np

# How each tiny preset is written: one per on-disk variant the loader must handle.
CHECKPOINT_VARIANTS = {
    "tiny": dict(key_spelling="saved"),  # save_pretrained, one file
    "tiny-gqa": dict(key_spelling="saved", max_shard_size="300KB"),  # sharded with an index
    "tiny-full": dict(key_spelling="state_dict"),  # newer in-memory key spelling
    "tiny-next": dict(key_spelling="saved"),  # LLaVA-NeXT over LLaMA
    "tiny-next-mistral": dict(key_spelling="state_dict"),  # LLaVA-NeXT over Mistral, model.image_newline
}


def exact_torch():
    """torch with TF32 off, so parity tests compare exact float32 on both sides."""
    import torch

    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    return torch


class TinyCheckpoint:
    """A tiny preset written to `directory` by transformers, with its torch model and the JAX runner."""

    def __init__(self, name: str, directory: str):
        exact_torch()
        from models import presets
        from models.checkpoint import load_checkpoint
        from models.generate import LlavaRunner

        self.name = name
        self.directory = directory
        self.hf_config = presets.llava_config(name)
        self.torch_model = presets.random_torch_model(self.hf_config, seed=0)
        presets.write_random_checkpoint(
            self.hf_config, directory, model=self.torch_model, **CHECKPOINT_VARIANTS[name]
        )
        # The CLIP its vision tower would come from, for methods that read CLIP's joint space.
        self.clip_directory = os.path.join(directory, "clip")
        presets.write_random_clip(self.hf_config, self.clip_directory, seed=1)
        _, self.jax_model = load_checkpoint(directory, text_tower=self.clip_directory)
        self.runner = LlavaRunner(self.jax_model)
        self.config = self.jax_model.config
        self.pad_token_id = self.hf_config.text_config.pad_token_id


def make_prompt(config, rng: np.random.Generator, before: int, after: int) -> list[int]:
    """BOS, `before` word ids, the image span, `after` word ids (ids from the tiny vocabulary)."""

    def words(n):
        return [int(t) for t in rng.integers(4, 60, n)]

    return [1] + words(before) + [config.image_token_index] * config.num_image_tokens + words(after)


def make_queries(ckpt, rng: np.random.Generator, words: list[int]) -> list[list[int]]:
    """Questions in the tiny CLIP tokenizer's ids (start, ``words[i]`` random words, end), one per
    count; past the text tower's max_position_embeddings a question spans several segments."""
    start, end = (
        ckpt.jax_model.joint_space.cfg.text.vocab_size - 2,
        ckpt.jax_model.joint_space.cfg.text.eos_token_id,
    )
    return [[start, *(int(t) for t in rng.integers(1, start, count)), end] for count in words]


def batch_for(ckpt, prompts, pixels, pruning=None, *, max_new_tokens: int = 0, queries=None):
    """``ckpt.runner.make_batch``; a method reading CLIP's joint space also gets questions (random
    ones of different lengths, or ``queries``)."""
    if queries is None and pruning is not None and pruning.needs_text_tower:
        rng = np.random.default_rng(len(prompts))
        queries = make_queries(ckpt, rng, [5 + 13 * row for row in range(len(prompts))])
    return ckpt.runner.make_batch(
        prompts,
        pixels,
        pad_token_id=ckpt.pad_token_id,
        max_new_tokens=max_new_tokens,
        queries=None if pruning is None or not pruning.needs_text_tower else queries,
    )


def random_pixels(rng: np.random.Generator, batch: int, size: int) -> np.ndarray:
    return rng.standard_normal((batch, 3, size, size)).astype(np.float32)


def random_cues(
    config,
    *,
    batch: int,
    layout,
    seed: int = 0,
    length: int = 40,
    heads: int = 2,
    dim: int = 8,
    text_segments: int = 3,
):
    """Random cues of the kinds ``config`` asks for, for ``batch`` rows of the layout's image tokens
    (``text_segments``: the most text segments a row's question has, for ``JointEmbeddings``)."""
    import jax

    import adaptprune_jax as prune

    rng = np.random.default_rng(seed)
    n = layout.num_tokens

    def normal(*shape):
        return rng.normal(size=shape).astype(np.float32)

    def uniform(*shape):
        return rng.uniform(size=shape).astype(np.float32)

    slots = np.broadcast_to(np.arange(n, dtype=np.int32) + (length - n) // 2, (batch, n)).copy()
    makers = {
        prune.LastTokenAttention: lambda: {"attention": uniform(batch, n)},
        prune.StageAttention: lambda: {"attention": uniform(batch, n)},
        prune.QueryAttention: lambda: {
            "query_attention": uniform(batch, length, n),
            "query_mask": rng.uniform(size=(batch, length)) < 0.5,
        },
        prune.FeatureKeys: lambda: {"keys": normal(batch, n, dim)},
        prune.Embeddings: lambda: {"embeddings": normal(batch, n, dim)},
        prune.VisionClsAttention: lambda: {"vision_attention": uniform(batch, n)},
        prune.VisionTokens: lambda: {
            "vision_tokens": normal(batch, 1 + n, dim),
            "vision_keys": normal(batch, 1 + n, dim),
        },
        prune.JointEmbeddings: lambda: {
            "image_embeds": normal(batch, n, dim),
            "text_embeds": normal(batch, text_segments, dim),
            "text_mask": np.arange(text_segments)[None] < rng.integers(1, text_segments + 1, (batch, 1)),
        },
        prune.LayerView: lambda: {
            "view": prune.LayerViewArrays(
                normal(batch, length, heads, dim),
                normal(batch, length, heads, dim),
                normal(batch, length, dim),
                np.broadcast_to(np.arange(length, dtype=np.int32), (batch, length)).copy(),
                slots,
            )
        },
        prune.InputEmbeddings: lambda: {
            "inputs": prune.InputEmbeddingsArrays(
                normal(batch, length, dim),
                np.broadcast_to(np.arange(length, dtype=np.int32), (batch, length)).copy(),
                slots,
                np.broadcast_to(np.arange(length, dtype=np.int32), (batch, length)).copy(),
            )
        },
    }
    fields = {}
    for request in config.cue_requests():
        fields.update(makers[type(request)]())
    if layout.valid.ndim == 1:
        layout = layout.broadcast((batch,))
    return prune.Cues(**fields, layout=layout, rng=jax.random.key(seed), batch_size=batch, num_image_tokens=n)


def small_model_config(name: str, **settings):
    """Method ``name``'s config for the small test models: the harness-wide ``settings`` it has (as
    ``make_config(strict=False)`` takes them) and its ``small_model_settings``."""
    from adaptprune_jax import methods

    return methods.make_config(name, strict=False, **{**settings, **methods.get(name).small_model_settings})


def once_per_session(tmp_path_factory, name: str, compute):
    """``compute()`` (a JSON value) once per test session, also when pytest-xdist spreads a module's
    tests over several workers: each worker sets up module fixtures of its own, so an expensive one
    (an end-to-end run) would otherwise run once per worker. Under xdist the first worker computes
    and stores the value in the session's shared temporary directory (a lock orders them), the
    others read it; without xdist this is ``compute()``."""
    import fcntl
    import json
    import os

    if not os.environ.get("PYTEST_XDIST_WORKER"):
        return compute()
    shared = tmp_path_factory.getbasetemp().parent  # the session's, above every worker's own
    stored = shared / f"{name}.json"
    with open(shared / f"{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
        if stored.exists():
            return json.loads(stored.read_text())
        value = compute()
        stored.write_text(json.dumps(value))
        return value


class InterruptAfter:
    """An engine that raises KeyboardInterrupt (as Ctrl-C would) after `calls` generations."""

    def __init__(self, engine, calls: int):
        self.engine, self.calls = engine, calls
        self.config, self.preprocessor = engine.config, engine.preprocessor
        self.prepare = engine.prepare

    def run(self, prepared):
        if self.calls == 0:
            raise KeyboardInterrupt
        self.calls -= 1
        return self.engine.run(prepared)

    def answer_stream(self, requests):
        """The engine's stream, through this wrapper's prepare and run."""
        from models.engine import LlavaEngine

        return LlavaEngine.answer_stream(self, requests)


REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def fake_devices_env(count: int) -> dict[str, str]:
    """What makes a new process's CPU backend show ``count`` devices (fixed before JAX starts)."""
    return {"XLA_FLAGS": f"--xla_force_host_platform_device_count={count}"}


def run_benchmark(*args: str, timeout: int, env: dict[str, str] | None = None):
    """``python -m experiments.benchmark *args`` from the repository root on the CPU, as a user runs it
    (no $OUT of the device machine leaking in), ``env`` added to its environment; the finished
    process, its return code asserted 0."""
    import subprocess
    import sys

    extra = env or {}
    env = {k: v for k, v in os.environ.items() if k != "OUT"}
    env.update(PYTHONPATH=REPO_ROOT, JAX_PLATFORMS="cpu", **extra)
    command = [sys.executable, "-m", "experiments.benchmark", *args]
    process = subprocess.run(command, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    assert process.returncode == 0, process.stdout[-3000:] + process.stderr[-3000:]
    return process
