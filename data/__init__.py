"""Data sets: the built-in synthetic task and Hugging Face style VQA sets, behind one function; prompt sampling
that skips (counts and names) the rows that fail on use."""

import os
import random

from data.hf import VQADataset
from data.prompts import encode_prompts
from data.synthetic import SyntheticVQA


def has_named_splits(source):
    """False for sources that hold one split only: .jsonl / .parquet files and a folder of a single Dataset."""
    if source.endswith((".jsonl", ".parquet")):
        return False
    if os.path.isdir(source):
        return os.path.isfile(os.path.join(source, "dataset_dict.json"))
    return True  # a hub data set


def check_source(source, constant):
    """ValueError when `source` names a local file or folder that does not exist (a hub name is left to the hub)."""
    local = source.endswith((".jsonl", ".parquet")) or source.startswith((".", "/", "~")) or source.count("/") > 1
    if local and not os.path.exists(source):
        raise ValueError(f"{constant}={source!r}: no such file or folder")


class WithSystemPrompt:
    """A data set whose examples all carry one fixed system prompt."""

    def __init__(self, dataset, system_prompt):
        self.dataset, self.system_prompt = dataset, system_prompt

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, index):
        return {**self.dataset[index], "system_prompt": self.system_prompt}


def load_datasets(dataset, eval_dataset, train_split, eval_split, train_size, eval_size, seed, kinds, image_size,
                  max_objects, shuffle_options, log=print, keys=None, system_prompt="auto", processor=None,
                  max_prompt_tokens=0, warn=None):
    """(training set, held-out set).

    `dataset` = "synthetic" (built in; train_size / eval_size examples, split by seed stream) or a HF source:
    hub name, save_to_disk folder, .parquet, .jsonl. The held-out set is `eval_dataset` when given, else the
    `eval_split` of `dataset` — which must then have named splits, or training rows would be scored as held out.
    keys, system_prompt, processor, max_prompt_tokens, warn: see VQADataset (the synthetic task needs none of them).
    """
    if dataset == "synthetic" and not eval_dataset:
        make = lambda split, size: SyntheticVQA(size, seed=seed, split=split, kinds=tuple(kinds),  # noqa: E731
                                                image_size=image_size, max_objects=max_objects,
                                                shuffle_options=shuffle_options)
        train, held_out = make("train", train_size), make("test", eval_size)
        if system_prompt != "auto":
            train, held_out = WithSystemPrompt(train, system_prompt), WithSystemPrompt(held_out, system_prompt)
        return train, held_out
    if dataset == "synthetic" or eval_dataset == "synthetic":
        raise ValueError("the synthetic task brings its own held-out split: with DATASET='synthetic' leave "
                         "EVAL_DATASET empty")
    check_source(dataset, "DATASET")
    if eval_dataset:
        check_source(eval_dataset, "EVAL_DATASET")
    if not eval_dataset and not has_named_splits(dataset):
        raise ValueError(f"{dataset} holds a single split, so held-out rows would be training rows; name a "
                         f"held-out set with --EVAL_DATASET=PATH")
    options = dict(log=log, keys=keys, processor=processor, max_prompt_tokens=max_prompt_tokens,
                   system_prompt=system_prompt, warn=warn)
    return VQADataset(dataset, train_split, **options), VQADataset(eval_dataset or dataset, eval_split, **options)


def example_name(dataset, index):
    name = getattr(dataset, "name", None)
    return name(index) if name else f"example {index}"


def usable_example(dataset, index, check=None):
    """(example, None), or (None, reason) when it cannot be used: decoding it, or `check(example)` (e.g. the
    processor encoding it), raised."""
    try:
        example = dataset[index]
        if check is not None:
            check(example)
        return example, None
    except Exception as e:  # a bad row must not end the run, whatever the decoder or the processor raises
        return None, f"{type(e).__name__}: {e}"


class PromptSampler:
    """Draws prompts without replacement, reshuffling at each pass over the data (deterministic from seed).

    Each drawn example is decoded and, given a `processor`, encoded alone: one that fails (an image that does not
    decode, one the processor rejects) is skipped for the rest of the run, counted (`skipped`) and named by `warn`.
    """

    def __init__(self, dataset, seed, processor=None, warn=print):
        self.dataset, self.rng, self.order, self.position = dataset, random.Random(seed), [], 0
        self.check = (lambda example: encode_prompts(processor, [example])) if processor is not None else None
        self.warn, self.bad = warn, set()

    @property
    def skipped(self):
        return len(self.bad)

    def next(self, n):
        out = []
        while len(out) < n:
            if self.position == len(self.order):
                self.order = [i for i in range(len(self.dataset)) if i not in self.bad]
                if not self.order:
                    raise ValueError(f"no usable example left: all {len(self.bad)} failed on use (see warnings)")
                self.rng.shuffle(self.order)
                self.position = 0
            index = self.order[self.position]
            self.position += 1
            if index in self.bad:
                continue
            example, error = usable_example(self.dataset, index, self.check)
            if error is None:
                out.append(example)
                continue
            self.bad.add(index)
            self.warn(f"{example_name(self.dataset, index)}: {error}; skipped ({len(self.bad)} skipped so far)")
        return out
