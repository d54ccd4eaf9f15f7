"""The trainers under `torchrun --nproc_per_node=2` on the CPU (gloo, FSDP2): 3 steps each, one run folder written
by rank 0, global metrics, a consolidated checkpoint that transformers loads, and an exact resume (DAPO, PPO)."""

import glob
import json
import os
import re
import shutil
import subprocess
import sys

import pytest
import torch

from tests.test_trainers import ATTENTION_KEYS, REQUIRED_KEYS

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMALL = ["--TOTAL_STEPS=3", "--EVAL_EVERY=3", "--EVAL_SAMPLES=12", "--GROUP_SIZE=4", "--MAX_NEW_TOKENS=16",
         "--OVERLONG_BUFFER=4", "--LOG_EVERY=1", "--LOG_SAMPLES=1", "--PLOT_EVERY=0", "--SAVE_EVERY=1",
         "--KEEP_CHECKPOINTS=0", "--CPU_THREADS=1", "--MICRO_BATCH_SIZE=5"]
EXTRA = {"dapo.py": ["--TRAIN_BATCH_PROMPTS=3"],  # uneven: 2 prompts on rank 0, 1 on rank 1
         "grpo.py": ["--TRAIN_BATCH_PROMPTS=3"],
         "ppo.py": ["--TRAIN_BATCH_PROMPTS=6", "--GROUP_SIZE=1", "--CRITIC_WARMUP_STEPS=1"]}


def torchrun(script, runs_dir, *extra):
    """`torchrun --standalone --nproc_per_node=2 <script>` with the small settings; returns the one run folder."""
    launcher = shutil.which("torchrun", path=os.path.dirname(sys.executable)) or "torchrun"
    args = [launcher, "--standalone", "--nproc_per_node=2", os.path.join(ROOT, script), *SMALL, *EXTRA[script],
            f"--RUNS_DIR={runs_dir}", *extra]
    env = dict(os.environ, TQDM_DISABLE="1", OMP_NUM_THREADS="1")
    done = subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-5000:]
    runs = glob.glob(os.path.join(runs_dir, "*"))
    assert len(runs) == 1, runs  # one writer: rank 0
    return runs[0], done.stdout


def metrics_rows(run_dir):
    return [json.loads(line) for line in open(os.path.join(run_dir, "metrics.jsonl"))]


def untimed(row):
    """A metrics row without its timings (perf/*): what must repeat exactly on resume."""
    return {k: v for k, v in row.items() if not k.startswith("perf/")}


@pytest.mark.parametrize("script", ["dapo.py", "grpo.py", "ppo.py"])
def test_two_ranks_train_three_steps(tiny_vlm_path, tmp_path, script):
    run_dir, stdout = torchrun(script, tmp_path / "runs")
    rows = metrics_rows(run_dir)
    assert [r["step"] for r in rows] == [0, 1, 2, 3]
    for row in rows[1:]:
        missing = [k for k in REQUIRED_KEYS + ATTENTION_KEYS if k not in row]
        assert not missing, missing
        assert row["policy/skipped_updates"] == 0 and row["policy/updates"] >= 1
        assert row["perf/tokens_per_s"] > 0 and 0 <= row["reward/accuracy/mean"] <= 1
    prompts = int(EXTRA[script][0].split("=")[1])
    if script == "dapo.py":  # informative groups of both ranks, at most the global batch
        assert all(0 <= r["dapo/train_groups"] <= prompts for r in rows[1:])
    else:  # every group of both ranks is trained on
        assert all(r["dapo/train_groups"] == prompts and r["dapo/kept_group_frac"] == 1.0 for r in rows[1:])
    if script == "ppo.py":
        assert [r["critic/warmup"] for r in rows[1:]] == [1.0, 0.0, 0.0]
        assert rows[1]["critic/values/mean"] == 0.0 and rows[2]["critic/values/mean"] != 0.0
    assert 0 <= rows[-1]["eval/accuracy"] <= 1  # both ranks' shares of the 12 held-out examples
    assert stdout.count("run folder:") == 1  # rank 0 prints, the other rank is quiet

    checkpoint = os.path.join(run_dir, "checkpoints", "step_3")
    assert os.path.isfile(os.path.join(checkpoint, "COMPLETE"))
    assert {os.path.basename(p) for p in glob.glob(os.path.join(checkpoint, "rank_*.pt"))} == {"rank_0.pt",
                                                                                              "rank_1.pt"}
    assert os.path.isdir(os.path.join(checkpoint, "sharded"))  # torch.distributed.checkpoint: AdamW shards
    from transformers import Qwen2_5_VLForConditionalGeneration

    trained = Qwen2_5_VLForConditionalGeneration.from_pretrained(checkpoint).state_dict()
    start = Qwen2_5_VLForConditionalGeneration.from_pretrained(tiny_vlm_path).state_dict()
    assert set(trained) == set(start)
    assert any(not torch.equal(trained[k], start[k]) for k in start)  # the gathered, trained weights

    if script != "grpo.py":
        # Steps 2 and 3 again from the step-1 checkpoint (the optimizer's shards, each rank's generators, the
        # sampler; for PPO the end of the critic warm-up, when only the critic's head has AdamW state): the same
        # numbers as the uninterrupted run.
        torchrun(script, tmp_path / "runs", f"--RESUME={os.path.join(run_dir, 'checkpoints', 'step_1')}")
        resumed = metrics_rows(run_dir)
        assert [r["step"] for r in resumed] == [0, 1, 2, 3]
        assert [untimed(r) for r in resumed] == [untimed(r) for r in rows]


def test_two_ranks_train_lora_adapters_and_resume_exactly(tiny_vlm_path, tmp_path):
    """dapo.py with LoRA under torchrun: the checkpoint holds the adapters (gathered from the shards) in PEFT's format,
    and steps 2 and 3 resumed from step 1 give the same numbers."""
    lora = ["--LORA_RANK=4", "--LEARNING_RATE=3e-3", "--DYNAMIC_SAMPLING=False"]  # every step trains
    run_dir, _ = torchrun("dapo.py", tmp_path / "runs", *lora)
    rows = metrics_rows(run_dir)
    assert [r["step"] for r in rows] == [0, 1, 2, 3]
    assert all(r["policy/updates"] == 1 and r["policy/skipped_updates"] == 0 for r in rows[1:])
    from safetensors.torch import load_file

    adapters = [load_file(os.path.join(run_dir, "checkpoints", f"step_{s}", "adapter_model.safetensors"))
                for s in (1, 3)]
    assert adapters[0] and all(".lora_" in k for k in adapters[0])
    if any(r["policy/advantage_abs_mean"] > 0 for r in rows[2:]):  # (unless every group of steps 2-3 was flat)
        assert any(not torch.equal(adapters[0][k], adapters[1][k]) for k in adapters[0])  # trained in steps 2-3
    torchrun("dapo.py", tmp_path / "runs", *lora, f"--RESUME={os.path.join(run_dir, 'checkpoints', 'step_1')}")
    assert [untimed(r) for r in metrics_rows(run_dir)] == [untimed(r) for r in rows]


def test_offloaded_optimizer_state_trains_and_resumes_exactly(tmp_path):
    """OFFLOAD_OPTIMIZER=True (FSDP2's CPUOffloadPolicy): dapo.py trains with its shards and AdamW state in CPU
    memory, and steps 2 and 3 resumed from step 1 (the AdamW shards loaded into offloaded parameters) give the same
    numbers. That an offloaded step equals one process's: tests/test_distributed.py."""
    offload = ["--OFFLOAD_OPTIMIZER=True", "--DYNAMIC_SAMPLING=False"]
    run_dir, stdout = torchrun("dapo.py", tmp_path / "runs", *offload)
    rows = metrics_rows(run_dir)
    assert [r["step"] for r in rows] == [0, 1, 2, 3] and re.search(r"OFFLOAD_OPTIMIZER +=  *true", stdout)
    assert all(r["policy/updates"] == 1 and r["policy/skipped_updates"] == 0 for r in rows[1:])
    torchrun("dapo.py", tmp_path / "runs", *offload, f"--RESUME={os.path.join(run_dir, 'checkpoints', 'step_1')}")
    assert [untimed(r) for r in metrics_rows(run_dir)] == [untimed(r) for r in rows]
