"""Held-out evaluation: greedy decoding, scored by every reward of utils.rewards.REWARDS."""

import warnings
from collections import defaultdict

import torch

from data import example_name, usable_example
from data.prompts import encode_prompts
from utils.distributed import all_reduce_sum, gather_objects, rank_share
from utils.generation import Decoding
from utils.rewards import score_texts
from utils.rollout import generate


@torch.no_grad()
def evaluate(model, processor, dataset, n_samples, rollout, suppress_ids=()):
    """Greedy decoding (at most rollout.max_new_tokens tokens, rollout.generation_batch_size sequences at once) on
    the first `n_samples` examples of `dataset`, each completion scored by every reward of REWARDS.

    Examples that cannot be used (undecodable, rejected by the processor) are skipped with a warning.
    Returns {"eval/<reward>"} (the mean: "eval/accuracy", "eval/format") and, when examples carry a "kind",
    "eval/accuracy/<kind>". Under torchrun each rank scores its share of the examples and the sums are summed.
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
    decoding = Decoding(rollout.max_new_tokens, greedy=True, suppress_ids=suppress_ids)
    texts = generate(model, processor, examples, 1, decoding, rollout.generation_batch_size,
                     desc="eval (greedy)").texts if examples else []
    model.train(was_training)
    scores, _ = score_texts(texts, [ex["solution"] for ex in examples])  # a failing reward scores 0, warned
    by_kind = defaultdict(list)
    for ex, correct in zip(examples, scores["accuracy"]):
        if "kind" in ex:
            by_kind[ex["kind"]].append(correct)
    kinds = sorted({k for rank_kinds in gather_objects(sorted(by_kind)) for k in rank_kinds})  # of every rank
    n, *sums = all_reduce_sum([len(examples)] + [sum(v) for v in scores.values()]
                              + [x for k in kinds for x in (len(by_kind[k]), sum(by_kind[k]))])
    metrics = {f"eval/{name}": total / n for name, total in zip(scores, sums)}
    per_kind = sums[len(scores):]
    metrics.update({f"eval/accuracy/{k}": per_kind[2 * i + 1] / per_kind[2 * i] for i, k in enumerate(kinds)})
    return metrics
