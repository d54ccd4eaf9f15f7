"""Answers: the last `Answer: X`, `<answer>X</answer>` or `\\boxed{X}` of a completion (or of a solution). A
solution's answer is one of three kinds, and a completion's answer is compared by kind:

* a letter (multiple choice: `B`, `(B)`, `B.`): the completion's answer must be, or start with, that letter as an
  option (`B`, `(B) 2`, `B. two`; not `Blue`), case-insensitive;
* a word (`yes`, `cylinder`): the same word, case-insensitive;
* anything else (integers, decimals, negatives, fractions, LaTeX): mathematical equivalence, graded by
  math-verify (as TRL and R1-V do) with a time limit per call, so a pathological expression cannot hang a step.
"""

import functools
import re

ANSWER_PATTERNS = (re.compile(r"<answer>(.*?)</answer>", re.DOTALL), re.compile(r"Answer:[ \t]*([^\n]*)"),
                   re.compile(r"\\boxed\{"))
LETTER = re.compile(r"\(?([A-Za-z])\)?[.:]?")
LETTER_FIRST = re.compile(r"\(?([A-Za-z])(?:\)|[.:]|\s|$)")  # "B", "(B) 2", "B. two": the chosen option's letter
WORD = re.compile(r"[A-Za-z][A-Za-z'-]*")
SENTENCE_WORDS = 3  # a text with this many words of two or more letters is a sentence, not an answer
MATH_TIMEOUT_S = 3  # seconds per math-verify call (parsing, comparing)


def boxed_content(text, start):
    """The text inside the braces of the `\\boxed{` that ends at `start`, or None if they never close."""
    depth = 1
    for i in range(start, len(text)):
        depth += {"{": 1, "}": -1}.get(text[i], 0)
        if depth == 0:
            return text[start:i]
    return None


def extract_answer(text):
    """The last answer marked in `text` — `Answer: X` (to the end of the line), `<answer>X</answer>` or
    `\\boxed{X}` — with a `\\boxed{}` inside it unwrapped and `$`, spaces and a final full stop stripped;
    None when nothing is marked."""
    found = []  # (position, answer)
    for pattern in ANSWER_PATTERNS:
        for match in pattern.finditer(text):
            inner = boxed_content(text, match.end()) if pattern.pattern.startswith("\\\\boxed") else match.group(1)
            if inner is not None:
                found.append((match.start(), inner))
    if not found:
        return None
    answer = max(found)[1]
    boxed = answer.find("\\boxed{")
    if boxed >= 0:
        answer = boxed_content(answer, boxed + len("\\boxed{")) or answer
    answer = answer.strip().strip("$").strip().rstrip(".").strip()
    return answer or None


def answer_kind(answer):
    """"letter", "word" or "math" by what the (extracted) answer looks like."""
    if LETTER.fullmatch(answer):
        return "letter"
    if WORD.fullmatch(answer):
        return "word"
    return "math"


@functools.lru_cache(maxsize=65536)
def parse_math(answer):
    """math-verify's parse of an answer: a tuple, empty when no expression could be parsed from it (math-verify
    then returns the bare string only)."""
    from math_verify import ExprExtractionConfig, LatexExtractionConfig, parse

    text = answer if "$" in answer else f"${answer}$"
    config = [LatexExtractionConfig(boxed_match_priority=0), ExprExtractionConfig()]
    parsed = tuple(parse(text, extraction_config=config, parsing_timeout=MATH_TIMEOUT_S))
    return parsed if any(not isinstance(p, str) for p in parsed) else ()


def solution_answer(solution):
    """The answer of a solution (its marked answer, else the whole text) without parsing any math, or None when
    it has none: empty, or a sentence with no marked answer. Letters come back bare (`(B).` -> `B`)."""
    if solution is None:
        return None
    text = str(solution).strip()
    marked = any(pattern.search(text) for pattern in ANSWER_PATTERNS)
    answer = extract_answer(text) if marked else text.strip("$").strip().rstrip(".").strip()
    if not answer:
        return None
    kind = answer_kind(answer)
    if kind == "letter":
        return LETTER.fullmatch(answer).group(1)
    prose = re.sub(r"\\text\{[^}]*\}|\\[A-Za-z]+", " ", answer)
    if kind == "math" and len(re.findall(r"[A-Za-z]{2,}", prose)) >= SENTENCE_WORDS:
        return None
    return answer


def gold_answer(solution):
    """solution_answer, or None also when it is not a letter or a word and math-verify cannot parse it."""
    answer = solution_answer(solution)
    if answer is not None and answer_kind(answer) == "math" and not parse_math(answer):
        return None
    return answer


def is_correct(answer, gold):
    """Whether a completion's extracted `answer` matches the `gold` answer (see the module docstring)."""
    if answer is None:
        return False
    kind = answer_kind(gold)
    if kind == "letter":
        found = LETTER_FIRST.match(answer)
        return bool(found) and found.group(1).upper() == LETTER.fullmatch(gold).group(1).upper()
    if kind == "word":
        return answer.lower() == gold.lower()
    from math_verify import verify

    target = parse_math(answer)
    return bool(target) and verify(list(parse_math(gold)), list(target), timeout_seconds=MATH_TIMEOUT_S)
