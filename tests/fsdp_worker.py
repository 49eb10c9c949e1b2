"""FSDP2 across processes, run by `tests/test_train.py` under `torchrun --nproc_per_node 2` (gloo, CPU).

Trainer enables FSDP through accelerate, and accelerate does so only on accelerators, so on CPU this drives FSDP2's
`fully_shard` directly, the way accelerate's FSDP2 path wraps a Transformers model: one unit per module whose class is
in `_no_split_modules` (one per decoder layer), then the root. Each rank trains on its half of the batch. Everything is
checked against the same model unsharded in this process on the whole batch: the loss, every gradient, the parameters
after an AdamW step, and the full state dict gathered from the shards and saved with `save_pretrained`, then reloaded.

Usage: torchrun --nproc_per_node 2 tests/fsdp_worker.py OUTPUT_DIR
"""

import copy
import json
import os
import sys

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor


sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from conftest import VARIANTS, randomize, tiny_config  # noqa: E402
from modeling_titans import TitansForCausalLM  # noqa: E402


def full(t):
    return t.full_tensor() if isinstance(t, DTensor) else t


def max_rel_err(tensors, references):
    return max(float((full(a) - b).abs().max() / (b.abs().max() + 1e-12)) for a, b in zip(tensors, references))


def check_variant(variant, rank, world, mesh, out_dir):
    torch.manual_seed(0)
    ref = randomize(TitansForCausalLM(tiny_config(variant)), scale=0.1).train()
    model = copy.deepcopy(ref)
    units = [m for m in model.modules() if type(m).__name__ in model._no_split_modules]
    for unit in units:
        fully_shard(unit, mesh=mesh)
    fully_shard(model, mesh=mesh)

    # 2 rows per rank, 27 tokens: several attention windows and memory chunks, the last chunk unfinished
    ids = torch.randint(2, 64, (2 * world, 27), generator=torch.Generator().manual_seed(1))
    mine = ids[2 * rank : 2 * rank + 2]
    opt, ref_opt = (torch.optim.AdamW(m.parameters(), lr=1e-2) for m in (model, ref))

    loss = model(input_ids=mine, labels=mine).loss
    loss.backward()
    ref_loss = ref(input_ids=ids, labels=ids).loss  # equal token counts per rank: the mean of the ranks' losses
    ref_loss.backward()
    losses = [torch.zeros(()) for _ in range(world)]
    dist.all_gather(losses, loss.detach())
    params, ref_params = list(model.parameters()), list(ref.parameters())
    grad_err = max_rel_err([p.grad for p in params], [p.grad for p in ref_params])
    opt.step()
    ref_opt.step()
    param_err = max_rel_err(params, ref_params)
    with torch.no_grad():
        after = model(input_ids=mine).logits
        ref_after = ref(input_ids=ids).logits[2 * rank : 2 * rank + 2]
    logits_err = float((after - ref_after).abs().max())

    # every rank takes part in gathering the full state dict; rank 0 saves it as a Transformers checkpoint
    state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    result = {
        "rank_losses": [float(x) for x in losses], "ref_loss": float(ref_loss), "grad_err": grad_err,
        "param_err": param_err, "logits_err_after_step": logits_err, "units": [type(u).__name__ for u in units],
        "parameters": len(params), "sharded_parameters": sum(isinstance(p, DTensor) for p in params),
        "local_elements": sum((p.to_local() if isinstance(p, DTensor) else p).numel() for p in params),
        "total_elements": sum(p.numel() for p in params),
    }  # fmt: skip
    if rank == 0:
        plain = TitansForCausalLM(tiny_config(variant))
        plain.load_state_dict(state)
        path = os.path.join(out_dir, variant)
        plain.save_pretrained(path)
        reloaded = TitansForCausalLM.from_pretrained(path).eval()
        with torch.no_grad():
            result["reload_err"] = float((reloaded(input_ids=ids).logits - ref.eval()(input_ids=ids).logits).abs().max())
        result["saved_files"] = sorted(os.listdir(path))
    return result


def main(out_dir):
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.set_num_threads(1)
    mesh = init_device_mesh("cpu", (world,))
    results = {variant: check_variant(variant, rank, world, mesh, out_dir) for variant in VARIANTS}
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
        json.dump({"rank": rank, "world_size": world, "variants": results}, f, indent=1)
    # rank 0 still saves and reloads the last variant when the others get here; tearing gloo down while a peer still
    # works aborted a rank once in CI ("terminate called without an active exception")
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
