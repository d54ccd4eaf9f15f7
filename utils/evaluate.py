"""Held-out evaluation: greedy accuracy and format rate."""

import warnings
from collections import defaultdict

import torch

from data import example_name, usable_example
from data.prompts import encode_prompts
from utils.rewards import accuracy_reward, format_reward
from utils.rollout import generate


@torch.no_grad()
def evaluate(model, processor, dataset, n_samples, max_new_tokens, batch_size, suppress_ids=()):
    """Greedy decoding on the first `n_samples` examples of `dataset`.

    Examples that cannot be used (undecodable, rejected by the processor) are skipped with a warning.
    Returns {"eval/accuracy", "eval/format"} and, when examples carry a "kind", "eval/accuracy/<kind>".
    """
    examples = []
    for i in range(min(n_samples, len(dataset))):
        example, error = usable_example(dataset, i, check=lambda ex: encode_prompts(processor, [ex]))
        if error is None:
            examples.append(example)
        else:
            warnings.warn(f"held-out {example_name(dataset, i)}: {error}; skipped", stacklevel=2)
    if not examples:
        raise ValueError(f"none of the first {n_samples} held-out examples can be used (see the warnings)")
    was_training = model.training
    model.eval()
    correct, formatted, by_kind = [], [], defaultdict(list)
    rollout = generate(model, processor, examples, 1, max_new_tokens, greedy=True, suppress_ids=suppress_ids,
                       batch_size=batch_size, desc="eval (greedy)")
    for ex, text in zip(examples, rollout.texts):
        correct.append(accuracy_reward(text, ex["solution"]))
        formatted.append(format_reward(text))
        if "kind" in ex:
            by_kind[ex["kind"]].append(correct[-1])
    model.train(was_training)
    metrics = {"eval/accuracy": sum(correct) / len(correct), "eval/format": sum(formatted) / len(formatted)}
    metrics.update({f"eval/accuracy/{k}": sum(v) / len(v) for k, v in sorted(by_kind.items())})
    return metrics
