"""Run by tests/test_hf.py under torchrun (2 CPU processes, gloo): train a few steps, save the result.

    python -m torch.distributed.run --nproc_per_node 2 tests/hf_ddp_worker.py LOSS_TYPE OUT_DIR GA
"""

import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
torch.set_num_threads(1)

import test_hf as T  # noqa: E402
from pathlib import Path  # noqa: E402

from psft_kernels.integrations.hf import PSFTTrainer  # noqa: E402


def main(loss_type: str, out_dir: str, grad_accum: int) -> None:
    model = T.llama()
    ref = T.llama(seed=1) if loss_type == "asft" else None
    # average_tokens_across_devices (the default from transformers 4.50 on): num_items_in_batch
    # counts the targets of all processes, so the update is the token mean over all of them.
    distributed = {"ddp_backend": "gloo", "average_tokens_across_devices": True} if "WORLD_SIZE" in os.environ else {}
    args = T.config(Path(out_dir), loss_type=loss_type, max_steps=3, old_policy_refresh_steps=2,
                    gradient_accumulation_steps=grad_accum, **distributed)
    trainer = PSFTTrainer(model=model, args=args, train_dataset=T.examples(), data_collator=T.collate, ref_model=ref)
    trainer.train()
    rank = int(os.environ.get("RANK", 0))
    params = {k: v.detach() for k, v in trainer.model.state_dict().items()}
    torch.save(params, os.path.join(out_dir, f"params{rank}.pt"))
    with open(os.path.join(out_dir, f"logs{rank}.json"), "w") as f:
        json.dump({"world_size": trainer.args.world_size, "logs": T.step_logs(trainer)}, f)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], int(sys.argv[3]))
