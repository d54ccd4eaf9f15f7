"""Rewards (SPEC §4): a table of rewards by name, the soft overlong punishment, the weighted total.

REWARDS maps a name to fn(completion, solution) -> float. Each reward's weight is the trainers' W_<NAME>
constant, and evaluation reports eval/<name> for each. A new reward is one function here, its entry in REWARDS and
a W_<NAME> constant in the trainers. The MDI reward (W_MDI) is the one reward that is not a function of the text:
it compares attention to the image within a group (utils.attention.mdi_reward), once the attention is measured.
The accuracy reward compares a completion's answer with the solution's by kind (letter, word or math): see
data/answers.py.
"""

import math
import re
import signal
import threading

from tqdm import tqdm

from data.answers import extract_answer, gold_answer, is_correct

REWARD_TIMEOUT_S = 10.0  # a reward call that runs longer is stopped and scores 0 (counted in reward/errors)

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


class RewardTimeout(Exception):
    pass


def guarded_reward(reward, completion, solution, timeout=REWARD_TIMEOUT_S):
    """(score, error): reward(completion, solution) as a float, or (0.0, what went wrong) when it raised, ran past
    `timeout` seconds, or returned NaN or ±inf — one bad completion must not end a run of days. The timeout uses
    SIGALRM, so it applies in the main thread and when no other timer is running (math-verify, inside the accuracy
    reward, keeps its own)."""
    def stop(signum, frame):
        raise RewardTimeout(f"no answer after {timeout:g} s")

    alarm = (timeout and hasattr(signal, "setitimer") and threading.current_thread() is threading.main_thread()
             and signal.getitimer(signal.ITIMER_REAL)[0] == 0)
    if alarm:
        previous = signal.signal(signal.SIGALRM, stop)
        signal.setitimer(signal.ITIMER_REAL, timeout)
    try:
        value = float(reward(completion, solution))
    except Exception as e:  # a reward's own bug or a RewardTimeout; not KeyboardInterrupt
        return 0.0, f"{type(e).__name__}: {e}"
    finally:
        if alarm:
            signal.setitimer(signal.ITIMER_REAL, 0)
            signal.signal(signal.SIGALRM, previous)
    return (value, None) if math.isfinite(value) else (0.0, f"returned {value}")


def score_texts(texts, solutions, reward_table=None):
    """Every reward of `reward_table` (default REWARDS) for each completion, guarded (guarded_reward): ({name:
    [B] floats}, errors [B]: how many of a completion's rewards failed). Failures are also warned about once per
    call, with the first one's message."""
    scores, errors, first = {}, [0] * len(texts), None
    for name, reward in (reward_table or REWARDS).items():
        scores[name] = []
        for i, (text, solution) in enumerate(zip(texts, solutions)):
            value, error = guarded_reward(reward, text, solution)
            scores[name].append(value)
            if error:
                errors[i] += 1
                first = first or f"{name} reward on {text[:60]!r}: {error}"
    if first:
        tqdm.write(f"WARNING: {sum(errors)} reward call(s) failed and scored 0 (reward/errors); first: {first}")
    return scores, errors


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
    Returns {name: [B], ..., "overlong": [B], "total": [B], "errors": [B]} as lists of floats; errors: how many of
    a completion's rewards raised, hung or gave NaN (each such reward scores 0 there; score_texts).
    """
    scores, errors = score_texts(texts, solutions)
    if spec.negative_accuracy:
        scores["accuracy"] = [2 * a - 1 for a in scores["accuracy"]]
    scores["overlong"] = [soft_overlong_punishment(n, max_length, spec.overlong_buffer)
                          if spec.soft_overlong_punishment else 0.0 for n in lengths]
    scores["total"] = [sum(weights[name] * scores[name][i] for name in REWARDS) + scores["overlong"][i]
                       for i in range(len(texts))]
    scores["errors"] = [float(e) for e in errors]
    return scores
