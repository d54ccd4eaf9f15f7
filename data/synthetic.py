"""The built-in synthetic visual multiple-choice task (SPEC §3).

Each image shows 1..`max_objects` copies of one coloured shape on a white canvas. A question asks for
the colour, the shape or the number of objects, with four options A-D; the solution is a letter.
Everything is a pure function of (seed, split, index), so the train and held-out splits never share an
example and every run sees the same data.
"""

import random

from PIL import Image, ImageDraw

COLOURS = {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 220), "yellow": (230, 200, 30)}
SHAPES = ("circle", "square", "triangle", "cross")
QUESTION_KINDS = ("colour", "shape", "count")
LETTERS = "ABCD"
QUESTIONS = {
    "colour": "What colour are the shapes?",
    "shape": "What shape are the objects?",
    "count": "How many shapes are there?",
}
# Different splits draw from disjoint seed streams.
SPLIT_OFFSETS = {"train": 0, "test": 1_000_003}


def draw_shape(draw, shape, box, fill):
    """Draw one `shape` filling `box` = (x0, y0, x1, y1)."""
    x0, y0, x1, y1 = box
    if shape == "circle":
        draw.ellipse(box, fill=fill)
    elif shape == "square":
        draw.rectangle(box, fill=fill)
    elif shape == "triangle":
        draw.polygon([((x0 + x1) / 2, y0), (x1, y1), (x0, y1)], fill=fill)
    elif shape == "cross":
        w, h = (x1 - x0) / 3, (y1 - y0) / 3
        draw.rectangle((x0 + w, y0, x1 - w, y1), fill=fill)
        draw.rectangle((x0, y0 + h, x1, y1 - h), fill=fill)
    else:
        raise ValueError(f"unknown shape {shape!r}; expected one of {SHAPES}")


def render(colour, shape, count, image_size, rng):
    """A white `image_size`² canvas with `count` non-overlapping copies of the shape, one per grid cell."""
    cells_per_side = 2
    cell = image_size // cells_per_side
    image = Image.new("RGB", (image_size, image_size), (255, 255, 255))
    draw = ImageDraw.Draw(image)
    cells = rng.sample(range(cells_per_side**2), count)
    for c in cells:
        cx, cy = (c % cells_per_side) * cell, (c // cells_per_side) * cell
        size = rng.randint(int(cell * 0.6), int(cell * 0.75))
        x0 = cx + rng.randint(0, cell - size)
        y0 = cy + rng.randint(0, cell - size)
        draw_shape(draw, shape, (x0, y0, x0 + size, y0 + size), COLOURS[colour])
    return image


def make_example(seed, split, index, kinds=QUESTION_KINDS, image_size=56, max_objects=4, shuffle_options=False):
    """Example `index` of `split`: dict with image (PIL), problem, solution (a letter), answer, kind.

    With `shuffle_options` the options are listed in a random order, so the model must find its answer among
    them (an induction skill a tiny model needs thousands of steps for); otherwise in a fixed order per kind.
    """
    if split not in SPLIT_OFFSETS:
        raise ValueError(f"unknown split {split!r}; expected one of {sorted(SPLIT_OFFSETS)}")
    if not 1 <= max_objects <= 4:
        raise ValueError(f"max_objects must be in 1..4 (one object per cell of a 2x2 grid), got {max_objects}")
    rng = random.Random(seed * 7_919 + SPLIT_OFFSETS[split] + index)
    kind = kinds[index % len(kinds)]
    colour, shape = rng.choice(list(COLOURS)), rng.choice(SHAPES)
    count = rng.randint(1, max_objects)
    if kind == "colour":
        answer, pool = colour, list(COLOURS)
    elif kind == "shape":
        answer, pool = shape, list(SHAPES)
    elif kind == "count":
        answer, pool = str(count), [str(n) for n in range(1, 5)]
    else:
        raise ValueError(f"unknown question kind {kind!r}; expected some of {QUESTION_KINDS}")
    options = rng.sample(pool, len(pool)) if shuffle_options else pool
    letter = LETTERS[options.index(answer)]
    problem = QUESTIONS[kind] + "\n" + "\n".join(f"{LETTERS[i]}. {o}" for i, o in enumerate(options))
    return {
        "image": render(colour, shape, count, image_size, rng),
        "problem": problem,
        "solution": letter,
        "answer": answer,
        "kind": kind,
    }


def reasoning_for(example):
    """The chain of thought a correct answer would give; used by the supervised warm start."""
    kind, answer = example["kind"], example["answer"]
    if kind == "count":
        return f"there are {answer} shapes"
    if kind == "colour":
        return f"the shapes are {answer}"
    return f"the shapes are {answer}s" if answer != "cross" else "the shapes are crosses"


class SyntheticVQA:
    """A deterministic, indexable split of the synthetic task (examples are rendered on access)."""

    def __init__(self, size, seed=0, split="train", kinds=QUESTION_KINDS, image_size=56, max_objects=4,
                 shuffle_options=False):
        unknown = [k for k in kinds if k not in QUESTION_KINDS]
        if unknown or not kinds:
            raise ValueError(f"question kinds {list(kinds)} invalid; choose from {QUESTION_KINDS}")
        self.size, self.seed, self.split = size, seed, split
        self.kinds, self.image_size, self.max_objects = tuple(kinds), image_size, max_objects
        self.shuffle_options = shuffle_options

    def __len__(self):
        return self.size

    def __getitem__(self, index):
        if not 0 <= index < self.size:
            raise IndexError(index)
        return make_example(
            self.seed, self.split, index, self.kinds, self.image_size, self.max_objects, self.shuffle_options
        )
