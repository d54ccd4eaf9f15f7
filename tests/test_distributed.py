"""torchrun + FSDP2 on the CPU (gloo, 2 ranks): one optimizer step equals one process's on the same global batch."""

import os
import shutil
import subprocess
import sys

import pytest
import torch

from utils import layout
from utils.distributed import (World, all_reduce_mean, all_reduce_sum, gather_rows, prompts_per_rank, rank_rows,
                               rank_share, replay_slots, split_quota)
from utils.generation import Decoding
from utils.logprobs import batched_logprobs
from utils.lora import merged_copy
from utils.model import load_model, load_processor, suppressed_token_ids
from utils.rollout import generate
from utils.trainer import trainable
from utils.update import Targets, policy_update

from tests.distributed_worker import PARITY_CASES, lora_model, parity_logp_old

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORKER = os.path.join(ROOT, "tests", "distributed_worker.py")


@pytest.fixture(scope="module")
def one_process_step(make_specs):
    def step(path, batch, advantages, logp_old, overrides=None):
        """The reference: one unsharded process, the whole batch, SGD lr 1. Returns (parameters after, stats)."""
        model = load_model(path, "cpu", torch.float32)
        specs = make_specs(MICRO_BATCH_SIZE=len(batch), MAX_GRAD_NORM=1e9, **(overrides or {}))
        targets = Targets(advantages, batch.completion_mask.float(), logp_old)
        stats = policy_update(model, torch.optim.SGD(model.parameters(), lr=1.0), batch, targets, specs.loss,
                              specs.optim, warn=lambda *_: None)
        return model.state_dict(), stats

    return step


def max_difference(a, b):
    return max((a[k].float() - b[k].float()).abs().max().item() for k in b)


@pytest.fixture(scope="module")
def torchrun_results(tiny_vlm_path, tmp_path_factory):
    """Runs tests/distributed_worker.py on 2 CPU ranks once; returns (folder, inputs)."""
    from tests.test_model import examples

    folder = tmp_path_factory.mktemp("distributed")
    processor = load_processor(tiny_vlm_path)
    model = load_model(tiny_vlm_path, "cpu", torch.float32)
    torch.manual_seed(0)
    batch = generate(model, processor, examples(4, seed=5), 3,
                     Decoding(14, temperature=2.0, suppress_ids=suppressed_token_ids(processor.tokenizer)))
    logp_old, _ = batched_logprobs(model, batch, 12)  # 4 groups of 3, lengths vary
    inputs = {"path": tiny_vlm_path, "batch": batch, "logp_old": logp_old,
              "advantages": torch.linspace(-1.0, 2.0, len(batch)),
              "rows": {0: list(range(9)), 1: list(range(9, 12))}}  # uneven: 3 groups and 1 group
    untied = load_model(tiny_vlm_path, "cpu", torch.float32)  # as Qwen2.5-VL-7B: lm_head not tied to the embedding
    untied.config.tie_word_embeddings = untied.config.text_config.tie_word_embeddings = False
    layout.lm_head(untied).weight = torch.nn.Parameter(layout.lm_head(untied).weight.detach() * 1.1)
    untied.save_pretrained(folder / "untied")
    load_processor(tiny_vlm_path).save_pretrained(folder / "untied")
    inputs["untied_path"] = str(folder / "untied")
    inputs["logp_old_untied"], _ = batched_logprobs(untied, batch, 12)
    noise = torch.randn(logp_old.shape, generator=torch.Generator().manual_seed(1))
    inputs["logp_old_perturbed"] = logp_old + 2e-4 * noise  # ratios off 1 for the loss cases
    inputs["logp_old_lora"], _ = batched_logprobs(lora_model(tiny_vlm_path), batch, 12)
    torch.save(inputs, folder / "inputs.pt")
    torchrun = shutil.which("torchrun", path=os.path.dirname(sys.executable)) or "torchrun"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    done = subprocess.run([torchrun, "--standalone", "--nproc_per_node=2", WORKER, str(folder)], env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-4000:]
    return folder, inputs


@pytest.mark.parametrize("case", list(PARITY_CASES))
def test_two_sharded_ranks_step_like_one_process(torchrun_results, one_process_step, case):
    """Every loss aggregation, every POLICY_LOSS (with TOP_ENTROPY_QUANTILE and the covariance choices made over the
    whole mini-batch) and the rollout corrections: 2 ranks × micro-batches of 2 take the same step as one process on
    the whole batch."""
    folder, inputs = torchrun_results
    rows = inputs["rows"]
    tokens = [int(inputs["batch"].completion_mask[r].sum()) for r in rows.values()]
    assert tokens[0] != 3 * tokens[1], "the ranks' valid-token counts must be uneven"
    expected, expected_stats = one_process_step(inputs["path"], inputs["batch"], inputs["advantages"],
                                                inputs[parity_logp_old(case)], PARITY_CASES[case])
    got = torch.load(folder / f"parity_{case}.pt", weights_only=False)
    fresh = load_model(inputs["path"], "cpu", torch.float32).state_dict()
    assert set(got["state"]) == set(expected)
    assert max_difference(got["state"], expected) < 1e-5
    assert max_difference(expected, fresh) > 1e-3  # the step moved the parameters
    assert set(got["stats"]) == set(expected_stats)
    for k, value in expected_stats.items():  # the loss's own statistics (clip, gate, covariance, selected) too
        if k == "logp_mismatch":  # measured on each rank's first micro-batch, by definition not the whole batch's
            continue
        assert got["stats"][k] == pytest.approx(value, rel=1e-5, abs=1e-7), k
    selecting = {"top_entropy": "entropy_selected_frac", "clip_cov": "cov_frac", "kl_cov": "cov_frac",
                 "tis": "rollout_tis_capped_frac", "mis_sequence": "rollout_mis_masked_frac"}
    if case in selecting:  # the choice bit: some tokens, not all
        assert 0 < expected_stats[selecting[case]] < 1


def test_an_untied_lm_head_is_sharded_and_trained_too(torchrun_results, one_process_step):
    folder, inputs = torchrun_results
    model = load_model(inputs["untied_path"], "cpu", torch.float32)
    assert layout.lm_head(model).weight is not model.get_input_embeddings().weight
    expected, _ = one_process_step(inputs["untied_path"], inputs["batch"], inputs["advantages"],
                                   inputs["logp_old_untied"])
    got = torch.load(folder / "parity_untied.pt", weights_only=False)
    assert "lm_head.weight" in got["state"] and max_difference(got["state"], expected) < 1e-5
    assert (got["state"]["lm_head.weight"] != layout.lm_head(model).weight).any()


def test_checkpoint_and_generation_copy_hold_the_gathered_weights(torchrun_results):
    folder, _ = torchrun_results
    state = torch.load(folder / "parity_sample.pt", weights_only=False)["state"]
    saved = load_model(str(folder / "checkpoint"), "cpu", torch.float32).state_dict()
    assert max_difference(saved, state) == 0
    copy = torch.load(folder / "generation_copy.pt")
    assert max_difference(copy, state) < 1e-2  # bf16 copy of the fp32 weights


def test_bf16_mixed_precision_trains_every_parameter_with_fp32_master_weights(torchrun_results):
    folder, _ = torchrun_results
    got = torch.load(folder / "bf16.pt", weights_only=False)
    assert got["dtypes"] == {"torch.float32"}
    assert all(got["moved"].values()), [k for k, v in got["moved"].items() if not v]
    assert torch.isfinite(torch.tensor([got["stats"]["loss"], got["stats"]["grad_norm"]])).all()


def test_offloaded_shards_take_the_clipped_adamw_step_of_one_process(torchrun_results, make_specs):
    """OFFLOAD_OPTIMIZER (FSDP2's CPUOffloadPolicy): every FSDP parameter is offloaded; the AdamW step, its gradient
    clipped on the global norm, equals one process's; the generation copy refreshes from the offloaded shards."""
    folder, inputs = torchrun_results
    got = torch.load(folder / "offload.pt", weights_only=False)
    assert got["offloaded"] and all(got["offloaded"])
    model = load_model(inputs["path"], "cpu", torch.float32)
    specs = make_specs(MICRO_BATCH_SIZE=len(inputs["batch"]), MAX_GRAD_NORM=0.05)
    targets = Targets(inputs["advantages"], inputs["batch"].completion_mask.float(), inputs["logp_old"])
    stats = policy_update(model, torch.optim.AdamW(model.parameters(), lr=1e-3), inputs["batch"], targets,
                          specs.loss, specs.optim, warn=lambda *_: None)
    assert stats["grad_norm"] > 0.05  # the clipping bit
    assert got["stats"]["grad_norm"] == pytest.approx(stats["grad_norm"], rel=1e-5)
    assert max_difference(got["state"], model.state_dict()) < 1e-5
    assert max_difference(got["copy"], got["state"]) == 0


def test_lora_adapters_step_like_one_process_and_refresh_the_merged_copy(torchrun_results, make_specs):
    """LoRA under FSDP2: the adapters' step on 2 ranks equals one process's on the whole batch; only the adapters are
    gathered for the checkpoint; the generation copy holds W + (α/r)·B·A of the trained adapters."""
    folder, inputs = torchrun_results
    got = torch.load(folder / "lora.pt", weights_only=False)
    model = lora_model(inputs["path"])
    specs = make_specs(MICRO_BATCH_SIZE=len(inputs["batch"]), MAX_GRAD_NORM=1e9)
    targets = Targets(inputs["advantages"], inputs["batch"].completion_mask.float(), inputs["logp_old_lora"])
    policy_update(model, torch.optim.SGD(trainable(model), lr=1.0), inputs["batch"], targets, specs.loss,
                  specs.optim, warn=lambda *_: None)
    expected = {k: v for k, v in model.state_dict().items() if "lora_" in k}
    gathered_base = {k for k in got["state"] if "lora_" not in k}
    assert set(got["state"]) - gathered_base == set(expected)
    assert gathered_base <= {"base_model.model.lm_head.weight"}  # of the frozen base at most the tied head
    assert max_difference({k: got["state"][k] for k in expected}, expected) < 1e-5
    assert max_difference(lora_model(inputs["path"]).state_dict(), expected) > 1e-3  # the step moved them
    merged = merged_copy(model, "cpu", torch.float32).state_dict()
    assert max_difference(got["copy"], merged) < 1e-5
    assert max_difference(merged, load_model(inputs["path"], "cpu", torch.float32).state_dict()) > 1e-3


def test_lora_under_bf16_mixed_keeps_a_bf16_base_and_trains_fp32_adapters(torchrun_results):
    got = torch.load(torchrun_results[0] / "lora_bf16.pt", weights_only=False)
    assert got["dtypes"] == {"base": "torch.bfloat16", "adapter": "torch.float32"}
    adapters = {k: moved for k, moved in got["moved"].items() if "lora_" in k}
    assert adapters and all(adapters.values())  # every adapter trained
    assert not any(moved for k, moved in got["moved"].items() if k not in adapters)  # the base did not
    assert torch.isfinite(torch.tensor([got["stats"]["loss"], got["stats"]["grad_norm"]])).all()


def test_dynamic_sampling_counts_informative_groups_globally(torchrun_results, one_process_step):
    """Rank 1 samples only flat groups; the rounds go on until 4 informative groups exist over both ranks, rank 0
    trains on all 4, rank 1 joins with zero weight, and the step equals one process's on rank 0's groups."""
    folder, inputs = torchrun_results
    got = torch.load(folder / "dynamic.pt", weights_only=False)
    assert got["n_train"] == 4 and got["local_groups"] == 4 and not got["padding"]
    assert torch.load(folder / "dynamic_rank1.pt") == {"padding": True, "rows": 2}  # one flat group, zero weight
    assert got["metrics"]["dapo/gen_batches"] == 2 and got["metrics"]["dapo/train_groups"] == 4
    assert got["metrics"]["dapo/kept_group_frac"] == pytest.approx(0.5)  # 4 of the 8 groups sampled
    expected, expected_stats = one_process_step(inputs["path"], got["batch"], got["advantages"], got["logp_old"])
    assert max_difference(got["state"], expected) < 1e-5
    assert got["stats"]["loss"] == pytest.approx(expected_stats["loss"], rel=1e-5, abs=1e-7)


def test_gather_rows_pads_and_concatenates_in_rank_order(torchrun_results):
    """Rank r holds r + 1 rows of width r + 2 (bool, int and float): every rank gets all 3 rows, zero-padded.
    (Saved by rank 1.)"""
    folder, _ = torchrun_results
    got = torch.load(folder / "gathered.pt")
    assert got["float"].tolist() == [[0.5, 0.5, 0.0], [1.5, 1.5, 1.5], [1.5, 1.5, 1.5]]
    assert got["bool"].dtype == torch.bool and got["bool"].tolist() == [True, False, False]
    assert got["nested"]["a"].dtype == torch.int64 and got["nested"]["a"].tolist() == [0, 1, 1]
    assert got["mean"] == pytest.approx((0.5 * 2 + 1.5 * 6) / 8)
    assert got["without_padding"].tolist() == [1.0, 1.0]  # rank 1 (padding) adds no rows
    # The global batch already full: rank 1 replays nothing (it would fill its own share alone); 4 short: 2 + 2.
    assert got["slots_full"] == 0 and got["slots_short"] == 2


def test_split_quota_fills_the_batch_from_the_ranks_with_groups_left():
    assert split_quota([4, 0], 4) == [4, 0]
    assert split_quota([3, 3], 4) == [2, 2]
    assert split_quota([5, 1, 0], 6) == [5, 1, 0]
    assert split_quota([1, 1], 4) == [1, 1]  # not enough anywhere: train on what there is
    assert split_quota([9, 9, 9], 4) == [2, 1, 1]


def test_one_process_is_unchanged():
    world = World()
    assert world.is_main and world.world_size == 1 and world.device is None
    assert all_reduce_sum(3) == 3 and all_reduce_sum([1.5, 2]) == [1.5, 2]
    rows = torch.arange(6.0).reshape(3, 2)
    assert gather_rows(rows) is rows and rank_rows()(rows) is rows and all_reduce_mean(2.5, 6) == 2.5
    assert replay_slots(n_fresh=3, n_stored=4, n_groups=8) == 4 and replay_slots(8, 4, 8) == 0
    assert rank_share(list(range(5)), world) == list(range(5)) and prompts_per_rank(8, world) == 8
    assert rank_share(list(range(5)), World(1, 2)) == [1, 3] and prompts_per_rank(5, World(1, 2)) == 2
