"""models/preprocess.py against the original LLaVA-1.5 recipe and transformers' LlavaProcessor."""

import json

import numpy as np
import PIL.Image
import pytest
import skimage.data
from transformers import LlavaProcessor
from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

from models.preprocess import (
    Preprocessor,
    UnreadableImageError,
    build_prompt,
    load_image,
    num_image_tokens,
)
from models.presets import llava15_image_processor, llava_config, tiny_tokenizer, write_random_checkpoint

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
# llava-hf/llava-1.5-7b-hf's preprocessor_config.json: a plain CLIP processor that centre-crops.
LLAVA_HF_PREPROCESSOR_CONFIG = {
    "crop_size": {"height": 336, "width": 336},
    "do_center_crop": True,
    "do_convert_rgb": True,
    "do_normalize": True,
    "do_rescale": True,
    "do_resize": True,
    "image_mean": list(CLIP_MEAN),
    "image_processor_type": "CLIPImageProcessor",
    "image_std": list(CLIP_STD),
    "processor_class": "LlavaProcessor",
    "resample": 3,
    "rescale_factor": 1 / 255,
    "size": {"shortest_edge": 336},
}


def expand2square(pil_img, background_color):
    """LLaVA's llava/mm_utils.py, verbatim."""
    width, height = pil_img.size
    if width == height:
        return pil_img
    elif width > height:
        result = PIL.Image.new(pil_img.mode, (width, width), background_color)
        result.paste(pil_img, (0, (width - height) // 2))
        return result
    else:
        result = PIL.Image.new(pil_img.mode, (height, height), background_color)
        result.paste(pil_img, ((height - width) // 2, 0))
        return result


def original_llava15_pixels(image: PIL.Image.Image) -> np.ndarray:
    """LLaVA-1.5's image_aspect_ratio='pad' preprocessing: expand2square, then the CLIP processor."""
    clip = CLIPImageProcessorPil(
        size={"shortest_edge": 336},
        crop_size={"height": 336, "width": 336},
        resample=PIL.Image.BICUBIC,
        image_mean=CLIP_MEAN,
        image_std=CLIP_STD,
    )
    padded = expand2square(image, tuple(int(x * 255) for x in clip.image_mean))
    return clip(images=padded, return_tensors="np")["pixel_values"][0]


def llava_hf_processor(config, tokenizer) -> LlavaProcessor:
    """LlavaProcessor as llava-hf configures it: num_additional_image_tokens=1 accounts for [CLS].

    (transformers' default 0 under the 'default' strategy yields 575 placeholders for 576 features.)
    """
    return LlavaProcessor(
        image_processor=llava15_image_processor(config),
        tokenizer=tokenizer,
        patch_size=config.vision_config.patch_size,
        num_additional_image_tokens=1,
        vision_feature_select_strategy=config.vision_feature_select_strategy,
    )


PHOTOS = {
    "astronaut": skimage.data.astronaut,  # 512 x 512, no padding
    "chelsea": skimage.data.chelsea,  # 300 x 451, landscape
    "coffee": skimage.data.coffee,  # 400 x 600
    "rocket": skimage.data.rocket,  # 427 x 640
    "chelsea_portrait": lambda: skimage.data.chelsea().transpose(1, 0, 2),  # 451 x 300, the other branch
}


@pytest.fixture(scope="session")
def photos():
    return {name: PIL.Image.fromarray(np.ascontiguousarray(load())) for name, load in PHOTOS.items()}


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory):
    return write_random_checkpoint(llava_config("tiny"), tmp_path_factory.mktemp("tiny_checkpoint"))


@pytest.fixture(scope="session")
def preprocessor(tiny_checkpoint):
    return Preprocessor.from_checkpoint(tiny_checkpoint)


def _checkpoint_without_weights(directory, config, processor_config=None):
    """A checkpoint directory with config + tokenizer and, optionally, a preprocessor_config.json."""
    config.save_pretrained(directory)
    tiny_tokenizer(config).save_pretrained(directory)
    if processor_config is not None:
        (directory / "preprocessor_config.json").write_text(json.dumps(processor_config))
    return directory


def test_build_prompt_is_vicuna_v1():
    assert build_prompt("What is in the image?") == (
        "A chat between a curious human and an artificial intelligence assistant. The assistant gives "
        "helpful, detailed, and polite answers to the human's questions. USER: <image>\nWhat is in the "
        "image? ASSISTANT:"
    )


def test_num_image_tokens_follows_the_config():
    assert num_image_tokens(llava_config("llava-1.5-7b")) == 576
    assert num_image_tokens(llava_config("tiny-full")) == 577  # [CLS] kept
    config = llava_config("tiny")
    config.vision_config.image_size = 224
    assert num_image_tokens(config) == 256


@pytest.mark.parametrize("name", PHOTOS)
def test_pixel_values_equal_original_llava15_recipe(preprocessor, photos, name):
    ours = preprocessor.pixel_values([photos[name]])
    assert ours.dtype == np.float32 and ours.shape == (1, 3, 336, 336)
    np.testing.assert_allclose(ours[0], original_llava15_pixels(photos[name]), rtol=0, atol=1e-6)


def test_original_recipe_is_pil_bicubic_then_clip_normalisation(photos):
    """The CLIP processor step of the recipe, spelled out with PIL and numpy (square input: no crop)."""
    padded = expand2square(photos["coffee"], tuple(int(x * 255) for x in CLIP_MEAN))
    resized = np.asarray(padded.resize((336, 336), PIL.Image.BICUBIC), dtype=np.float64) / 255
    expected = ((resized - CLIP_MEAN) / CLIP_STD).transpose(2, 0, 1)
    np.testing.assert_allclose(original_llava15_pixels(photos["coffee"]), expected, rtol=0, atol=1e-6)


def test_pixel_values_equal_llava_processor_in_a_batch(preprocessor, photos):
    config = preprocessor.config
    processor = llava_hf_processor(config, preprocessor.tokenizer)
    images = list(photos.values())
    expected = processor(
        images=images, text=[build_prompt("what color is it")] * len(images), return_tensors="np"
    )["pixel_values"]
    np.testing.assert_allclose(preprocessor.pixel_values(images), expected, rtol=0, atol=1e-6)


@pytest.mark.parametrize("threads", [2, 3, 8])
def test_threaded_pixel_values_equal_one_call_in_order(preprocessor, photos, threads):
    """Slices of a batch processed side by side come back in the batch's order, with the pixels the
    image processor gives the whole batch in one call."""
    images = [photos[name] for name in ("astronaut", "chelsea", "coffee", "rocket", "chelsea")]
    one_call = np.asarray(preprocessor.image_processor(images=images, return_tensors="np")["pixel_values"])
    default = preprocessor.preprocess_threads
    preprocessor.preprocess_threads, preprocessor._pool = threads, None
    try:
        threaded = preprocessor.pixel_values(images)
    finally:
        preprocessor.preprocess_threads, preprocessor._pool = default, None
    assert threaded.dtype == np.float32
    np.testing.assert_array_equal(threaded, one_call.astype(np.float32))


def test_padded_border_is_the_normalised_mean_colour(preprocessor, photos):
    border = (np.array([int(x * 255) for x in CLIP_MEAN]) / 255 - CLIP_MEAN) / CLIP_STD
    assert np.all(np.abs(border) < 0.02)  # the mean colour, up to truncation to integer levels
    # chelsea: 451 wide, padded by 75 rows top and bottom -> ~56 of 336 rows; keep clear of the
    # bicubic kernel's reach into the photo.
    landscape = preprocessor.pixel_values([photos["chelsea"]])[0]
    portrait = preprocessor.pixel_values([photos["chelsea_portrait"]])[0]
    for strip in (landscape[:, :50, :], landscape[:, -50:, :], portrait[:, :, :50], portrait[:, :, -50:]):
        np.testing.assert_allclose(
            strip, np.broadcast_to(border[:, None, None], strip.shape), rtol=0, atol=1e-6
        )


def test_from_checkpoint_forces_pad_mode_over_llava_hf_center_crop(tmp_path, photos):
    directory = _checkpoint_without_weights(tmp_path, llava_config("tiny"), LLAVA_HF_PREPROCESSOR_CONFIG)
    image = photos["coffee"]
    padded = Preprocessor.from_checkpoint(directory).pixel_values([image])[0]
    np.testing.assert_allclose(padded, original_llava15_pixels(image), rtol=0, atol=1e-6)
    cropped = Preprocessor.from_checkpoint(directory, pad_to_square=False).pixel_values([image])[0]
    clip = CLIPImageProcessorPil(
        **{
            k: v
            for k, v in LLAVA_HF_PREPROCESSOR_CONFIG.items()
            if k not in ("image_processor_type", "processor_class")
        }
    )
    np.testing.assert_allclose(
        cropped, clip(images=image, return_tensors="np")["pixel_values"][0], rtol=0, atol=1e-6
    )
    assert np.abs(cropped - padded).max() > 0.5


def test_from_checkpoint_without_saved_processor_uses_llava15(tmp_path, photos):
    directory = _checkpoint_without_weights(tmp_path, llava_config("tiny"))
    pixels = Preprocessor.from_checkpoint(directory).pixel_values([photos["rocket"]])[0]
    np.testing.assert_allclose(pixels, original_llava15_pixels(photos["rocket"]), rtol=0, atol=1e-6)


@pytest.mark.parametrize("preset", ["tiny", "tiny-full"])
def test_encode_equals_llava_processor_input_ids(photos, preset):
    config = llava_config(preset)
    tokenizer = tiny_tokenizer(config)
    preprocessor = Preprocessor(config, tokenizer, llava15_image_processor(config))
    question = "Is there a cat in the image? Answer the question using a single word or phrase."
    expected = llava_hf_processor(config, tokenizer)(
        images=photos["chelsea"], text=build_prompt(question), return_tensors="np"
    )["input_ids"][0].tolist()
    ids = preprocessor.encode(question)
    assert ids == expected
    assert ids.count(config.image_token_index) == num_image_tokens(config)
    assert ids[0] == tokenizer.bos_token_id


def test_from_checkpoint_encode_decode_and_special_ids(preprocessor):
    ids = preprocessor.encode("what color is it")
    assert ids.count(preprocessor.image_token_index) == preprocessor.num_image_tokens == 576
    assert preprocessor.decode(ids).endswith("user : what color is it assistant :")
    assert preprocessor.decode(ids + [preprocessor.eos_token_id]) == preprocessor.decode(ids)
    assert (preprocessor.eos_token_id, preprocessor.pad_token_id) == (2, 3)
    tokenizer_without_pad = tiny_tokenizer(preprocessor.config)
    tokenizer_without_pad.pad_token = None
    no_pad = Preprocessor(preprocessor.config, tokenizer_without_pad, preprocessor.image_processor)
    assert no_pad.pad_token_id == no_pad.eos_token_id == 2


def test_load_image_returns_rgb(tmp_path, photos):
    path = tmp_path / "astronaut.png"
    photos["astronaut"].convert("RGBA").save(path)
    image = load_image(path)
    assert image.mode == "RGB"
    np.testing.assert_array_equal(np.asarray(image), np.asarray(photos["astronaut"]))


def test_load_image_missing_file_names_the_path(tmp_path):
    missing = tmp_path / "no_such_image.jpg"
    with pytest.raises(FileNotFoundError, match="no_such_image.jpg"):
        load_image(missing)


def test_load_image_unreadable_file_names_the_path_and_reason(tmp_path):
    garbage = tmp_path / "garbage.jpg"
    garbage.write_bytes(b"this is not a jpeg \x00\x01\x02" * 10)
    with pytest.raises(UnreadableImageError, match=r"cannot read image .*garbage\.jpg: .+") as caught:
        load_image(garbage)
    assert isinstance(caught.value, ValueError)


def test_prompt_must_hold_exactly_one_image_token(preprocessor):
    with pytest.raises(ValueError, match="exactly one image token .* found 0"):
        preprocessor.encode_prompt("USER: what color is it ASSISTANT:")
    with pytest.raises(ValueError, match="exactly one image token .* found 2"):
        preprocessor.encode("<image> what color is it")
