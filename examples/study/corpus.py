"""General English text that every CPython installation carries: the language reference behind
``help()`` (``pydoc_data.topics``) and the standard library's docstrings; plus worked two-number
sums, so that the base model knows the addition facts before it is fine-tuned on three-number
problems (as the paper's base models know math before SFT).

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
from .task import Problem

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


def arithmetic_examples(n_chars: int, per_doc: int, task: TaskConfig) -> List[str]:
    """Documents of worked two-number sums in the task's format, about ``n_chars`` characters.

    The sums are the facts a solution of the task is made of: a running total (up to 9 times the
    task's operands minus one) plus a digit, in either order. Three-number problems never appear."""
    top = 9 * (task.operands - 1)
    rng = random.Random(4321)
    docs, total = [], 0
    while total < n_chars:
        items = []
        for _ in range(per_doc):
            a, b = rng.randrange(top + 1), rng.randrange(10)
            p = Problem((a, b) if rng.random() < 0.5 else (b, a), "forward")
            items.append(p.prompt + p.solution)
        docs.append("\n\n".join(items))
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
        arith = arithmetic_examples(n_chars, cfg.arithmetic_per_doc, task)
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
