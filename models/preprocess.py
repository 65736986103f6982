"""Images, prompts and token ids for LLaVA-1.5, as numpy arrays the JAX model consumes.

Everything here reproduces what the original LLaVA-1.5 code feeds its model, so that the JAX model,
transformers' PyTorch model and published numbers all see the same inputs:

- images: LLaVA-1.5's 'pad' mode (paste the image centred on a square canvas of the mean colour, then
  CLIP's bicubic resize, centre crop, 1/255 rescale and mean/std normalisation). llava-hf's saved
  processor centre-crops instead; `Preprocessor.from_checkpoint` therefore forces the pad mode by
  default. Resizing always goes through PIL (transformers' PIL backend), as the original code did;
  the torchvision backend's bicubic kernel gives slightly different pixels.
- prompts: the vicuna_v1 conversation template with a single `<image>` placeholder.
- tokens: the placeholder expanded to one id per image feature, exactly what transformers'
  `LlavaProcessor` produces (the model scatters image features into those positions).
"""

from __future__ import annotations

import concurrent.futures
import os
from collections.abc import Sequence

import numpy as np
import PIL.Image
from transformers import AutoTokenizer, LlavaConfig
from transformers.models.auto.image_processing_auto import AutoImageProcessor
from transformers.models.llava.image_processing_pil_llava import LlavaImageProcessorPil

from models import anyres
from models.config import from_hf_config, load_hf_config
from models.presets import anyres_image_processor, llava15_image_processor
from models.tokenizer import IMAGE_TOKEN

VICUNA_V1_SYSTEM = (
    "A chat between a curious human and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the human's questions."
)

# The image-processor settings that carry over when a saved processor is converted to pad mode.
_PROCESSOR_SETTINGS = (
    "do_resize",
    "size",
    "resample",
    "do_center_crop",
    "crop_size",
    "do_rescale",
    "rescale_factor",
    "do_normalize",
    "image_mean",
    "image_std",
    "do_convert_rgb",
)
# Files in which `save_pretrained` stores an image processor (processor_config.json nests it).
_PROCESSOR_FILES = ("processor_config.json", "preprocessor_config.json")


class UnreadableImageError(ValueError):
    """An image file exists but PIL cannot decode it (corrupt, truncated, or not an image)."""


def build_prompt(question: str, text_model_type: str = "llama") -> str:
    """The prompt LLaVA was trained with, one image placeholder before the question: vicuna_v1 for a
    LLaMA (LLaVA-1.5, v1.6-vicuna), mistral_instruct for a Mistral (v1.6-mistral)."""
    if text_model_type == "mistral":
        return f"[INST] {IMAGE_TOKEN}\n{question} [/INST]"
    return f"{VICUNA_V1_SYSTEM} USER: {IMAGE_TOKEN}\n{question} ASSISTANT:"


def build_followup(question: str) -> str:
    """A later turn of a vicuna_v1 conversation, as LLaVA-1.5's multi-turn training data has it: it
    follows the previous answer's `</s>` directly (separator `</s>`, no image)."""
    return f"USER: {question} ASSISTANT:"


def load_image(path: str | os.PathLike) -> PIL.Image.Image:
    """Decode an image file fully into an RGB PIL image (alpha dropped, as LLaVA's `.convert('RGB')`).

    Decoding happens here rather than lazily so that a corrupt file fails with its path in the message,
    not later inside the image processor.
    """
    path = os.fspath(path)
    try:
        with PIL.Image.open(path) as image:
            image.load()
            return image.convert("RGB")
    except FileNotFoundError:
        raise FileNotFoundError(f"image file not found: {path}") from None
    except (PIL.UnidentifiedImageError, OSError, SyntaxError, ValueError) as error:
        raise UnreadableImageError(f"cannot read image {path}: {error}") from error


def num_image_tokens(config: LlavaConfig) -> int:
    """How many embeddings one image contributes: one per patch, plus [CLS] under the 'full' strategy."""
    vision = config.vision_config
    per_side = vision.image_size // vision.patch_size
    return per_side * per_side + (1 if config.vision_feature_select_strategy == "full" else 0)


def llava15_pad_mode(image_processor) -> LlavaImageProcessorPil:
    """A PIL-backend LLaVA image processor with `image_processor`'s settings and do_pad=True.

    llava-hf saves a CLIPImageProcessor (no padding at all); converting rather than patching an
    attribute makes the pad mode hold whatever class was saved.
    """
    settings = {name: getattr(image_processor, name) for name in _PROCESSOR_SETTINGS}
    for name in ("size", "crop_size"):  # SizeDict -> the plain dict the constructor takes
        settings[name] = {key: value for key, value in dict(settings[name]).items() if value is not None}
    return LlavaImageProcessorPil(**settings, do_pad=True)


class Preprocessor:
    """Turns questions and images into the token ids and pixel arrays of one LLaVA checkpoint."""

    def __init__(self, config: LlavaConfig, tokenizer, image_processor, query_tokenizer=None):
        self.config = config
        self.model_config = from_hf_config(config)
        self.tokenizer = tokenizer
        self.image_processor = image_processor
        self.query_tokenizer = query_tokenizer  # the CLIP text tower's, when one is loaded
        self.preprocess_threads = max(1, os.cpu_count() or 1)  # image slices processed side by side
        self._pool = None

    @classmethod
    def from_checkpoint(
        cls,
        directory: str | os.PathLike,
        config: LlavaConfig | None = None,
        *,
        pad_to_square: bool = True,
        text_tower: str | os.PathLike | None = None,
    ) -> Preprocessor:
        """Load the tokenizer and image processor saved with a checkpoint directory (and the tokenizer
        of a CLIP text tower directory).

        pad_to_square=True (default) applies LLaVA-1.5's original pad mode whatever processor was saved;
        False keeps the saved processor as it is (llava-hf's centre crop). Without a saved processor,
        the LLaVA-1.5 one is built from the config. A LLaVA-NeXT checkpoint takes its saved anyres
        processor as it is (or builds one from the config's pinpoints).
        """
        directory = os.fspath(directory)
        config = config if config is not None else load_hf_config(directory)
        is_anyres = config.model_type == "llava_next"
        tokenizer = AutoTokenizer.from_pretrained(directory)
        if any(os.path.isfile(os.path.join(directory, name)) for name in _PROCESSOR_FILES):
            image_processor = AutoImageProcessor.from_pretrained(directory, backend="pil")
        else:
            image_processor = (anyres_image_processor if is_anyres else llava15_image_processor)(config)
        if pad_to_square and not is_anyres:
            image_processor = llava15_pad_mode(image_processor)
        query_tokenizer = None if text_tower is None else AutoTokenizer.from_pretrained(text_tower)
        return cls(config, tokenizer, image_processor, query_tokenizer)

    @property
    def image_token_index(self) -> int:
        return self.config.image_token_index

    @property
    def num_image_tokens(self) -> int:
        """Image tokens per image (LLaVA-NeXT: the most any image takes; `image_token_count`)."""
        return self.model_config.num_image_tokens

    def image_token_count(self, image_size: Sequence[int] | None = None) -> int:
        """Image tokens an image of ``image_size`` (height, width) puts in the prompt: LLaVA-NeXT's
        count per image, newlines included (as its processor expands `<image>`); LLaVA-1.5's fixed one."""
        if not self.model_config.anyres:
            return self.num_image_tokens
        if image_size is None:
            raise ValueError("a LLaVA-NeXT prompt's image-token count depends on its image: give image_size")
        return anyres.image_token_count(image_size, self.model_config)

    @staticmethod
    def image_sizes(images: Sequence[PIL.Image.Image]) -> list[tuple[int, int]]:
        """Each image's (height, width), as LLaVA-NeXT's processor reports it."""
        return [(image.height, image.width) for image in images]

    @property
    def eos_token_id(self) -> int:
        if self.tokenizer.eos_token_id is not None:
            return self.tokenizer.eos_token_id
        return self.config.text_config.eos_token_id

    @property
    def pad_token_id(self) -> int:
        """The tokenizer's pad id; its EOS id when it has none (padding is masked out anyway)."""
        if self.tokenizer.pad_token_id is not None:
            return self.tokenizer.pad_token_id
        return self.eos_token_id

    def pixel_values(self, images: Sequence[PIL.Image.Image]) -> np.ndarray:
        """float32 (B, 3, H, W) pixels; H = W = the vision tower's image size (checked). LLaVA-NeXT:
        its crops (B, C, 3, H, W), C the most any image takes (`models.anyres.max_crops`), zero-padded.

        A batch is split over threads, one slice each: every image is processed on its own (PIL's
        resize and numpy's normalisation release the GIL), so the pixels equal one call's, and a batch
        of 128 no longer waits on one core while the accelerator is idle."""
        images = list(images)
        if self.model_config.anyres:  # every slice's crops padded to one count before they are joined
            return self._threaded(images, self._process_crops)
        pixels = self._threaded(images, self._process_images)
        size = self.config.vision_config.image_size
        if pixels.shape[1:] != (3, size, size):
            raise ValueError(
                f"image processor produced pixels of shape {pixels.shape[1:]}, but the vision "
                f"tower expects (3, {size}, {size}); the saved processor disagrees with the config"
            )
        return pixels

    def _threaded(self, images: list[PIL.Image.Image], process) -> np.ndarray:
        """``process`` over slices of ``images`` on threads, joined in batch order."""
        slices = [images[i :: self.preprocess_threads] for i in range(self.preprocess_threads)]
        slices = [part for part in slices if part]
        if len(slices) > 1:
            parts = list(self._thread_pool().map(process, slices))
            pixels = np.empty((len(images), *parts[0].shape[1:]), np.float32)
            for index, part in enumerate(parts):
                pixels[index :: len(slices)] = part
            return pixels
        return process(images)

    def _process_crops(self, images: list[PIL.Image.Image]) -> np.ndarray:
        pixels = self._process_images(images)
        crops = anyres.max_crops(self.model_config)
        size = self.config.vision_config.image_size
        if pixels.ndim != 5 or pixels.shape[2:] != (3, size, size) or pixels.shape[1] > crops:
            raise ValueError(
                f"image processor produced crops of shape {pixels.shape[1:]}, but the vision tower "
                f"expects at most {crops} crops of (3, {size}, {size}); the saved processor disagrees "
                "with the config"
            )
        return np.pad(pixels, [(0, 0), (0, crops - pixels.shape[1])] + [(0, 0)] * 3)

    def _process_images(self, images: list[PIL.Image.Image]) -> np.ndarray:
        pixels = self.image_processor(images=images, return_tensors="np")["pixel_values"]
        return np.asarray(pixels, dtype=np.float32)

    def _thread_pool(self) -> concurrent.futures.ThreadPoolExecutor:
        if self._pool is None:
            self._pool = concurrent.futures.ThreadPoolExecutor(self.preprocess_threads, "preprocess")
        return self._pool

    def encode(self, question: str, image_size: Sequence[int] | None = None) -> list[int]:
        """Token ids of the model's prompt for `question`, with the image placeholder expanded (for an
        image of ``image_size`` (height, width) under LLaVA-NeXT)."""
        return self.encode_prompt(build_prompt(question, self.config.text_config.model_type), image_size)

    def encode_prompt(self, prompt: str, image_size: Sequence[int] | None = None) -> list[int]:
        """Token ids of a complete prompt holding exactly one `<image>`, expanded to one id per feature
        (LLaVA-NeXT: per image token of an image of ``image_size``)."""
        ids = self.tokenizer(prompt)["input_ids"]
        image_slots = [index for index, token in enumerate(ids) if token == self.image_token_index]
        if len(image_slots) != 1:
            raise ValueError(
                f"the prompt must hold exactly one image token {IMAGE_TOKEN!r} (id {self.image_token_index}), "
                f"found {len(image_slots)}: {prompt!r}"
            )
        slot = image_slots[0]
        return ids[:slot] + [self.image_token_index] * self.image_token_count(image_size) + ids[slot + 1 :]

    def encode_query(self, question: str) -> list[int]:
        """The question in the CLIP text tower's tokens, untruncated (as the released CDPruner
        tokenizes it; ``models.clip_text.text_segments`` splits it)."""
        if self.query_tokenizer is None:
            raise ValueError("no CLIP text tower tokenizer: load the preprocessor with text_tower=DIR")
        return self.query_tokenizer(question)["input_ids"]

    def decode(self, ids: Sequence[int]) -> str:
        """Text of generated ids, special tokens (EOS, padding, image) dropped."""
        return self.tokenizer.decode(list(ids), skip_special_tokens=True)
