"""Data sets: the built-in synthetic task and Hugging Face style VQA sets, behind one function; prompt sampling
that skips (counts and names) the rows that fail on use."""

import json
import os
import random

from data.hf import VQADataset, source_format
from data.prompts import encode_prompts
from data.synthetic import SyntheticVQA


def has_named_splits(source):
    """False for sources that hold one split only: .jsonl / .parquet files and a folder of a single Dataset."""
    fmt = source_format(source)
    if fmt == "save_to_disk":
        return os.path.isfile(os.path.join(source, "dataset_dict.json"))
    return fmt == "hub"


def check_source(source, constant):
    """ValueError when `source` names a local file or folder that does not exist (a hub name is left to the hub), or
    a .jsonl file that is empty or whose first line is not a JSON object — checked before any model is loaded."""
    local = source.endswith((".jsonl", ".parquet")) or source.startswith((".", "/", "~")) or source.count("/") > 1
    if local and not os.path.exists(source):
        raise ValueError(f"{constant}={source!r}: no such file or folder")
    if source.endswith(".jsonl") and os.path.isfile(source):
        with open(source, encoding="utf-8", errors="replace") as f:
            first = next((line.strip() for line in f if line.strip()), None)
        if first is None:
            raise ValueError(f"{constant}={source!r}: the file is empty")
        try:
            row = json.loads(first)
        except json.JSONDecodeError:
            row = None
        if not isinstance(row, dict):
            raise ValueError(f"{constant}={source!r}: its first line is not a JSON object ({first[:60]!r}); a .jsonl "
                             f"holds one object per line, e.g. {{\"image\": \"a.png\", \"problem\": \"...\", "
                             f"\"solution\": \"...\"}}")


class WithSystemPrompt:
    """A data set whose examples all carry one fixed system prompt."""

    def __init__(self, dataset, system_prompt):
        self.dataset, self.system_prompt = dataset, system_prompt

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, index):
        return {**self.dataset[index], "system_prompt": self.system_prompt}


def load_datasets(spec, seed, processor=None, log=print, warn=None):
    """(training set, held-out set) as `spec` describes them: an object with the attributes of utils.specs.DataSpec
    (dataset, eval_dataset, train_split, eval_split, train_size, eval_samples, question_kinds, image_size,
    max_objects, shuffle_options, image_key, problem_key, answer_key, system_prompt, max_prompt_tokens).

    `spec.dataset` = "synthetic" (built in; train_size / eval_samples examples, split by the `seed` stream) or a HF
    source: hub name, save_to_disk folder, .parquet, .jsonl. The held-out set is `spec.eval_dataset` when given,
    else the eval_split of the data set — which must then have named splits, or training rows would be scored as
    held out. processor, log, warn: see VQADataset (the synthetic task needs none of them).
    """
    dataset, eval_dataset, system_prompt = spec.dataset, spec.eval_dataset, spec.system_prompt
    if dataset == "synthetic" and not eval_dataset:
        make = lambda split, size: SyntheticVQA(size, seed=seed, split=split, kinds=tuple(spec.question_kinds),  # noqa: E731
                                                image_size=spec.image_size, max_objects=spec.max_objects,
                                                shuffle_options=spec.shuffle_options)
        train, held_out = make("train", spec.train_size), make("test", spec.eval_samples)
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
    keys = {"image": spec.image_key, "problem": spec.problem_key, "solution": spec.answer_key}
    options = dict(log=log, keys=keys, processor=processor, max_prompt_tokens=spec.max_prompt_tokens,
                   system_prompt=system_prompt, warn=warn)
    return (VQADataset(dataset, spec.train_split, **options),
            VQADataset(eval_dataset or dataset, spec.eval_split, **options))


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

    def state_dict(self):
        """Where the sampler is: its generator, the current pass's order and the position in it."""
        return {"rng": self.rng.getstate(), "order": list(self.order), "position": self.position}

    def load_state_dict(self, state):
        if state["order"] and (len(state["order"]) != len(self.dataset) or max(state["order"]) >= len(self.dataset)):
            raise ValueError(f"the saved prompt order covers {len(state['order'])} examples but the data set has "
                             f"{len(self.dataset)}: resume with the data set the run was started with")
        self.rng.setstate(state["rng"])
        self.order, self.position = list(state["order"]), state["position"]
