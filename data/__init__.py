"""Data sets: the built-in synthetic task and Hugging Face style VQA sets, behind one function."""

import random

from data.hf import VQADataset
from data.synthetic import SyntheticVQA


def load_split(dataset, split, size, seed, kinds, image_size, max_objects, shuffle_options, log=print):
    """`dataset` = "synthetic" (built in; `size` examples) or a HF source (hub name, folder, .parquet, .jsonl)."""
    if dataset == "synthetic":
        return SyntheticVQA(size, seed=seed, split=split, kinds=tuple(kinds), image_size=image_size,
                            max_objects=max_objects, shuffle_options=shuffle_options)
    return VQADataset(dataset, split=split, log=log)


class PromptSampler:
    """Draws prompts without replacement, reshuffling at each pass over the data (deterministic from seed)."""

    def __init__(self, dataset, seed):
        self.dataset, self.rng, self.order, self.position = dataset, random.Random(seed), [], 0

    def next(self, n):
        out = []
        while len(out) < n:
            if self.position == len(self.order):
                self.order = list(range(len(self.dataset)))
                self.rng.shuffle(self.order)
                self.position = 0
            out.append(self.dataset[self.order[self.position]])
            self.position += 1
        return out
