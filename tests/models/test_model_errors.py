"""Bad input gets a clear, specific error: checkpoints, configs, prompts and pruning settings."""

from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file
from transformers import LlavaConfig

import adaptprune_jax as prune
from models import presets
from models.checkpoint import CheckpointError, load_checkpoint
from models.config import from_hf_config
from models.generate import pad_prompts
from tests.helpers import make_prompt, random_pixels


@pytest.fixture
def checkpoint_copy(tiny_checkpoints, tmp_path):
    """A writable copy of the single-file tiny checkpoint."""
    target = tmp_path / "ckpt"
    shutil.copytree(tiny_checkpoints("tiny").directory, target)
    return target


def _edit_weights(directory, edit):
    path = os.path.join(directory, "model.safetensors")
    tensors = load_file(path)
    edit(tensors)
    save_file(tensors, path)


def test_missing_unexpected_and_mismatched_keys_are_named_in_one_error(checkpoint_copy):
    def edit(tensors):
        del tensors["language_model.model.layers.1.mlp.up_proj.weight"]
        tensors["language_model.model.layers.0.self_attn.rotary_scale"] = np.ones(3, np.float32)
        tensors["multi_modal_projector.linear_2.bias"] = np.ones(7, np.float32)

    _edit_weights(checkpoint_copy, edit)
    with pytest.raises(CheckpointError) as error:
        load_checkpoint(checkpoint_copy)
    message = str(error.value)
    assert "missing keys (1): language_model.layers.1.mlp.up_proj.weight" in message
    assert "unexpected keys (1): language_model.layers.0.self_attn.rotary_scale" in message
    assert "shape mismatches (1): multi_modal_projector.linear_2.bias: checkpoint (7,)" in message


def test_unknown_model_type_is_refused_with_the_supported_list(checkpoint_copy):
    config_path = checkpoint_copy / "config.json"
    config = json.loads(config_path.read_text())
    config["model_type"] = "qwen2_vl"
    config_path.write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"unsupported model_type 'qwen2_vl'.*supported: llava"):
        load_checkpoint(checkpoint_copy)


def test_missing_directory_weights_and_shards(checkpoint_copy, tmp_path, tiny_checkpoints):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_checkpoint(tmp_path / "nowhere")
    os.remove(checkpoint_copy / "model.safetensors")
    with pytest.raises(FileNotFoundError, match="no model.safetensors or model.safetensors.index.json"):
        load_checkpoint(checkpoint_copy)
    sharded = tmp_path / "sharded"
    shutil.copytree(tiny_checkpoints("tiny-gqa").directory, sharded)
    shard = sorted(
        set(json.loads((sharded / "model.safetensors.index.json").read_text())["weight_map"].values())
    )[1]
    os.remove(sharded / shard)
    with pytest.raises(
        FileNotFoundError, match=f"shard {shard} listed in model.safetensors.index.json is missing"
    ):
        load_checkpoint(sharded)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match="no config.json"):
        load_checkpoint(empty)


def test_unsupported_variants_of_the_config_are_refused():
    config = presets.llava_config("tiny")
    config.text_config.rope_parameters = {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0}
    with pytest.raises(ValueError, match="unsupported RoPE type 'yarn'"):
        from_hf_config(config)
    tiny = presets.llava_config("tiny")
    qwen = LlavaConfig(
        vision_config=tiny.vision_config.to_dict(),
        text_config=dict(
            model_type="qwen2",
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            vocab_size=128,
        ),
    )
    with pytest.raises(
        ValueError, match="unsupported language model type 'qwen2'; supported: llama, mistral"
    ):
        from_hf_config(qwen)


def test_prompt_errors(tiny_checkpoints, prompt_rng):
    ckpt = tiny_checkpoints("tiny")
    cfg = ckpt.config
    kwargs = dict(
        pad_token_id=ckpt.pad_token_id,
        image_token_index=cfg.image_token_index,
        num_image_tokens=cfg.num_image_tokens,
    )
    with pytest.raises(
        ValueError, match=f"prompt 0 must contain one contiguous run of {cfg.num_image_tokens}"
    ):
        pad_prompts([[1, 5, 6, 7]], **kwargs)  # no image token
    split = make_prompt(cfg, prompt_rng, 2, 2)
    split.insert(10, 5)  # a text token inside the image span
    with pytest.raises(ValueError, match="prompt 0 must contain one contiguous run"):
        pad_prompts([split], **kwargs)
    long_prompt = make_prompt(cfg, prompt_rng, 2, 2)
    limit = len(long_prompt) + 3
    with pytest.raises(
        ValueError, match=rf"prompt too long for the cache: {len(long_prompt)} prompt tokens \+ 4 new"
    ):
        pad_prompts([long_prompt], **kwargs, max_total_length=limit, max_new_tokens=4)
    with pytest.raises(ValueError, match="2 prompts but 1 images"):
        ckpt.runner.make_batch(
            [long_prompt, long_prompt],
            random_pixels(prompt_rng, 1, cfg.vision.image_size),
            pad_token_id=ckpt.pad_token_id,
        )


@pytest.mark.parametrize(
    "config, message",
    [
        (dict(name="adaptprune", keep=0), "keep"),
        (dict(name="adaptprune", keep=100_000), "keep"),
        (dict(name="fastv", keep=1.5), "keep"),
        (dict(name="fastv", keep=16, layer=9), "layer=9 is out of range"),
    ],
)
def test_pruning_settings_out_of_range_fail_before_any_work(tiny_checkpoints, prompt_rng, config, message):
    ckpt = tiny_checkpoints("tiny")
    name = config.pop("name")
    with pytest.raises(ValueError, match=message):
        pruning = prune.make_config(name, **config)
        ckpt.runner.resolve_keep(pruning)


def test_grid_methods_refuse_a_non_square_token_count(tiny_checkpoints):
    """Uniform needs every token on its grid; AdaptPrune keeps the off-grid [CLS] and selects the rest,
    so its budget must exceed the one off-grid token."""
    ckpt = tiny_checkpoints("tiny-full")  # 577 image tokens: [CLS] + 24 x 24
    assert ckpt.config.image_grid is None
    with pytest.raises(ValueError, match="uniform: .*577"):
        ckpt.runner.resolve_keep(prune.make_config("uniform", keep=16, layer=1))
    assert ckpt.runner.resolve_keep(prune.make_config("adaptprune", keep=16, layer=1)) == 16
    with pytest.raises(ValueError, match="keep=1 must exceed the 1 such tokens"):
        ckpt.runner.resolve_keep(prune.make_config("adaptprune", keep=1, layer=1))
    assert ckpt.runner.resolve_keep(prune.make_config("fastv", keep=16, layer=1)) == 16  # no grid needed


def test_validate_reference_generation_is_not_masked_where_the_prompt_holds_the_pad_id(tmp_path):
    """A tokenizer whose pad token is <unk> (a common LLaMA set-up) gives words it does not know the pad
    id; transformers would mask them in generate unless told the prompt has no padding, and the
    continuation compared against JAX's would then be the reference's error."""
    import torch
    from transformers import LlavaForConditionalGeneration, PreTrainedTokenizerFast

    from experiments.validate import ValidateConfig, build_question, default_image, run
    from models.preprocess import Preprocessor
    from models.tokenizer import BOS_TOKEN, EOS_TOKEN, IMAGE_TOKEN, UNK_TOKEN

    config = presets.llava_config("tiny")
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=presets.tiny_tokenizer(config).backend_tokenizer,
        unk_token=UNK_TOKEN,
        bos_token=BOS_TOKEN,
        eos_token=EOS_TOKEN,
        pad_token=UNK_TOKEN,
        extra_special_tokens={"image_token": IMAGE_TOKEN},
        padding_side="right",
        model_max_length=1 << 20,
    )
    directory = presets.write_random_checkpoint(config, tmp_path / "unk-pad", tokenizer=tokenizer)
    unknown = " ".join(f"zq{i}" for i in range(20))  # 20 words outside the vocabulary
    prompt = f"Describe the {unknown} in detail."
    report = run(ValidateConfig(checkpoint=directory, prompt=prompt, generate_tokens=5))
    assert report["generated_equal"], report
    assert report["passed"]
    assert report["attention"] == "einsum"  # --attention=auto in float32: the parity path

    # The case is one where the mask matters: left to infer it, transformers continues differently.
    preprocessor = Preprocessor.from_checkpoint(directory, config)
    ids = build_question(preprocessor, prompt, 0)
    assert ids.count(tokenizer.pad_token_id) >= 20
    torch_model = LlavaForConditionalGeneration.from_pretrained(directory, dtype=torch.float32).eval()
    input_ids = torch.tensor([ids])
    with torch.no_grad():
        unmasked = torch_model.generate(
            input_ids=input_ids,
            pixel_values=torch.tensor(preprocessor.pixel_values([default_image()])),
            do_sample=False,
            max_new_tokens=5,
            eos_token_id=preprocessor.eos_token_id,
            pad_token_id=preprocessor.pad_token_id,
        )
    assert unmasked[0, len(ids) :].tolist() != report["generated_ids_jax"]
