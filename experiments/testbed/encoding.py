"""Prompts and token ids: the vicuna_v1 prompt, the testbed's vocabulary and word-level tokenizer.

The vocabulary is every word a prompt, question or answer can contain (each template filled every
way), so nothing the testbed asks tokenizes to `<unk>`, and `<image>` sits right after the words.
The trainer builds its token sequences from `encode_prompt` / `encode_followup` / `answer_token_ids`,
which encode exactly as the tokenizer the checkpoint ships with.
"""

from __future__ import annotations

import functools

from experiments.testbed.words import (
    ATTRIBUTE_TEMPLATE,
    COLOUR_NAMES,
    COUNT_COLOUR_TEMPLATE,
    COUNT_SHAPE_TEMPLATE,
    EXISTENCE_TEMPLATE,
    NO,
    NUMBER_WORDS,
    POSITION_TEMPLATES,
    SHAPE_NAMES,
    SHAPES,
    SHORT_ANSWER_INSTRUCTIONS,
    YES,
)
from models.preprocess import build_followup, build_prompt
from models.tokenizer import EOS_TOKEN, build_word_tokenizer, vocabulary_from_texts


def format_prompt(question: str) -> str:
    """The full LLaVA-1.5 (vicuna_v1) prompt for one question (the harness's template, one source)."""
    return build_prompt(question)


def all_texts() -> list[str]:
    """Every text the testbed can produce: prompt, instructions, each template filled in every way."""
    texts = [format_prompt(""), *SHORT_ANSWER_INSTRUCTIONS, YES, NO, *NUMBER_WORDS, *COLOUR_NAMES]
    for colour in COLOUR_NAMES:
        texts.append(COUNT_COLOUR_TEMPLATE.format(colour=colour))
        for shape in SHAPE_NAMES:
            texts.append(EXISTENCE_TEMPLATE.format(colour=colour, shape=shape))
            texts.extend(
                template.format(colour=colour, shape=shape, colour2=colour, shape2=shape)
                for template in POSITION_TEMPLATES.values()
            )
    for shape, shapes in SHAPES:
        texts.append(COUNT_SHAPE_TEMPLATE.format(shapes=shapes))
        texts.append(ATTRIBUTE_TEMPLATE.format(shape=shape))
    return texts


VOCABULARY: tuple[str, ...] = tuple(vocabulary_from_texts(all_texts()))
NUM_SPECIAL_TOKENS = 4  # <unk>, <s>, </s>, <pad> (models.tokenizer.SPECIAL_TOKENS)
IMAGE_TOKEN_INDEX = NUM_SPECIAL_TOKENS + len(VOCABULARY)  # `<image>` right after the words
TOKENIZER_SIZE = IMAGE_TOKEN_INDEX + 1  # smallest text vocab_size that holds every id


@functools.cache
def make_tokenizer():
    """The testbed's word-level `PreTrainedTokenizerFast` (`<image>` at IMAGE_TOKEN_INDEX).

    Cached: treat the returned object as read-only (call `save_pretrained` on it, don't mutate it).
    """
    return build_word_tokenizer(VOCABULARY)


@functools.cache
def _token_ids() -> dict[str, int]:
    return make_tokenizer().get_vocab()


@functools.cache
def encode_prompt(question: str) -> tuple[int, ...]:
    """Token ids of `format_prompt(question)` with BOS, exactly as `make_tokenizer()` encodes it."""
    return tuple(make_tokenizer()(format_prompt(question))["input_ids"])


@functools.cache
def encode_followup(question: str) -> tuple[int, ...]:
    """Token ids of a later conversation turn asking `question` (`build_followup`; no BOS)."""
    return tuple(make_tokenizer()(build_followup(question), add_special_tokens=False)["input_ids"])


def answer_token_ids(answer: str) -> tuple[int, int]:
    """The training target of an answer: its word id, then </s>."""
    ids = _token_ids()
    return ids[answer], ids[EOS_TOKEN]


def _longest_questions() -> list[str]:
    """Each template filled with one-token words (every colour and shape name is one token)."""
    templates = [
        EXISTENCE_TEMPLATE,
        COUNT_SHAPE_TEMPLATE,
        COUNT_COLOUR_TEMPLATE,
        ATTRIBUTE_TEMPLATE,
        *POSITION_TEMPLATES.values(),
    ]
    fill = dict(colour="red", shape="circle", colour2="red", shape2="circle", shapes="circles")
    return [t.format(**fill) for t in templates]


def max_prompt_length() -> int:
    """Longest `encode_prompt` of any question."""
    return max(len(encode_prompt(q)) for q in _longest_questions())


def max_followup_length() -> int:
    """Longest `encode_followup` of any question."""
    return max(len(encode_followup(q)) for q in _longest_questions())
