"""The study's protocol as data: one frozen dataclass per part, a default and a ``--quick`` preset.

Everything that changes a number in results.json lives here, so the protocol written in README.md
can be checked against the code, and the pretraining cache key is a hash of the parts it uses.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import sys
from dataclasses import dataclass, field
from typing import Tuple

METHODS = ("sft", "psft", "psft_warmup", "dft", "asft")


@dataclass(frozen=True)
class CorpusConfig:
    use_docstrings: bool = True  # pydoc_data.topics always; stdlib docstrings (parsed, not imported) too
    min_docstring_chars: int = 200  # short docstrings are mostly signatures, not prose
    max_chars: int = 0  # 0 = everything; the quick preset cuts the corpus
    heldout_every: int = 20  # every 20th document (by stable hash) is held-out general text
    # Elementary arithmetic the base model should know: worked two-number sums in the task's format
    # ("Q: 12 + 7 = ?" / "A: 12 + 7 = 19. Answer: 19"), this share of the pretraining characters.
    # Never a three-number problem (the task); never in the held-out text.
    arithmetic_char_share: float = 0.25
    arithmetic_per_doc: int = 8


@dataclass(frozen=True)
class ModelConfig:
    vocab_size: int = 2048
    hidden_size: int = 160
    num_hidden_layers: int = 4
    num_attention_heads: int = 4
    intermediate_size: int = 448
    max_position_embeddings: int = 256


@dataclass(frozen=True)
class PretrainConfig:
    seq_len: int = 128
    batch_size: int = 32
    steps: int = 500
    lr: float = 3e-3
    warmup_steps: int = 30
    weight_decay: float = 0.1
    seed: int = 0


@dataclass(frozen=True)
class TaskConfig:
    operands: int = 3  # sums of this many one-digit numbers (10**3 = 1000 problems)
    train_problems: int = 512  # drawn per seed from the pool that excludes the eval problems
    eval_problems: int = 200  # fixed held-out problems for exact-match accuracy
    entropy_probe: int = 64  # training problems whose answer-token entropy is tracked at evals


@dataclass(frozen=True)
class FinetuneConfig:
    methods: Tuple[str, ...] = METHODS
    lrs: Tuple[float, ...] = (1e-4, 5e-4, 2.5e-3)  # the SAME grid for every method (x5 steps, 25x span)
    seeds: Tuple[int, ...] = (0, 1, 2)
    batch_size: int = 16
    epochs: int = 5
    warmup_steps: int = 10  # linear lr warm-up, then constant (verl's PSFT schedule)
    weight_decay: float = 0.1
    max_grad_norm: float = 1.0
    psft_k: int = 8  # optimizer steps per pi_old refresh
    psft_eps_low: float = 0.2
    psft_eps_high: float = 0.28
    psft_warmup_epochs: int = 1  # "PSFT with SFT warm-up": the first epoch is plain SFT
    asft_kl_coef: float = 0.05
    eval_every_epochs: float = 1.0  # OOD loss / accuracy / probe entropy at these points (and step 0)
    ood_eval_sequences: int = 48  # held-out general-text windows of PretrainConfig.seq_len tokens
    max_new_tokens: int = 40


@dataclass(frozen=True)
class StudyConfig:
    name: str = "default"
    # psft_kernels backend for every loss and metric. The pure-PyTorch "chunked" one is available
    # everywhere, so the numbers do not depend on whether a compiler (native) or a GPU (triton) is
    # around; "auto" picks the fastest the machine has.
    loss_backend: str = "chunked"
    corpus: CorpusConfig = field(default_factory=CorpusConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    pretrain: PretrainConfig = field(default_factory=PretrainConfig)
    task: TaskConfig = field(default_factory=TaskConfig)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def base_key(self) -> str:
        """Hash of what determines the tokenizer and the pretrained model (and the Python version,
        whose standard library is the corpus)."""
        parts = {"corpus": dataclasses.asdict(self.corpus), "model": dataclasses.asdict(self.model),
                 "pretrain": dataclasses.asdict(self.pretrain), "python": sys.version.split()[0],
                 # what else the cached files depend on: the arithmetic in the corpus, the held-out
                 # windows saved beside the model, the base's fact accuracy in meta.json
                 "operands": self.task.operands, "ood_eval_sequences": self.finetune.ood_eval_sequences,
                 "max_new_tokens": self.finetune.max_new_tokens, "loss_backend": self.loss_backend,
                 "format": 1}
        blob = json.dumps(parts, sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:16]


def default_config() -> StudyConfig:
    return StudyConfig()


def quick_config() -> StudyConfig:
    """About a minute on 2 cores, cold cache included: every method and code path, tiny sizes."""
    return StudyConfig(
        name="quick",
        corpus=CorpusConfig(use_docstrings=False, max_chars=120_000),
        model=ModelConfig(vocab_size=512, hidden_size=64, num_hidden_layers=2, num_attention_heads=2,
                          intermediate_size=128, max_position_embeddings=128),
        pretrain=PretrainConfig(seq_len=64, batch_size=16, steps=30, warmup_steps=5),
        task=TaskConfig(train_problems=32, eval_problems=16, entropy_probe=8),
        finetune=FinetuneConfig(lrs=(1e-3,), seeds=(0, 1), batch_size=8, epochs=2, warmup_steps=1, psft_k=2,
                                ood_eval_sequences=4, max_new_tokens=32),
    )
