"""The base model: a small Llama-style decoder pretrained on general English text, cached.

Pretraining is a plain PyTorch loop whose loss is ``psft_kernels.linear_sft_loss`` on the last
hidden states and the (tied) embedding matrix. The tokenizer, the weights and a ``meta.json``
(pretraining curve, time, corpus sizes) are cached under ``<cache>/<preset>-<hash of the config
and Python version>``; a later run with the same key loads them instead of pretraining. The result
is the same either way (fixed seeds), so committed results never depend on the cache.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
import time
from typing import List, Optional

import torch

import psft_kernels as pk

from .config import ModelConfig, StudyConfig
from .corpus import load_corpus
from .tokenizer import TextCodec, train_tokenizer

CACHE_ENV = "PSFT_STUDY_CACHE"


def default_cache_root() -> str:
    return os.environ.get(CACHE_ENV) or os.path.join(os.path.expanduser("~"), ".cache", "psft_kernels_study")


def build_model(cfg: ModelConfig, codec: TextCodec):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=codec.vocab_size, hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_hidden_layers, num_attention_heads=cfg.num_attention_heads,
        num_key_value_heads=cfg.num_attention_heads, max_position_embeddings=cfg.max_position_embeddings,
        tie_word_embeddings=True, pad_token_id=codec.pad_id, bos_token_id=codec.bos_id, eos_token_id=codec.eos_id,
        attention_dropout=0.0,
    )
    return LlamaForCausalLM(config)


def load_base(path: str):
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(os.path.join(path, "model"), dtype=torch.float32)
    model.eval()
    return model


def token_stream(codec: TextCodec, docs: List[str]) -> torch.Tensor:
    """Documents as one 1-D stream: <bos> text <eos> <bos> text <eos> ..."""
    ids = []
    for doc_ids in codec.encode_batch(docs):
        ids += [codec.bos_id] + doc_ids + [codec.eos_id]
    return torch.tensor(ids, dtype=torch.long)


def windows(stream: torch.Tensor, seq_len: int, count: int) -> torch.Tensor:
    """The first ``count`` non-overlapping windows of ``seq_len`` tokens (fewer if the stream is short)."""
    n = min(count, stream.numel() // seq_len)
    return stream[: n * seq_len].view(n, seq_len)


def lm_loss(model, ids: torch.Tensor, backend: str) -> torch.Tensor:
    """Token-mean next-token NLL of ``ids`` (B, T) through the fused head: no (B, T, V) logits."""
    hidden = model.model(input_ids=ids).last_hidden_state[:, :-1]
    return pk.linear_sft_loss(hidden, model.get_output_embeddings().weight, ids[:, 1:], backend=backend)


def _lr_at(step: int, cfg) -> float:
    if step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    progress = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))  # cosine down to 10%


def fact_accuracy(model, codec: TextCodec, cfg: StudyConfig) -> float:
    """Greedy exact match on every two-number sum the task's solutions use (the base's knowledge)."""
    from .evaluate import accuracy
    from .task import Problem

    top = 9 * (cfg.task.operands - 1)
    facts = [Problem((a, b), "forward") for a in range(top + 1) for b in range(10)]
    return accuracy(model, codec, facts, cfg.finetune.max_new_tokens)[0]


def pretrain(cfg: StudyConfig, out_dir: str, log=print) -> dict:
    t0 = time.perf_counter()
    train_docs, heldout_docs, is_arith = load_corpus(cfg.corpus, cfg.task)
    n_arith = sum(is_arith)
    codec = TextCodec(train_tokenizer(train_docs, cfg.model.vocab_size))
    codec.tok.save(os.path.join(out_dir, "tokenizer.json"))
    stream = token_stream(codec, train_docs)
    arith_tokens = sum(len(ids) + 2 for a, ids in zip(is_arith, codec.encode_batch(train_docs)) if a)
    heldout = windows(token_stream(codec, heldout_docs), cfg.pretrain.seq_len, cfg.finetune.ood_eval_sequences)
    t_data = time.perf_counter() - t0
    share = arith_tokens / stream.numel()
    log(f"  corpus: {len(train_docs)} documents ({n_arith} of worked two-number sums, {share:.0%} of the tokens),"
        f" {stream.numel()} tokens for pretraining; {len(heldout_docs)} held-out documents "
        f"({t_data:.1f}s incl. tokenizer)")

    p = cfg.pretrain
    torch.manual_seed(p.seed)
    model = build_model(cfg.model, codec)
    n_params = sum(t.numel() for t in model.parameters())
    decay = [t for n, t in model.named_parameters() if t.dim() >= 2]
    no_decay = [t for n, t in model.named_parameters() if t.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": p.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=p.lr, betas=(0.9, 0.95))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: _lr_at(s, p))
    gen = torch.Generator().manual_seed(p.seed)
    curve = []
    model.train()
    t1 = time.perf_counter()
    for step in range(p.steps):
        starts = torch.randint(0, stream.numel() - p.seq_len, (p.batch_size,), generator=gen)
        batch = torch.stack([stream[s: s + p.seq_len] for s in starts.tolist()])
        loss = lm_loss(model, batch, cfg.loss_backend)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        if step % max(1, p.steps // 10) == 0 or step == p.steps - 1:
            curve.append({"step": step, "loss": loss.item()})
            log(f"  pretrain step {step:4d}/{p.steps}  loss {loss.item():.3f}  ({time.perf_counter() - t1:.0f}s)")
    model.eval()
    with torch.no_grad():
        heldout_loss = lm_loss(model, heldout, cfg.loss_backend).item()
    facts = fact_accuracy(model, codec, cfg)
    log(f"  base model: held-out text loss {heldout_loss:.3f}; two-number sums answered right: {facts:.0%}")
    model.save_pretrained(os.path.join(out_dir, "model"))
    meta = {
        "key": cfg.base_key(), "params": n_params, "vocab_size": codec.vocab_size,
        "pretrain_tokens_in_corpus": stream.numel(), "pretrain_tokens_seen": p.steps * p.batch_size * p.seq_len,
        "train_documents": len(train_docs), "arithmetic_documents": n_arith,
        "arithmetic_token_share": arith_tokens / stream.numel(), "heldout_documents": len(heldout_docs),
        "heldout_tokens_evaluated": heldout.numel(), "heldout_loss": heldout_loss,
        "two_number_sum_accuracy": facts, "curve": curve,
        "seconds_data": t_data, "seconds_pretrain": time.perf_counter() - t1,
        "torch_threads": torch.get_num_threads(),
    }
    with open(os.path.join(out_dir, "meta.json"), "w") as f:
        json.dump(meta, f, indent=1)
    torch.save(heldout, os.path.join(out_dir, "heldout_windows.pt"))
    return meta


def ensure_base(cfg: StudyConfig, cache_root: Optional[str] = None, log=print) -> tuple:
    """(path, meta, was_cached): the cached base for this config, pretraining it if absent."""
    root = cache_root or default_cache_root()
    path = os.path.join(root, f"{cfg.name}-{cfg.base_key()}")
    meta_path = os.path.join(path, "meta.json")
    if os.path.exists(meta_path):
        with open(meta_path) as f:
            return path, json.load(f), True
    os.makedirs(root, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".building-", dir=root)
    try:
        meta = pretrain(cfg, tmp, log=log)
        try:
            os.replace(tmp, path)  # atomic: a concurrent run that finished first wins, ours is dropped
        except OSError:
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path, meta, False
