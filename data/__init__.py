"""Data sets: the built-in synthetic task and Hugging Face style VQA sets, behind one function."""

import os
import random

from data.hf import VQADataset
from data.synthetic import SyntheticVQA


def has_named_splits(source):
    """False for sources that hold one split only: .jsonl / .parquet files and a folder of a single Dataset."""
    if source.endswith((".jsonl", ".parquet")):
        return False
    if os.path.isdir(source):
        return os.path.isfile(os.path.join(source, "dataset_dict.json"))
    return True  # a hub data set


def load_datasets(dataset, eval_dataset, train_split, eval_split, train_size, eval_size, seed, kinds, image_size,
                  max_objects, shuffle_options, log=print):
    """(training set, held-out set).

    `dataset` = "synthetic" (built in; train_size / eval_size examples, split by seed stream) or a HF source:
    hub name, save_to_disk folder, .parquet, .jsonl. The held-out set is `eval_dataset` when given, else the
    `eval_split` of `dataset` — which must then have named splits, or training rows would be scored as held out.
    """
    if dataset == "synthetic" and not eval_dataset:
        make = lambda split, size: SyntheticVQA(size, seed=seed, split=split, kinds=tuple(kinds),  # noqa: E731
                                                image_size=image_size, max_objects=max_objects,
                                                shuffle_options=shuffle_options)
        return make("train", train_size), make("test", eval_size)
    if dataset == "synthetic" or eval_dataset == "synthetic":
        raise ValueError("the synthetic task brings its own held-out split: with DATASET='synthetic' leave "
                         "EVAL_DATASET empty")
    if not eval_dataset and not has_named_splits(dataset):
        raise ValueError(f"{dataset} holds a single split, so held-out rows would be training rows; name a "
                         f"held-out set with --EVAL_DATASET=PATH")
    return VQADataset(dataset, train_split, log), VQADataset(eval_dataset or dataset, eval_split, log)


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

    def state_dict(self):
        """Where the sampler is: its generator, the current pass's order and the position in it."""
        return {"rng": self.rng.getstate(), "order": list(self.order), "position": self.position}

    def load_state_dict(self, state):
        if state["order"] and (len(state["order"]) != len(self.dataset) or max(state["order"]) >= len(self.dataset)):
            raise ValueError(f"the saved prompt order covers {len(state['order'])} examples but the data set has "
                             f"{len(self.dataset)}: resume with the data set the run was started with")
        self.rng.setstate(state["rng"])
        self.order, self.position = list(state["order"]), state["position"]
