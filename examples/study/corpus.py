"""General English text that every CPython installation carries: the language reference behind
``help()`` (``pydoc_data.topics``) and the standard library's docstrings; plus elementary integer
addition written as Python doctests, so that the base model knows some arithmetic before it is
fine-tuned on worked solutions (as the paper's base models know math before SFT).

Docstrings are read with ``ast`` from the source files, never by importing modules (importing the
whole standard library is slow and has side effects). The split into pretraining and held-out text
is by document, decided by a stable hash of the text, so it does not depend on file order.
"""

from __future__ import annotations

import ast
import hashlib
import os
import random
import sysconfig
from typing import List, Tuple

from .config import CorpusConfig, TaskConfig
from .task import eval_problems

# Packages whose docstrings are test scaffolding, demos or vendored code rather than documentation.
_SKIP_DIRS = {"test", "tests", "idlelib", "lib2to3", "turtledemo", "ensurepip", "site-packages", "dist-packages",
              "__pycache__"}


def _topics() -> List[str]:
    from pydoc_data.topics import topics

    return [topics[k].strip() for k in sorted(topics)]


def _stdlib_files() -> List[str]:
    root = sysconfig.get_paths()["stdlib"]
    found = []
    for here, dirs, files in os.walk(root):
        dirs[:] = sorted(d for d in dirs if d not in _SKIP_DIRS and not d.startswith(("test", "config-")))
        found += [os.path.join(here, f) for f in sorted(files) if f.endswith(".py")]
    return found


def _docstrings(min_chars: int) -> List[str]:
    docs = []
    for path in _stdlib_files():
        try:
            with open(path, encoding="utf-8") as f:
                tree = ast.parse(f.read())
        except (SyntaxError, UnicodeDecodeError, ValueError):
            continue  # a few files are templates or in other encodings: skip them
        for node in ast.walk(tree):
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                text = ast.get_docstring(node)
                if text and len(text) >= min_chars:
                    docs.append(text.strip())
    return docs


def _is_heldout(text: str, every: int) -> bool:
    return int(hashlib.sha1(text.encode("utf-8")).hexdigest(), 16) % every == 0


def arithmetic_doctests(n_chars: int, lines_per_doc: int, task: TaskConfig) -> List[str]:
    """Documents of doctest additions, about ``n_chars`` characters in all.

    Half of the sums are of two single digits (the facts a worked solution is made of), half of two
    numbers of the task's size; no pair (in either order) of the task's evaluation problems appears,
    so held-out accuracy is never a lookup of a pretraining line."""
    banned = set()
    for p in eval_problems(task):
        banned |= {(p.a, p.b), (p.b, p.a)}
    lo, hi = 10 ** (task.operand_digits - 1), 10 ** task.operand_digits
    rng = random.Random(4321)
    docs, total = [], 0
    while total < n_chars:
        lines = []
        while len(lines) < lines_per_doc:
            if rng.random() < 0.5:
                a, b = rng.randrange(10), rng.randrange(10)
            else:
                a, b = rng.randrange(lo, hi), rng.randrange(lo, hi)
            if (a, b) not in banned:
                lines.append(f">>> {a} + {b}\n{a + b}")
        docs.append("\n".join(lines))
        total += len(docs[-1])
    return docs


def load_corpus(cfg: CorpusConfig, task: TaskConfig) -> Tuple[List[str], List[str], List[bool]]:
    """(pretraining documents, held-out general-text documents, which pretraining documents are
    arithmetic doctests), deduplicated, in a fixed order.

    The arithmetic doctests go to pretraining only: the held-out text measures general language."""
    docs = _topics() + (_docstrings(cfg.min_docstring_chars) if cfg.use_docstrings else [])
    seen, unique = set(), []
    for d in docs:
        if d and d not in seen:
            seen.add(d)
            unique.append(d)
    if cfg.max_chars:
        kept, total = [], 0
        for d in unique:
            if total >= cfg.max_chars:
                break
            kept.append(d[: cfg.max_chars - total])
            total += len(kept[-1])
        unique = kept
    train = [d for d in unique if not _is_heldout(d, cfg.heldout_every)]
    heldout = [d for d in unique if _is_heldout(d, cfg.heldout_every)]
    if not heldout:  # a tiny corpus can hash every document to the training side
        heldout = [train.pop()]
    is_arith = [False] * len(train)
    if cfg.arithmetic_char_share > 0:
        general = sum(len(d) for d in train)
        n_chars = int(general * cfg.arithmetic_char_share / (1 - cfg.arithmetic_char_share))
        arith = arithmetic_doctests(n_chars, cfg.arithmetic_lines_per_doc, task)
        # interleave rather than append, so that a prefix of the stream has the same mix
        step = max(1, len(train) // max(1, len(arith)))
        mixed, is_arith = [], []
        for i, d in enumerate(train):
            mixed.append(d)
            is_arith.append(False)
            if i % step == step - 1 and arith:
                mixed.append(arith.pop())
                is_arith.append(True)
        train = mixed + arith
        is_arith += [True] * len(arith)
    return train, heldout, is_arith
