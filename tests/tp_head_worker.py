"""Run by tests/test_tp_head.py under torchrun (2 CPU processes, gloo, tensor-parallel group of 2).

    python -m torch.distributed.run --standalone --nproc_per_node 2 tests/tp_head_worker.py OUT_DIR
    python -m torch.distributed.run --standalone --nproc_per_node 4 tests/tp_head_worker.py OUT_DIR 2d

Each case: a tiny random-init model whose lm-head is sharded over the vocabulary by torch's
``parallelize_module(model, mesh, {"lm_head": ColwiseParallel(...)})`` (V = 101: uneven shards of 51
and 50 rows) trains 3 SGD steps in float64 through the plain-loop API on the *same* micro-batches on
both ranks (tensor parallelism, no data parallelism), and a copy of the model trains the same steps in
one process without any plan. The record holds the largest difference over all parameters (the head's
shards gathered), how far the weights moved, and the head's local shape (the plan was really active).
Refusals (a tied head, RowwiseParallel on the head) record their error messages. With ``2d``: 4
processes, a (dp=2, tp=2) mesh, the head ColwiseParallel on "tp" and FSDP2 on "dp" (fsdp2_tp_case).
Assertions live in tests/test_tp_head.py.
"""

from __future__ import annotations

import copy
import json
import os
import sys
import traceback

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
torch.set_num_threads(1)

from distributed_worker import GA, LR, STEPS, K, make_model, micro_batches, step_loss, train  # noqa: E402
from torch.distributed.device_mesh import init_device_mesh  # noqa: E402
from torch.distributed.tensor import DTensor, Replicate  # noqa: E402
from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module  # noqa: E402

from psft_kernels.integrations.plain import count_targets, fused_logprobs, fused_loss, prepare_model  # noqa: E402

# (model kind, loss, ColwiseParallel options, prepare_model before the plan or after it)
CASES = [
    ("llama", "sft", dict(), "before"),
    ("llama", "dft", dict(use_local_output=False), "after"),
    ("llama", "psft", dict(), "after"),
    ("llama", "psft", dict(use_local_output=False), "before"),
    ("llama", "asft", dict(), "before"),
    ("llama", "sft_none", dict(use_local_output=False), "before"),
    ("phi", "psft", dict(), "before"),  # an lm-head bias, sharded with the weight
    ("llama", "sft", dict(output_layouts=Replicate()), "before"),  # the hook gathers the (carrier) logits
]


def full(p):
    return p.full_tensor() if isinstance(p, DTensor) else p


def tp_case(kind, loss_type, plan, order, mesh):
    torch.manual_seed(0)
    base = make_model(kind)
    single = copy.deepcopy(base)
    ref = copy.deepcopy(base).requires_grad_(False) if loss_type == "asft" else None
    start = {k: v.detach().clone() for k, v in base.named_parameters()}
    steps = micro_batches(world=1)

    train(single, steps, loss_type, ref=copy.deepcopy(ref) if ref is not None else None, world=1, reduce=False)

    model = base
    if order == "before":
        prepare_model(model)
    parallelize_module(model, mesh, {"lm_head": ColwiseParallel(**plan)})
    if order == "after":
        prepare_model(model)
    head = model.get_output_embeddings().weight
    # the same micro-batches on both ranks: a token count of this process only (no all-reduce), world=1
    train(model, steps, loss_type, ref=ref, world=1, reduce=False)

    got = {k: full(v).detach() for k, v in model.named_parameters()}
    want = dict(single.named_parameters())
    diff = max((got[k] - want[k]).abs().max().item() for k in want)
    moved = min((want[k] - start[k]).abs().max().item() for k in want)
    return {"case": f"{kind}/{loss_type}/{plan}/{order}", "max_abs_diff": diff, "min_moved": moved,
            "head_local_rows": head.to_local().shape[0], "head_is_dtensor": isinstance(head, DTensor),
            "steps": STEPS}


def refused(kind, style, mesh):
    torch.manual_seed(0)
    model = prepare_model(make_model(kind))
    parallelize_module(model, mesh, {"lm_head": style})
    batch = micro_batches(world=1)[0][0]
    try:
        fused_loss(model, batch, loss_type="sft")
    except (ValueError, RuntimeError) as e:
        return {"case": f"refused/{kind}/{type(style).__name__}", "error_message": str(e)}
    return {"case": f"refused/{kind}/{type(style).__name__}", "error_message": None}


def fsdp2_tp_case(loss_type, mesh):
    """A 2-D mesh (dp=2, tp=2): the head ColwiseParallel on "tp", FSDP2 on "dp" over every layer and the
    root. Data-parallel rank d takes micro-batches d*GA .. d*GA+GA-1 of each step (its tp peer the same);
    the truth is one process on the concatenated batch."""
    from torch.distributed.fsdp import fully_shard

    torch.manual_seed(0)
    base = make_model("llama")
    single = copy.deepcopy(base)
    ref = copy.deepcopy(base).requires_grad_(False) if loss_type == "asft" else None
    start = {k: v.detach().clone() for k, v in base.named_parameters()}
    steps = micro_batches(world=2)
    train(single, steps, loss_type, ref=copy.deepcopy(ref) if ref is not None else None, world=1, reduce=False)

    dp, tp = mesh["dp"], mesh["tp"]
    d = dp.get_local_rank()
    model = prepare_model(base)
    parallelize_module(model, tp, {"lm_head": ColwiseParallel()})
    for layer in model.model.layers:
        fully_shard(layer, mesh=dp)
    fully_shard(model, mesh=dp)
    mine = [step[d * GA:(d + 1) * GA] for step in steps]
    opt = torch.optim.SGD(model.parameters(), lr=LR[loss_type])
    old = {}
    for s, step in enumerate(mine):
        if loss_type == "psft" and s % K == 0:
            old = {(t, i): fused_logprobs(model, b) for t in range(s, min(s + K, STEPS)) for i, b in enumerate(mine[t])}
        n = count_targets(step, group=dp.get_group())  # over the data-parallel ranks only: tp peers share data
        for i, batch in enumerate(step):
            (step_loss(model, batch, loss_type, old.get((s, i)), n, ref) * dp.size()).backward()
        opt.step()
        opt.zero_grad()
    got = {k.replace("_fsdp_wrapped_module.", ""): full(v).detach() for k, v in model.named_parameters()}
    want = dict(single.named_parameters())
    diff = max((got[k] - want[k]).abs().max().item() for k in want)
    moved = min((want[k] - start[k]).abs().max().item() for k in want)
    head = model.get_output_embeddings().weight
    return {"case": f"fsdp2_tp/{loss_type}", "max_abs_diff": diff, "min_moved": moved,
            "head_placements": str(head.placements), "head_local_rows": head.to_local().shape[0]}


def trainer_refuses(mesh):
    """PSFTTrainer's model check (hf.PSFTTrainer.__init__ calls it first) on a ColwiseParallel head."""
    from psft_kernels.integrations import _engines

    model = make_model("llama")
    parallelize_module(model, mesh, {"lm_head": ColwiseParallel()})
    try:
        _engines.check_model(model)
    except ValueError as e:
        return {"case": "refused/trainer", "error_message": str(e)}
    return {"case": "refused/trainer", "error_message": None}


def main(out_dir: str, two_d: bool) -> None:
    """Every case in turn (a failure is recorded, not raised: the other ranks would hang), one JSON per rank."""
    dist.init_process_group("gloo")
    if two_d:
        mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("dp", "tp"))
        jobs = [(f"fsdp2_tp/{loss}", fsdp2_tp_case, (loss, mesh)) for loss in ("sft", "psft", "asft")]
    else:
        mesh = init_device_mesh("cpu", (dist.get_world_size(),), mesh_dim_names=("tp",))["tp"]
        jobs = [(str(case), tp_case, (*case, mesh)) for case in CASES]
        jobs += [(f"refused/{kind}", refused, (kind, style, mesh))
                 for kind, style in (("llama_tied", ColwiseParallel()), ("llama", RowwiseParallel()))]
        jobs.append(("refused/trainer", trainer_refuses, (mesh,)))
    results = []
    for name, fn, args in jobs:
        try:
            results.append(fn(*args))
        except Exception:
            results.append({"case": name, "error": traceback.format_exc()})
    with open(os.path.join(out_dir, f"tp{'2d' if two_d else ''}{dist.get_rank()}.json"), "w") as f:
        json.dump(results, f)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2:] == ["2d"])
