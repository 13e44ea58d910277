"""Fine-tune a causal LM with PSFT, SFT, DFT or ASFT through TRL's SFTTrainer (FusedSFTTrainer).

    python examples/train_trl.py --loss psft --max-steps 20 --output-dir runs/psft
    python examples/train_trl.py --loss sft --packing --output-dir runs/sft_packed
    python examples/train_trl.py --loss asft --lora --model path/to/local/model --dataset chat.jsonl --output-dir runs/a
    python examples/train_trl.py --loss sft --trl-trainer --save-model --output-dir runs/trl  # TRL's own SFTTrainer

Offline by default: a small random-init Llama-style model, a byte-level tokenizer with a chat
template built here (no hub access), and a generated conversational data set of two-digit
additions ("17+25=" -> "42") trained with TRL's assistant-only loss. With --model, any local
Hugging Face causal LM and its tokenizer (nothing is downloaded). With --dataset, a local .json /
.jsonl file in any format TRL takes: {"messages": [...]} (conversational), {"prompt", "completion"}
or {"text"}.

TRL does the data handling (chat template, assistant-only / completion-only labels, --packing,
--padding-free); psft_kernels computes the loss on the fused head. Writes OUTPUT_DIR/metrics.jsonl:
one JSON object per logged step (TRL's loss, entropy, mean_token_accuracy, num_tokens; the fused
nll, tokens; clip_fraction / ratio_mean / approx_kl for PSFT, kl for ASFT; plus step).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import random
import time

os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

import torch  # noqa: E402

from psft_kernels.integrations.hf import LOSS_TYPES, MetricsJsonlCallback  # noqa: E402

SPECIAL_TOKENS = ["<|pad|>", "<|end|>", "<|system|>", "<|user|>", "<|assistant|>"]
# {% generation %} marks the assistant's tokens: TRL's assistant_only_loss trains on those only.
CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>"
    "{% if m['role'] == 'assistant' %}{% generation %}{{ m['content'] }}<|end|>{% endgeneration %}"
    "{% else %}{{ m['content'] }}<|end|>{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def build_tokenizer():
    """A byte-level tokenizer (every byte one token, no merges) with special tokens and a chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS + alphabet)}
    core = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    core.pre_tokenizer = byte_level
    core.decoder = decoders.ByteLevel()
    tok = PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<|pad|>", eos_token="<|end|>",
                                  additional_special_tokens=SPECIAL_TOKENS[2:])
    tok.chat_template = CHAT_TEMPLATE
    return tok


def build_model(vocab_size: int, seed: int = 0, hidden_size: int = 64, layers: int = 2):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=vocab_size, hidden_size=hidden_size, intermediate_size=2 * hidden_size,
                         num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=512, pad_token_id=0, bos_token_id=None, eos_token_id=1)
    return LlamaForCausalLM(config)


def additions(n: int, seed: int, kind: str = "conversational"):
    """Two-digit additions as TRL data set records of the given kind."""
    rng = random.Random(seed)
    records = []
    for _ in range(n):
        a, b = rng.randrange(10, 100), rng.randrange(10, 100)
        prompt, answer = f"{a}+{b}=", str(a + b)
        if kind == "conversational":
            records.append({"messages": [{"role": "user", "content": prompt},
                                         {"role": "assistant", "content": answer}]})
        elif kind == "prompt-completion":
            records.append({"prompt": prompt, "completion": answer})
        elif kind == "text":
            records.append({"text": prompt + answer})
        else:
            raise ValueError(f"kind must be 'conversational', 'prompt-completion' or 'text'; got {kind!r}")
    return records


def load_dataset(args):
    import datasets

    if args.dataset:
        return datasets.load_dataset("json", data_files=args.dataset, split="train")
    return datasets.Dataset.from_list(additions(args.examples, args.seed, args.format))


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--loss", choices=LOSS_TYPES, default="psft")
    p.add_argument("--max-steps", type=int, default=50)
    p.add_argument("--output-dir", required=True)
    p.add_argument("--model", help="a local Hugging Face causal LM directory (default: a small built-in Llama)")
    p.add_argument("--dataset", help="a local .json/.jsonl file TRL can train on (default: generated additions)")
    p.add_argument("--format", choices=["conversational", "prompt-completion", "text"], default="conversational",
                   help="kind of the generated data set")
    p.add_argument("--examples", type=int, default=2048, help="size of the generated data set")
    p.add_argument("--packing", action="store_true", help="TRL packing (BFD, padding-free batches)")
    p.add_argument("--padding-free", action="store_true", help="TRL padding-free batches without packing")
    p.add_argument("--max-length", type=int, default=512)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--grad-accum", type=int, default=2)
    p.add_argument("--lr", type=float, help="default: 3e-3 for the built-in model, 1e-5 with --model")
    p.add_argument("--optim", default="adamw_torch",
                   help="a TrainingArguments optimizer; 'sgd' makes weight comparisons (--trl-trainer) exact to fp32 "
                        "rounding, where Adam amplifies the rounding of near-zero gradients")
    p.add_argument("--refresh-steps", type=int, default=4, help="PSFT: optimizer steps per pi_old refresh (K)")
    p.add_argument("--sft-warmup-steps", type=int, default=0)
    p.add_argument("--kl-coef", type=float, default=0.05)
    p.add_argument("--lora", action="store_true", help="train a peft LoRA adapter (ASFT's reference: adapter off)")
    p.add_argument("--backend", default="auto", help="psft_kernels backend")
    p.add_argument("--logging-steps", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    p.add_argument("--save-model", action="store_true", help="save the trained model (or adapter) to OUTPUT_DIR")
    p.add_argument("--trl-trainer", action="store_true",
                   help="for comparison: TRL's own SFTTrainer (loss_type 'nll' for --loss sft, 'dft' for dft)")
    return p.parse_args(argv)


def main(argv=None) -> str:
    """Runs the training; returns the path of metrics.jsonl."""
    args = parse_args(argv)
    if args.trl_trainer:
        if args.loss not in ("sft", "dft"):
            raise SystemExit(f"--trl-trainer runs TRL's own losses, 'sft' (its 'nll') or 'dft'; got --loss {args.loss}")
        from trl import SFTConfig as Config, SFTTrainer as Trainer

        loss_options = dict(loss_type="nll" if args.loss == "sft" else "dft")
    else:
        from psft_kernels.integrations.trl import FusedSFTConfig as Config, FusedSFTTrainer as Trainer

        loss_options = dict(loss_type=args.loss, old_policy_refresh_steps=args.refresh_steps,
                            sft_warmup_steps=args.sft_warmup_steps, kl_coef=args.kl_coef, loss_backend=args.backend)
    if not args.model and not torch.cuda.is_available():
        # The built-in model is tiny: extra CPU threads only wait on each other (badly so on a busy machine).
        torch.set_num_threads(1)
    if args.model:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(args.model, local_files_only=True)
        model = AutoModelForCausalLM.from_pretrained(args.model, local_files_only=True)
    else:
        tokenizer = build_tokenizer()
        model = build_model(len(tokenizer), args.seed)
    ref_model = copy.deepcopy(model) if args.loss == "asft" and not args.lora else None  # the frozen start
    peft_config = None
    if args.lora:
        from peft import LoraConfig

        peft_config = LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"])
    dataset = load_dataset(args)
    conversational = "messages" in dataset.column_names
    config = Config(
        output_dir=args.output_dir,
        max_steps=args.max_steps,
        per_device_train_batch_size=args.batch_size,
        gradient_accumulation_steps=args.grad_accum,
        learning_rate=args.lr if args.lr is not None else (1e-5 if args.model else 3e-3),
        optim=args.optim,
        **loss_options,
        assistant_only_loss=conversational and not args.model,  # the built-in template marks the assistant's turns
        packing=args.packing,
        padding_free=args.padding_free,
        max_length=None if args.padding_free and not args.packing else args.max_length,
        logging_steps=args.logging_steps,
        save_strategy="no",
        report_to="none",
        seed=args.seed,
        disable_tqdm=args.no_progress,
        bf16=False,
        gradient_checkpointing=False,
        use_cpu=not torch.cuda.is_available(),
    )
    metrics_path = os.path.join(args.output_dir, "metrics.jsonl")
    extra = {} if args.trl_trainer else dict(ref_model=ref_model)
    trainer = Trainer(model=model, args=config, train_dataset=dataset, processing_class=tokenizer,
                      peft_config=peft_config, callbacks=[MetricsJsonlCallback(metrics_path)], **extra)
    start = time.perf_counter()
    trainer.train()
    elapsed = time.perf_counter() - start
    if args.save_model:
        trainer.save_model(args.output_dir)
    last = [h for h in trainer.state.log_history if "loss" in h][-1:]
    print(f"{args.loss}: {trainer.state.global_step} steps in {elapsed:.1f} s; last log {json.dumps(last)}")
    print(f"metrics: {metrics_path}")
    return metrics_path


if __name__ == "__main__":
    main()
