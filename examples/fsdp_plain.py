"""A plain training loop with FSDP2's ``fully_shard`` and a fused loss (PSFT, SFT, DFT or ASFT).

Runs on CPUs (gloo) as on GPUs (nccl), with as many processes as you launch:

    torchrun --standalone --nproc_per_node 2 examples/fsdp_plain.py --loss psft
    torchrun --standalone --nproc_per_node 2 examples/fsdp_plain.py --engine ddp --check

``--check`` also trains the same steps in one process on the concatenated batch (on every
rank, float64, no collectives) and reports the largest parameter difference: the sharded run
must reproduce it up to rounding (about 1e-15 here). The model is a tiny random-init Llama;
replace ``build_model`` with ``AutoModelForCausalLM.from_pretrained(...)`` for a real one.

What the fused loss needs from you (docs/distributed.md):
1. ``prepare_model(model)`` before ``fully_shard`` (or DDP / FSDP / ``deepspeed.initialize``):
   the loss is then computed inside the lm-head's own module call, where FSDP has the head whole;
2. ``num_items_in_batch = count_targets(micro_batches)``: the targets of the whole step, all
   processes; 3. ``(loss * world_size).backward()``: every engine averages gradients over processes.
"""

from __future__ import annotations

import argparse
import copy
import os

import torch
import torch.distributed as dist
import transformers

from psft_kernels.integrations.plain import count_targets, fused_logprobs, fused_loss, prepare_model

VOCAB = 128


def build_model(seed: int = 0, dtype=torch.float64):
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    return transformers.LlamaForCausalLM(cfg).to(dtype)


def step_batches(step: int, micro: int, seqs: int = 2, seed: int = 1):
    """The ``micro`` micro-batches of one optimizer step (random tokens, ragged lengths, prompts masked)."""
    g = torch.Generator().manual_seed(seed * 1000 + step)
    out = []
    for _ in range(micro):
        lengths = torch.randint(4, 17, (seqs,), generator=g).tolist()
        T = max(lengths)
        ids = torch.zeros(seqs, T, dtype=torch.long)
        labels = torch.full((seqs, T), -100)
        mask = torch.zeros(seqs, T, dtype=torch.long)
        for r, n in enumerate(lengths):
            ids[r, :n] = torch.randint(0, VOCAB, (n,), generator=g)
            labels[r, :n] = ids[r, :n]
            labels[r, : int(torch.randint(0, n - 2, (1,), generator=g))] = -100  # the prompt
            mask[r, :n] = 1
        out.append({"input_ids": ids, "attention_mask": mask, "labels": labels})
    return out


def train(model, steps, loss, lr, refresh, ref=None, world=1, rank=0, ga=2, distributed=True):
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=lr)
    old = {}
    for s in range(steps):
        all_batches = step_batches(s, ga * world)
        mine = all_batches[rank * ga:(rank + 1) * ga]  # this process's share of the step
        if loss == "psft" and s % refresh == 0:  # a pi_old group starts: score its steps once
            old = {(t, i): fused_logprobs(model, b) for t in range(s, min(s + refresh, steps))
                   for i, b in enumerate(step_batches(t, ga * world)[rank * ga:(rank + 1) * ga])}
        # 3. the step's targets over all processes (the one-process check counts its own, no collective)
        n = count_targets(mine) if distributed else sum(b["labels"][:, 1:].ne(-100).sum() for b in mine)
        for i, batch in enumerate(mine):
            value, stats = fused_loss(model, batch, loss_type=loss, old_logprobs=old.get((s, i)),
                                      num_items_in_batch=n, ref_model=ref)
            (value * world).backward()  # 4. the engine averages over processes: scale back up
        opt.step()
        opt.zero_grad()
        if rank == 0 and distributed:
            print(f"step {s}: nll {stats['nll'].item():.4f}" +
                  (f", clip_fraction {stats['clip_fraction'].item():.3f}" if loss == "psft" else ""))
    return model


def full_parameters(model):
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True))


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--loss", default="psft", choices=["psft", "sft", "dft", "asft"])
    parser.add_argument("--engine", default="fsdp2", choices=["fsdp2", "ddp"])
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--lr", type=float, default=1.0)
    parser.add_argument("--refresh", type=int, default=2, help="PSFT: optimizer steps per pi_old group (K)")
    parser.add_argument("--check", action="store_true", help="compare with one process on the concatenated batch")
    a = parser.parse_args()

    backend = "nccl" if torch.cuda.is_available() else "gloo"
    dist.init_process_group(backend)
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    start = build_model()
    ref = build_model(seed=1).requires_grad_(False) if a.loss == "asft" else None  # held whole, never sharded

    model = prepare_model(copy.deepcopy(start))  # 1. before the engine wraps it
    if a.engine == "fsdp2":
        from torch.distributed.fsdp import fully_shard
        for layer in model.model.layers:  # 2. one unit per layer, the rest (embeddings, head) in the root
            fully_shard(layer)
        fully_shard(model)  # the root is resharded after forward: the head exists whole only in its call
        runner = model
    else:
        runner = torch.nn.parallel.DistributedDataParallel(model)
    train(runner, a.steps, a.loss, a.lr, a.refresh, ref=ref, world=world, rank=rank)

    if a.check:
        got = full_parameters(runner)
        single = copy.deepcopy(start)
        train(single, a.steps, a.loss, a.lr, a.refresh, ref=ref, world=1, rank=0, ga=2 * world, distributed=False)
        diff = max((got[k] - v).abs().max().item() for k, v in single.named_parameters())
        moved = max((v - p).abs().max().item() for (_, v), p in zip(single.named_parameters(), start.parameters()))
        print(f"rank {rank}: max |sharded - one process| = {diff:.3e} (weights moved by up to {moved:.3f})")
        assert diff <= 1e-10, diff
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
