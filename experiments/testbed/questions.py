"""Questions about a scene, with single-word answers computed from its object list.

POPE-style existence, counting, attribute and relative-position questions. Evaluation splits use
POPE's random / popular / adversarial negatives; training uses frequency-matched negatives so that no
question text predicts its answer (see `words.TRAINING_NEGATIVE_TYPES`). Each question records the
objects its answer depends on, so pruning analyses can tell which image regions hold the evidence.
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import numpy as np

from experiments.testbed.layout import SceneParams, num_scenes
from experiments.testbed.scene_config import DEFAULT_CONFIG, TestbedConfig
from experiments.testbed.words import (
    ATTRIBUTE_TEMPLATE,
    COLOUR_NAMES,
    COLOURS,
    COUNT_COLOUR_TEMPLATE,
    COUNT_SHAPE_TEMPLATE,
    EXISTENCE_TEMPLATE,
    KINDS,
    NEGATIVE_TYPES,
    NO,
    NUMBER_WORDS,
    POSITION_TEMPLATES,
    SHAPE_NAMES,
    SHAPE_PLURALS,
    SHAPES,
    YES,
)


@dataclasses.dataclass(frozen=True)
class QuestionItem:
    """One question about one scene. `objects` are the scene's object indices the answer depends on
    (for pruning analyses: which image regions hold the evidence); empty for "no" existence."""

    kind: str
    category: str  # kind, or 'existence/<negative type>'
    text: str
    answer: str
    objects: tuple[int, ...] = ()


class SceneObject(NamedTuple):
    index: int  # slot in SceneParams
    shape: int
    colour: int
    top: int
    left: int
    size: int

    @property
    def centre2(self) -> tuple[int, int]:
        """Doubled (y, x) centre: integers, comparable exactly."""
        return 2 * self.top + self.size, 2 * self.left + self.size

    @property
    def pair(self) -> tuple[int, int]:
        return self.colour, self.shape


def scene_objects(scenes: SceneParams, scene: int) -> list[SceneObject]:
    """The valid objects of one scene of a batch, as plain Python values."""
    valid = np.asarray(scenes.valid[scene])
    columns = [
        np.asarray(a[scene]).tolist()
        for a in (scenes.shape_id, scenes.colour_id, scenes.top, scenes.left, scenes.size)
    ]
    return [SceneObject(i, *(c[i] for c in columns)) for i in range(len(valid)) if valid[i]]


def _all_pairs() -> list[tuple[int, int]]:
    return [(c, s) for c in range(len(COLOURS)) for s in range(len(SHAPES))]


def popular_ranking(config: TestbedConfig = DEFAULT_CONFIG) -> list[tuple[int, int]]:
    """(colour, shape) pairs from most to least frequent under the dataset's priors (ties by index)."""
    return sorted(_all_pairs(), key=lambda p: (-config.colour_prior[p[0]] * config.shape_prior[p[1]], p))


def _pair_words(pair: tuple[int, int]) -> dict[str, str]:
    return {"colour": COLOUR_NAMES[pair[0]], "shape": SHAPE_NAMES[pair[1]]}


def _pick(rng: np.random.Generator, items: list):
    return items[int(rng.integers(len(items)))]


def _existence(rng, objects: list[SceneObject], negative_type: str, config: TestbedConfig):
    category = f"existence/{negative_type}"
    present = {o.pair for o in objects}
    if rng.random() < 0.5:
        target = _pick(rng, objects)
        text = EXISTENCE_TEMPLATE.format(**_pair_words(target.pair))
        return QuestionItem(
            "existence", category, text, YES, tuple(o.index for o in objects if o.pair == target.pair)
        )
    absent = [p for p in _all_pairs() if p not in present]
    if negative_type == "frequency":
        weights = np.array([config.colour_prior[c] * config.shape_prior[s] for c, s in absent])
        text = EXISTENCE_TEMPLATE.format(
            **_pair_words(absent[rng.choice(len(absent), p=weights / weights.sum())])
        )
        return QuestionItem("existence", category, text, NO, ())
    if negative_type == "random":
        candidates = absent
    elif negative_type == "popular":
        candidates = [p for p in popular_ranking(config) if p not in present][: config.popular_top_k]
    elif negative_type == "adversarial":
        colours, shapes = {c for c, _ in present}, {s for _, s in present}
        candidates = [p for p in absent if p[0] in colours or p[1] in shapes]
    else:
        raise ValueError(f"unknown negative type {negative_type!r}")
    if not candidates:
        return None
    text = EXISTENCE_TEMPLATE.format(**_pair_words(_pick(rng, candidates)))
    return QuestionItem("existence", category, text, NO, ())


def _counting(rng, objects: list[SceneObject], config: TestbedConfig):
    by_shape = rng.random() < 0.5
    attribute = (lambda o: o.shape) if by_shape else (lambda o: o.colour)
    values = range(len(SHAPES) if by_shape else len(COLOURS))
    present = sorted({attribute(o) for o in objects})
    absent = [v for v in values if v not in present]
    pool = absent if absent and rng.random() < config.count_absent_probability else present
    target = _pick(rng, pool)
    matching = tuple(o.index for o in objects if attribute(o) == target)
    text = (
        COUNT_SHAPE_TEMPLATE.format(shapes=SHAPE_PLURALS[target])
        if by_shape
        else COUNT_COLOUR_TEMPLATE.format(colour=COLOUR_NAMES[target])
    )
    return QuestionItem("counting", "counting", text, NUMBER_WORDS[len(matching)], matching)


def _attribute(rng, objects: list[SceneObject], config: TestbedConfig):
    shapes = [o.shape for o in objects]
    unique = [o for o in objects if shapes.count(o.shape) == 1]
    if not unique:
        return None
    target = _pick(rng, unique)
    return QuestionItem(
        "attribute",
        "attribute",
        ATTRIBUTE_TEMPLATE.format(shape=SHAPE_NAMES[target.shape]),
        COLOUR_NAMES[target.colour],
        (target.index,),
    )


def relation_holds(relation: str, first: SceneObject, second: SceneObject) -> bool:
    """Whether `first` is `relation` (left / right / above / below) of `second`, by box centres."""
    (y1, x1), (y2, x2) = first.centre2, second.centre2
    return {"left": x1 < x2, "right": x1 > x2, "above": y1 < y2, "below": y1 > y2}[relation]


def relation_pairs(
    objects: list[SceneObject], margin_px: int
) -> list[tuple[SceneObject, SceneObject, tuple[str, str]]]:
    """(first, second, the axis' two relations) for every ordered pair of objects of unique
    (colour, shape) whose centres are `margin_px` apart along that axis: what a position question
    may ask about (horizontal before vertical for each pair)."""
    pairs = [o.pair for o in objects]
    unique = [o for o in objects if pairs.count(o.pair) == 1]
    margin2 = 2 * margin_px  # centres are doubled
    options = []
    for first in unique:
        for second in unique:
            if first is second:
                continue
            (y1, x1), (y2, x2) = first.centre2, second.centre2
            if abs(x1 - x2) >= margin2:
                options.append((first, second, ("left", "right")))
            if abs(y1 - y2) >= margin2:
                options.append((first, second, ("above", "below")))
    return options


def _position(rng, objects: list[SceneObject], config: TestbedConfig):
    options = relation_pairs(objects, config.relation_margin_px)
    if not options:
        return None
    first, second, relations = _pick(rng, options)
    relation = relations[int(rng.integers(2))]
    words = _pair_words(first.pair)
    words.update(colour2=COLOUR_NAMES[second.colour], shape2=SHAPE_NAMES[second.shape])
    answer = YES if relation_holds(relation, first, second) else NO
    return QuestionItem(
        "position",
        "position",
        POSITION_TEMPLATES[relation].format(**words),
        answer,
        (first.index, second.index),
    )


def _category_weights(config: TestbedConfig, negative_types: tuple[str, ...]) -> tuple[list[str], np.ndarray]:
    """Categories (existence split into its negative types) and their sampling probabilities."""
    names, weights = [], []
    for kind, weight in zip(KINDS, config.kind_weights):
        if kind == "existence":
            names += [f"existence/{t}" for t in negative_types]
            weights += [weight / len(negative_types)] * len(negative_types)
        else:
            names.append(kind)
            weights.append(weight)
    weights = np.asarray(weights, np.float64)
    return names, weights / weights.sum()


def ask(
    rng: np.random.Generator,
    objects: list[SceneObject],
    category: str,
    config: TestbedConfig = DEFAULT_CONFIG,
) -> QuestionItem | None:
    """One question of `category` about a scene's objects, or None where the scene cannot support it
    (no uniquely-shaped object, no unambiguous pair, no absent pair of the negative type)."""
    kind, _, negative_type = category.partition("/")
    if kind == "existence":
        return _existence(rng, objects, negative_type, config)
    if kind == "counting":
        return _counting(rng, objects, config)
    if kind == "attribute":
        return _attribute(rng, objects, config)
    if kind == "position":
        return _position(rng, objects, config)
    raise ValueError(f"unknown question category {category!r}")


def sample_questions(
    rng: np.random.Generator,
    scenes: SceneParams,
    config: TestbedConfig = DEFAULT_CONFIG,
    per_scene: int = 1,
    negative_types: tuple[str, ...] = NEGATIVE_TYPES,
) -> list[list[QuestionItem]]:
    """`per_scene` distinct questions for every scene; categories drawn from `config.kind_weights`
    (existence split evenly over `negative_types`), redrawn when a scene cannot support one.
    The default negative types are POPE's (evaluation); training uses TRAINING_NEGATIVE_TYPES."""
    categories, probabilities = _category_weights(config, negative_types)
    result = []
    for scene in range(num_scenes(scenes)):
        objects = scene_objects(scenes, scene)
        items: list[QuestionItem] = []
        seen: set[str] = set()
        for _ in range(100 * per_scene):  # bounded: a scene always supports existence and counting
            if len(items) == per_scene:
                break
            item = ask(rng, objects, categories[rng.choice(len(categories), p=probabilities)], config)
            if item is not None and item.text not in seen:
                seen.add(item.text)
                items.append(item)
        result.append(items)
    return result
