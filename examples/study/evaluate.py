"""The three measurements: out-of-domain loss, in-domain exact match, entropy on the task's answers."""

from __future__ import annotations

from typing import Dict, List, Sequence

import torch

import psft_kernels as pk

from .base import lm_loss
from .task import Problem, parse_answer
from .tokenizer import TextCodec

IGNORE = -100


def encode_problem(codec: TextCodec, p: Problem) -> Dict[str, List[int]]:
    """input_ids / labels for one problem: <bos> prompt (masked) + solution <eos> (trained).

    Prompt and solution are encoded separately so that the boundary is the same at training and at
    generation time (greedy decoding starts right after the prompt's tokens)."""
    prompt = [codec.bos_id] + codec.encode(p.prompt)
    answer = codec.encode(p.solution) + [codec.eos_id]
    return {"input_ids": prompt + answer, "labels": [IGNORE] * len(prompt) + answer}


def collate(features: Sequence[Dict[str, List[int]]], pad_id: int) -> Dict[str, torch.Tensor]:
    """Right-pad a list of encoded problems; padding is masked out of attention and loss."""
    width = max(len(f["input_ids"]) for f in features)
    ids = torch.full((len(features), width), pad_id, dtype=torch.long)
    labels = torch.full((len(features), width), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(features), width), dtype=torch.long)
    for i, f in enumerate(features):
        n = len(f["input_ids"])
        ids[i, :n] = torch.tensor(f["input_ids"])
        labels[i, :n] = torch.tensor(f["labels"])
        mask[i, :n] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


@torch.no_grad()
def ood_loss(model, heldout: torch.Tensor, backend: str, batch: int = 16) -> float:
    """Token-mean NLL on the held-out general-text windows (B, T)."""
    total, count = 0.0, 0
    for i in range(0, heldout.shape[0], batch):
        chunk = heldout[i: i + batch]
        n = chunk.numel() - chunk.shape[0]
        total += lm_loss(model, chunk, backend).item() * n
        count += n
    return total / count


@torch.no_grad()
def answer_entropy(model, codec: TextCodec, problems: Sequence[Problem], backend: str) -> float:
    """Token-mean entropy (nats) of the model's next-token distribution at the solution tokens."""
    batch = collate([encode_problem(codec, p) for p in problems], codec.pad_id)
    hidden = model.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
    targets = batch["labels"][:, 1:]
    _, entropy = pk.linear_logprobs(hidden[:, :-1], model.get_output_embeddings().weight, targets, backend=backend)
    valid = targets.ne(IGNORE)
    return (entropy[valid].sum() / valid.sum()).item()


@torch.no_grad()
def greedy_solutions(model, codec: TextCodec, problems: Sequence[Problem], max_new_tokens: int) -> List[str]:
    """Greedy continuations of each prompt, up to <eos>, decoded to text.

    Prompts are grouped by token length, so a group needs no padding (the arithmetic prompts all
    have the same length) and the KV cache gives one token per forward pass."""
    prompts = [[codec.bos_id] + codec.encode(p.prompt) for p in problems]
    out: List[str] = [""] * len(prompts)
    by_len: Dict[int, List[int]] = {}
    for i, ids in enumerate(prompts):
        by_len.setdefault(len(ids), []).append(i)
    for idx in by_len.values():
        ids = torch.tensor([prompts[i] for i in idx])
        step = model(input_ids=ids, use_cache=True, logits_to_keep=1)
        tokens = []
        done = torch.zeros(len(idx), dtype=torch.bool)
        for _ in range(max_new_tokens):
            nxt = step.logits[:, -1].argmax(-1)
            nxt = torch.where(done, torch.full_like(nxt, codec.eos_id), nxt)
            tokens.append(nxt)
            done |= nxt.eq(codec.eos_id)
            if bool(done.all()):
                break
            step = model(input_ids=nxt[:, None], past_key_values=step.past_key_values, use_cache=True)
        gen = torch.stack(tokens, 1).tolist()
        for row, i in enumerate(idx):
            seq = gen[row]
            if codec.eos_id in seq:
                seq = seq[: seq.index(codec.eos_id)]
            out[i] = codec.decode(seq)
    return out


def accuracy(model, codec: TextCodec, problems: Sequence[Problem], max_new_tokens: int) -> tuple:
    """(exact-match accuracy of the greedy "Answer: N", the generated texts)."""
    texts = greedy_solutions(model, codec, problems, max_new_tokens)
    correct = sum(parse_answer(t) == p.answer for t, p in zip(texts, problems))
    return correct / len(problems), texts
