"""A killed run resumes exactly: each trainer, stopped by SIGKILL (after a checkpoint, or while writing one) or by
SIGTERM, then resumed with RESUME=auto, leaves the metrics.jsonl of a run that was never stopped.

The kills come from the test: a `python -c` driver wraps a function of utils.checkpoint (or RunLog.log_metrics)
so that the process kills itself at the chosen moment, then runs the trainer's main()."""

import glob
import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["--TOTAL_STEPS=4", "--SAVE_EVERY=2", "--EVAL_EVERY=2", "--EVAL_SAMPLES=8", "--TRAIN_BATCH_PROMPTS=3",
        "--GROUP_SIZE=4", "--MAX_NEW_TOKENS=16", "--OVERLONG_BUFFER=4", "--LOG_EVERY=1", "--LOG_SAMPLES=1",
        "--PLOT_EVERY=0", "--CPU_THREADS=1"]  # one thread: deterministic CPU kernels
DRIVER = """
import os, signal, sys
import utils.checkpoint as ck
from utils.runlog import RunLog

mode, at, trainer, argv = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4:]
die = lambda: os.kill(os.getpid(), signal.SIGKILL)
if mode == "kill_after_save":  # the checkpoint of step `at` is complete, then the process dies
    save = ck.save_checkpoint
    def after_save(run_dir, step, *args, **kwargs):
        path = save(run_dir, step, *args, **kwargs)
        if step == at:
            die()
        return path
    ck.save_checkpoint = after_save  # before the trainer imports it
elif mode == "kill_while_saving":  # the weights and training state of step `at` are written, not the marker
    finalize = ck.finalize
    def killed_finalize(tmp, final, step):
        if step == at:
            die()
        finalize(tmp, final, step)
    ck.finalize = killed_finalize
elif mode == "sigterm_at_step":  # as a scheduler would, while step `at` is being logged
    log_metrics = RunLog.log_metrics
    def terminated(self, metrics):
        log_metrics(self, metrics)
        if metrics["step"] == at:
            os.kill(os.getpid(), signal.SIGTERM)
    RunLog.log_metrics = terminated
elif mode == "sigterm_during_eval":  # while the held-out evaluation of step `at` runs
    import utils.trainer as house
    evaluate, calls = house.evaluate, []
    def interrupted_evaluation(*args, **kwargs):
        calls.append(1)
        if len(calls) == at // 2 + 1:  # EVAL_EVERY=2 (TINY); the first call is step 0's
            os.kill(os.getpid(), signal.SIGTERM)
        return evaluate(*args, **kwargs)
    house.evaluate = interrupted_evaluation
from utils.config import run_cli
run_cli(__import__(trainer).main, argv)
"""


def run(trainer, runs_dir, *args, mode="none", at=0):
    command = [sys.executable, "-c", DRIVER, mode, str(at), trainer, *TINY, f"--RUNS_DIR={runs_dir}", *args]
    return subprocess.run(command, cwd=ROOT, env=dict(os.environ, TQDM_DISABLE="1"), capture_output=True, text=True,
                          timeout=600)


def ok(done):
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done.stdout + done.stderr


def metrics(runs_dir):
    (run_dir,) = glob.glob(os.path.join(runs_dir, "*_*"))
    rows = [json.loads(line) for line in open(os.path.join(run_dir, "metrics.jsonl"))]
    return [{k: v for k, v in row.items() if not k.startswith("perf/")} for row in rows]  # timings differ


def markdown(runs_dir):
    (run_dir,) = glob.glob(os.path.join(runs_dir, "*_*"))
    return [open(os.path.join(run_dir, name)).read() for name in ("rollout_results.md", "token_weights.md")]


def test_dapo_stopped_three_ways_resumes_exactly(tiny_vlm_path, tmp_path):
    """DAPO with refill (one round) and a replay buffer: SIGTERM in step 1, SIGKILL while writing the step-4 checkpoint, each
    resumed; then resuming the finished run, and resuming with a changed learning rate. The resumed metrics equal
    the reference run's whatever was sampled, so the test asserts no particular outcome of the model."""
    args = ["--REPLAY_BUFFER_SIZE=2", "--REPLAY_MIN_REWARD_STD=0.1", "--MAX_GEN_BATCHES=1"]
    ok(run("dapo", tmp_path / "ref", *args))
    runs = tmp_path / "runs"

    out = ok(run("dapo", runs, *args, mode="sigterm_at_step", at=1))  # exits 0 after a checkpoint
    assert "SIGTERM received" in out and "stopped by SIGTERM after step 1" in out
    assert os.listdir(glob.glob(str(runs / "*" / "checkpoints"))[0]) == ["step_1"]

    killed = run("dapo", runs, "--RESUME=auto", mode="kill_while_saving", at=4)
    assert killed.returncode == -9
    assert [r["step"] for r in metrics(runs)] == [0, 1, 2, 3, 4]  # rows of steps 3-4 are past the last checkpoint
    out = ok(run("dapo", runs, "--RESUME=auto"))
    assert "step_4.tmp is half-written" in out and "resumed from" in out and "step_2: step 2 of 4" in out
    assert metrics(runs) == metrics(tmp_path / "ref")
    assert markdown(runs) == markdown(tmp_path / "ref")
    # Whether groups are replayed depends on what this machine samples; the replay buffer's state is restored all
    # the same (the metrics above include its size at every step, and tests/test_checkpoint.py's round trip).

    out = ok(run("dapo", runs, "--RESUME=auto"))
    assert "the run is finished (TOTAL_STEPS=4); nothing to train" in out
    refused = run("dapo", runs, "--RESUME=auto", "--TOTAL_STEPS=6", "--LEARNING_RATE=0.1")
    assert refused.returncode == 2 and "LEARNING_RATE would change the run" in refused.stderr
    assert "TOTAL_STEPS" not in refused.stderr  # allowed on resume
    assert metrics(runs) == metrics(tmp_path / "ref")


@pytest.mark.parametrize("trainer, args, mode", [
    # a reference model, two-stage rewards, a sequence-level loss; 6 training prompts, 3 a step: the stop after
    # step 2 falls exactly on an epoch boundary, and the run goes through two more epochs
    ("grpo", ["--REWARD_SWITCH_STEP=2", "--POLICY_LOSS=gspo", "--TRAIN_SIZE=6"], "sigterm_during_eval"),
    ("ppo", ["--GROUP_SIZE=1", "--TRAIN_BATCH_PROMPTS=6", "--CRITIC_WARMUP_STEPS=1", "--POLICY_LOSS=cispo",
             "--TOP_ENTROPY_QUANTILE=0.5"], "kill_after_save"),
    ("ppo", ["--GROUP_SIZE=1", "--TRAIN_BATCH_PROMPTS=6", "--CRITIC_WARMUP_STEPS=1", "--CRITIC_SHARED_BACKBONE=False",
             "--POLICY_LOSS=clip_cov", "--CLIP_COV_FRACTION=0.05", "--CLIP_COV_LOW=-100"], "kill_while_saving"),
    # LoRA: the policy's adapters, the separate critic's own adapters, the reference without adapters (KL_COEF)
    ("ppo", ["--GROUP_SIZE=1", "--TRAIN_BATCH_PROMPTS=6", "--CRITIC_WARMUP_STEPS=1", "--CRITIC_SHARED_BACKBONE=False",
             "--LORA_RANK=4", "--LEARNING_RATE=3e-3"], "kill_after_save"),
], ids=["grpo-gspo-sigterm-in-eval", "ppo-shared-critic-cispo", "ppo-separate-critic-clip_cov", "ppo-lora"])
def test_killed_run_resumes_exactly(tiny_vlm_path, tmp_path, trainer, args, mode):
    ok(run(trainer, tmp_path / "ref", *args))
    at = 4 if mode == "kill_while_saving" else 2
    stopped = run(trainer, tmp_path / "runs", *args, mode=mode, at=at)
    if mode == "sigterm_during_eval":  # the evaluation finishes, then the stop checkpoint of that step is written
        assert stopped.returncode == 0 and "stopped by SIGTERM after step 2" in stopped.stdout + stopped.stderr
        assert os.listdir(glob.glob(str(tmp_path / "runs" / "*" / "checkpoints"))[0]) == ["step_2"]
    else:
        assert stopped.returncode == -9
    ok(run(trainer, tmp_path / "runs", *args, "--RESUME=auto"))  # the same values again: allowed
    assert metrics(tmp_path / "runs") == metrics(tmp_path / "ref")
