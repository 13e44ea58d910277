"""The in-domain task: sums of three one-digit numbers with a short worked solution.

    Q: 7 + 8 + 5 = ?
    A: 7 + 8 = 15, 15 + 5 = 20. Answer: 20

The base model has seen two-number sums in this format during pretraining (corpus.py): it knows
the addition facts a solution is made of. Fine-tuning teaches it to chain two of them, as SFT on
math demonstrations teaches the paper's base models harder problems than they solve.

Each solution follows one of three strategies picked at random per example, so the
demonstrations hold a real choice (about log 3 nats at the first solution token): a model that
memorizes which strategy each training problem happened to get drives its entropy on the training
data below what the data supports, the "entropy collapse" the PSFT paper describes. The answer is
exact: every solution ends in "Answer: <sum>", and accuracy is the exact match of that number under
greedy decoding.
"""

from __future__ import annotations

import itertools
import random
import re
from dataclasses import dataclass
from typing import List, Optional, Tuple

from .config import TaskConfig

STRATEGIES = ("forward", "backward", "swap")
_ANSWER = re.compile(r"Answer:\s*(-?\d+)")


@dataclass(frozen=True)
class Problem:
    operands: Tuple[int, ...]
    strategy: str

    @property
    def answer(self) -> int:
        return sum(self.operands)

    @property
    def prompt(self) -> str:
        return "Q: " + " + ".join(map(str, self.operands)) + " = ?\nA:"

    @property
    def solution(self) -> str:
        ops = list(self.operands)
        if len(ops) < 2:
            raise ValueError(f"a problem needs at least two operands; got {self.operands}")
        if self.strategy == "backward":  # right to left
            ops = ops[::-1]
        elif self.strategy == "swap":  # the first two swapped, then left to right
            ops[0], ops[1] = ops[1], ops[0]
        steps, acc = [], ops[0]
        for x in ops[1:]:
            steps.append(f"{acc} + {x} = {acc + x}")
            acc += x
        return " " + ", ".join(steps) + f". Answer: {acc}"


def all_operand_tuples(cfg: TaskConfig) -> List[Tuple[int, ...]]:
    return list(itertools.product(range(10), repeat=cfg.operands))


def eval_problems(cfg: TaskConfig) -> List[Problem]:
    """The fixed held-out problems (the same for every seed and method)."""
    rng = random.Random(1234)
    chosen = rng.sample(all_operand_tuples(cfg), cfg.eval_problems)
    return [Problem(t, rng.choice(STRATEGIES)) for t in chosen]


def train_problems(cfg: TaskConfig, seed: int) -> List[Problem]:
    """This seed's training set: drawn from the problems that are not evaluation problems."""
    held = {p.operands for p in eval_problems(cfg)}
    pool = [t for t in all_operand_tuples(cfg) if t not in held]
    rng = random.Random(10_000 + seed)
    chosen = rng.sample(pool, cfg.train_problems)
    return [Problem(t, rng.choice(STRATEGIES)) for t in chosen]


def parse_answer(text: str) -> Optional[int]:
    """The number after the first "Answer:", or None when the model never wrote one."""
    m = _ANSWER.search(text)
    return int(m.group(1)) if m else None
