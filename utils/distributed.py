"""Scaling out with PyTorch's own engine: `torchrun` + FSDP2 (SPEC §2), the algorithm unchanged.

Launch: `torchrun --nproc_per_node=N dapo.py` (NCCL on GPUs, gloo on CPU). Each rank samples its share of the
prompts (a group never spans ranks), trains its rows on the one sharded policy, and the loss is normalised by
the *global* number of valid tokens (token level) or sequences (sample level) of each mini-batch, so the
gradient is the single-process gradient of the whole global batch (tests/test_distributed.py). FSDP's
gradient reduction is set to a plain sum across ranks to match (its default averages).

Every function here is the identity, or a no-op, in a process not launched by torchrun: one process runs
exactly as before.
"""

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor


@dataclass(frozen=True)
class World:
    """Where this process stands. device: the rank's device, or None when not launched by torchrun (then the
    trainer's POLICY_DEVICE / ROLLOUT_DEVICE choice applies unchanged)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device | None = None

    @property
    def is_main(self):
        """Rank 0: the one writer of the run folder."""
        return self.rank == 0


def init_distributed():
    """Join the process group that torchrun set up (RANK / WORLD_SIZE / LOCAL_RANK in the environment): NCCL
    with one GPU per rank when there are GPUs, gloo on the CPU otherwise. Without torchrun: World() and no
    process group."""
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        return World()
    rank, world_size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if torch.cuda.is_available():
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
        dist.init_process_group("nccl", device_id=device)
    else:
        device = torch.device("cpu")
        dist.init_process_group("gloo")
    return World(rank, world_size, local_rank, device)


def close_distributed():
    """Leave the process group at the end of a run (nothing to do in one process)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def is_distributed():
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _comm_device():
    """Device of the small tensors the reductions exchange: NCCL needs them on the rank's GPU."""
    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")


def _all_reduce(value, op):
    if not is_distributed():
        return value
    if isinstance(value, torch.Tensor):
        out = value.detach().to(_comm_device(), torch.float64)
        dist.all_reduce(out, op=op)
        return out.to(value.device, value.dtype)
    out = torch.tensor(value, dtype=torch.float64, device=_comm_device())
    dist.all_reduce(out, op=op)
    out = out.tolist()
    if isinstance(value, (list, tuple)):
        return [type(v)(o) for v, o in zip(value, out)]
    return type(value)(out)


def all_reduce_sum(value):
    """Sum over ranks of a number, a list of numbers or a tensor (returned in the same form; exact for integer
    counts below 2**53). The identity in one process."""
    return _all_reduce(value, dist.ReduceOp.SUM if dist.is_available() else None)


def all_reduce_max(value):
    """Maximum over ranks, as all_reduce_sum."""
    return _all_reduce(value, dist.ReduceOp.MAX if dist.is_available() else None)


def all_gather_counts(count):
    """Every rank's value of the integer `count`, in rank order ([count] in one process)."""
    if not is_distributed():
        return [count]
    out = [torch.zeros(1, dtype=torch.int64, device=_comm_device()) for _ in range(dist.get_world_size())]
    dist.all_gather(out, torch.tensor([count], dtype=torch.int64, device=_comm_device()))
    return [int(t.item()) for t in out]


# ── Splitting the work ────────────────────────────────────────────────────────────────────────────────────


def rank_share(items, world):
    """This rank's share of a sequence (a list or a dataset; every world_size-th item from its rank on), as a
    list: e.g. the held-out examples each rank evaluates. Shares differ by at most one item."""
    return [items[i] for i in range(world.rank, len(items), world.world_size)]


def prompts_per_rank(n_prompts, world):
    """How many of the global batch's `n_prompts` prompts this rank samples (shares differ by at most one)."""
    return n_prompts // world.world_size + (world.rank < n_prompts % world.world_size)


def split_quota(counts, total):
    """How many of its informative groups each rank trains on so that together they train on min(total,
    sum(counts)): each rank first up to an equal share of `total`, then the rest goes to the ranks with groups
    left, in rank order. counts: each rank's number of informative groups. Returns a list like counts."""
    n = len(counts)
    quota = [min(c, total // n + (r < total % n)) for r, c in enumerate(counts)]
    left = min(total, sum(counts)) - sum(quota)
    for r, c in enumerate(counts):
        extra = min(c - quota[r], left)
        quota[r] += extra
        left -= extra
    return quota


def global_group_quota(n_groups_global, world):
    """For utils.rollout.collect_groups (refill): a callable mapping this rank's number of informative groups to
    (whether the ranks together have `n_groups_global`, how many of them this rank trains on). Every rank must
    call it in the same round (it all-gathers the counts)."""

    def quota(n_kept):
        counts = all_gather_counts(n_kept)
        return sum(counts) >= n_groups_global, split_quota(counts, n_groups_global)[world.rank]

    return quota


def reduce_metrics(metrics, weight=1.0, sums=(), maxes=()):
    """One metrics dict for the whole global batch from each rank's: the `weight`-weighted mean over ranks
    (weight: the rank's number of sequences, tokens or examples behind its means), the sum for keys in `sums`,
    the maximum for keys in `maxes`. Non-numeric values (and "step") are left as they are. All ranks must pass
    the same keys in the same order."""
    if not is_distributed():
        return metrics
    keys = [k for k, v in metrics.items() if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool)]
    mean_keys = [k for k in keys if k not in sums and k not in maxes]
    totals = all_reduce_sum([metrics[k] * weight for k in mean_keys] + [metrics[k] for k in keys if k in sums]
                            + [float(weight)])
    largest = all_reduce_max([metrics[k] for k in keys if k in maxes])
    out = dict(metrics)
    total_weight = totals[-1]
    for k, v in zip(mean_keys, totals):
        out[k] = v / total_weight if total_weight else float("nan")
    for k, v in zip([k for k in keys if k in sums], totals[len(mean_keys) :]):
        out[k] = v
    for k, v in zip([k for k in keys if k in maxes], largest):
        out[k] = v
    return out


# ── The sharded policy ────────────────────────────────────────────────────────────────────────────────────


def shard_model(model, precision):
    """Shard a Qwen-VL policy with FSDP2, in place; returns it.

    One FSDP unit per vision block and per text decoder layer, and the root unit: the backbone `model.model`
    with the rest of its parameters *and* `model.lm_head`'s (tied to the token embedding in the tiny VLM and in
    Qwen2.5-VL-3B, so they must share a unit; untied, it is one more parameter of the root). Our code calls
    `model.model(...)` and then `model.lm_head` itself (utils/logprobs.py, PPO's shared critic), so the backbone
    must be the root: its hooks run on that call, and a root keeps its parameters gathered from its forward to
    the end of the backward, which is when lm_head runs. (`model(...)`, e.g. generate(), works too.)
    Sharded parameters, gradients and so AdamW state stay fp32; precision "bf16-mixed" computes in bf16 and
    reduces gradients in fp32. Gradients are summed over ranks (not averaged): policy_update divides the loss by
    global counts.
    """
    mixed = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    kwargs = {"mp_policy": mixed} if precision == "bf16-mixed" else {}
    model.float()
    units = list(model.model.visual.blocks) + list(model.model.language_model.layers)
    for unit in units:
        fully_shard(unit, **kwargs)
    # lm_head sits outside the backbone: registered under it while the root is built, its weight joins the root
    # unit, and FSDP swaps it (sharded / gathered) on lm_head as on every module that holds it.
    model.model.add_module("sharded_lm_head", model.lm_head)
    fully_shard(model.model, **kwargs)
    del model.model.sharded_lm_head  # the state dict keeps its own keys
    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.set_gradient_divide_factor(1.0)  # a sum over ranks ...
            module.set_force_sum_reduction_for_comms(True)  # ... as a plain SUM on every backend
    return model


def grad_norm_value(norm):
    """clip_grad_norm_'s result as a float; on sharded parameters it is a DTensor over the whole model."""
    return (norm.full_tensor() if isinstance(norm, DTensor) else norm).item()


def gather_full_state_dict(model, to_all_ranks=False):
    """The full (unsharded) state dict of a sharded model, on the CPU: on rank 0 only (for its consolidated
    checkpoint; other ranks get {}), or on every rank with to_all_ranks. Every rank must call it. A model that
    is not sharded gives its own state dict."""
    if not is_distributed():
        return model.state_dict()
    options = StateDictOptions(full_state_dict=True, cpu_offload=not to_all_ranks)
    state = get_model_state_dict(model, options=options)
    return {k: v.cpu() for k, v in state.items()} if to_all_ranks else state


@torch.no_grad()
def refresh_generation_copy(policy, rollout):
    """Copy the sharded policy's weights into this rank's full generation copy (any dtype), one parameter at a
    time so that at most one full parameter is gathered at once. Every rank must call it."""
    targets = dict(rollout.named_parameters())
    for name, p in policy.named_parameters():
        full = p.full_tensor() if isinstance(p, DTensor) else p
        targets[name].copy_(full, non_blocking=True)
