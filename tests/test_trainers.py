"""End-to-end: each trainer runs 2 steps on the embedded tiny VLM in a subprocess and leaves a run folder."""

import glob
import json
import os
import subprocess
import sys

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
REQUIRED_KEYS = [
    "step", "reward/total/mean", "reward/accuracy/mean", "reward/format/mean", "policy/loss", "policy/entropy",
    "policy/clip_frac_low", "policy/clip_frac_high", "policy/kl", "response/length/mean",
    "response/truncated_frac", "dapo/gen_batches", "dapo/kept_group_frac", "perf/step_s", "perf/tokens_per_s",
]


def run_trainer(script, runs_dir, *extra):
    args = [sys.executable, os.path.join(ROOT, script), "--TOTAL_STEPS=2", "--EVAL_EVERY=1", "--EVAL_SAMPLES=12",
            "--TRAIN_BATCH_PROMPTS=3", "--GROUP_SIZE=4", "--MAX_NEW_TOKENS=16", "--OVERLONG_BUFFER=4",
            f"--RUNS_DIR={runs_dir}", *extra]
    env = dict(os.environ, TQDM_DISABLE="1")
    done = subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    (run_dir,) = glob.glob(os.path.join(runs_dir, f"{script[:-3]}_*"))
    return run_dir


def check_run_folder(run_dir, script):
    config = json.load(open(os.path.join(run_dir, "config.json")))
    assert config["TOTAL_STEPS"] == 2
    assert open(os.path.join(run_dir, script)).read() == open(os.path.join(ROOT, script)).read()
    rows = [json.loads(line) for line in open(os.path.join(run_dir, "metrics.jsonl"))]
    assert [r["step"] for r in rows] == [0, 1, 2]
    for row in rows[1:]:
        missing = [k for k in REQUIRED_KEYS if k not in row]
        assert not missing, f"{script}: missing {missing}"
        assert 0.0 <= row["eval/accuracy"] <= 1.0 and 0.0 <= row["eval/format"] <= 1.0
        assert row["policy/entropy"] is None or row["policy/entropy"] >= 0
        assert row["perf/step_s"] > 0 and row["perf/tokens_per_s"] > 0
    assert 0.0 <= rows[0]["eval/accuracy"] <= 1.0
    return config, rows


def test_dapo_then_grpo_from_its_checkpoint(tiny_vlm_path, tmp_path):
    dapo_dir = run_trainer("dapo.py", tmp_path / "runs")
    config, rows = check_run_folder(dapo_dir, "dapo.py")
    assert config["KL_BETA"] == 0.0 and all(r["policy/kl"] in (0.0, None) for r in rows[1:])
    assert all(1 <= r["dapo/gen_batches"] <= config["MAX_GEN_BATCHES"] for r in rows[1:])

    # The checkpoint loads with transformers directly ...
    checkpoint = os.path.join(dapo_dir, "checkpoints", "step_2")
    from transformers import Qwen2_5_VLForConditionalGeneration

    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(checkpoint)
    assert os.path.isfile(os.path.join(checkpoint, "model.safetensors"))
    trained = dict(model.named_parameters())
    original = Qwen2_5_VLForConditionalGeneration.from_pretrained(tiny_vlm_path)
    assert any(not torch.equal(p, trained[n]) for n, p in original.named_parameters())

    # ... and as the starting point of a GRPO run (with a reference model: β = 0.04).
    grpo_dir = run_trainer("grpo.py", tmp_path / "runs", f"--MODEL_NAME_OR_PATH={checkpoint}")
    config, rows = check_run_folder(grpo_dir, "grpo.py")
    assert config["MODEL_NAME_OR_PATH"] == checkpoint
    assert all(r["dapo/gen_batches"] == 1 and r["dapo/kept_group_frac"] == 1.0 for r in rows[1:])
    assert all(r["policy/kl"] is not None and r["policy/kl"] >= 0 for r in rows[1:])


def test_bad_override_fails_before_any_work(tmp_path):
    done = subprocess.run([sys.executable, "dapo.py", "--TOTAL_STEP=3", f"--RUNS_DIR={tmp_path}"], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode != 0 and "did you mean --TOTAL_STEPS" in done.stderr
    assert not os.listdir(tmp_path)
