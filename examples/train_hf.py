"""Fine-tune a causal LM with PSFT, SFT, DFT or ASFT through the Hugging Face Trainer.

    python examples/train_hf.py --loss psft --max-steps 20 --output-dir runs/psft
    python examples/train_hf.py --loss asft --model path/to/local/model --dataset data.jsonl --output-dir runs/asft

Offline by default: a small Llama-style model built from a config, a byte-level tokenizer, and a
generated data set of two-digit additions ("17+25=" -> "42"), the prompt masked out of the loss.
With --model, any local Hugging Face causal LM and its tokenizer (nothing is downloaded). With
--dataset, a .jsonl file of {"prompt": ..., "completion": ...} or {"text": ...} objects, or a
.txt file with one training text per line.

Several processes: launch with torchrun (or accelerate launch / deepspeed) and pick the engine with
--engine ddp | fsdp1 | fsdp2 | zero2 | zero3 (docs/distributed.md). On CPUs the engine is forced
through psft_kernels.integrations.cpu_engines (accelerate would silently run DDP there):

    torchrun --standalone --nproc_per_node 2 examples/train_hf.py --engine fsdp2 --max-steps 5 --output-dir runs/fsdp2

Writes OUTPUT_DIR/metrics.jsonl: one JSON object per logged step (loss, nll, entropy, tokens,
and clip_fraction / ratio_mean / approx_kl for PSFT, kl for ASFT, plus step).
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import os
import random
import time

import torch

from psft_kernels.integrations.hf import LOSS_TYPES, MetricsJsonlCallback, PSFTConfig, PSFTTrainer


class ByteTokenizer:
    """Bytes as tokens: ids 0-2 are pad / bos / eos, byte b is id b + 3."""

    pad_token_id, bos_token_id, eos_token_id = 0, 1, 2
    vocab_size = 259

    def encode(self, text: str, bos: bool = False):
        return ([self.bos_token_id] if bos else []) + [b + 3 for b in text.encode("utf-8")]


class HFTokenizer:
    """The model's own tokenizer behind the same two calls."""

    def __init__(self, path: str):
        from transformers import AutoTokenizer

        self.tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
        self.eos_token_id = self.tok.eos_token_id
        pad = self.tok.pad_token_id
        self.pad_token_id = pad if pad is not None else (self.eos_token_id or 0)

    def encode(self, text: str, bos: bool = False):
        return self.tok(text, add_special_tokens=bos)["input_ids"]


def additions(n: int, seed: int):
    rng = random.Random(seed)
    pairs = [(rng.randrange(10, 100), rng.randrange(10, 100)) for _ in range(n)]
    return [{"prompt": f"{a}+{b}=", "completion": str(a + b)} for a, b in pairs]


def load_records(path: str):
    with open(path, encoding="utf-8") as f:
        if path.endswith(".jsonl"):
            return [json.loads(line) for line in f if line.strip()]
        return [{"text": line.rstrip("\n")} for line in f if line.strip()]


def tokenize(records, tok, max_len: int):
    """input_ids / labels lists; the prompt's tokens are masked (-100), the completion ends with eos."""
    out = []
    for r in records:
        if "text" in r:
            prompt, completion = tok.encode(r["text"], bos=True), []
            labels = list(prompt)
        else:
            prompt = tok.encode(r["prompt"], bos=True)
            completion = tok.encode(r["completion"]) + ([tok.eos_token_id] if tok.eos_token_id is not None else [])
            labels = [-100] * len(prompt) + completion
        ids = (prompt + completion)[:max_len]
        out.append({"input_ids": ids, "labels": labels[:max_len]})
    return out


class PadCollator:
    def __init__(self, pad_id: int):
        self.pad_id = pad_id

    def __call__(self, features):
        T = max(len(f["input_ids"]) for f in features)
        ids = torch.full((len(features), T), self.pad_id, dtype=torch.long)
        labels = torch.full((len(features), T), -100, dtype=torch.long)
        mask = torch.zeros((len(features), T), dtype=torch.long)
        for i, f in enumerate(features):
            n = len(f["input_ids"])
            ids[i, :n] = torch.tensor(f["input_ids"])
            labels[i, :n] = torch.tensor(f["labels"])
            mask[i, :n] = 1
        return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def build_model(args, vocab_size: int):
    from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

    dtype = torch.bfloat16 if args.bf16_model else torch.float32
    if args.model:
        return AutoModelForCausalLM.from_pretrained(args.model, local_files_only=True, dtype=dtype)
    torch.manual_seed(args.seed)
    config = LlamaConfig(vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                         tie_word_embeddings=True)
    return LlamaForCausalLM(config).to(dtype)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--loss", choices=LOSS_TYPES, default="psft")
    p.add_argument("--max-steps", type=int, default=50)
    p.add_argument("--output-dir", required=True)
    p.add_argument("--model", help="a local Hugging Face causal LM directory (default: a small built-in Llama)")
    p.add_argument("--dataset", help=".jsonl of prompt/completion or text objects, or .txt (default: generated)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--grad-accum", type=int, default=2)
    p.add_argument("--lr", type=float, help="default: 3e-3 for the built-in model, 1e-5 with --model")
    p.add_argument("--refresh-steps", type=int, default=4, help="PSFT: optimizer steps per pi_old refresh (K)")
    p.add_argument("--sft-warmup-steps", type=int, default=0)
    p.add_argument("--kl-coef", type=float, default=0.05)
    p.add_argument("--max-len", type=int, default=512)
    p.add_argument("--lora", action="store_true", help="train a peft LoRA adapter (ASFT's reference: adapter off)")
    p.add_argument("--bf16-model", action="store_true", help="load / build the model in bfloat16")
    p.add_argument("--gradient-checkpointing", action="store_true")
    p.add_argument("--backend", default="auto", help="psft_kernels backend")
    p.add_argument("--logging-steps", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--engine", choices=["auto", "ddp", "fsdp1", "fsdp2", "zero2", "zero3"], default="auto",
                   help="distributed engine (auto: what the launcher / accelerate config says)")
    # The deepspeed launcher passes --local_rank; the process reads its rank from the environment.
    p.add_argument("--local_rank", "--local-rank", type=int, default=-1, help=argparse.SUPPRESS)
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    return p.parse_args(argv)


def engine_arguments(engine: str, model) -> dict:
    """TrainingArguments that select ``engine``; on CPUs accelerate's state is forced (cpu_engines)."""
    if engine == "auto":
        return {}
    layers = list(getattr(model, "_no_split_modules", None) or []) or None  # FSDP's units: the decoder layers
    if not torch.cuda.is_available():
        from psft_kernels.integrations.cpu_engines import force_engine

        return force_engine(engine, layers)
    if engine.startswith("zero"):
        from psft_kernels.integrations.cpu_engines import deepspeed_config

        return {"deepspeed": deepspeed_config(int(engine[-1]))}
    if engine.startswith("fsdp"):
        return {"fsdp": "full_shard auto_wrap",
                "fsdp_config": {"version": int(engine[-1]), "transformer_layer_cls_to_wrap": layers}}
    return {}


def main(argv=None) -> str:
    """Runs the training; returns the path of metrics.jsonl."""
    args = parse_args(argv)
    if not args.model and not torch.cuda.is_available():
        # The built-in model is tiny: extra CPU threads only wait on each other (badly so on a busy machine).
        torch.set_num_threads(1)
    tok = HFTokenizer(args.model) if args.model else ByteTokenizer()
    records = load_records(args.dataset) if args.dataset else additions(2048, args.seed)
    train = tokenize(records, tok, args.max_len)
    model = build_model(args, getattr(tok, "vocab_size", None))
    ref_model = None
    if args.lora:
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"]))
    elif args.loss == "asft":
        ref_model = copy.deepcopy(model)  # the frozen starting point
    extra = engine_arguments(args.engine, model)
    if args.gradient_checkpointing:  # renamed activation_checkpointing in transformers 5.2x
        names = {f.name for f in dataclasses.fields(PSFTConfig)}
        extra["activation_checkpointing" if "activation_checkpointing" in names else "gradient_checkpointing"] = True
    config = PSFTConfig(
        output_dir=args.output_dir,
        loss_type=args.loss,
        max_steps=args.max_steps,
        per_device_train_batch_size=args.batch_size,
        gradient_accumulation_steps=args.grad_accum,
        learning_rate=args.lr if args.lr is not None else (1e-5 if args.model else 3e-3),
        old_policy_refresh_steps=args.refresh_steps,
        sft_warmup_steps=args.sft_warmup_steps,
        kl_coef=args.kl_coef,
        loss_backend=args.backend,
        logging_steps=args.logging_steps,
        save_strategy="no",
        report_to="none",
        seed=args.seed,
        disable_tqdm=args.no_progress,
        **extra,
    )
    metrics_path = os.path.join(args.output_dir, "metrics.jsonl")
    trainer = PSFTTrainer(model=model, args=config, train_dataset=train, data_collator=PadCollator(tok.pad_token_id),
                          ref_model=ref_model, callbacks=[MetricsJsonlCallback(metrics_path)])
    start = time.perf_counter()
    trainer.train()
    elapsed = time.perf_counter() - start
    last = [h for h in trainer.state.log_history if "nll" in h][-1:]
    print(f"{args.loss} ({trainer.engine}, {trainer.args.world_size} process(es)): {trainer.state.global_step} "
          f"steps in {elapsed:.1f} s; last log {last}")
    print(f"metrics: {metrics_path}")
    return metrics_path


if __name__ == "__main__":
    main()
