"""The accuracy reward by answer type: letters and words exactly, everything else by mathematical equivalence."""

import dataclasses
import time

import pytest

import data.answers as answers
from data.answers import extract_answer, gold_answer, solution_answer
from utils.rewards import accuracy_reward, score_completions

THINK = "<think>reasoning</think>"


@pytest.mark.parametrize("completion, solution, right", [
    # letters (multiple choice): exact, case-insensitive, brackets and a full stop allowed
    ("Answer: B", "B", True), ("Answer: (b).", "B", True), ("Answer: C", "B", False), ("Answer: BC", "B", False),
    ("Answer: (B) 2", "B", True), ("Answer: B. two", "B", True), ("Answer: Blue", "B", False),
    ("<answer>D</answer>", "\\boxed{D}", True), ("\\boxed{A}", "(A)", True),
    # integers, negatives, decimals
    ("Answer: 24", "24", True), ("Answer: 24.0", "24", True), ("Answer: 25", "24", False),
    ("Answer: -2", "-2", True), ("Answer: 2", "-2", False), ("Answer: -12.50", "-12.5", True),
    ("Answer: 1,000", "1000", True),
    # fractions and LaTeX
    ("Answer: 0.75", "\\frac{3}{4}", True), ("Answer: 3/4", "\\frac{3}{4}", True), ("Answer: \\frac{2}{3}", "0.75", False),
    ("Answer: \\sqrt{18}", "3\\sqrt{2}", True), ("Answer: 3\\sqrt{3}", "3\\sqrt{2}", False),
    ("Answer: \\frac{\\pi}{2}", "\\pi/2", True), ("Answer: x+1", "1+x", True),
    # \boxed{} and <answer> forms, in completions and in solutions
    ("so \\boxed{\\frac{1}{4}}.", "\\boxed{\\frac{1}{4}}", True), ("Answer: $\\boxed{0.25}$", "\\frac{1}{4}", True),
    ("<answer> 3 </answer>", "<answer> 3 </answer>", True), ("<answer>4</answer>", "<answer> 3 </answer>", False),
    ("Four sides make \\boxed{24}", "Four sides of 6 make \\boxed{24}.", True),
    # words
    ("Answer: Yes", "yes", True), ("Answer: no", "yes", False),
    # no marked answer, or the last one counts
    ("the answer is 3", "3", False), ("Answer: 2 ... no wait, Answer: 3", "3", True),
])
def test_accuracy_by_answer_type(completion, solution, right, specs):
    assert accuracy_reward(THINK + completion, solution) == (1.0 if right else 0.0)
    # NEGATIVE_ACCURACY_REWARD: score_completions makes it +1/-1.
    negative = dataclasses.replace(specs.rewards, negative_accuracy=True)
    scores = score_completions([THINK + completion], [solution], [1], negative.at(1), negative,
                               specs.rollout.max_new_tokens)
    assert scores["accuracy"] == [1.0 if right else -1.0]


def test_extract_answer():
    assert extract_answer("<think>x</think>Answer: B") == "B"
    assert extract_answer("\\boxed{\\frac{1}{\\sqrt{2}}}") == "\\frac{1}{\\sqrt{2}}"  # nested braces
    assert extract_answer("\\boxed{3") is None and extract_answer("nothing") is None and extract_answer("Answer:") is None


@pytest.mark.parametrize("solution, answer", [
    ("B", "B"), ("(C).", "C"), ("\\boxed{D}", "D"), ("<answer> 3 </answer>", "3"), ("3\\sqrt{2}", "3\\sqrt{2}"),
    ("$\\frac{4}{3}$", "\\frac{4}{3}"), ("-12.5", "-12.5"), ("yes", "yes"), ("10 cm", "10 cm"),
    ("", None), ("   ", None), (None, None), ("The answer is unclear", None), ("<answer></answer>", None),
    ("\\frac{", None), ("???", None),
])
def test_gold_answers_and_unparseable_ones(solution, answer):
    assert gold_answer(solution) == answer


def test_cheap_check_leaves_math_parsing_to_use_time():
    assert solution_answer("\\frac{") == "\\frac{" and gold_answer("\\frac{") is None


def test_a_pathological_expression_cannot_hang_a_step(monkeypatch):
    monkeypatch.setattr(answers, "MATH_TIMEOUT_S", 1)
    start = time.time()
    assert accuracy_reward("Answer: 9^{9^{9^{9^{9}}}}", "3") == 0.0
    assert time.time() - start < 5


def test_a_reward_that_raises_hangs_or_gives_nan_scores_zero_and_is_counted(monkeypatch, capsys, make_specs):
    """One bad completion must not end a run: its failing reward scores 0, counted in the `errors` entry (logged as
    reward/errors), and a warning names the first failure."""
    import time

    from utils import rewards as rw

    def picky(completion, solution):
        if "boom" in completion:
            raise RuntimeError("parser crashed")
        if "nan" in completion:
            return float("nan")
        if "slow" in completion:
            time.sleep(5)
        return 1.0

    monkeypatch.setitem(rw.REWARDS, "format", picky)
    monkeypatch.setattr(rw, "REWARD_TIMEOUT_S", 0.2)
    monkeypatch.setattr(rw.guarded_reward, "__defaults__", (0.2,))
    texts = ["<think>a</think>Answer: A", "boom", "nan", "slow"]
    start = time.time()
    scores = rw.score_completions(texts, ["A"] * 4, [5] * 4, {"accuracy": 1.0, "format": 1.0}, make_specs().rewards,
                                  24)
    assert time.time() - start < 3  # the slow call was stopped
    assert scores["format"] == [1.0, 0.0, 0.0, 0.0] and scores["errors"] == [0.0, 1.0, 1.0, 1.0]
    assert scores["total"][1] == scores["accuracy"][1] * 1.0 + scores["overlong"][1]  # the failure adds 0
    err = capsys.readouterr()
    assert "3 reward call(s) failed" in err.out + err.err and "parser crashed" in err.out + err.err
