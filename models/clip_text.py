"""CLIP's joint image-text space beside a LLaVA model: the text tower with its projection
(transformers' ``CLIPTextModelWithProjection``) and the vision side's ``visual_projection``, which
CDPruner's relevance reads. LLaVA checkpoints carry neither; they come from the CLIP checkpoint the
vision tower was taken from (a ``CLIPModel`` directory such as openai/clip-vit-large-patch14-336).

Text tower: token and position embeddings, pre-layernorm encoder layers under a causal mask (and the
segments' padding mask), a final layer norm, the hidden state at the end-of-text token, and the
projection. The encoder layers are the vision tower's (``models/clip.py``: q/k/v in one fused kernel,
joined from and split back into transformers' q_proj / k_proj / v_proj by ``models.checkpoint``) with a
mask, attending through einsum whatever the LLaVA model's attention option says. Also the
host-side split of tokenized questions into segments of ``max_position_embeddings`` tokens, as the
released CDPruner feeds the tower.
"""

from __future__ import annotations

import dataclasses
import os

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from models.checkpoint import (
    CheckpointError,
    Names,
    TensorSource,
    _identity,
    _transpose,
    fill_module,
    module_names,
)
from models.clip import CLIPAttention, CLIPEncoderLayer
from models.config import read_json_object
from models.layers import Dense, LayerNorm, attend, normal_param

# transformers' CLIPTextTransformer: configs saved before its eos_token_id was fixed say 2, and the
# tower then pools at the highest token id (the end-of-text token of CLIP's vocabulary).
LEGACY_EOS_TOKEN_ID = 2


@dataclasses.dataclass(frozen=True)
class TextTowerConfig:
    """The shapes of a CLIP text tower (field names as ``VisionConfig``'s, so the layers are shared)."""

    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    layer_norm_eps: float
    hidden_act: str
    vocab_size: int
    max_position_embeddings: int
    projection_dim: int
    eos_token_id: int

    @classmethod
    def from_hf(cls, hf_config) -> TextTowerConfig:
        """From transformers' ``CLIPTextConfig``."""
        if hf_config.model_type != "clip_text_model":
            raise ValueError(f"expected a clip_text_model config, got model_type {hf_config.model_type!r}")
        return cls(
            hidden_size=hf_config.hidden_size,
            intermediate_size=hf_config.intermediate_size,
            num_layers=hf_config.num_hidden_layers,
            num_heads=hf_config.num_attention_heads,
            layer_norm_eps=hf_config.layer_norm_eps,
            hidden_act=hf_config.hidden_act,
            vocab_size=hf_config.vocab_size,
            max_position_embeddings=hf_config.max_position_embeddings,
            projection_dim=hf_config.projection_dim,
            eos_token_id=hf_config.eos_token_id,
        )


class CLIPTextAttention(CLIPAttention):
    """The vision tower's attention (fused q/k/v) under the text tower's mask, always through
    `attend` (einsum): a few short segments per question, read once per batch."""

    def __call__(self, x: jax.Array, mask: jax.Array) -> jax.Array:
        return self.out_proj(attend(*self.heads(x), mask=mask))


class CLIPTextEncoderLayer(CLIPEncoderLayer):
    def _attention(self, cfg: TextTowerConfig, *, dtype, rngs: nnx.Rngs) -> CLIPTextAttention:
        return CLIPTextAttention(cfg, dtype=dtype, rngs=rngs)

    def __call__(self, x: jax.Array, mask: jax.Array) -> jax.Array:
        x = x + self.self_attn(self.layer_norm1(x), mask)
        return x + self.fc2(self.act(self.fc1(self.layer_norm2(x))))


class CLIPTextTower(nnx.Module):
    def __init__(self, cfg: TextTowerConfig, *, dtype=jnp.float32, rngs: nnx.Rngs | None = None):
        rngs = rngs if rngs is not None else nnx.Rngs(0)
        self.cfg = cfg
        self.token_embedding = normal_param(rngs, (cfg.vocab_size, cfg.hidden_size), dtype)
        self.position_embedding = normal_param(rngs, (cfg.max_position_embeddings, cfg.hidden_size), dtype)
        self.layers = nnx.List(
            [CLIPTextEncoderLayer(cfg, dtype=dtype, rngs=rngs) for _ in range(cfg.num_layers)]
        )
        self.final_layer_norm = LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps, dtype=dtype)
        self.text_projection = Dense(
            cfg.hidden_size, cfg.projection_dim, use_bias=False, dtype=dtype, rngs=rngs
        )

    def eos_index(self, input_ids: jax.Array) -> jax.Array:
        """(B,) the slot transformers pools at: the first end-of-text token (slot 0 when a segment has
        none), or under a legacy config the highest token id."""
        if self.cfg.eos_token_id == LEGACY_EOS_TOKEN_ID:
            return jnp.argmax(input_ids, axis=-1)
        return jnp.argmax(input_ids == self.cfg.eos_token_id, axis=-1)

    def __call__(self, input_ids: jax.Array, attention_mask: jax.Array) -> jax.Array:
        """input_ids (B, T) int, attention_mask (B, T) (0 = padding) -> text_embeds (B, projection_dim)."""
        length = input_ids.shape[1]
        if length > self.cfg.max_position_embeddings:
            raise ValueError(
                f"{length} tokens exceed the text tower's max_position_embeddings="
                f"{self.cfg.max_position_embeddings}: split them with text_segments"
            )
        x = self.token_embedding[...][input_ids] + self.position_embedding[...][:length]
        causal = jnp.tril(jnp.ones((length, length), bool))
        mask = causal[None] & (attention_mask[:, None, :] > 0)
        for layer in self.layers:
            x = layer(x, mask)
        x = self.final_layer_norm(x)
        pooled = jnp.take_along_axis(x, self.eos_index(input_ids)[:, None, None], axis=1)[:, 0]
        return self.text_projection(pooled)


def text_segments(input_ids: np.ndarray | list[int], segment_length: int) -> tuple[np.ndarray, np.ndarray]:
    """One tokenized question (T,) -> (input_ids, attention_mask), each (ceil(T / L), L) int64: the
    released split into segments of L = max_position_embeddings tokens, the last zero-padded with
    mask 0 there (later segments carry no start token, and only the last an end-of-text token)."""
    ids = np.asarray(input_ids, dtype=np.int64).reshape(-1)
    if ids.size == 0:
        raise ValueError("text_segments needs at least one token")
    count = (ids.size - 1) // segment_length + 1
    padding = count * segment_length - ids.size
    mask = np.concatenate([np.ones_like(ids), np.zeros(padding, np.int64)])
    ids = np.concatenate([ids, np.zeros(padding, np.int64)])
    return ids.reshape(count, segment_length), mask.reshape(count, segment_length)


def batch_segments(queries, segment_length: int, num_segments: int | None = None):
    """Tokenized questions (one id list per row) -> (ids, mask) (B, M, L) int32: each row's
    ``text_segments``, then empty segments (ids 0, mask 0) up to M = ``num_segments`` (default: the
    most any row needs), so questions of different lengths share one static shape."""
    rows = [text_segments(ids, segment_length) for ids in queries]
    needed = max(len(ids) for ids, _ in rows)
    count = needed if num_segments is None else num_segments
    if needed > count:
        raise ValueError(
            f"a question takes {needed} text segments of {segment_length} tokens; only {count} fit"
        )
    ids = np.zeros((len(rows), count, segment_length), np.int32)
    mask = np.zeros_like(ids)
    for row, (row_ids, row_mask) in enumerate(rows):
        ids[row, : len(row_ids)], mask[row, : len(row_ids)] = row_ids, row_mask
    return ids, mask


@dataclasses.dataclass(frozen=True)
class JointSpaceConfig:
    text: TextTowerConfig
    vision_width: int  # the vision tower's hidden size, visual_projection's input

    @classmethod
    def from_hf(cls, clip_config) -> JointSpaceConfig:
        """From transformers' ``CLIPConfig`` (a CLIPModel's: its projection_dim is the shared one)."""
        text = dataclasses.replace(
            TextTowerConfig.from_hf(clip_config.text_config), projection_dim=clip_config.projection_dim
        )
        return cls(text, clip_config.vision_config.hidden_size)


class JointSpace(nnx.Module):
    """CLIP's text tower and visual projection: a question and the image tokens in one space."""

    def __init__(self, cfg: JointSpaceConfig, *, dtype=jnp.float32, rngs: nnx.Rngs | None = None):
        rngs = rngs if rngs is not None else nnx.Rngs(0)
        self.cfg = cfg
        self.text_tower = CLIPTextTower(cfg.text, dtype=dtype, rngs=rngs)
        self.visual_projection = Dense(
            cfg.vision_width, cfg.text.projection_dim, use_bias=False, dtype=dtype, rngs=rngs
        )

    def text_embeds(self, query_ids: jax.Array, query_mask: jax.Array) -> jax.Array:
        """(B, M, L) segments -> (B, M, projection_dim). An empty segment (mask 0 throughout) is run
        with its first slot visible, so its (unused) embedding is finite rather than a softmax over
        nothing."""
        batch, count, length = query_ids.shape
        mask = query_mask.reshape(batch * count, length) > 0
        mask = mask.at[:, 0].set(True)
        embeds = self.text_tower(query_ids.reshape(batch * count, length), mask.astype(jnp.int32))
        return embeds.reshape(batch, count, -1)


def _hf_name(path: tuple) -> tuple[Names, object]:
    """transformers' name(s) (``CLIPModel``'s) and the transform for one of ``JointSpace``'s paths."""
    parts = [str(p) for p in path]
    if parts[0] == "visual_projection":
        return "visual_projection.weight", _transpose
    parts = parts[1:]  # text_tower
    if parts[0] in ("token_embedding", "position_embedding"):
        return f"text_model.embeddings.{parts[0]}.weight", _identity
    if parts[0] == "text_projection":
        return "text_projection.weight", _transpose
    suffix, transform = {
        "kernel": ("weight", _transpose),
        "bias": ("bias", _identity),
        "scale": ("weight", _identity),
    }[parts[-1]]
    module = parts[:-1]
    if module[0] == "layers":
        module = ["encoder", "layers", module[1]] + [
            {"fc1": "mlp.fc1", "fc2": "mlp.fc2"}.get(m, m) for m in module[2:]
        ]
    return module_names(["text_model", *module], suffix), transform


def load_joint_space(directory: str | os.PathLike, vision_width: int, dtype=jnp.float32) -> JointSpace:
    """The joint space from a CLIP checkpoint directory (``CLIPModel.save_pretrained``,
    as openai/clip-vit-large-patch14-336 ships: config.json, safetensors and a tokenizer). Only the
    text tower, ``text_projection`` and ``visual_projection`` are read; the CLIP vision model, if
    there, is not (the LLaVA checkpoint has its own). Errors: FileNotFoundError for a missing
    directory or safetensors file; CheckpointError without config.json, for a config that is no
    CLIPModel's, for a visual_projection that does not take ``vision_width`` features, or naming every
    missing or misshapen tensor."""
    from transformers import CLIPConfig

    directory = os.fspath(directory)
    if not os.path.isdir(directory):
        raise FileNotFoundError(f"CLIP text tower directory {directory!r} does not exist")
    config_path = os.path.join(directory, "config.json")
    if not os.path.isfile(config_path):
        raise CheckpointError(
            f"{directory} has no config.json: expected a CLIPModel directory (the text tower and "
            "visual_projection of the CLIP the vision tower came from)"
        )
    model_type = read_json_object(config_path).get("model_type")
    if model_type != "clip":
        raise CheckpointError(
            f"{directory} holds a {model_type!r} checkpoint; expected a CLIPModel ('clip') directory, "
            "which has both the text tower and visual_projection"
        )
    clip = CLIPConfig.from_pretrained(directory)
    if clip.vision_config.hidden_size != vision_width:
        raise CheckpointError(
            f"{directory}'s visual_projection takes {clip.vision_config.hidden_size}-wide features, but "
            f"this model's vision tower is {vision_width} wide: not the CLIP it was taken from"
        )
    cfg = JointSpaceConfig.from_hf(clip)
    abstract = nnx.eval_shape(lambda: JointSpace(cfg, dtype=dtype, rngs=nnx.Rngs(0)))
    return fill_module(
        abstract,
        TensorSource(directory),
        _hf_name,
        dtype,
        ignored=lambda name: (
            name.endswith("position_ids") or name.startswith("vision_model.") or name == "logit_scale"
        ),
        what="the CLIP text tower",
    )
