"""Word-level tokenizers saved as real transformers tokenizers.

No LLaMA tokenizer can be downloaded here, yet every checkpoint the project writes (test fixtures, the
trained testbed) must load through `AutoTokenizer.from_pretrained` exactly like a llava-hf one. A
word-level vocabulary built with `tokenizers` and wrapped in `PreTrainedTokenizerFast` does that, with
`<image>` as a special token placed at the config's `image_token_index`.
"""

from __future__ import annotations

from collections.abc import Iterable

from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast

UNK_TOKEN = "<unk>"
BOS_TOKEN = "<s>"
EOS_TOKEN = "</s>"
PAD_TOKEN = "<pad>"
IMAGE_TOKEN = "<image>"
SPECIAL_TOKENS = (UNK_TOKEN, BOS_TOKEN, EOS_TOKEN, PAD_TOKEN)


def _split_words(text: str) -> list[str]:
    """Words the way the tokenizer's pre-tokenizer will see them (lowercased, punctuation split)."""
    pieces = pre_tokenizers.Whitespace().pre_tokenize_str(text.lower())
    return [piece for piece, _ in pieces]


def vocabulary_from_texts(texts: Iterable[str]) -> list[str]:
    """Sorted distinct words of `texts` (the image placeholder excluded), for `build_word_tokenizer`."""
    words: set[str] = set()
    for text in texts:
        words.update(_split_words(text.replace(IMAGE_TOKEN, " ")))
    return sorted(words)


def build_word_tokenizer(
    words: Iterable[str], image_token_index: int | None = None
) -> PreTrainedTokenizerFast:
    """A lowercasing word-level tokenizer: ids 0..3 are <unk>, <s>, </s>, <pad>, then `words` in order.

    `<image>` gets `image_token_index` (default: right after the words), which must not collide with a
    word id. A BOS token is prepended to every encoded text, as LLaMA's tokenizer does.
    """
    vocab: dict[str, int] = {token: index for index, token in enumerate(SPECIAL_TOKENS)}
    for word in words:
        word = word.lower()
        if word in vocab or word == IMAGE_TOKEN:
            raise ValueError(f"duplicate or reserved word in tokenizer vocabulary: {word!r}")
        vocab[word] = len(vocab)
    if image_token_index is None:
        image_token_index = len(vocab)
    if image_token_index < len(vocab):
        raise ValueError(
            f"image_token_index {image_token_index} collides with the {len(vocab)} word ids; "
            f"use an index >= {len(vocab)}"
        )
    vocab[IMAGE_TOKEN] = image_token_index

    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK_TOKEN))
    backend.normalizer = normalizers.Lowercase()
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.decoder = decoders.WordPiece(prefix="##")  # joins words with single spaces
    backend.post_processor = processors.TemplateProcessing(
        single=f"{BOS_TOKEN} $A", pair=f"{BOS_TOKEN} $A $B", special_tokens=[(BOS_TOKEN, vocab[BOS_TOKEN])]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        unk_token=UNK_TOKEN,
        bos_token=BOS_TOKEN,
        eos_token=EOS_TOKEN,
        pad_token=PAD_TOKEN,
        extra_special_tokens={"image_token": IMAGE_TOKEN},
        padding_side="right",
        model_max_length=1 << 20,
    )


CLIP_START_TOKEN = "<|startoftext|>"
CLIP_END_TOKEN = "<|endoftext|>"


def build_clip_word_tokenizer(words: Iterable[str]) -> PreTrainedTokenizerFast:
    """A lowercasing word-level tokenizer with CLIP's conventions, for CLIP text towers the project
    writes itself: id 0 is <unk>, then `words`, then <|startoftext|> and <|endoftext|> as the two
    highest ids; every text is wrapped in them. (CLIP's text tower pools at the end-of-text token, and
    a legacy config at the highest id: here both are the same slot.)"""
    vocab: dict[str, int] = {UNK_TOKEN: 0}
    for word in words:
        word = word.lower()
        if word in vocab:
            raise ValueError(f"duplicate or reserved word in tokenizer vocabulary: {word!r}")
        vocab[word] = len(vocab)
    vocab[CLIP_START_TOKEN] = len(vocab)
    vocab[CLIP_END_TOKEN] = len(vocab)
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK_TOKEN))
    backend.normalizer = normalizers.Lowercase()
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.decoder = decoders.WordPiece(prefix="##")
    backend.post_processor = processors.TemplateProcessing(
        single=f"{CLIP_START_TOKEN} $A {CLIP_END_TOKEN}",
        special_tokens=[(token, vocab[token]) for token in (CLIP_START_TOKEN, CLIP_END_TOKEN)],
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        unk_token=UNK_TOKEN,
        bos_token=CLIP_START_TOKEN,
        eos_token=CLIP_END_TOKEN,
        pad_token=CLIP_END_TOKEN,  # as openai's CLIP tokenizers; the released segments pad with id 0
        model_max_length=1 << 20,
    )
