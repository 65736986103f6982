"""Procedural scenes and questions for the token-pruning testbed: the public names in one import.

No pretrained LVLM can be downloaded here, so the project trains its own small LLaVA. To compare
visual-token pruning methods honestly the task must make the answer depend on SMALL image regions:
a scene is a 336 x 336 textured background (LLaVA-1.5's input size, a 24 x 24 grid of 14 px patches)
with a few objects only 1 to 3 patches wide. Dropping the wrong tokens then loses the answer, while
the background tokens carry nothing.

Where each part lives (this module re-exports their public names, e.g. for the Makefile's
`write_split`):

* `words`: shapes, colours, numbers, question kinds, splits and templates (the only word lists).
* `scene_config`: `TestbedConfig`, every size and distribution.
* `layout`: `SceneParams` and `sample_scenes` (vectorised NumPy layouts), `split_rng`.
* `render`: `render_scenes` (jitted JAX) and `render_scenes_numpy`, bit-identical.
* `questions`: `sample_questions` and the answer logic.
* `encoding`: the vicuna_v1 prompt, `VOCABULARY`, `make_tokenizer` and the token ids the trainer uses.
* `splits`: `write_split`, a fixed validation/test split in the eval harness's layout.
"""

from experiments.testbed.encoding import (
    IMAGE_TOKEN_INDEX,
    NUM_SPECIAL_TOKENS,
    TOKENIZER_SIZE,
    VOCABULARY,
    all_texts,
    answer_token_ids,
    encode_followup,
    encode_prompt,
    format_prompt,
    make_tokenizer,
    max_followup_length,
    max_prompt_length,
)
from experiments.testbed.layout import (
    SceneParams,
    concatenate_scenes,
    num_scenes,
    sample_scenes,
    split_rng,
    take_scenes,
)
from experiments.testbed.questions import (
    QuestionItem,
    SceneObject,
    ask,
    popular_ranking,
    relation_holds,
    sample_questions,
    scene_objects,
)
from experiments.testbed.render import render_scenes, render_scenes_numpy
from experiments.testbed.scene_config import DEFAULT_CONFIG, TestbedConfig
from experiments.testbed.splits import (
    IMAGES_DIR,
    QUESTIONS_FILE,
    SCENES_FILE,
    image_file_name,
    save_png,
    write_split,
)
from experiments.testbed.words import (
    CIRCLE,
    COLOUR_NAMES,
    COLOURS,
    CROSS,
    DIAMOND,
    KINDS,
    NEGATIVE_TYPES,
    NO,
    NUMBER_WORDS,
    PALETTE,
    SHAPE_NAMES,
    SHAPE_PLURALS,
    SHAPES,
    SHORT_ANSWER_INSTRUCTIONS,
    SPLITS,
    SQUARE,
    TRAINING_NEGATIVE_TYPES,
    TRIANGLE,
    YES,
)

__all__ = [
    "CIRCLE",
    "COLOURS",
    "COLOUR_NAMES",
    "CROSS",
    "DEFAULT_CONFIG",
    "DIAMOND",
    "IMAGES_DIR",
    "IMAGE_TOKEN_INDEX",
    "KINDS",
    "NEGATIVE_TYPES",
    "NO",
    "NUMBER_WORDS",
    "NUM_SPECIAL_TOKENS",
    "PALETTE",
    "QUESTIONS_FILE",
    "SCENES_FILE",
    "SHAPES",
    "SHAPE_NAMES",
    "SHAPE_PLURALS",
    "SHORT_ANSWER_INSTRUCTIONS",
    "SPLITS",
    "SQUARE",
    "TOKENIZER_SIZE",
    "TRAINING_NEGATIVE_TYPES",
    "TRIANGLE",
    "VOCABULARY",
    "YES",
    "QuestionItem",
    "SceneObject",
    "SceneParams",
    "TestbedConfig",
    "all_texts",
    "answer_token_ids",
    "ask",
    "concatenate_scenes",
    "encode_followup",
    "encode_prompt",
    "format_prompt",
    "image_file_name",
    "make_tokenizer",
    "max_followup_length",
    "max_prompt_length",
    "num_scenes",
    "popular_ranking",
    "relation_holds",
    "render_scenes",
    "render_scenes_numpy",
    "sample_questions",
    "sample_scenes",
    "save_png",
    "scene_objects",
    "split_rng",
    "take_scenes",
    "write_split",
]
