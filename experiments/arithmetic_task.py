"""The arithmetic-series task of notebook 001: problems, a word tokenizer, answers, the program
that checks them, and the wrong answers a reward model learns to rank below the right ones.

A problem (n terms, start s, difference d) is asked in one of three phrasings; its answer is
"s s+d ... <EOS>", leaving out terms above `max_value` as the notebook does.
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import numpy as np

PAD, EOS = "<PAD>", "<EOS>"
PAD_ID, EOS_ID = 0, 1  # the first two words of `WordTokenizer`
MAX_NEW_TOKENS = 16  # the longest answer (14 terms + EOS) fits
TEMPLATES = (
    "generate an arithmetic series with {n} terms starting with value {s} and common "
    "difference {d}",
    "make a series of arithmetic type which starts at {s} with {n} elements and {d} common "
    "difference value",
    "Let {n} be the number of terms {s} the starting number and {d} the common difference then "
    "write the arithmetic series",
)


@dataclasses.dataclass(frozen=True)
class Task:
    """The problem distribution (notebook 001's): n in [min_terms, max_terms], s in
    [0, max_value), d in [1, max_difference]."""

    max_value: int = 100
    max_difference: int = 9
    min_terms: int = 5
    max_terms: int = 14

    def __post_init__(self):
        if min(self.max_value, self.max_difference, self.min_terms) < 1:
            raise ValueError(f"max_value, max_difference and min_terms must be >= 1, got {self}")
        if self.max_terms < self.min_terms:
            raise ValueError(f"max_terms ({self.max_terms}) must be >= min_terms "
                             f"({self.min_terms})")
        if self.max_terms + 1 > MAX_NEW_TOKENS:
            raise ValueError(f"max_terms must be <= {MAX_NEW_TOKENS - 1}: an answer is its terms "
                             f"and EOS within {MAX_NEW_TOKENS} new tokens")


class Problem(NamedTuple):
    terms: int  # n
    start: int  # s
    difference: int  # d


class WordTokenizer:
    """Whitespace words -> ids: PAD, EOS, the numbers 0..max_value, then the template words."""

    def __init__(self, max_value: int):
        words = sorted({w for t in TEMPLATES for w in t.split() if not w.startswith("{")})
        self.vocab = [PAD, EOS] + [str(i) for i in range(max_value + 1)] + words
        self.ids = {w: i for i, w in enumerate(self.vocab)}
        self.pad_id, self.eos_id = PAD_ID, EOS_ID

    def encode(self, text: str) -> list[int]:
        return [self.ids[w] for w in text.split()]

    def decode(self, ids) -> str:
        return " ".join(self.vocab[i] for i in ids)


def series(problem: Problem, max_value: int) -> list[int]:
    """The terms s, s+d, ... (n of them), leaving out those above max_value (notebook 001)."""
    return [v for v in range(problem.start, problem.start + problem.terms * problem.difference,
                             problem.difference) if v <= max_value]


def sample_problems(rng: np.random.Generator, count: int, task: Task,
                    exclude: frozenset = frozenset()) -> list[Problem]:
    problems = []
    while len(problems) < count:
        problem = Problem(int(rng.integers(task.min_terms, task.max_terms + 1)),
                          int(rng.integers(0, task.max_value)),
                          int(rng.integers(1, task.max_difference + 1)))
        if problem not in exclude:
            problems.append(problem)
    return problems


def prompt_ids(tokenizer: WordTokenizer, problem: Problem, template: int) -> list[int]:
    n, s, d = problem
    return tokenizer.encode(TEMPLATES[template].format(n=n, s=s, d=d))


def answer_ids(tokenizer: WordTokenizer, problem: Problem, max_value: int) -> list[int]:
    """The correct continuation: the terms, then EOS."""
    return tokenizer.encode(" ".join(map(str, series(problem, max_value)))) + [tokenizer.eos_id]


def corrupt(answer: list[int], tokenizer: WordTokenizer, rng: np.random.Generator,
            max_value: int) -> list[int]:
    """A wrong continuation near the right one: a term dropped or added, one term off by 1-3,
    or the difference changed from some term on (the mistakes a weak policy makes)."""
    numbers = [int(tokenizer.vocab[i]) for i in answer[:-1]]
    while True:
        kind, i = rng.integers(4), int(rng.integers(len(numbers)))
        wrong = list(numbers)
        if kind == 0 and len(numbers) > 1:
            wrong.pop(i)
        elif kind == 1:
            wrong.insert(i + 1, wrong[i] + int(rng.integers(-3, 4)))
        elif kind == 2:
            wrong[i] += int(rng.choice([-3, -2, -1, 1, 2, 3]))
        elif kind == 3 and i > 0:
            step = wrong[i] - wrong[i - 1] + int(rng.choice([-1, 1]))
            wrong[i:] = [wrong[i - 1] + step * (j + 1) for j in range(len(wrong) - i)]
        if wrong != numbers and all(0 <= v <= max_value for v in wrong):
            return tokenizer.encode(" ".join(map(str, wrong))) + [tokenizer.eos_id]


def credit(response: list[int], answer: list[int]) -> int:
    """Partial credit: how many leading tokens of `response` match the right continuation
    (len(answer) for an exactly right one): the program's finer verdict."""
    matched = 0
    for got, want in zip(response, answer):
        if got != want:
            break
        matched += 1
    return matched


def exact_reward_fn(answers: dict[tuple[int, ...], list[int]]):
    """1 if a response is exactly the right series + EOS, else 0 (the program's verdict);
    `answers` maps every training prompt's ids to its correct continuation."""

    def exact_reward(prompts, responses):
        return np.array([float(list(r) == answers[tuple(p)]) for p, r in zip(prompts, responses)])

    return exact_reward
