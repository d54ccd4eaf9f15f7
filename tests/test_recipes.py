"""docs/recipes/: each recipe's commands, taken from the document itself, run for 2 steps on the CPU with the tiny VLM
and a data set of the same shape standing in for the real model and data (and smaller sizes): the commands stay
valid, and the run uses the recipe's constants."""

import glob
import json
import os
import re
import subprocess
import sys

import pytest

from tests import vqa_fixtures
from utils.config import parse_value

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RECIPE = os.path.join(ROOT, "docs", "recipes", "geo3k.md")
# What the CPU stand-in replaces: the model, the data and every size; everything else is the recipe's.
STAND_IN = {"MODEL_NAME_OR_PATH": "embedded-tiny-vlm", "EVAL_SAMPLES": "1", "MAX_PIXELS": "0", "MIN_PIXELS": "0",
            "MAX_NEW_TOKENS": "12", "OVERLONG_BUFFER": "4", "TRAIN_BATCH_PROMPTS": "4", "TOTAL_STEPS": "2",
            "MICRO_BATCH_SIZE": "8", "GENERATION_BATCH_SIZE": "64", "SAVE_EVERY": "0"}


def recipe_commands(path):
    """{trainer: {constant: value}} of the torchrun commands in the recipe's bash blocks (every word after the
    trainer is a --KEY=value)."""
    commands = {}
    for block in re.findall(r"```bash\n(.*?)```", open(path, encoding="utf-8").read(), re.S):
        words = block.split()
        at = next(i for i, w in enumerate(words) if w.endswith(".py"))  # torchrun's own options come before
        commands[words[at]] = dict(w[2:].split("=", 1) for w in words[at + 1:])
    return commands


def test_the_recipe_names_both_trainers_with_easyr1s_settings():
    commands = recipe_commands(RECIPE)
    assert set(commands) == {"grpo.py", "dapo.py"}
    for trainer, constants in commands.items():
        assert constants["LEARNING_RATE"] == "1e-6" and constants["GROUP_SIZE"] == "5"
        assert constants["TRAIN_BATCH_PROMPTS"] == "512" and constants["MINI_BATCHES"] == "4"  # 512 / 128
        assert (constants["EVAL_TEMPERATURE"], constants["EVAL_TOP_P"]) == ("0.6", "0.95")
    assert commands["grpo.py"]["KL_BETA"] == "0.01" and "KL_BETA" not in commands["dapo.py"]


@pytest.mark.parametrize("trainer", ["grpo.py", "dapo.py"])
def test_recipe_runs_two_steps_with_the_tiny_vlm(trainer, tmp_path):
    constants = recipe_commands(RECIPE)[trainer]
    data = vqa_fixtures.geometry3k(tmp_path / "geometry3k")
    args = [f"--{k}={STAND_IN.get(k, v)}" for k, v in constants.items() if k != "DATASET"]
    done = subprocess.run([sys.executable, trainer, *args, f"--DATASET={data}", f"--RUNS_DIR={tmp_path / 'runs'}",
                           "--CPU_THREADS=2", "--COMPARE_WITH=", "--PLOT_EVERY=0"], cwd=ROOT, capture_output=True,
                          text=True, timeout=900, env=dict(os.environ, TQDM_DISABLE="1"))
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    run_dir = glob.glob(str(tmp_path / "runs" / "*_*"))[0]
    rows = [json.loads(line) for line in open(os.path.join(run_dir, "metrics.jsonl"))]
    assert [r["step"] for r in rows] == [0, 1, 2]
    assert all("eval/accuracy" in r and "eval/accuracy_blank_image" in r for r in (rows[0], rows[2]))
    config = json.load(open(os.path.join(run_dir, "config.json")))
    for key, value in constants.items():  # the run used the recipe's own values, apart from the stand-ins
        if key not in STAND_IN and key != "DATASET":
            assert config[key] == parse_value(key, value, config[key]), key
