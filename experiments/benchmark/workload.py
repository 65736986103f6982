"""The work --mode=throughput gives both frameworks: POPE-shaped questions, COCO-sized images, a
tokenizer for the preset, and the batches they are cut into.

Everything here is a pure function of its arguments (and the seed), so the JAX and the PyTorch worker,
each in its own process, answer the same questions about the same images in the same batches.

- Questions: POPE's form ("Is there a <object> in the image?" plus LLaVA-1.5's short-answer
  instruction, built as `experiments.benchmarks.pope` builds its prompts) over COCO's 80 object
  names, six per image as POPE asks them. No POPE file travels to the GPU machine, so they are
  generated.
- Images: scikit-image's bundled photographs, each resized to COCO's size (long side 640 px);
  where scikit-image is not installed, procedural photographs of that size (smooth colour fields,
  shapes, noise). Only their size matters to the speed of preprocessing.
- Tokenizer: no LLaMA tokenizer can be fetched, so a word-level one (`models.tokenizer`) whose
  vocabulary holds the prompts' words and fills every id below the image token, as LLaMA's 32000
  do, so any id the model draws decodes to a word.
"""

from __future__ import annotations

import dataclasses
import itertools
import math

import numpy as np
import PIL.Image

from experiments.benchmarks.base import SHORT_ANSWER_INSTRUCTION, Question, with_instruction

# COCO's 80 object categories, the objects POPE asks about.
COCO_OBJECTS = (
    "person", "bicycle", "car", "motorcycle", "airplane", "bus", "train", "truck", "boat",
    "traffic light", "fire hydrant", "stop sign", "parking meter", "bench", "bird", "cat", "dog",
    "horse", "sheep", "cow", "elephant", "bear", "zebra", "giraffe", "backpack", "umbrella",
    "handbag", "tie", "suitcase", "frisbee", "skis", "snowboard", "sports ball", "kite",
    "baseball bat", "baseball glove", "skateboard", "surfboard", "tennis racket", "bottle",
    "wine glass", "cup", "fork", "knife", "spoon", "bowl", "banana", "apple", "sandwich", "orange",
    "broccoli", "carrot", "hot dog", "pizza", "donut", "cake", "chair", "couch", "potted plant",
    "bed", "dining table", "toilet", "tv", "laptop", "mouse", "remote", "keyboard", "cell phone",
    "microwave", "oven", "toaster", "sink", "refrigerator", "book", "clock", "vase", "scissors",
    "teddy bear", "hair drier", "toothbrush",
)  # fmt: skip
# POPE asks six questions per image (three objects it shows, three it does not).
QUESTIONS_PER_IMAGE = 6
# COCO val2014 images are 640 px on their long side.
COCO_LONG_SIDE = 640
# scikit-image's bundled colour photographs (no download).
PHOTOS = ("astronaut", "chelsea", "coffee", "rocket", "hubble_deep_field", "immunohistochemistry", "retina")
PROCEDURAL_IMAGES = 8


@dataclasses.dataclass(frozen=True)
class Workload:
    """The questions, the images they ask about (question i: image ``image_of(i)``), and where the
    images came from."""

    questions: tuple[Question, ...]
    images: tuple[PIL.Image.Image, ...]
    image_source: str

    def image_of(self, question_index: int) -> PIL.Image.Image:
        return self.images[(question_index // QUESTIONS_PER_IMAGE) % len(self.images)]

    def batch(self, indices) -> tuple[list[PIL.Image.Image], list[str]]:
        """(images, prompts) of the questions at ``indices``."""
        return [self.image_of(i) for i in indices], [self.questions[i].prompt for i in indices]


def pope_style_questions(count: int, seed: int) -> list[Question]:
    """``count`` POPE-form questions, six per image, the objects drawn from COCO's names."""
    if count < 1:
        raise ValueError(f"need at least one question, got {count}")
    rng = np.random.default_rng(seed)
    questions = []
    for index in range(count):
        image = index // QUESTIONS_PER_IMAGE
        name = COCO_OBJECTS[int(rng.integers(len(COCO_OBJECTS)))]
        questions.append(
            Question(
                question_id=f"throughput/{index}",
                image=f"image_{image}",
                prompt=with_instruction(f"Is there a {name} in the image?", SHORT_ANSWER_INSTRUCTION),
                answer="yes" if index % QUESTIONS_PER_IMAGE < QUESTIONS_PER_IMAGE // 2 else "no",
                category="throughput",
            )
        )
    return questions


def coco_sized_photos() -> list[PIL.Image.Image] | None:
    """scikit-image's photographs resized to COCO's long side, or None without scikit-image."""
    try:
        import skimage.data
    except ImportError:
        return None
    photos = []
    for name in PHOTOS:
        image = PIL.Image.fromarray(getattr(skimage.data, name)()).convert("RGB")
        scale = COCO_LONG_SIDE / max(image.size)
        size = (round(image.width * scale), round(image.height * scale))
        photos.append(image.resize(size, PIL.Image.Resampling.BICUBIC))
    return photos


def procedural_photo(rng: np.random.Generator, width: int = COCO_LONG_SIDE, height: int = 480):
    """A photograph-like RGB image: a smooth colour field, a few shapes, sensor-like noise."""
    from PIL import ImageDraw

    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    field = np.zeros((height, width, 3), np.float32)
    for channel in range(3):
        fx, fy, phase = rng.uniform(0.5, 3.0), rng.uniform(0.5, 3.0), rng.uniform(0, 2 * np.pi)
        wave = np.sin(2 * np.pi * (fx * x / width + fy * y / height) + phase)
        field[..., channel] = rng.uniform(60, 190) + 50 * wave
    image = PIL.Image.fromarray(np.clip(field, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(image)
    for _ in range(int(rng.integers(4, 10))):
        x0, y0 = int(rng.integers(0, width - 40)), int(rng.integers(0, height - 40))
        box = (x0, y0, x0 + int(rng.integers(30, width // 3)), y0 + int(rng.integers(30, height // 3)))
        colour = tuple(int(c) for c in rng.integers(0, 256, 3))
        (draw.ellipse if rng.random() < 0.5 else draw.rectangle)(box, fill=colour)
    noisy = np.asarray(image, np.float32) + rng.normal(0, 6, (height, width, 3))
    return PIL.Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8))


def build_workload(count: int, seed: int) -> Workload:
    """The questions and images of a throughput run (the same in every worker of the run)."""
    photos = coco_sized_photos()
    source = f"scikit-image photographs ({', '.join(PHOTOS)}), long side {COCO_LONG_SIDE} px"
    if photos is None:
        rng = np.random.default_rng(seed)
        photos = [procedural_photo(rng) for _ in range(PROCEDURAL_IMAGES)]
        source = f"procedural photographs, {COCO_LONG_SIDE} x 480 px (no scikit-image)"
    return Workload(tuple(pope_style_questions(count, seed)), tuple(photos), source)


def word_tokenizer(hf_config, texts):
    """A word-level tokenizer for ``hf_config``: the words of ``texts`` (the prompt template's
    first), then filler words up to the image token's id, ``<image>`` at that id. A preset whose
    image token leaves fewer ids than the texts have words (the tiny ones) keeps the first words;
    the rest encode as ``<unk>``, one token each, as before."""
    from models.tokenizer import SPECIAL_TOKENS, build_word_tokenizer, vocabulary_from_texts

    room = hf_config.image_token_index - len(SPECIAL_TOKENS)
    words = list(dict.fromkeys(word for text in texts for word in vocabulary_from_texts([text])))[:room]
    known = set(words)
    fillers = (word for word in (f"w{index}" for index in itertools.count()) if word not in known)
    words += itertools.islice(fillers, room - len(words))
    return build_word_tokenizer(words, image_token_index=hf_config.image_token_index)


def batch_indices(pool_size: int, batch: int, batch_number: int) -> list[int]:
    """The question indices of batch ``batch_number``: consecutive questions, cycling through the
    pool, so every batch is full and every run's batches are the same."""
    start = batch_number * batch
    return [(start + row) % pool_size for row in range(batch)]


def timed_batch_count(batch: int, timed_batches: int, min_timed_questions: int) -> int:
    """Warm batches to time: ``timed_batches``, more where a small batch would answer fewer than
    ``min_timed_questions`` questions."""
    return max(timed_batches, math.ceil(min_timed_questions / batch))
