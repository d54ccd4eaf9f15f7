"""Held-out evaluation: greedy decoding (or k samples per question), scored by every reward of utils.rewards.REWARDS,
and the same questions with blank images (does the answer depend on the image?)."""

import math
import warnings
from collections import defaultdict

import torch

from data import example_name, usable_example
from data.prompts import encode_prompts, images_of, with_blank_images
from utils.distributed import all_reduce_sum, current_world, gather_objects, rank_share
from utils.generation import Decoding
from utils.rewards import score_texts
from utils.rollout import generate


def pass_at_k(n, c, k):
    """The unbiased estimator of pass@k from n samples of which c are correct (Chen et al. 2021, arXiv:2107.03374):
    the chance that k samples drawn from the n without replacement hold at least one correct, 1 − C(n−c, k)/C(n, k)."""
    if not 0 < k <= n or not 0 <= c <= n:
        raise ValueError(f"pass@k needs 0 < k <= n and 0 <= c <= n (n={n}, c={c}, k={k})")
    return 1.0 - math.comb(n - c, k) / math.comb(n, k)


@torch.no_grad()
def evaluate(model, processor, dataset, spec, max_new_tokens, generation_batch_size, suppress_ids=(), seed=0,
             compiled=False):
    """Score the first `spec.samples` examples of `dataset` (an EvalSpec: EVAL_SAMPLES, EVAL_TEMPERATURE, EVAL_TOP_P,
    EVAL_SAMPLES_PER_PROMPT, EVAL_BLANK_IMAGE): greedy decoding at temperature 0, else k samples per question drawn
    from a generator seeded by `seed` (each evaluation draws the same random numbers, and the training's random
    stream is never touched); each completion scored by every reward of REWARDS. `compiled`: COMPILED_DECODE.

    Examples that cannot be used (undecodable, rejected by the processor) are skipped with a warning.
    Returns {"eval/<reward>"} (the mean over every completion: "eval/accuracy", "eval/format"); when examples carry a
    "kind", "eval/accuracy/<kind>"; with k > 1, "eval/mean_at_k" and "eval/pass_at_k" (pass_at_k's estimator); with
    EVAL_BLANK_IMAGE and images, "eval/accuracy_blank_image" (the same questions, the images blanked:
    data.prompts.blank_image) and "eval/grounding_gap" (accuracy minus it). Under torchrun each rank scores its share
    of the examples and the sums are summed.
    """
    examples = []
    for i in rank_share(range(min(spec.samples, len(dataset)))):
        example, error = usable_example(dataset, i, check=lambda ex: encode_prompts(processor, [ex]))
        if error is None:
            examples.append(example)
        else:
            warnings.warn(f"held-out {example_name(dataset, i)}: {error}; skipped", stacklevel=2)
    if not all_reduce_sum(len(examples)):
        raise ValueError(f"none of the first {spec.samples} held-out examples can be used (see the warnings)")
    k, greedy = spec.samples_per_prompt, spec.temperature == 0
    decoding = Decoding(max_new_tokens, temperature=spec.temperature or 1.0, top_p=spec.top_p, greedy=greedy,
                        suppress_ids=suppress_ids, compiled=compiled)
    label = "eval (greedy)" if greedy else f"eval ({k} per question, T={spec.temperature:g})"

    def correct(examples, desc):  # [n, k] accuracy of each completion, and the scores of every reward
        generator = None
        if not greedy:
            device = next(model.parameters()).device
            generator = torch.Generator(device=device).manual_seed(seed + current_world().rank)
        texts = generate(model, processor, examples, k, decoding, generation_batch_size, desc,
                         generator).texts if examples else []
        scores, _ = score_texts(texts, [ex["solution"] for ex in examples for _ in range(k)])  # a failure: 0
        return torch.tensor(scores["accuracy"], dtype=torch.float64).view(-1, k), scores

    was_training = model.training
    model.eval()
    accuracy, scores = correct(examples, label)
    blank = spec.blank_image and all_reduce_sum(sum(bool(images_of(ex)) for ex in examples)) > 0
    blank_accuracy = correct([with_blank_images(ex) for ex in examples], "eval (blank images)")[0] if blank else None
    model.train(was_training)

    by_kind = defaultdict(list)
    for ex, row in zip(examples, accuracy):
        if "kind" in ex:
            by_kind[ex["kind"]].append(row.mean().item())
    kinds = sorted({kind for rank_kinds in gather_objects(sorted(by_kind)) for kind in rank_kinds})  # of every rank
    n, *sums = all_reduce_sum([len(examples)] + [sum(v) / k for v in scores.values()]
                              + [x for kind in kinds for x in (len(by_kind[kind]), sum(by_kind[kind]))])
    metrics = {f"eval/{name}": total / n for name, total in zip(scores, sums)}
    per_kind = sums[len(scores):]
    metrics.update({f"eval/accuracy/{kind}": per_kind[2 * i + 1] / per_kind[2 * i] for i, kind in enumerate(kinds)})
    if k > 1:
        solved = [pass_at_k(k, int(row.sum().item()), k) for row in accuracy]
        metrics["eval/mean_at_k"] = metrics["eval/accuracy"]
        metrics["eval/pass_at_k"] = all_reduce_sum(sum(solved)) / n
    if blank:
        metrics["eval/accuracy_blank_image"] = all_reduce_sum(blank_accuracy.mean(1).sum().item()) / n
        metrics["eval/grounding_gap"] = metrics["eval/accuracy"] - metrics["eval/accuracy_blank_image"]
    return metrics

