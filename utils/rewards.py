"""Rewards (SPEC §4): a table of rewards by name, the soft overlong punishment, the weighted total.

REWARDS maps a name to fn(completion, solution) -> float. Each reward's weight is the trainers' W_<NAME>
constant, and evaluation reports eval/<name> for each. A new reward is one function here, its entry in REWARDS and
a W_<NAME> constant in the trainers. The MDI reward (W_MDI) is the one reward that is not a function of the text:
it compares attention to the image within a group (utils.attention.mdi_reward), once the attention is measured.
The accuracy reward compares a completion's answer with the solution's by kind (letter, word or math): see
data/answers.py.
"""

import re

from data.answers import extract_answer, gold_answer, is_correct

FORMAT_PATTERN = re.compile(r"^<think>(?!.*<think>)(.*?)</think>.*$", re.DOTALL)


def accuracy_reward(completion, solution):
    """1 if the completion's answer matches the solution's, else 0."""
    gold = gold_answer(solution)
    return 1.0 if gold is not None and is_correct(extract_answer(completion), gold) else 0.0


def format_reward(completion, solution=None):
    """1 if the completion is `<think>…</think>` followed by anything, with a single <think>."""
    return 1.0 if FORMAT_PATTERN.match(completion.strip()) else 0.0


REWARDS = {"accuracy": accuracy_reward, "format": format_reward}  # weights: W_ACCURACY, W_FORMAT
ATTENTION_REWARDS = ("mdi",)  # weights: W_MDI; computed from the attention masses (utils.attention.mdi_reward)


def reward_names():
    """Every reward that has a weight constant W_<NAME>: those of the text, then those of the attention."""
    return (*REWARDS, *ATTENTION_REWARDS)


def soft_overlong_punishment(length, max_length, cache_length):
    """DAPO Eq. 13: 0 up to max_length - cache_length tokens, then a linear ramp to -1 at max_length."""
    safe = max_length - cache_length
    if length <= safe:
        return 0.0
    if length <= max_length:
        return (safe - length) / cache_length
    return -1.0


def score_completions(texts, solutions, lengths, weights, spec, max_length):
    """Every reward of REWARDS for a batch of completions, the soft overlong punishment, and the weighted total.

    texts, solutions: lists of str; lengths: completion lengths in tokens; weights: {name: weight} (the step's,
    RewardSpec.at). spec: the RewardSpec — NEGATIVE_ACCURACY_REWARD makes accuracy +1/-1 (the DAPO paper's
    rule-based reward) instead of 1/0; SOFT_OVERLONG_PUNISHMENT adds DAPO Eq. 13 over the last OVERLONG_BUFFER
    tokens before max_length (a completion cut at the limit has length max_length and gets the full -1).
    Returns {name: [B], ..., "overlong": [B], "total": [B]} as lists of floats.
    """
    scores = {name: [reward(t, s) for t, s in zip(texts, solutions)] for name, reward in REWARDS.items()}
    if spec.negative_accuracy:
        scores["accuracy"] = [2 * a - 1 for a in scores["accuracy"]]
    scores["overlong"] = [soft_overlong_punishment(n, max_length, spec.overlong_buffer)
                          if spec.soft_overlong_punishment else 0.0 for n in lengths]
    scores["total"] = [sum(weights[name] * scores[name][i] for name in REWARDS) + scores["overlong"][i]
                       for i in range(len(texts))]
    return scores
