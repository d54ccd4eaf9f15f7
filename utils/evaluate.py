"""Held-out evaluation: greedy accuracy and format rate."""

import warnings
from collections import defaultdict

import torch

from data import example_name, usable_example
from data.prompts import encode_prompts
from utils.distributed import all_reduce_sum, gather_objects, rank_share
from utils.rewards import accuracy_reward, format_reward
from utils.rollout import generate


@torch.no_grad()
def evaluate(model, processor, dataset, n_samples, max_new_tokens, batch_size, suppress_ids=()):
    """Greedy decoding on the first `n_samples` examples of `dataset`.

    Examples that cannot be used (undecodable, rejected by the processor) are skipped with a warning.
    Returns {"eval/accuracy", "eval/format"} and, when examples carry a "kind", "eval/accuracy/<kind>".
    Under torchrun each rank scores its share of the examples and the counts are summed.
    """
    examples = []
    for i in rank_share(range(min(n_samples, len(dataset)))):
        example, error = usable_example(dataset, i, check=lambda ex: encode_prompts(processor, [ex]))
        if error is None:
            examples.append(example)
        else:
            warnings.warn(f"held-out {example_name(dataset, i)}: {error}; skipped", stacklevel=2)
    if not all_reduce_sum(len(examples)):
        raise ValueError(f"none of the first {n_samples} held-out examples can be used (see the warnings)")
    was_training = model.training
    model.eval()
    correct, formatted, by_kind = [], [], defaultdict(list)
    texts = generate(model, processor, examples, 1, max_new_tokens, greedy=True, suppress_ids=suppress_ids,
                     batch_size=batch_size, desc="eval (greedy)").texts if examples else []
    for ex, text in zip(examples, texts):
        correct.append(accuracy_reward(text, ex["solution"]))
        formatted.append(format_reward(text))
        if "kind" in ex:
            by_kind[ex["kind"]].append(correct[-1])
    model.train(was_training)
    kinds = sorted({k for rank_kinds in gather_objects(sorted(by_kind)) for k in rank_kinds})  # of every rank
    n, n_correct, n_formatted, *per_kind = all_reduce_sum(
        [len(correct), sum(correct), sum(formatted)] + [x for k in kinds for x in (len(by_kind[k]), sum(by_kind[k]))])
    metrics = {"eval/accuracy": n_correct / n, "eval/format": n_formatted / n}
    metrics.update({f"eval/accuracy/{k}": per_kind[2 * i + 1] / per_kind[2 * i] for i, k in enumerate(kinds)})
    return metrics
