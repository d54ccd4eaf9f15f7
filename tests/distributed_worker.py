"""One rank of tests/test_distributed.py: `torchrun --nproc_per_node=2 tests/distributed_worker.py <folder>`.

<folder>/inputs.pt (written by the test) holds the tiny VLM's path, a global batch, its π_old log-probs and
advantages, and each rank's rows. Rank 0 writes what the test compares with one process into <folder>.
"""

import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import dapo  # noqa: E402
from data.synthetic import SyntheticVQA  # noqa: E402
from utils.config import constants_of  # noqa: E402
from utils.distributed import (all_reduce_mean, gather_full_state_dict, gather_rows, init_distributed,  # noqa: E402
                               rank_rows, replay_slots, shard_model)
from utils.generation import Decoding  # noqa: E402
from utils.logprobs import Passes, batched_logprobs  # noqa: E402
from utils.lora import add_adapters, merged_copy  # noqa: E402
from utils.model import load_model, load_processor, suppressed_token_ids, sync_rollout_model  # noqa: E402
from utils.precision import inference_dtype  # noqa: E402
from utils.rollout import generate, sample_step, select_rows  # noqa: E402
from utils.specs import build_specs  # noqa: E402
from utils.update import Targets, policy_update  # noqa: E402


def update_specs(**overrides):
    """dapo.py's specs with the test's settings (one epoch, one mini-batch, no gradient clipping)."""
    return build_specs({**constants_of(vars(dapo)), "MAX_GRAD_NORM": 1e9, **overrides})


# The cases of the parity test: every loss aggregation, and every policy loss with its token choices made to bite
# (π_old slightly off the policy, so ratios differ from 1; covariance bounds that admit every token).
PARITY_CASES = {
    "token": {"LOSS_AGGREGATION": "token"}, "sample": {"LOSS_AGGREGATION": "sample"},
    "constant": {"LOSS_AGGREGATION": "constant"},
    **{loss: {"POLICY_LOSS": loss} for loss in ("gspo", "gspo_token", "cispo", "sapo", "gmpo")},
    "clip_cov": {"POLICY_LOSS": "clip_cov", "CLIP_COV_FRACTION": 0.1, "CLIP_COV_LOW": -100.0, "CLIP_COV_HIGH": 100.0},
    "kl_cov": {"POLICY_LOSS": "kl_cov", "KL_COV_FRACTION": 0.1},
    "top_entropy": {"TOP_ENTROPY_QUANTILE": 0.2},
    "tis": {"ROLLOUT_CORRECTION": "tis", "ROLLOUT_TIS_CAP": 1.0},
    "mis_sequence": {"ROLLOUT_CORRECTION": "mis", "ROLLOUT_CORRECTION_LEVEL": "sequence", "ROLLOUT_MIS_LOW": 0.01,
                     "ROLLOUT_MIS_HIGH": 2.0},
}


def parity_logp_old(case):
    """The π_old of a parity case in inputs.pt: the policy's own for the aggregations, perturbed for the losses."""
    return "logp_old" if case in ("token", "sample", "constant") else "logp_old_perturbed"


def sharded_sgd_step(path, batch, targets, overrides, micro_batch_size, precision="fp32", optimizer="sgd",
                     offload=False):
    """One policy_update of a freshly loaded, FSDP2-sharded policy on this rank's rows (SGD lr 1: the parameter
    change is minus the gradient), with dapo.py's constants and `overrides`. Returns (model, stats)."""
    model = shard_model(load_model(path, "cpu", torch.float32), precision, offload)
    opt = (torch.optim.SGD(model.parameters(), lr=1.0) if optimizer == "sgd"
           else torch.optim.AdamW(model.parameters(), lr=1e-3))
    specs = update_specs(MICRO_BATCH_SIZE=micro_batch_size, **overrides)
    stats = policy_update(model, opt, batch, targets, specs.loss, specs.optim, Passes(precision=precision),
                          warn=lambda *_: None)
    return model, stats


def rank_targets(inputs, rows, logp_old_key="logp_old"):
    mask = inputs["batch"].completion_mask[rows].float()
    return Targets(inputs["advantages"][rows], mask, inputs[logp_old_key][rows])


def parity(world, out, inputs):
    """Each rank trains its rows of the global batch; rank 0 saves the full parameters and the statistics."""
    rows = inputs["rows"][world.rank]
    batch = select_rows(inputs["batch"], rows)
    for case, overrides in PARITY_CASES.items():
        model, stats = sharded_sgd_step(inputs["path"], batch, rank_targets(inputs, rows, parity_logp_old(case)),
                                        overrides, micro_batch_size=2)
        state = gather_full_state_dict(model)
        if world.is_main:
            torch.save({"state": state, "stats": stats}, os.path.join(out, f"parity_{case}.pt"))
        if case == "sample":
            sample_model, sample_state = model, state  # the checkpoint and generation-copy checks below use it
    model, state = sample_model, sample_state
    # An untied lm_head (as in Qwen2.5-VL-7B) is one more parameter of the root unit.
    untied, stats_untied = sharded_sgd_step(inputs["untied_path"], batch,
                                            rank_targets(inputs, rows, "logp_old_untied"), {}, micro_batch_size=2)
    untied_state = gather_full_state_dict(untied)
    if world.is_main:
        torch.save({"state": untied_state, "stats": stats_untied}, os.path.join(out, "parity_untied.pt"))
    # The consolidated checkpoint and the generation copy come from the same gathered weights.
    if world.is_main:
        model.save_pretrained(os.path.join(out, "checkpoint"), state_dict=state, safe_serialization=True)
    copy = load_model(inputs["path"], "cpu", torch.bfloat16)
    sync_rollout_model(model, copy)
    if world.rank == 1:
        torch.save({k: v.float() for k, v in copy.state_dict().items()}, os.path.join(out, "generation_copy.pt"))
    # bf16 compute, fp32 master weights: every parameter still receives a gradient and moves.
    model, stats = sharded_sgd_step(inputs["path"], batch, rank_targets(inputs, rows), {}, micro_batch_size=2,
                                    precision="bf16-mixed", optimizer="adamw")
    after = gather_full_state_dict(model, to_all_ranks=True)
    if world.is_main:
        fresh = load_model(inputs["path"], "cpu", torch.float32).state_dict()
        moved = {k: bool((after[k] != fresh[k]).any()) for k in after}
        dtypes = {str(p.dtype) for p in model.parameters()}
        torch.save({"moved": moved, "stats": stats, "dtypes": dtypes},
                   os.path.join(out, "bf16.pt"))


def offload(world, out, inputs):
    """OFFLOAD_OPTIMIZER: an AdamW step with the gradient clipped (MAX_GRAD_NORM 0.05) on offloaded shards, and the
    generation copy refreshed from them."""
    rows = inputs["rows"][world.rank]
    model, stats = sharded_sgd_step(inputs["path"], select_rows(inputs["batch"], rows), rank_targets(inputs, rows),
                                    {"MAX_GRAD_NORM": 0.05}, micro_batch_size=2, optimizer="adamw", offload=True)
    state = gather_full_state_dict(model)
    copy = load_model(inputs["path"], "cpu", torch.float32)
    sync_rollout_model(model, copy)
    fsdp_params = [p for m in model.modules() if hasattr(m, "_get_fsdp_state")
                   for group in [m._get_fsdp_state()._fsdp_param_group] if group for p in group.fsdp_params]
    if world.is_main:
        torch.save({"state": state, "stats": stats, "copy": copy.state_dict(),
                    "offloaded": [p.offload_to_cpu for p in fsdp_params]}, os.path.join(out, "offload.pt"))


def lora_model(path, precision="fp32"):
    """The tiny VLM with rank-4 adapters on the text decoder, B made non-zero: the same on every rank and in the
    test's one process (seeded)."""
    torch.manual_seed(0)
    spec = update_specs(LORA_RANK=4, LORA_ALPHA=8.0)
    model = add_adapters(load_model(path, "cpu", inference_dtype(precision)), spec.lora)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    return model


def lora(world, out, inputs):
    """LoRA under FSDP2: one SGD step on this rank's rows (the adapters' gradients summed over ranks), the merged
    generation copy refreshed from the sharded policy, and a bf16-mixed step (bf16 base, fp32 adapters)."""
    rows = inputs["rows"][world.rank]
    batch = select_rows(inputs["batch"], rows)
    policy = lora_model(inputs["path"])
    copy = merged_copy(policy, "cpu", torch.float32)
    model = shard_model(policy, "fp32")
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1.0)
    specs = update_specs(MICRO_BATCH_SIZE=2)
    stats = policy_update(model, opt, batch, rank_targets(inputs, rows, "logp_old_lora"), specs.loss, specs.optim,
                          warn=lambda *_: None)
    state = gather_full_state_dict(model)  # the adapters only
    sync_rollout_model(model, copy)
    if world.is_main:
        torch.save({"state": state, "stats": stats, "copy": copy.state_dict()}, os.path.join(out, "lora.pt"))
    model = shard_model(lora_model(inputs["path"], "bf16-mixed"), "bf16-mixed")
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    before = {k: v.clone() for k, v in gather_full_state_dict(model, to_all_ranks=True).items()}
    stats = policy_update(model, opt, batch, rank_targets(inputs, rows, "logp_old_lora"), specs.loss, specs.optim,
                          Passes(precision="bf16-mixed"), warn=lambda *_: None)
    after = gather_full_state_dict(model, to_all_ranks=True)
    if world.is_main:
        dtypes = {("adapter" if "lora_" in n else "base"): str(p.dtype) for n, p in model.named_parameters()}
        torch.save({"moved": {k: bool((after[k] != before[k]).any()) for k in after}, "stats": stats,
                    "dtypes": dtypes}, os.path.join(out, "lora_bf16.pt"))


def gathering(world, out):
    """gather_rows on uneven shapes and dtypes; all_reduce_mean; a padding rank's rows left out; replay slots."""
    rows = torch.full((world.rank + 1, world.rank + 2), world.rank + 0.5)
    got = {"float": gather_rows(rows), "bool": gather_rows(torch.tensor([world.rank == 0] * (world.rank + 1))),
           "nested": gather_rows({"a": torch.full((world.rank + 1,), world.rank)}),
           "mean": all_reduce_mean(rows.mean().item(), rows.numel()),
           "without_padding": rank_rows(padding=world.rank == 1)(torch.full((2,), world.rank + 1.0)),
           "slots_full": replay_slots(n_fresh=8 if world.rank == 0 else 0, n_stored=0 if world.rank == 0 else 4,
                                      n_groups=8),
           "slots_short": replay_slots(n_fresh=3 if world.rank == 0 else 1, n_stored=2 if world.rank == 0 else 4,
                                       n_groups=8)}
    if world.rank == 1:  # every rank gets everything
        torch.save(got, os.path.join(out, "gathered.pt"))


def dynamic_sampling(world, out, inputs):
    """Rank 1's groups are all flat (accuracy 0): the ranks keep sampling until 4 informative groups exist
    globally, rank 0 trains on them and rank 1 joins the update with a zero-weight batch (one of its flat groups)."""
    path, group_size, n_groups = inputs["path"], 2, 4
    processor = load_processor(path)
    generator_model = load_model(path, "cpu", torch.float32)  # this rank's generation copy
    data = SyntheticVQA(64, seed=10 + world.rank, split="test")
    drawn = iter(range(64))
    torch.manual_seed(world.rank)

    def sample(examples, n):
        rollout = generate(generator_model, processor, examples, n,
                           Decoding(8, temperature=2.0, suppress_ids=suppressed_token_ids(processor.tokenizer)))
        right = torch.arange(len(rollout)) % 2 if world.rank == 0 else torch.zeros(len(rollout))
        rollout.rewards = {"accuracy": right.float(), "total": right.float()}
        return rollout

    rollout = update_specs(TRAIN_BATCH_PROMPTS=n_groups, GROUP_SIZE=group_size, DYNAMIC_SAMPLING_MODE="refill",
                           MAX_GEN_BATCHES=3).rollout  # TRAIN_BATCH_PROMPTS: the global batch
    everything, batch, padding, metrics = sample_step(sample, lambda k: [data[next(drawn)] for _ in range(k)], rollout,
                                                      processor.tokenizer.pad_token_id)
    n_train = metrics["dapo/train_groups"]
    logp_old, _ = batched_logprobs(generator_model, batch, 8)
    advantages = torch.linspace(-1.0, 1.0, len(batch))
    targets = Targets(advantages, batch.completion_mask.float(), logp_old, padding=padding)
    model, stats = sharded_sgd_step(path, batch, targets, {}, micro_batch_size=3)
    state = gather_full_state_dict(model)
    if world.is_main:
        torch.save({"state": state, "stats": stats, "metrics": metrics, "n_train": n_train,
                    "local_groups": len(batch.group_sizes), "padding": padding, "batch": batch, "logp_old": logp_old,
                    "advantages": advantages}, os.path.join(out, "dynamic.pt"))
    else:
        torch.save({"padding": padding, "rows": len(batch)}, os.path.join(out, "dynamic_rank1.pt"))


if __name__ == "__main__":
    torch.set_num_threads(1)
    world = init_distributed()
    assert world.world_size == 2, "run under torchrun --nproc_per_node=2"
    folder = sys.argv[1]
    inputs = torch.load(os.path.join(folder, "inputs.pt"), weights_only=False)
    parity(world, folder, inputs)
    offload(world, folder, inputs)
    lora(world, folder, inputs)
    gathering(world, folder)
    dynamic_sampling(world, folder, inputs)
    torch.distributed.destroy_process_group()
