"""The testbed world's word lists and question templates: every other table derives from these.

Shapes, colours and numbers are the only nouns; the renderer's shape and colour codes are indices into
`SHAPES` / `COLOURS`, and the vocabulary (`encoding.VOCABULARY`) is every template filled every way.
"""

from __future__ import annotations

import numpy as np

# (singular, plural). The renderer's shape codes are the indices into this tuple.
SHAPES: tuple[tuple[str, str], ...] = (
    ("circle", "circles"),
    ("square", "squares"),
    ("triangle", "triangles"),
    ("diamond", "diamonds"),
    ("cross", "crosses"),
)
SHAPE_NAMES: tuple[str, ...] = tuple(singular for singular, _ in SHAPES)
SHAPE_PLURALS: tuple[str, ...] = tuple(plural for _, plural in SHAPES)
CIRCLE, SQUARE, TRIANGLE, DIAMOND, CROSS = range(len(SHAPES))

# Saturated colours, pairwise far apart in RGB (closest pair >= ~110 apart) and far from the dull
# background range, so a colour word is never ambiguous.
COLOURS: tuple[tuple[str, tuple[int, int, int]], ...] = (
    ("red", (215, 35, 35)),
    ("green", (40, 170, 60)),
    ("blue", (40, 80, 225)),
    ("yellow", (235, 215, 40)),
    ("purple", (150, 50, 205)),
    ("cyan", (40, 205, 215)),
    ("white", (240, 240, 240)),
)
COLOUR_NAMES: tuple[str, ...] = tuple(name for name, _ in COLOURS)
PALETTE = np.array([rgb for _, rgb in COLOURS], dtype=np.int32)  # (num_colours, 3)

NUMBER_WORDS: tuple[str, ...] = (
    "zero",
    "one",
    "two",
    "three",
    "four",
    "five",
    "six",
    "seven",
    "eight",
    "nine",
    "ten",
)
YES, NO = "yes", "no"

KINDS: tuple[str, ...] = ("existence", "counting", "attribute", "position")
# POPE's three ways of picking the absent object of a "no" existence question (evaluation splits).
NEGATIVE_TYPES: tuple[str, ...] = ("random", "popular", "adversarial")
# Training draws the absent pair with probability proportional to its dataset frequency, the same
# distribution the "yes" questions' pairs follow, so the question text alone does not predict the
# answer. Training on POPE's own types would leak: popular negatives always name the few most
# frequent pairs, so "Is there a <frequent pair>?" would mostly mean "no" and a blind model would
# score ~80% on existence/popular. With frequency-matched training a blind model scores ~50% on every
# evaluation subset, and popular / adversarial probe looking and binding, not question priors.
TRAINING_NEGATIVE_TYPES: tuple[str, ...] = ("frequency",)
SPLITS: tuple[str, ...] = ("train", "validation", "test")

# LLaVA-1.5's short-answer instructions (POPE / MME style); not used by this task's questions, but in
# the vocabulary so a harness that appends one still tokenizes without <unk>.
SHORT_ANSWER_INSTRUCTIONS: tuple[str, ...] = (
    "Answer the question using a single word or phrase.",
    "Answer the question using a single word.",
)

EXISTENCE_TEMPLATE = "Is there a {colour} {shape} in the image?"
COUNT_SHAPE_TEMPLATE = "How many {shapes} are there?"
COUNT_COLOUR_TEMPLATE = "How many {colour} objects are there?"
ATTRIBUTE_TEMPLATE = "What color is the {shape}?"
POSITION_TEMPLATES = {
    "left": "Is the {colour} {shape} to the left of the {colour2} {shape2}?",
    "right": "Is the {colour} {shape} to the right of the {colour2} {shape2}?",
    "above": "Is the {colour} {shape} above the {colour2} {shape2}?",
    "below": "Is the {colour} {shape} below the {colour2} {shape2}?",
}
