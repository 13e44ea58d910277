"""The in-domain task: two-number addition with a short worked solution, like the paper's math.

Each solution follows one of three strategies picked at random per example (column addition with
carries, tens-and-ones, add the tens then the ones). The demonstrations therefore have a real
choice in them (about log 3 nats at the first answer token): a model that memorizes which strategy
each training problem happened to get drives its entropy on the training data below what the data
supports, the "entropy collapse" the PSFT paper describes. The answer itself is exact: every
solution ends in "Answer: <sum>", and accuracy is the exact match of that number under greedy
decoding.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass
from typing import List, Optional, Tuple

from .config import TaskConfig

STRATEGIES = ("column", "tens_ones", "tens_first")
_ANSWER = re.compile(r"Answer:\s*(-?\d+)")


@dataclass(frozen=True)
class Problem:
    a: int
    b: int
    strategy: str

    @property
    def answer(self) -> int:
        return self.a + self.b

    @property
    def prompt(self) -> str:
        return f"Q: {self.a}+{self.b}=?\nA:"

    @property
    def solution(self) -> str:
        a, b, s = self.a, self.b, self.answer
        if self.strategy == "column":
            ones = a % 10 + b % 10
            carry = ones // 10
            if carry:
                first = f"{a % 10}+{b % 10}={ones}, write {ones % 10} carry {carry}."
                tens = f"{a // 10}+{b // 10}+{carry}={a // 10 + b // 10 + carry}."
            else:
                first = f"{a % 10}+{b % 10}={ones}, write {ones}."
                tens = f"{a // 10}+{b // 10}={a // 10 + b // 10}."
            steps = f"{first} {tens}"
        elif self.strategy == "tens_ones":
            t, o = a // 10 * 10 + b // 10 * 10, a % 10 + b % 10
            steps = f"{a // 10 * 10}+{b // 10 * 10}={t}, {a % 10}+{b % 10}={o}, {t}+{o}={s}."
        else:  # tens_first
            mid = a + b // 10 * 10
            steps = f"{a}+{b // 10 * 10}={mid}, {mid}+{b % 10}={s}."
        return f" {steps} Answer: {s}"


def _pairs(digits: int) -> List[Tuple[int, int]]:
    lo, hi = 10 ** (digits - 1), 10 ** digits
    return [(a, b) for a in range(lo, hi) for b in range(lo, hi)]


def eval_problems(cfg: TaskConfig) -> List[Problem]:
    """The fixed held-out problems (the same for every seed and method)."""
    rng = random.Random(1234)
    pairs = rng.sample(_pairs(cfg.operand_digits), cfg.eval_problems)
    return [Problem(a, b, rng.choice(STRATEGIES)) for a, b in pairs]


def train_problems(cfg: TaskConfig, seed: int) -> List[Problem]:
    """This seed's training set: drawn from the pairs that are not evaluation problems."""
    held = {(p.a, p.b) for p in eval_problems(cfg)}
    pool = [p for p in _pairs(cfg.operand_digits) if p not in held]
    rng = random.Random(10_000 + seed)
    pairs = rng.sample(pool, cfg.train_problems)
    return [Problem(a, b, rng.choice(STRATEGIES)) for a, b in pairs]


def parse_answer(text: str) -> Optional[int]:
    """The number after the first "Answer:", or None when the model never wrote one."""
    m = _ANSWER.search(text)
    return int(m.group(1)) if m else None
