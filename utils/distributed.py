"""Scaling out with PyTorch's own engine: `torchrun` + FSDP2 (SPEC §2), the algorithm unchanged.

Launch: `torchrun --nproc_per_node=N dapo.py` (NCCL on GPUs, gloo on CPU). Each rank samples its share of the
prompts (a group never spans ranks), trains its rows on the one sharded policy, and the loss is normalised by
the *global* number of valid tokens (token level) or sequences (sample level) of each mini-batch, so the
gradient is the single-process gradient of the whole global batch (tests/test_distributed.py). FSDP's
gradient reduction is set to a plain sum across ranks to match (its default averages).

What the trainers call (each the identity, or a no-op, in a process not launched by torchrun, so one process
runs exactly as before):
* `init_distributed` / `close_distributed`: join and leave the process group; the rank's device;
* `shard_model`, `shard_critic`: FSDP2 units, fp32 sharded parameters and AdamW state, bf16 compute if mixed;
  with `offload` (OFFLOAD_OPTIMIZER) those sharded states live in CPU memory and AdamW steps on the CPU;
* `rank_sampling` (used by utils.rollout.sample_step): each rank's share of every draw of prompts, and dynamic
  sampling's refill rounds stopped on the *global* count of informative groups;
* `rank_rows`, `gather_rows`, `all_reduce_sum`, `all_reduce_max`: the metrics of the whole global batch, exactly;
* `rank_share`: this rank's part of the held-out evaluation;
* `gather_full_state_dict`, `full_tensor`: the consolidated weights rank 0 saves, the generation copy's refresh.
Rank 0 is the one writer of the run folder (utils/runlog.py, utils/checkpoint.py).
"""

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from torch.distributed.fsdp import CPUOffloadPolicy, FSDPModule, MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor

from utils import layout


@dataclass(frozen=True)
class World:
    """Where this process stands. device: the rank's device under torchrun, or None in a process not launched by
    it. With one rank (`--nproc_per_node=1`) nothing is sharded and POLICY_DEVICE / ROLLOUT_DEVICE apply as
    without torchrun."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device | None = None

    @property
    def is_main(self):
        """Rank 0: the one writer of the run folder."""
        return self.rank == 0


def init_distributed(cpu_collectives=False):
    """Join the process group that torchrun set up (RANK / WORLD_SIZE / LOCAL_RANK in the environment): NCCL
    with one GPU per rank when there are GPUs, gloo on the CPU otherwise. `cpu_collectives` (the optimizer
    offload) adds gloo next to NCCL for the collectives on CPU tensors: clip_grad_norm_'s over offloaded
    gradients. Without torchrun: World() and no process group."""
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        return World()
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if not dist.is_initialized():
        if torch.cuda.is_available():
            torch.cuda.set_device(local_rank)
            dist.init_process_group("cuda:nccl,cpu:gloo" if cpu_collectives else "nccl",
                                    device_id=torch.device("cuda", local_rank))
        else:
            dist.init_process_group("gloo")
    return current_world()


def current_world():
    """The World of this process, from the process group (World() without one)."""
    if not (dist.is_available() and dist.is_initialized()):
        return World()
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    device = torch.device("cuda", local_rank) if _on_gpus() else torch.device("cpu")
    return World(dist.get_rank(), dist.get_world_size(), local_rank, device)


def is_main_process():
    """Rank 0, or the only process: the one that writes the run folder and prints."""
    return current_world().is_main


def barrier():
    if is_distributed():
        dist.barrier()


def gather_objects(value):
    """Every rank's `value` (any picklable object), in rank order ([value] in one process)."""
    if not is_distributed():
        return [value]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, value)
    return out


def broadcast_object(value):
    """Rank 0's `value` on every rank (any picklable object); the value itself in one process."""
    if not is_distributed():
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def close_distributed():
    """Leave the process group at the end of a run (nothing to do in one process)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def is_distributed():
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _on_gpus():
    return "nccl" in dist.get_backend()  # "nccl", or "cuda:nccl,cpu:gloo" with cpu_collectives


def _comm_device():
    """Device of the small tensors the reductions exchange: NCCL needs them on the rank's GPU."""
    return torch.device("cuda", torch.cuda.current_device()) if _on_gpus() else torch.device("cpu")


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


def gather_rows(value):
    """Every rank's rows of a tensor concatenated in rank order, on every rank (the tensor itself in one process).

    value: [n, ...]; n and the other sizes may differ between ranks (a rank's smaller dimensions are padded with
    zeros to the largest, e.g. completion lengths [n, L]). A dict (of dicts) of tensors is gathered leaf by leaf.
    Used for the metrics of the global batch: the same numbers as one process that sampled every rank's rows."""
    if isinstance(value, dict):
        return {k: gather_rows(v) for k, v in value.items()}
    if not is_distributed():
        return value
    device, world_size = _comm_device(), dist.get_world_size()
    shape = torch.tensor(value.shape, dtype=torch.int64, device=device)
    shapes = [torch.zeros_like(shape) for _ in range(world_size)]
    dist.all_gather(shapes, shape)
    shapes = torch.stack(shapes).tolist()
    largest = [max(s[d] for s in shapes) for d in range(value.dim())]
    padded = torch.zeros(largest, dtype=torch.float64, device=device)
    padded[tuple(slice(0, n) for n in value.shape)] = value.detach().to(device, torch.float64)
    parts = [torch.zeros_like(padded) for _ in range(world_size)]
    dist.all_gather(parts, padded)
    rows = [part[: s[0]] for part, s in zip(parts, shapes)]
    return torch.cat(rows).to(value.device, value.dtype)


def rank_rows(padding=False):
    """The `pool` of the statistics of a step's training batch (utils.rl.whiten, the attention and token-weight
    metrics, the trainers' means): gather_rows, so that they run over the rows of every rank; a rank that trains
    on a zero-weight padding group (`padding`, utils.rollout.sample_step) contributes no rows. The identity in one
    process."""
    if not padding:
        return gather_rows

    def none_of_mine(value):
        return {k: none_of_mine(v) for k, v in value.items()} if isinstance(value, dict) else gather_rows(value[:0])

    return none_of_mine


def all_reduce_mean(value, weight):
    """The `weight`-weighted mean over ranks of each rank's mean `value` (a rank with weight 0 adds nothing);
    `value` itself in one process."""
    if not is_distributed():
        return value
    total, weight = all_reduce_sum([value * weight if weight else 0.0, weight])
    return total / weight if weight else float("nan")


def all_gather_counts(count):
    """Every rank's value of the integer `count`, in rank order ([count] in one process)."""
    if not is_distributed():
        return [count]
    out = [torch.zeros(1, dtype=torch.int64, device=_comm_device()) for _ in range(dist.get_world_size())]
    dist.all_gather(out, torch.tensor([count], dtype=torch.int64, device=_comm_device()))
    return [int(t.item()) for t in out]


def rank_uniform(n_rows, length, seed):
    """Uniform random numbers [n_rows, length] for this rank's rows of the global batch: its block of one draw of
    [every rank's rows, the longest length] from `seed`, so that a row gets the same numbers however the batch is
    split over ranks (rows in rank order). One process: the draw itself."""
    counts = all_gather_counts(n_rows)
    longest = int(all_reduce_max(float(length))) if is_distributed() else length
    offset = sum(counts[: current_world().rank])
    draw = torch.rand(sum(counts), longest, generator=torch.Generator().manual_seed(seed))
    return draw[offset : offset + n_rows, :length]


# ── Splitting the work ────────────────────────────────────────────────────────────────────────────────────


def rank_share(items, world=None):
    """This rank's share of a sequence (a list or a dataset; every world_size-th item from its rank on), as a
    list: e.g. the held-out examples each rank evaluates. Shares differ by at most one item. world: this process's
    World by default."""
    world = world or current_world()
    return [items[i] for i in range(world.rank, len(items), world.world_size)]


def prompts_per_rank(n_prompts, world=None):
    """How many of the global batch's `n_prompts` prompts this rank samples (shares differ by at most one)."""
    world = world or current_world()
    return n_prompts // world.world_size + (world.rank < n_prompts % world.world_size)


def rank_sampling(draw_prompts, n_prompts):
    """How this rank samples its share of a step whose global batch is `n_prompts` prompts (groups):
    (its number of prompts, a draw function for its share, the refill quota for utils.rollout.collect_groups).
    Every rank holds the same prompt sampler, draws the whole global batch of each round and keeps its share, so
    the prompts a run sees do not depend on the number of ranks, and the sampler's state is the same everywhere.
    In one process: (n_prompts, draw_prompts, None)."""
    if not is_distributed():
        return n_prompts, draw_prompts, None
    world = current_world()
    return (prompts_per_rank(n_prompts, world), lambda _: rank_share(draw_prompts(n_prompts), world),
            global_group_quota(n_prompts, world))


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


def replay_slots(n_fresh, n_stored, n_groups):
    """How many groups this rank takes from its replay buffer: the global batch of `n_groups` lacks
    n_groups − (fresh groups of all ranks), and the ranks fill that from their buffers (`n_stored` groups here)
    as split_quota splits it. In one process: min(n_stored, n_groups − n_fresh)."""
    fresh, stored = all_gather_counts(n_fresh), all_gather_counts(n_stored)
    return split_quota(stored, max(n_groups - sum(fresh), 0))[current_world().rank]


# ── The sharded policy ────────────────────────────────────────────────────────────────────────────────────


def _fsdp_kwargs(precision, offload=False):
    kwargs = {}
    if precision == "bf16-mixed":
        kwargs["mp_policy"] = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    if offload:  # pinned host memory, for asynchronous copies to and from the GPU
        kwargs["offload_policy"] = CPUOffloadPolicy(pin_memory=torch.cuda.is_available())
    return kwargs


def _sum_gradients(module):
    for m in module.modules():
        if isinstance(m, FSDPModule):
            m.set_gradient_divide_factor(1.0)  # a sum over ranks ...
            m.set_force_sum_reduction_for_comms(True)  # ... as a plain SUM on every backend


def _shard_backbone(backbone, precision, offload, extra=None):
    """fully_shard each vision block and text decoder layer of a Qwen-VL backbone, then the backbone itself as the
    root unit (with `extra`'s parameters, a module outside it that must share the root: the lm_head)."""
    kwargs = _fsdp_kwargs(precision, offload)
    for unit in layout.vision_blocks(backbone) + layout.decoder_layers(backbone):
        fully_shard(unit, **kwargs)
    if extra is not None:  # registered under the backbone while the root is built, its weights join the root unit
        backbone.add_module("sharded_extra", extra)
    fully_shard(backbone, **kwargs)
    if extra is not None:
        del backbone.sharded_extra  # the state dict keeps its own keys


def shard_model(model, precision, offload=False):
    """Shard a Qwen-VL policy with FSDP2, in place; returns it.

    One FSDP unit per vision block and per text decoder layer, and the root unit: the backbone (utils/layout.py)
    with the rest of its parameters *and* the lm_head's (tied to the token embedding in the tiny VLM and in
    Qwen2.5-VL-3B, so they must share a unit; untied, it is one more parameter of the root). Our code calls the
    backbone and then the lm_head itself (utils/logprobs.py, PPO's shared critic), so the backbone must be the
    root: its hooks run on that call, and a root keeps its parameters gathered from its forward to the end of the
    backward, which is when lm_head runs. (`model(...)`, e.g. generate(), works too.)
    Sharded parameters, gradients and so AdamW state stay fp32 (a LoRA policy's frozen base stays as loaded);
    precision "bf16-mixed" computes in bf16 and reduces gradients in fp32. Gradients are summed over ranks (not
    averaged): policy_update divides the loss by global counts. `offload` (OFFLOAD_OPTIMIZER): FSDP2's
    CPUOffloadPolicy keeps the sharded parameters, their gradients and so the AdamW state in CPU memory (the
    optimizer steps on the CPU); each unit's shards are copied to the GPU for its all-gather, and its gradient
    shards back. In one process the model is returned as it is.
    """
    if not is_distributed():
        return model
    if offload and _on_gpus() and "gloo" not in dist.get_backend():
        raise RuntimeError("offloaded shards need gloo beside NCCL for the gradient norm: "
                           "init_distributed(cpu_collectives=True)")
    # lm_head sits outside the backbone; FSDP swaps its weight (sharded / gathered) on lm_head as on every module
    # that holds it.
    _shard_backbone(layout.backbone(model), precision, offload, extra=layout.lm_head(model))
    _sum_gradients(model)
    return model


def shard_critic(critic, policy, precision, offload=False):
    """Shard PPO's critic like the policy: its head is a unit of its own (its gradient is summed over ranks like
    every other), and a separate backbone is sharded as the policy's. A shared backbone is the policy's, already
    sharded. In one process the critic is returned as it is."""
    if not is_distributed():
        return critic
    if critic.backbone is not layout.backbone(policy):
        _shard_backbone(critic.backbone, precision, offload)
    fully_shard(critic.head, **_fsdp_kwargs("fp32", offload))  # fp32 always: the head runs outside autocast
    _sum_gradients(critic)
    return critic


def equal_passes(n_rows, micro_batch_size):
    """The number of micro-batch passes every rank runs over its `n_rows` rows: the busiest rank's. A forward pass
    of a sharded model gathers its weights from all ranks, so all ranks must run the same number of them."""
    return all_reduce_max(-(-n_rows // micro_batch_size))


def grad_norm_value(norm):
    """clip_grad_norm_'s result as a float; on sharded parameters it is a DTensor over the whole model."""
    return full_tensor(norm).item()


def gather_full_state_dict(model, to_all_ranks=False):
    """The full (unsharded) state dict of a sharded model, on the CPU: on rank 0 only (for its consolidated
    checkpoint; other ranks get {}), or on every rank with to_all_ranks. Every rank must call it. A model that
    is not sharded gives its own state dict."""
    if not is_distributed():
        return model.state_dict()
    options = StateDictOptions(full_state_dict=True, cpu_offload=not to_all_ranks,
                               ignore_frozen_params=layout.is_lora(model))  # LoRA: only the adapters
    state = get_model_state_dict(model, options=options)
    return {k: v.cpu() for k, v in state.items()} if to_all_ranks else state


def full_tensor(tensor):
    """A sharded parameter (DTensor) gathered whole on every rank (every rank must call it); a tensor as it is.
    An offloaded shard (in CPU memory, its mesh on the GPUs) is gathered on the GPUs, through NCCL."""
    if not isinstance(tensor, DTensor):
        return tensor
    if tensor.device.type != tensor.device_mesh.device_type:
        tensor = tensor.to(tensor.device_mesh.device_type, non_blocking=True)
    return tensor.full_tensor()


def compute_device(module):
    """The device `module` computes on: the rank's under torchrun (an offloaded policy's parameters are in CPU
    memory, gathered onto the GPU for each pass), else its parameters'."""
    return current_world().device if is_distributed() else next(module.parameters()).device

