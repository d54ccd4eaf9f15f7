"""Rewards (SPEC §4): accuracy, format, soft overlong punishment, weighted total."""

import re

FORMAT_PATTERN = re.compile(r"^<think>(?!.*<think>)(.*?)</think>.*$", re.DOTALL)
ANSWER_PATTERNS = (re.compile(r"<answer>\s*([^<\s]+)\s*</answer>"), re.compile(r"Answer:\s*([A-Za-z0-9]+)"))


def extract_answer(completion):
    """The answer after the last `Answer:` (or inside the last <answer>…</answer>), or None."""
    for pattern in ANSWER_PATTERNS:
        found = pattern.findall(completion)
        if found:
            return found[-1].strip()
    return None


def accuracy_reward(completion, solution, negative=False):
    """1 if the extracted answer equals the solution (case-insensitive), else 0 (or -1 when `negative`)."""
    answer = extract_answer(completion)
    correct = answer is not None and answer.strip().upper() == str(solution).strip().upper()
    return 1.0 if correct else (-1.0 if negative else 0.0)


def format_reward(completion):
    """1 if the completion is `<think>…</think>` followed by anything, with a single <think>."""
    return 1.0 if FORMAT_PATTERN.match(completion.strip()) else 0.0


def soft_overlong_punishment(length, max_length, cache_length):
    """DAPO Eq. 13: 0 up to max_length - cache_length tokens, then a linear ramp to -1 at max_length."""
    safe = max_length - cache_length
    if length <= safe:
        return 0.0
    if length <= max_length:
        return (safe - length) / cache_length
    return -1.0


def score_completions(texts, solutions, lengths, weights, max_length, overlong_buffer,
                      soft_overlong=True, negative_accuracy=False):
    """Every reward component for a batch of completions, and the weighted total.

    texts, solutions: lists of str; lengths: completion lengths in tokens.
    weights: {"accuracy": w_acc, "format": w_fmt}. A completion cut at the limit has length max_length
    and so gets the full -1 of the soft overlong punishment.
    Returns {"accuracy": [B], "format": [B], "overlong": [B], "total": [B]} as lists of floats.
    """
    accuracy = [accuracy_reward(t, s, negative_accuracy) for t, s in zip(texts, solutions)]
    fmt = [format_reward(t) for t in texts]
    if soft_overlong:
        overlong = [soft_overlong_punishment(n, max_length, overlong_buffer) for n in lengths]
    else:
        overlong = [0.0] * len(texts)
    total = [weights["accuracy"] * a + weights["format"] * f + o for a, f, o in zip(accuracy, fmt, overlong)]
    return {"accuracy": accuracy, "format": fmt, "overlong": overlong, "total": total}


def reward_weights_at(step, switch_step, early, regular):
    """Two-stage reward weights: `regular` ({"accuracy", "format", "mdi"}: weight) overridden by the entries of
    `early` during the first `switch_step` training steps (1-based), `regular` from step switch_step + 1 on."""
    return {**regular, **early} if step <= switch_step else dict(regular)
