"""CLIP's joint space in Flax against transformers' CLIPModel (a tiny random one written by
save_pretrained, as openai's CLIP ships): the text tower with projection on segments split as the
released CDPruner splits a question, the visual projection; the loader's errors. (No CLIP tokenizer
offline: random token ids with start and end-of-text tokens.)"""

from __future__ import annotations

import jax
import numpy as np
import pytest

from models.checkpoint import CheckpointError, CheckpointFileError
from models.clip_text import batch_segments, load_joint_space, text_segments
from tests.helpers import exact_torch

MAX_REL_ERR = 1e-5
SEGMENT_LENGTH, VOCAB, START, END = 77, 99, 97, 98


VISION_WIDTH = 24


def _write_tower(directory, eos_token_id):
    torch = exact_torch()
    from transformers import CLIPConfig, CLIPModel, CLIPTextConfig, CLIPVisionConfig

    text = CLIPTextConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=37,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=SEGMENT_LENGTH,
        projection_dim=16,
        bos_token_id=START,
        eos_token_id=eos_token_id,
        pad_token_id=1,
    )
    vision = CLIPVisionConfig(
        hidden_size=VISION_WIDTH,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        image_size=28,
    )
    config = CLIPConfig(text_config=text.to_dict(), vision_config=vision.to_dict(), projection_dim=16)
    torch.manual_seed(0)
    model = CLIPModel(config).eval()
    model.save_pretrained(directory)
    return model


def _question(rng, words):
    return [START, *rng.integers(3, START, words).tolist(), END]


@pytest.mark.parametrize("eos_token_id", [END, 2])  # 2: a legacy config, pooled at the highest id
def test_text_embeds_equal_transformers(tmp_path, eos_token_id):
    torch = exact_torch()
    model = _write_tower(tmp_path, eos_token_id)
    joint = load_joint_space(tmp_path, VISION_WIDTH)
    tower = joint.text_tower
    rng = np.random.default_rng(0)
    # Two questions: one segment with padding, and three segments (the last one padded).
    ids, mask = zip(*(text_segments(_question(rng, words), SEGMENT_LENGTH) for words in (9, 180)))
    ids, mask = np.concatenate(ids), np.concatenate(mask)
    assert (
        ids.shape == (4, SEGMENT_LENGTH) and mask[0].sum() == 11 and mask[1:3].all() and mask[3].sum() == 28
    )
    with jax.default_matmul_precision("highest"):
        ours = np.asarray(jax.jit(tower)(ids, mask))
    with torch.no_grad():
        theirs = model.get_text_features(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask))
        theirs = getattr(theirs, "pooler_output", theirs).numpy()
    assert np.abs(ours - theirs).max() / np.abs(theirs).max() < MAX_REL_ERR
    # Batched as the model runs it: (B, M, L) segments, the second question's third segment empty.
    segments, segment_mask = batch_segments([_question(rng, 9), _question(rng, 100)], SEGMENT_LENGTH)
    assert segments.shape == (2, 2, SEGMENT_LENGTH) and not segment_mask[0, 1].any()
    with jax.default_matmul_precision("highest"):
        batched = np.asarray(jax.jit(joint.text_embeds)(segments, segment_mask))
    with torch.no_grad():
        alone = model.get_text_features(
            input_ids=torch.tensor(segments[1]), attention_mask=torch.tensor(segment_mask[1])
        )
        alone = getattr(alone, "pooler_output", alone).numpy()
    assert np.isfinite(batched).all()
    assert np.abs(batched[1] - alone).max() / np.abs(alone).max() < MAX_REL_ERR
    features = rng.normal(size=(5, VISION_WIDTH)).astype(np.float32)
    with torch.no_grad():
        projected = model.visual_projection(torch.tensor(features)).numpy()
    np.testing.assert_allclose(np.asarray(joint.visual_projection(features)), projected, rtol=1e-5, atol=1e-6)


def test_text_segments_pad_the_last_segment_with_zeros():
    ids, mask = text_segments(list(range(1, 80)), SEGMENT_LENGTH)
    assert ids.shape == mask.shape == (2, SEGMENT_LENGTH)
    assert ids[1, :2].tolist() == [78, 79] and not ids[1, 2:].any()
    assert mask[0].all() and mask[1].tolist() == [1, 1] + [0] * (SEGMENT_LENGTH - 2)
    assert text_segments([5] * SEGMENT_LENGTH, SEGMENT_LENGTH)[0].shape == (1, SEGMENT_LENGTH)
    with pytest.raises(ValueError, match="at least one token"):
        text_segments([], SEGMENT_LENGTH)


def test_loader_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="CLIP text tower directory .* does not exist"):
        load_joint_space(tmp_path / "absent", VISION_WIDTH)
    with pytest.raises(CheckpointError, match="has no config.json"):
        load_joint_space(tmp_path, VISION_WIDTH)
    model = _write_tower(tmp_path, END)
    with pytest.raises(
        CheckpointError, match="visual_projection takes 24-wide features, but this model's vision tower is 32"
    ):
        load_joint_space(tmp_path, 32)
    model.text_model.save_pretrained(tmp_path / "text_only")
    with pytest.raises(CheckpointError, match="holds a 'clip_text_model' checkpoint; expected a CLIPModel"):
        load_joint_space(tmp_path / "text_only", VISION_WIDTH)
    from safetensors.numpy import load_file, save_file

    path = tmp_path / "model.safetensors"
    tensors = load_file(path)
    tensors.pop("visual_projection.weight")
    tensors["text_model.extra.weight"] = np.zeros(3, np.float32)
    save_file(tensors, path, metadata={"format": "pt"})
    with pytest.raises(
        CheckpointError,
        match=r"missing keys \(1\): visual_projection\.weight(.|\n)*unexpected keys \(1\): text_model\.extra\.weight",
    ):
        load_joint_space(tmp_path, VISION_WIDTH)
    path.write_bytes(b"")
    with pytest.raises(CheckpointFileError, match="is empty"):
        load_joint_space(tmp_path, VISION_WIDTH)
    path.unlink()
    with pytest.raises(FileNotFoundError, match="no model.safetensors or model.safetensors.index.json"):
        load_joint_space(tmp_path, VISION_WIDTH)
