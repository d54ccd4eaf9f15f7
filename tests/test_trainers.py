"""End-to-end: each trainer runs 2 steps on the embedded tiny VLM in a subprocess and leaves a run folder."""

import glob
import json
import math
import os
import re
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
REQUIRED_KEYS = [
    "step", "reward/total/mean", "reward/accuracy/mean", "reward/format/mean", "response/length/mean",
    "response/truncated_frac", "dapo/gen_batches", "dapo/kept_group_frac", "dapo/train_groups", "perf/step_s",
    "perf/tokens_per_s",
]
UPDATE_KEYS = ["policy/loss", "policy/entropy", "policy/clip_frac_low", "policy/clip_frac_high", "policy/kl"]


ATTENTION_KEYS = [f"attention/{stage}/{metric}" for stage in ("early", "middle", "late", "all")
                  for metric in ("text_ratio", "vision_ratio", "aei_text", "aei_vision", "mdi", "mdi_median",
                                 "sink_ratio", "response_ratio")] + ["attention/vision_tokens", "attention/text_tokens"]


def run_trainer(script, runs_dir, *extra):
    args = [sys.executable, os.path.join(ROOT, script), "--TOTAL_STEPS=2", "--EVAL_EVERY=1", "--EVAL_SAMPLES=12",
            "--TRAIN_BATCH_PROMPTS=3", "--GROUP_SIZE=4", "--MAX_NEW_TOKENS=16", "--OVERLONG_BUFFER=4",
            "--LOG_EVERY=1", "--LOG_SAMPLES=1",
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
        # A step whose sampling found no informative group (dynamic sampling) has no update and no update metrics:
        # which steps those are depends on the machine's numerics, so each row is checked for what it must hold.
        trained = row["dapo/train_groups"] > 0
        missing = [k for k in REQUIRED_KEYS + (UPDATE_KEYS if trained else []) if k not in row]
        assert not missing, f"{script}: missing {missing}"
        assert trained or not any(k in row for k in UPDATE_KEYS)
        assert 0.0 <= row["eval/accuracy"] <= 1.0 and 0.0 <= row["eval/format"] <= 1.0
        assert row.get("policy/entropy") is None or row["policy/entropy"] >= 0
        assert row["perf/step_s"] > 0 and row["perf/tokens_per_s"] > 0
        assert row["perf/flops_per_step"] > 0 and row["perf/mfu_generate"] > 0  # the CPU's peak is measured
        assert not trained or row["perf/mfu_update"] > 0
    assert 0.0 <= rows[0]["eval/accuracy"] <= 1.0
    for row in rows:  # EVAL_BLANK_IMAGE is on by default: the same questions with blank images
        assert 0.0 <= row["eval/accuracy_blank_image"] <= 1.0
        assert row["eval/grounding_gap"] == pytest.approx(row["eval/accuracy"] - row["eval/accuracy_blank_image"])
    groups = config["TRAIN_BATCH_PROMPTS"] * config["GROUP_SIZE"]  # completions per generation round
    counts = [(r["progress/completions"], r["progress/completion_tokens"], r["perf/elapsed_s"]) for r in rows]
    assert counts[0] == (0, 0, 0.0)
    for before, after, row in zip(counts, counts[1:], rows[1:]):  # cumulative, from every round and top-up
        topup = "dapo/topup_samples" in row  # one round of whole groups, then single completions
        assert after[0] - before[0] == (groups + row["dapo/topup_samples"] if topup else row["dapo/gen_batches"] * groups)
        assert after[1] > before[1] and after[2] == pytest.approx(before[2] + row["perf/step_s"])
    for row in (r for r in rows[1:] if r["dapo/train_groups"]):  # attention metrics are on by default
        for key in ATTENTION_KEYS:
            assert math.isfinite(row[key]), key
        assert row["attention/text_only_count"] == 0 and row["attention/vision_tokens"] == 16
        assert row["attention/all/mdi"] == pytest.approx(row["attention/all/aei_text"] / row["attention/all/aei_vision"])
    check_markdown_logs(run_dir, [r["step"] for r in rows[1:] if r["dapo/train_groups"]])
    assert os.path.getsize(os.path.join(run_dir, "plots", "training_metrics.png")) > 10_000
    return config, rows


def check_grounding(row):
    """The grounding/ metrics of a step that measured the visual dependency."""
    assert 0 <= row["grounding/visual_kl_p50"] <= row["grounding/visual_kl_p90"] <= row["grounding/visual_kl_max"]
    assert row["grounding/visual_kl_mean"] <= row["grounding/visual_kl_max"]
    for key in ("grounding/corr_entropy", "grounding/corr_image_attention"):
        assert row[key] is None or -1 - 1e-9 <= row[key] <= 1 + 1e-9  # None (NaN): a constant KL


def table_rows(markdown, header):
    """The rows (lists of cells) of the first markdown table whose header row is `header`."""
    lines = markdown.splitlines()
    start = lines.index(header)
    rows = []
    for line in lines[start + 2:]:
        if not line.startswith("|"):
            break
        rows.append([cell.strip() for cell in line.strip("|").split("|")])
    return rows


def check_markdown_logs(run_dir, trained_steps):
    """The four markdown logs exist, have one entry per logged step, and their tables hold finite numbers; the entry
    of a step with an update shows its attention (a step without one, which dynamic sampling may leave on some
    machines, shows every completion sampled and no attention)."""
    read = lambda name: open(os.path.join(run_dir, name)).read()  # noqa: E731
    results = read("rollout_results.md")
    assert results.count("## Step ") == 2  # LOG_EVERY=1, 2 steps
    for step, entry in enumerate(results.split("## Step ")[1:], 1):
        summary = dict(table_rows(entry, "| Metric | Value |"))
        assert list(summary) == ["Accuracy", "Format", "MDI", "Total reward", "Success rate", "Completions"]
        for key in ("Accuracy", "Format", "Total reward"):
            mean, std = (float(x) for x in summary[key].split(" ± "))
            assert math.isfinite(mean) and math.isfinite(std) and std >= 0
        if step not in trained_steps:
            assert summary["MDI"] == "off"
            continue
        mdi = summary["MDI"].split(" (")[0].split(" ± ")
        assert all(math.isfinite(float(x)) for x in mdi) and float(mdi[0]) > 0
        stages = table_rows(entry, "| Stage | MDI mean | MDI std | AEI text | AEI vision |")
        assert [row[0] for row in stages] == ["Early", "Middle", "Late", "All"]
        assert all(math.isfinite(float(x)) for row in stages for x in row[1:])
    image = re.search(r"!\[[^\]]*\]\(([^)]+)\)", results).group(1)
    assert os.path.getsize(os.path.join(run_dir, image)) > 100
    tokens = dict(table_rows(read("attention_diagnostics.md"), "| Tokens | Mean ± std |"))
    assert tokens["Vision tokens"] == "16.000 ± 0.000"  # 56x56 image, 7-pixel patches merged 2x2
    assert float(tokens["Text tokens"].split(" ± ")[0]) > 20
    weights = read("token_weights.md")
    assert weights.count("## Step ") == 2 and "advantage" in weights and "<think>" in weights
    terminal = read("run_terminal.md")
    assert "## Config" in terminal and "TOTAL_STEPS" in terminal and "### Step 2" in terminal
    assert "**Rewards**" in terminal
    if trained_steps:
        assert "**Policy**" in terminal and "**Attention**" in terminal
        assert os.path.getsize(os.path.join(run_dir, "plots", "attention_mdi.png")) > 10_000


def test_dapo_then_grpo_from_its_checkpoint(tiny_vlm_path, tmp_path):
    # DAPO with the attention ablation (VGR token weights and the MDI reward) and top-up dynamic sampling.
    dapo_dir = run_trainer("dapo.py", tmp_path / "runs", "--USE_TOKEN_WEIGHTS=True", "--W_MDI=0.1",
                           "--TOKEN_WEIGHT_SMOOTHING=1.0", "--DYNAMIC_SAMPLING_MODE=topup", "--MAX_DYNAMIC_SAMPLES=6",
                           "--GROUNDING_EVERY=1")
    config, rows = check_run_folder(dapo_dir, "dapo.py")
    for row in rows[1:]:  # one round of 3 prompts x 4, then at most 2 top-up rounds of one completion per group
        assert 1 <= row["dapo/gen_batches"] <= 3 and 0 <= row["dapo/topup_samples"] <= 3 * 2
        assert row["dapo/train_groups"] == round(3 * row["dapo/kept_group_frac"])
    for row in (r for r in rows[1:] if r["dapo/train_groups"]):
        assert -0.5 <= row["reward/mdi/mean"] <= 0.5
        assert row["policy/token_weight_mean"] == pytest.approx(1.0, abs=1e-4)
        assert 0.2 - 1e-5 <= row["policy/token_weight_min"] <= row["policy/token_weight_max"] <= 3.0 + 1e-5
        check_grounding(row)
    weights_log = open(os.path.join(dapo_dir, "token_weights.md")).read()
    assert "Token weights: each word shows" in weights_log and "Visual dependency, word(KL" in weights_log
    assert re.search(r"shapes\(\d\.\d\d\)", weights_log)  # e.g. "shapes(1.85)"
    assert config["KL_BETA"] == 0.0 and all(r.get("policy/kl") in (0.0, None) for r in rows[1:])

    # The checkpoint loads with transformers directly ...
    checkpoint = os.path.join(dapo_dir, "checkpoints", "step_2")
    from transformers import Qwen2_5_VLForConditionalGeneration

    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(checkpoint)
    assert os.path.isfile(os.path.join(checkpoint, "model.safetensors"))
    trained = dict(model.named_parameters())
    original = Qwen2_5_VLForConditionalGeneration.from_pretrained(tiny_vlm_path)
    moved = any(not torch.equal(p, trained[n]) for n, p in original.named_parameters())
    assert moved == any(row.get("policy/updates") for row in rows[1:])  # the weights move iff a step updated them

    # ... and as the starting point of a GRPO run (with a reference model: β = 0.04), here with the replay
    # buffer, dual clip and two-stage rewards (format weighs 2 in step 1, 1 after).
    grpo_dir = run_trainer("grpo.py", tmp_path / "runs", f"--MODEL_NAME_OR_PATH={checkpoint}", "--PPO_EPOCHS=2",
                           "--MINI_BATCHES=2", "--MICRO_BATCH_SIZE=5", "--REPLAY_BUFFER_SIZE=2", "--DUAL_CLIP_C=3",
                           "--REWARD_SWITCH_STEP=1", "--REWARD_WEIGHTS_EARLY={'format':2.0}",
                           "--USE_TOKEN_WEIGHTS=True", "--TOKEN_WEIGHT_SOURCE=visual_kl", "--GROUNDING_EVERY=0")
    config, rows = check_run_folder(grpo_dir, "grpo.py")
    for row in rows[1:]:  # weights from the visual dependency: measured every step, whatever GROUNDING_EVERY says
        check_grounding(row)
        assert row["policy/token_weight_mean"] == pytest.approx(1.0, abs=1e-4)
    assert config["MODEL_NAME_OR_PATH"] == checkpoint
    for row, w_format in zip(rows[1:], (2.0, 1.0)):
        expected = 3.0 * row["reward/accuracy/mean"] + w_format * row["reward/format/mean"]
        assert row["reward/total/mean"] == pytest.approx(expected, abs=1e-5)
        assert 0 <= row["dapo/replay_buffer_size"] <= 2 and 0 <= row["dapo/replayed_groups"] <= 3
        assert 0 <= row["policy/clip_frac_dual"] <= 1
    assert all(r["dapo/gen_batches"] == 1 and r["dapo/kept_group_frac"] == 1.0 for r in rows[1:])
    assert all(r["policy/updates"] == 4 for r in rows[1:])  # 2 epochs x 2 mini-batches
    assert all(r["policy/kl"] is not None and r["policy/kl"] >= 0 for r in rows[1:])
    # COMPARE_WITH="auto" found the DAPO run and drew the comparison.
    assert os.path.getsize(os.path.join(grpo_dir, "plots", "dapo_vs_grpo.png")) > 10_000


def test_bad_override_fails_before_any_work(tmp_path):
    done = subprocess.run([sys.executable, "dapo.py", "--TOTAL_STEP=3", f"--RUNS_DIR={tmp_path}"], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode != 0 and "did you mean --TOTAL_STEPS" in done.stderr
    assert not os.listdir(tmp_path)


def test_ppo_two_steps(tmp_path):
    """ppo.py with its defaults (one completion per prompt, a critic on the policy's backbone), one warm-up step."""
    ppo_dir = run_trainer("ppo.py", tmp_path / "runs", "--GROUP_SIZE=1", "--TRAIN_BATCH_PROMPTS=6",
                          "--CRITIC_WARMUP_STEPS=1", "--GROUNDING_EVERY=2", "--EVAL_TEMPERATURE=0.8",
                          "--EVAL_SAMPLES_PER_PROMPT=3")
    config, rows = check_run_folder(ppo_dir, "ppo.py")
    check_grounding(rows[2])
    assert not any(k.startswith("grounding/") for k in rows[1])  # every 2 steps
    for row in rows:  # three samples per question at temperature 0.8
        assert row["eval/mean_at_k"] == row["eval/accuracy"] <= row["eval/pass_at_k"] <= 1.0
    assert config["KL_COEF"] > 0 and config["CRITIC_SHARED_BACKBONE"]
    for row in rows[1:]:
        for key in ("critic/value_loss", "critic/explained_variance", "critic/values/mean", "critic/returns/mean"):
            assert key in row and (row[key] is None or math.isfinite(row[key])), key
        assert row["critic/value_loss"] >= 0 and row["dapo/train_groups"] == 6
        # Step 1 trained only the critic's head (not the backbone it shares with the policy), so in both steps the
        # rollout policy is still the reference: no KL.
        assert abs(row["reward/kl_penalty/mean"]) < 1e-6
    assert [r["critic/warmup"] for r in rows[1:]] == [1.0, 0.0]
    assert rows[1]["critic/values/mean"] == 0.0  # the value head starts at zero ...
    assert rows[2]["critic/values/mean"] != 0.0  # ... and the warm-up step trained it
    assert "**Critic**" in open(os.path.join(ppo_dir, "run_terminal.md")).read()


# DAPO without dynamic sampling: every group is trained on, so an update is certain whatever the machine samples.
@pytest.mark.parametrize("script, extra", [("dapo.py", ("--DYNAMIC_SAMPLING=False",)), ("grpo.py", ()),
                                           ("ppo.py", ("--GROUP_SIZE=1", "--TRAIN_BATCH_PROMPTS=6",
                                                       "--CRITIC_WARMUP_STEPS=1", "--CRITIC_SHARED_BACKBONE=False"))])
def test_bf16_mixed_on_cpu(tiny_vlm_path, tmp_path, script, extra):
    """fp32 master weights, bf16 compute and a bf16 generation copy (the GPU's numerics, on the CPU)."""
    run_dir = run_trainer(script, tmp_path / "runs", "--PRECISION=bf16-mixed", "--PLOT_EVERY=0", *extra)
    rows = [json.loads(line) for line in open(os.path.join(run_dir, "metrics.jsonl"))]
    assert json.load(open(os.path.join(run_dir, "config.json")))["PRECISION"] == "bf16-mixed"
    assert "in bf16-mixed, generation by a torch.bfloat16 copy" in open(os.path.join(run_dir, "run_terminal.md")).read()
    trained = [r for r in rows[1:] if r.get("policy/updates")]
    assert len(trained) == 2, "every step trains without dynamic sampling"
    for row in trained:  # the bf16 copy computed π_old, the fp32 policy under autocast the update
        assert 0 < row["policy/logp_mismatch"] < 0.1 and math.isfinite(row["policy/loss"])
        assert row["policy/skipped_updates"] == 0 and 0 <= row["eval/accuracy"] <= 1
    if script == "ppo.py":
        assert all(math.isfinite(r["critic/value_loss"]) for r in rows[1:])
    from safetensors.torch import load_file

    weights = load_file(os.path.join(run_dir, "checkpoints", "step_2", "model.safetensors"))
    assert all(w.dtype == torch.float32 for w in weights.values())  # the fp32 master weights, not a bf16 rounding
