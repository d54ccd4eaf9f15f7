"""The trainers' constants: same layout in grpo.py, dapo.py and ppo.py (plus its critic block), documented, and
validated overrides."""

import ast
import os

import pytest

import dapo
import grpo
import ppo
from utils.config import UserError, apply_overrides, constants_of
from utils.specs import build_specs, resumable_constants

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def constant_lines(path):
    """(name, source line) of each module-level UPPER_CASE assignment, in order."""
    source = open(path).read()
    lines = source.splitlines()
    return [(node.targets[0].id, lines[node.lineno - 1]) for node in ast.parse(source).body
            if isinstance(node, ast.Assign) and isinstance(node.targets[0], ast.Name) and node.targets[0].id.isupper()]


def test_grpo_and_dapo_declare_the_same_constants_in_the_same_order():
    dapo_names = [name for name, _ in constant_lines(os.path.join(ROOT, "dapo.py"))]
    grpo_names = [name for name, _ in constant_lines(os.path.join(ROOT, "grpo.py"))]
    assert dapo_names == grpo_names
    assert list(constants_of(vars(dapo))) == dapo_names


def test_grpo_and_dapo_run_the_same_code():
    """Only the docstring and the constants' values differ, so no mechanics can drift between the two."""
    def code(path):
        source = open(os.path.join(ROOT, path)).read()
        body = source[source.index('"""', 3) + 3 :]  # after the docstring
        return [line.split(" = ")[0] if line[:1].isupper() and " = " in line else line for line in body.splitlines()]

    assert code("dapo.py") == code("grpo.py")


def test_ppo_declares_grpos_constants_in_the_same_order_plus_the_critics():
    ppo_names = [name for name, _ in constant_lines(os.path.join(ROOT, "ppo.py"))]
    grpo_names = [name for name, _ in constant_lines(os.path.join(ROOT, "grpo.py"))]
    critic = ["CRITIC_SHARED_BACKBONE", "VF_COEF", "CRITIC_LEARNING_RATE", "CLIP_RANGE_VALUE", "GAMMA", "LAMBDA",
              "KL_COEF", "CRITIC_WARMUP_STEPS"]
    assert [n for n in ppo_names if n not in critic] == grpo_names
    assert [n for n in ppo_names if n in critic] == critic  # one block
    start = ppo_names.index(critic[0])
    assert ppo_names[start : start + len(critic)] == critic
    p = constants_of(vars(ppo))
    assert (p["GROUP_SIZE"], p["GAMMA"], p["LAMBDA"], p["KL_BETA"]) == (1, 1.0, 0.95, 0.0)
    assert not p["DYNAMIC_SAMPLING"] and p["REPLAY_BUFFER_SIZE"] == 0 and p["DUAL_CLIP_C"] == 0
    assert build_specs(p).critic.gamma == 1.0  # one completion per prompt: the critic is the baseline
    with pytest.raises(UserError, match="GROUP_SIZE >= 2"):
        build_specs({**p, "DYNAMIC_SAMPLING": True})


def test_every_constant_has_a_trailing_comment():
    for path in ("dapo.py", "grpo.py", "ppo.py"):
        for name, line in constant_lines(os.path.join(ROOT, path)):
            assert "  # " in line and line.split("  # ", 1)[1].strip(), f"{path}: {name} has no trailing comment"


def test_the_algorithms_differ_where_the_spec_says():
    d, g = constants_of(vars(dapo)), constants_of(vars(grpo))
    assert (d["CLIP_EPS_LOW"], d["CLIP_EPS_HIGH"], g["CLIP_EPS_HIGH"]) == (0.2, 0.28, 0.2)
    assert (d["LOSS_AGGREGATION"], g["LOSS_AGGREGATION"]) == ("token", "sample")
    assert (d["KL_BETA"], g["KL_BETA"]) == (0.0, 0.04)
    assert d["DYNAMIC_SAMPLING"] and not g["DYNAMIC_SAMPLING"]
    assert d["OVERLONG_FILTERING"] and not g["OVERLONG_FILTERING"]
    differing = {k for k in d if d[k] != g[k]}
    assert differing == {"TRAIN_BATCH_PROMPTS", "SOFT_OVERLONG_PUNISHMENT", "LOSS_AGGREGATION", "CLIP_EPS_HIGH",
                         "KL_BETA", "DYNAMIC_SAMPLING", "OVERLONG_FILTERING"}
    # The remaining DAPO options are off in both: dual clip, replay, two-stage rewards; top-up is not the mode.
    for cfg in (d, g):
        assert cfg["DUAL_CLIP_C"] == 0 and cfg["REPLAY_BUFFER_SIZE"] == 0 and cfg["REWARD_SWITCH_STEP"] == 0
        assert cfg["DYNAMIC_SAMPLING_MODE"] == "refill" and cfg["SCALE_ADVANTAGE_BY_STD"]
        assert not cfg["NEGATIVE_ACCURACY_REWARD"]


def test_overrides_are_typed():
    cfg = constants_of(vars(dapo))
    out = apply_overrides(cfg, ["--TOTAL_STEPS=7", "--KL_BETA=0.1", "--DYNAMIC_SAMPLING=false",
                                "--QUESTION_KINDS=['count']", "--DATASET=my/data"])
    assert out["TOTAL_STEPS"] == 7 and out["KL_BETA"] == 0.1 and out["DYNAMIC_SAMPLING"] is False
    assert out["QUESTION_KINDS"] == ["count"] and out["DATASET"] == "my/data"
    assert apply_overrides(cfg, ["--KL_BETA=1"])["KL_BETA"] == 1.0  # an int is a fine float
    assert cfg["TOTAL_STEPS"] != 7  # the defaults are untouched


def test_unknown_key_names_close_matches():
    with pytest.raises(ValueError, match="--TOTAL_STEPS"):
        apply_overrides(constants_of(vars(dapo)), ["--TOTAL_STEP=3"])
    with pytest.raises(ValueError, match="unknown constant --NOPE$"):
        apply_overrides(constants_of(vars(dapo)), ["--NOPE=3"])


@pytest.mark.parametrize("arg", ["--TOTAL_STEPS=ten", "--KL_BETA=abc", "--DYNAMIC_SAMPLING=maybe",
                                 "--QUESTION_KINDS=count", "--TOTAL_STEPS"])
def test_wrong_types_are_errors(arg):
    with pytest.raises(ValueError):
        apply_overrides(constants_of(vars(dapo)), [arg])


@pytest.mark.parametrize("arg, message", [("--LOSS_AGGREGATION=tokens", "LOSS_AGGREGATION"),
                                          ("--GROUP_SIZE=1", "at least two completions"),
                                          ("--LR_SCHEDULE=linear", "cosine"), ("--OVERLONG_BUFFER=99", "OVERLONG"),
                                          ("--DYNAMIC_SAMPLING_MODE=resample", "topup"),
                                          ("--DYNAMIC_SAMPLING_MODE=topup --MAX_DYNAMIC_SAMPLES=8", "exceed"),
                                          ("--DUAL_CLIP_C=0.5", "above 1"),
                                          ("--REPLAY_MAX_SUCCESS_RATE=1.5",
                                           "REPLAY_MAX_SUCCESS_RATE=1.5: must be >= 0 and <= 1"),
                                          ("--REWARD_WEIGHTS_EARLY={'acc':1.0}", "unknown reward acc"),
                                          ("--CLIP_EPS_HIGH=-1", "CLIP_EPS_HIGH=-1.0: must be >= 0"),
                                          ("--CLIP_EPS_LOW=2", "CLIP_EPS_LOW=2.0: must be >= 0 and <= 1"),
                                          ("--CLIP_EPS_LOW=1", "below 1"),
                                          ("--TEMPERATURE=0", "TEMPERATURE=0.0: must be > 0"),
                                          ("--TOP_P=1.5", "TOP_P"), ("--MAX_OBJECTS=9", "MAX_OBJECTS=9: must be"),
                                          ("--QUESTION_KINDS=['count','size']", "QUESTION_KINDS"),
                                          ("--PRECISION=bf16", "'auto' | 'bf16-mixed' | 'fp32'"),
                                          ("--POLICY_LOSS=ppo2", "POLICY_LOSS='ppo2': expected 'clip' | 'gspo'"),
                                          ("--POLICY_DEVICE=gpu", "POLICY_DEVICE='gpu': expected 'auto', 'cpu'"),
                                          ("--OFFLOAD_OPTIMIZER=True", "OFFLOAD_OPTIMIZER=True .* torchrun and 2")])
def test_values_outside_the_allowed_ones_are_errors(arg, message):
    cfg = apply_overrides(constants_of(vars(dapo)), arg.split(" "))
    with pytest.raises(UserError, match=message):
        build_specs(cfg)


def test_every_trainers_defaults_pass_the_checks():
    for trainer in (dapo, grpo, ppo):
        specs = build_specs(constants_of(vars(trainer)))
        assert (specs.critic is not None) == (trainer is ppo)


def test_a_constant_of_the_wrong_type_is_refused_before_anything_loads():
    """A constant edited in the file with the wrong type (TOTAL_STEPS = 3.0, GROUP_SIZE = "4") is one error naming
    it, not a TypeError deep in the first step."""
    cfg = constants_of(vars(dapo))
    with pytest.raises(UserError, match=r"TOTAL_STEPS=3.0: expected an integer"):
        build_specs({**cfg, "TOTAL_STEPS": 3.0})
    with pytest.raises(UserError, match=r"GROUP_SIZE='4': expected an integer"):
        build_specs({**cfg, "GROUP_SIZE": "4"})
    with pytest.raises(UserError, match=r"DYNAMIC_SAMPLING=1: expected a boolean"):
        build_specs({**cfg, "DYNAMIC_SAMPLING": 1})
    assert build_specs({**cfg, "KL_BETA": 1}).loss.kl_beta == 1  # an int is a fine float


def test_every_constant_fills_exactly_one_spec_field():
    """The specs cover the trainers' constants one to one: nothing is read by name elsewhere, nothing is left out."""
    from dataclasses import fields

    from utils.rewards import reward_names
    from utils.specs import SPEC_CLASSES, CriticSpec

    named = [f.metadata["constant"] for cls in (*SPEC_CLASSES.values(), CriticSpec) for f in fields(cls)
             if f.metadata.get("constant")] + [f"W_{name.upper()}" for name in reward_names()]
    shared = {"MAX_NEW_TOKENS",  # the rollout's length limit, and Dr.GRPO's normaliser (LOSS_AGGREGATION="constant")
              "EVAL_SAMPLES"}  # the size of the synthetic held-out set, and how many held-out questions are scored
    assert {n for n in named if named.count(n) > 1} == shared and len(named) == len(set(named)) + len(shared)
    assert set(named) == set(constants_of(vars(ppo)))
    assert resumable_constants() >= {"TOTAL_STEPS", "RUNS_DIR", "MICRO_BATCH_SIZE", "RESUME"}
    assert not resumable_constants() & {"LEARNING_RATE", "CLIP_EPS_HIGH", "GROUP_SIZE", "SEED"}
