"""Run by tests/test_distributed.py under torchrun (2 CPU processes, gloo); writes one JSON per rank.

    python -m torch.distributed.run --standalone --nproc_per_node 2 tests/distributed_worker.py MODE OUT_DIR

MODE ``plain``: the plain-loop API (psft_kernels.integrations.plain) under DDP, FSDP2
(``fully_shard``, root resharded after forward or not), FSDP1 (``use_orig_params`` True/False);
MODE ``deepspeed``: the same under ``deepspeed.initialize`` at ZeRO-2 and ZeRO-3; MODE ``trainer``:
PSFTTrainer with accelerate's FSDP2 / FSDP1 / DeepSpeed ZeRO-2 / ZeRO-3 forced on the CPU
(psft_kernels.integrations.cpu_engines: accelerate would silently run DDP there).

Every case trains 3 optimizer steps (SGD) of SFT, DFT, PSFT (K=2) or ASFT on 2 processes x 2
micro-batches of 2 sequences of different lengths (ragged token counts), and the same steps in one
process on the concatenated batch (the 4 micro-batches, no collectives); the result records the
largest parameter difference, facts showing that the engine is really active, and PSFT's clip
fraction. The pytest side holds the tolerances.
"""

from __future__ import annotations

import contextlib
import copy
import json
import os
import sys
import traceback
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
torch.set_num_threads(1)
import faulthandler  # noqa: E402
faulthandler.enable()

import transformers  # noqa: E402

from psft_kernels.integrations.cpu_engines import force_engine  # noqa: E402
from psft_kernels.integrations.plain import count_targets, fused_logprobs, fused_loss, prepare_model  # noqa: E402

VOCAB = 101
STEPS, GA, SEQS, K = 3, 2, 2, 2
# Large enough that every loss moves the weights by O(0.1) in 3 steps and that PSFT's second step
# of a group clips some tokens (DFT and ASFT's gradients are weighted by p ~ 1/V).
LR = {"sft": 2.0, "sft_none": 2.0, "psft": 2.0, "dft": 100.0, "asft": 100.0}
# sft_none: SFT through reduction="none", summed and divided by the step's target count by the caller
LOSSES = ("sft", "dft", "psft", "asft", "sft_none")


def make_model(kind: str, seed: int = 0, dtype=torch.float64) -> nn.Module:
    torch.manual_seed(seed)
    common = dict(vocab_size=VOCAB, hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
                  num_key_value_heads=1, max_position_embeddings=64)
    if kind == "qwen2":  # q/k/v biases
        cfg = transformers.Qwen2Config(**common)
    elif kind == "phi":  # an lm-head bias
        cfg = transformers.PhiConfig(**{k: v for k, v in common.items() if k != "num_key_value_heads"},
                                     resid_pdrop=0.0, embd_pdrop=0.0, attention_dropout=0.0)
    elif kind == "gemma2":  # final_logit_softcapping (a small cap, so that it matters)
        cfg = transformers.Gemma2Config(head_dim=8, final_logit_softcapping=0.5, **common)
    else:
        cfg = transformers.LlamaConfig(tie_word_embeddings=kind == "llama_tied", **common)
    model = transformers.AutoModelForCausalLM.from_config(cfg).to(dtype)
    if kind == "llama_ckpt":
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if kind == "llama_lora":
        import peft
        torch.manual_seed(seed + 100)
        model = peft.get_peft_model(model, peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"],
                                                           init_lora_weights=False))
    return model


def decoder(model: nn.Module) -> nn.Module:
    """The decoder (``.layers``, ``.norm``, ``.embed_tokens``) of a causal LM, inside a peft model too."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return base.model


def micro_batches(world: int, seed: int = 1):
    """``[step][micro-batch]`` for one process on the concatenated batch; process r of ``world`` takes
    micro-batches r*GA .. r*GA+GA-1 of each step. Lengths and prompt masks vary: token counts differ."""
    g = torch.Generator().manual_seed(seed)
    steps = []
    for _ in range(STEPS):
        step = []
        for _ in range(world * GA):
            rows = []
            for _ in range(SEQS):
                n = int(torch.randint(3, 15, (1,), generator=g))
                ids = torch.randint(0, VOCAB, (n,), generator=g)
                labels = ids.clone()
                labels[: int(torch.randint(0, n - 1, (1,), generator=g))] = -100
                rows.append((ids, labels))
            T = max(len(i) for i, _ in rows)
            ids = torch.zeros(SEQS, T, dtype=torch.long)
            labels = torch.full((SEQS, T), -100)
            mask = torch.zeros(SEQS, T, dtype=torch.long)
            for r, (i, lab) in enumerate(rows):
                ids[r, :len(i)], labels[r, :len(i)], mask[r, :len(i)] = i, lab, 1
            step.append({"input_ids": ids, "attention_mask": mask, "labels": labels})
        steps.append(step)
    return steps


def step_loss(runner, batch, loss_type, old, n, ref, monitor=None, stats_out=None):
    opts = {"backend": "chunked", "chunk_size": 4} if monitor is not None else {}
    if loss_type == "sft_none":
        per_token, _ = fused_loss(runner, batch, loss_type="sft", reduction="none", ref_model=ref, **opts)
        return per_token.sum() / n
    loss, stats = fused_loss(runner, batch, loss_type=loss_type, old_logprobs=old, num_items_in_batch=n,
                             ref_model=ref, kl_coef=0.5, **opts)
    if stats_out is not None and loss_type == "psft":
        stats_out.append(float(stats["clip_fraction"]))
    return loss


def train(runner: nn.Module, steps, loss_type: str, ref=None, world: int = 1, reduce=True, monitor=None):
    """3 SGD steps through the plain-loop API. ``world``: the factor that undoes the engine's average."""
    opt = torch.optim.SGD([p for p in runner.parameters() if p.requires_grad], lr=LR[loss_type])
    clip = []
    old = {}
    for s, step in enumerate(steps):
        if loss_type == "psft" and s % K == 0:  # a pi_old group starts: score its steps once
            old = {(t, i): fused_logprobs(runner, b) for t in range(s, min(s + K, STEPS))
                   for i, b in enumerate(steps[t])}
        n = count_targets(step) if reduce else sum(b["labels"][:, 1:].ne(-100).sum() for b in step)
        for i, batch in enumerate(step):
            with monitor if (monitor is not None and s == 0 and i == 1) else contextlib.nullcontext():
                loss = step_loss(runner, batch, loss_type, old.get((s, i)), n, ref, monitor, clip)
                (loss * world).backward()
        opt.step()
        opt.zero_grad()
    return clip


class LogitsWatch(TorchDispatchMode):
    """Records the most token rows of any logits-like tensor an op produces: a tensor with a
    vocabulary-sized dimension, other than the head's weight, its bias and their gradients."""

    def __init__(self, vocab: int, hidden: int):
        super().__init__()
        self.vocab, self.skip, self.rows = vocab, {(vocab, hidden), (hidden, vocab), (vocab,)}, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in (out if isinstance(out, (tuple, list)) else (out,)):
            if isinstance(t, torch.Tensor) and self.vocab in t.shape and tuple(t.shape) not in self.skip:
                self.rows = max(self.rows, t.numel() // self.vocab)
        return out


def full_params(runner: nn.Module, engine: str) -> dict:
    if engine.startswith("zero"):
        import deepspeed
        module = runner.module
        params = list(module.parameters())
        with deepspeed.zero.GatheredParameters(params) if engine == "zero3" else contextlib.nullcontext():
            return {k: v.detach().clone() for k, v in module.named_parameters()}
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    sd = get_model_state_dict(runner, options=StateDictOptions(full_state_dict=True))
    return {k: v.detach().clone() for k, v in sd.items()}


def compare(got: dict, want: nn.Module) -> dict:
    want = dict(want.named_parameters())
    missing = sorted(set(want) - set(got))
    diff = max(((got[k].to(torch.float64) - want[k].to(torch.float64)).abs().max().item() for k in want if k in got))
    return {"max_abs_diff": diff, "missing": missing}


# ----------------------------------------------------------------------------------------------
# Engines for the plain loop
# ----------------------------------------------------------------------------------------------


def wrap(engine: str, model: nn.Module, world: int, lr: float = 0.0):
    """The engine's wrapper around a prepared model, and facts that show the engine is active."""
    dec = decoder(model)
    head = (model.get_base_model() if hasattr(model, "get_base_model") else model).lm_head
    layers = type(dec.layers[0])
    if engine == "ddp":
        w = nn.parallel.DistributedDataParallel(model)
        return w, {"ddp": isinstance(w, nn.parallel.DistributedDataParallel)}
    if engine.startswith("fsdp2"):
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard
        from torch.distributed.tensor import DTensor
        mesh = init_device_mesh("cpu", (world,))
        offload = {}
        if engine == "fsdp2_offload":  # parameters kept on the CPU, copied to the device for each unit's call
            from torch.distributed.fsdp import CPUOffloadPolicy
            offload = {"offload_policy": CPUOffloadPolicy(pin_memory=False)}
        for layer in dec.layers:
            fully_shard(layer, mesh=mesh, **offload)
        # A tied head shares its weight with the input embedding: both must be in one unit.
        tied = [dec.embed_tokens] if head.weight is dec.embed_tokens.weight else []
        if engine == "fsdp2_head_unit":  # the lm-head in a unit with the final norm, as accelerate does
            fully_shard([dec.norm, *tied, head], mesh=mesh, reshard_after_forward=False, **offload)
        if engine == "fsdp2_head_alone":  # the lm-head a unit of its own, resharded after its call
            fully_shard([*tied, head], mesh=mesh, **offload)
        reshard_root = engine in ("fsdp2_reshard_root", "fsdp2_offload")
        fully_shard(model, mesh=mesh, reshard_after_forward=reshard_root, **offload)
        return model, {"all_dtensor": all(isinstance(p, DTensor) for p in model.parameters()),
                       "local_rows": head.weight.to_local().shape[0], "rows": VOCAB,
                       "reshard_root": reshard_root}
    if engine.startswith("fsdp1"):
        from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
        from torch.distributed.fsdp.wrap import ModuleWrapPolicy
        orig = engine == "fsdp1_orig_params"
        w = FSDP(model, auto_wrap_policy=ModuleWrapPolicy({layers}), use_orig_params=orig,
                 device_id=torch.device("cpu"), sync_module_states=False)
        units = sum(isinstance(m, FSDP) for m in w.modules())
        flat = [p for p in w.parameters() if getattr(p, "_is_flat_param", False)]
        return w, {"fsdp1": isinstance(w, FSDP), "units": units, "use_orig_params": orig,
                   "flat_params": len(flat), "sharded": all(p.numel() < sum(q.numel() for q in model.parameters())
                                                              for p in w.parameters())}
    if engine.startswith("zero"):
        import deepspeed
        stage = int(engine[-1])
        cfg = {"train_micro_batch_size_per_gpu": SEQS, "gradient_accumulation_steps": GA,
               "zero_optimization": {"stage": stage, "stage3_param_persistence_threshold": 0},
               "zero_allow_untested_optimizer": True, "gradient_clipping": 0.0}
        params = [p for p in model.parameters() if p.requires_grad]
        w, *_ = deepspeed.initialize(model=model, optimizer=torch.optim.SGD(params, lr=lr), config=cfg)
        return w, {"stage": w.zero_optimization_stage(), "head_numel_at_rest": head.weight.numel(),
                   "head_ds_numel": getattr(head.weight, "ds_numel", None)}
    raise ValueError(engine)


def train_deepspeed(engine, steps, loss_type, ref, world, monitor=None):
    """DeepSpeed owns the optimizer and its accumulation: backward / step through the engine."""
    clip, old = [], {}
    for s, step in enumerate(steps):
        if loss_type == "psft" and s % K == 0:
            old = {(t, i): fused_logprobs(engine, b) for t in range(s, min(s + K, STEPS))
                   for i, b in enumerate(steps[t])}
        n = count_targets(step)
        for i, batch in enumerate(step):
            with monitor if (monitor is not None and s == 0 and i == 1) else contextlib.nullcontext():
                loss = step_loss(engine, batch, loss_type, old.get((s, i)), n, ref, monitor, clip)
                engine.backward(loss * world, scale_wrt_gas=False)
            engine.step()  # an optimizer step only at the accumulation boundary (every GA micro-batches)
    return clip


def plain_case(engine: str, kind: str, loss_type: str, rank: int, world: int, dtype) -> dict:
    start = make_model(kind, dtype=dtype)
    # ASFT's reference: a separate frozen model, or for a peft model its base with the adapter off.
    ref = make_model(kind, seed=1, dtype=dtype).requires_grad_(False) if loss_type == "asft" and \
        kind != "llama_lora" else None
    steps = micro_batches(world)
    mine = [[b for b in step[rank * GA:(rank + 1) * GA]] for step in steps]
    single = copy.deepcopy(start)
    # The truth: the same steps in one process, reduction="mean" over the concatenated batch.
    train(single, steps, "sft" if loss_type == "sft_none" else loss_type, ref=ref, reduce=False)
    single_lr = LR[loss_type]
    model = prepare_model(copy.deepcopy(start))
    runner, facts = wrap(engine, model, world, single_lr)
    watch = LogitsWatch(VOCAB, start.config.hidden_size) if loss_type == "sft" else None
    if engine.startswith("zero"):
        clip = train_deepspeed(runner, mine, loss_type, ref, world, watch)
    else:
        clip = train(runner, mine, loss_type, ref=ref, world=world, monitor=watch)
    got = full_params(runner, engine)
    out = {"engine": engine, "model": kind, "loss": loss_type, "dtype": str(dtype), "facts": facts,
           "clip": clip, "moved": max((p - q).abs().max().item() for p, q in
                                      zip(single.parameters(), start.parameters())),
           **compare(got, single)}
    if dtype != torch.float64:
        # The float64 truth, to hold this run's error to the single-process run's error at its dtype.
        truth = start.double()
        train(truth, steps, "sft" if loss_type == "sft_none" else loss_type,
              ref=None if ref is None else ref.double(), reduce=False)
        out["err_vs_truth"] = compare(got, truth)["max_abs_diff"]
        out["single_err_vs_truth"] = compare({k: v.detach() for k, v in single.named_parameters()},
                                             truth)["max_abs_diff"]
    if watch is not None:
        # The fused path's largest logits block (chunk_size=4 rows), watched on the second micro-batch
        # (the first runs the once-per-model head probe: <= 32 tokens of one row), then the watch's own check:
        # the model's plain forward under the same engine must show its (B, T, V) logits.
        out["fused_logit_rows"], out["tokens"] = watch.rows, mine[0][1]["input_ids"].numel()
        plain = LogitsWatch(VOCAB, start.config.hidden_size)
        with torch.no_grad(), plain:
            runner(**{k: v for k, v in mine[0][1].items() if k != "labels"})
        out["plain_logit_rows"] = plain.rows
    return out


# Every loss on the untied Llama; the tied head and Qwen2's biases with SFT and PSFT (what they change
# is the head's and the layers' parameters, not the loss): keeps the suite's distributed part short.
CASES = [("llama", loss) for loss in LOSSES] + [(kind, loss) for kind in ("llama_tied", "qwen2")
                                                for loss in ("sft", "psft")]
# Options, under the engines that shard the head at rest: an lm-head bias, softcap, gradient
# checkpointing, peft LoRA (ASFT's reference then is the base model with the adapter disabled).
OPTION_CASES = [("phi", "sft"), ("gemma2", "psft"), ("llama_ckpt", "sft"), ("llama_lora", "psft"),
                ("llama_lora", "asft")]
OPTION_ENGINES = ("fsdp2_reshard_root", "fsdp1_orig_params", "zero3")  # FSDP1 flat params refuse LoRA itself
LAYOUT_CASES = [("llama", "sft"), ("llama", "psft"), ("llama_tied", "sft")]


def refused_case(engine, kind, loss_type, rank, world, dtype) -> dict:
    """A set-up the integration refuses under this engine: the error, before any step."""
    model = prepare_model(make_model(kind, dtype=dtype))
    runner, facts = wrap(engine, model, world)
    batch = micro_batches(world)[0][rank * GA]
    try:
        fused_loss(runner, batch, loss_type=loss_type, num_items_in_batch=count_targets([batch]))
    except ValueError as e:
        return {"engine": engine, "model": kind, "loss": loss_type, "facts": facts, "refused": str(e)}
    return {"engine": engine, "model": kind, "loss": loss_type, "error": "not refused"}


def run_plain(rank, world, engines, dtype):
    results = []
    for engine in engines:
        # Variants of FSDP2's layout: the head-relevant cases only (the losses run the same code).
        cases = LAYOUT_CASES if engine in ("fsdp2_keep_root", "fsdp2_head_alone", "fsdp2_offload") else CASES
        for kind, loss_type in cases + (OPTION_CASES if engine in OPTION_ENGINES else []):
            if engine.startswith("fsdp1") and (kind, loss_type) == ("llama_lora", "asft"):
                results.append(refused_case(engine, kind, loss_type, rank, world, dtype))
                continue
            try:
                results.append(plain_case(engine, kind, loss_type, rank, world, dtype))
            except Exception:  # recorded, so that the test names the failing case
                results.append({"engine": engine, "model": kind, "loss": loss_type,
                                "error": traceback.format_exc()[-3000:]})
                if engine.startswith(("fsdp", "zero")):
                    raise  # a collective may be left half-done: stop rather than hang
    return results


# ----------------------------------------------------------------------------------------------
# PSFTTrainer under accelerate's FSDP / DeepSpeed, forced on the CPU
# ----------------------------------------------------------------------------------------------


TRAINER_LR = {"sft": 2.0, "psft": 3.0, "dft": 150.0, "asft": 150.0}  # as LR, for test_hf's llama
# FSDP2 and ZeRO-3 (the engines that shard the head at rest) with every loss; the others with SFT
# (untied and tied) and PSFT.
TRAINER_CASES = {"fsdp2": ("sft", "dft", "psft", "asft"), "zero3": ("sft", "dft", "psft", "asft"),
                 "fsdp1_orig_params": ("sft", "psft"), "fsdp1_flat_params": ("sft", "psft"), "zero2": ("sft", "psft")}


def trainer_args(out_dir, loss_type: str, **kw):
    """The PSFTConfig of a trainer case; the single-process truth uses it with twice the accumulation."""
    import test_hf as T
    return T.config(Path(out_dir), loss_type=loss_type, max_steps=3, old_policy_refresh_steps=K,
                    learning_rate=TRAINER_LR[loss_type], **kw)


def trainer_case(engine: str, loss_type: str, tied: bool, rank: int, out_dir: str) -> dict:
    import test_hf as T
    from psft_kernels.integrations.hf import PSFTTrainer
    extra = force_engine(engine.split("_")[0], ["LlamaDecoderLayer"], use_orig_params=engine != "fsdp1_flat_params")
    model = T.llama(tie_word_embeddings=tied)
    ref = T.llama(seed=1) if loss_type == "asft" else None
    args = trainer_args(Path(out_dir) / engine, loss_type, gradient_accumulation_steps=2,
                        average_tokens_across_devices=True, **extra)
    trainer = PSFTTrainer(model=model, args=args, train_dataset=T.examples(), data_collator=T.collate, ref_model=ref)
    trainer.train()
    wrapped = trainer.model_wrapped
    facts = {"engine": trainer.engine, "wrapper": type(wrapped).__name__}
    if engine.startswith("zero"):
        facts.update(stage=wrapped.zero_optimization_stage(),
                     head_numel_at_rest=wrapped.module.lm_head.weight.numel())
        params = full_params(wrapped, "zero3" if engine == "zero3" else "zero2")
    else:
        from torch.distributed.tensor import DTensor
        facts.update(all_dtensor=all(isinstance(p, DTensor) for p in trainer.model.parameters()),
                     fsdp1_units=sum(type(m).__name__ == "FullyShardedDataParallel" for m in wrapped.modules()))
        params = full_params(wrapped, engine)
    name = f"{engine}-{loss_type}-{'tied' if tied else 'untied'}"
    if rank == 0:
        torch.save(params, os.path.join(out_dir, f"{name}.pt"))
    return {"case": name, "engine": engine, "loss": loss_type, "tied": tied, "facts": facts,
            "logs": T.step_logs(trainer)}


def run_trainer(rank, out_dir, engines):
    results = []
    for engine in engines:
        for loss_type in TRAINER_CASES[engine]:
            for tied in ((False, True) if loss_type == "sft" else (False,)):
                results.append(trainer_case(engine, loss_type, tied, rank, out_dir))
    return results


def main(mode: str, out_dir: str) -> None:
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    if mode == "plain":
        results = run_plain(rank, world, ["ddp", "fsdp2_reshard_root", "fsdp2_keep_root", "fsdp2_head_unit",
                                          "fsdp2_head_alone", "fsdp2_offload", "fsdp1_orig_params",
                                          "fsdp1_flat_params"], torch.float64)
    elif mode == "deepspeed":
        results = run_plain(rank, world, ["zero2", "zero3"], torch.float32)
    elif mode == "trainer":
        results = run_trainer(rank, out_dir, list(TRAINER_CASES))
    else:
        raise ValueError(mode)
    with open(os.path.join(out_dir, f"{mode}{rank}.json"), "w") as f:
        json.dump(results, f)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
