"""The testbeds' CLIP joint spaces (`experiments.testbed.training.joint_space`): the committed
directories are what CDPruner's loader reads (a CLIPConfig, text weights that transformers loads
whole, CLIP's special-token convention, no vision tower), and the trainer lowers its contrastive loss,
writes a directory whose text embeddings transformers reproduces, and reruns bit for bit."""

from __future__ import annotations

import json
import math
import os

import jax
import numpy as np
import pytest
from safetensors import safe_open

from experiments.testbed.training import joint_space
from models.checkpoint import SINGLE_FILE
from models.clip_text import load_joint_space
from tests.helpers import exact_torch

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TESTBEDS = ("testbed", "testbed-deep")
MAX_DIRECTORY_BYTES = 1 << 20
MAX_REL_ERR = 1e-5


def _text_embeds_gap(directory: str, model, texts) -> float:
    """Largest |Flax - transformers| text_embeds over `texts`, relative to transformers' largest."""
    torch = exact_torch()
    from transformers import AutoTokenizer, CLIPTextModelWithProjection

    tokenizer = AutoTokenizer.from_pretrained(directory)
    theirs = CLIPTextModelWithProjection.from_pretrained(directory).eval()
    encoded = tokenizer(texts, padding="longest", return_tensors="np")
    ids, mask = encoded["input_ids"], encoded["attention_mask"]
    with torch.no_grad():
        reference = theirs(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask)).text_embeds.numpy()
    with jax.default_matmul_precision("highest"):
        ours = np.asarray(jax.jit(lambda m, i, a: m.text_tower(i, a))(model, ids, mask))
    return float(np.abs(ours - reference).max() / np.abs(reference).max())


@pytest.mark.parametrize("testbed", TESTBEDS)
def test_committed_joint_space_loads_as_clip(testbed):
    exact_torch()
    from transformers import AutoTokenizer, CLIPConfig, CLIPTextModelWithProjection, LlavaConfig

    lvlm_dir = os.path.join(ROOT, "checkpoints", testbed)
    directory = os.path.join(lvlm_dir, "clip")
    config = CLIPConfig.from_pretrained(directory)
    text = config.text_config
    assert config.model_type == "clip" and text.projection_dim == config.projection_dim
    lvlm_vision = LlavaConfig.from_pretrained(lvlm_dir).vision_config.to_dict()
    ours = config.vision_config.to_dict()
    assert ours["projection_dim"] == config.projection_dim
    assert {k: v for k, v in ours.items() if k not in ("projection_dim", "transformers_version")} == {
        k: v for k, v in lvlm_vision.items() if k not in ("projection_dim", "transformers_version")
    }

    _, info = CLIPTextModelWithProjection.from_pretrained(directory, output_loading_info=True)
    assert not info["missing_keys"] and sorted(info["unexpected_keys"]) == ["visual_projection.weight"]
    with safe_open(os.path.join(directory, SINGLE_FILE), framework="np") as handle:
        shapes = {name: handle.get_slice(name).get_shape() for name in handle.keys()}
        dtypes = {handle.get_slice(name).get_dtype() for name in handle.keys()}
    assert dtypes == {"F32"}
    assert all(name.startswith("text_model.") for name in shapes if "projection" not in name)
    assert shapes["text_projection.weight"] == [config.projection_dim, text.hidden_size]
    assert shapes["visual_projection.weight"] == [config.projection_dim, ours["hidden_size"]]

    tokenizer = AutoTokenizer.from_pretrained(directory)
    assert len(tokenizer) == text.vocab_size
    assert (tokenizer.bos_token_id, tokenizer.eos_token_id) == (text.bos_token_id, text.eos_token_id)
    assert text.eos_token_id == text.vocab_size - 1 and text.bos_token_id == text.vocab_size - 2
    assert tokenizer.pad_token_id == text.pad_token_id
    questions = joint_space.testbed_questions()
    assert joint_space.unknown_words(tokenizer, questions) == []
    ids = tokenizer(questions[:3])["input_ids"]
    assert all(i[0] == text.bos_token_id and i[-1] == text.eos_token_id for i in ids)

    assert joint_space.directory_bytes(directory) < MAX_DIRECTORY_BYTES
    model = load_joint_space(directory, lvlm_vision["hidden_size"])
    assert _text_embeds_gap(directory, model, questions[::401]) < MAX_REL_ERR


def test_committed_joint_spaces_record_their_choice():
    for testbed in TESTBEDS:
        with open(os.path.join(ROOT, "checkpoints", testbed, "clip", joint_space.LOG_FILE)) as handle:
            record = json.load(handle)
        held_out = {p: r["held_out"]["text_to_image_top1"] for p, r in record["poolings"].items()}
        assert record["pooling"] == max(held_out, key=held_out.get)
        assert (
            held_out[record["pooling"]] > 2 * record["poolings"][record["pooling"]]["held_out"]["chance_top1"]
        )


TINY = dict(
    checkpoint=os.path.join(ROOT, "checkpoints", "testbed"),
    train_images=64,
    validation_images=16,
    hidden_size=32,
    num_layers=1,
    num_heads=2,
    intermediate_size=64,
    projection_dim=16,
    steps=400,
    batch_size=32,
    learning_rate=1e-3,
    warmup_steps=5,
    pooling="patch_mean",
    retrieval_batch=16,
    retrieval_rounds=1,
    alignment_scenes=2,
    quiet=True,
)


def test_tiny_training_lowers_the_loss_and_reruns_identically(tmp_path):
    exact_torch()
    cache = str(tmp_path / "cache")
    first = joint_space.run(
        joint_space.JointSpaceOptions(output=str(tmp_path / "a"), cache_dir=cache, **TINY)
    )
    # Below uniform logits (log batch), not only below the start: every caption mapped to one
    # embedding (the collapse the loss falls into first) scores exactly log batch.
    loss = first["fixed_batch_loss"]
    assert loss["after"] < min(loss["before"], math.log(TINY["batch_size"])) - 0.3, loss
    parity = first["transformers_parity"]
    assert not parity["missing_keys"] and parity["max_abs_err"] < MAX_REL_ERR * parity["max_abs"]

    directory = str(tmp_path / "b")
    joint_space.run(joint_space.JointSpaceOptions(output=directory, cache_dir=cache, **TINY))
    weights = [(tmp_path / name / SINGLE_FILE).read_bytes() for name in ("a", "b")]
    assert weights[0] == weights[1]
    from transformers import LlavaConfig

    model = load_joint_space(
        directory, LlavaConfig.from_pretrained(TINY["checkpoint"]).vision_config.hidden_size
    )
    assert _text_embeds_gap(directory, model, joint_space.testbed_questions()[:5]) < MAX_REL_ERR
