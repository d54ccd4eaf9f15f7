"""The command line: --help lists every constant by section; user errors are one line on stderr, exit status 2."""

import ast
import json
import os
import subprocess
import sys

import pytest

import dapo
import grpo
import ppo
from utils.config import constants_of, run_cli
from utils.trackers import Trackers, make_tracker, scalars, tracker_names

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_help_lists_every_constant_with_its_default_and_comment_by_section():
    done = subprocess.run([sys.executable, "dapo.py", "--help"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and done.stderr == ""
    out = done.stdout
    assert out.startswith("usage: python dapo.py [--KEY=value ...]")
    sections = [line[:-1] for line in out.splitlines() if line and not line.startswith(" ") and line.endswith(":")]
    banners = [line.split("── ")[1].split(" ─")[0] for line in open(os.path.join(ROOT, "dapo.py")) if line.startswith("# ── ")]
    assert sections[-len(banners):] == banners
    source = open(os.path.join(ROOT, "dapo.py")).read().splitlines()
    for name, value in constants_of(vars(dapo)).items():
        line = next(line for line in source if line.startswith(f"{name} = "))
        assert f"  --{name}={value!r}\n      {line.split('  # ', 1)[1]}\n" in out, name
    # in the file's order, each under its own banner
    assert out.index("--DATASET=") < out.index("--IMAGE_KEY=") < out.index("Rollout:") < out.index("--GROUP_SIZE=")
    assert out.index("Evaluation, logging, checkpoints:") < out.index("--REPORT_TO=")


def run_main(module, argv, capsys):
    with pytest.raises(SystemExit) as exit_:
        run_cli(module.main, argv)
    return exit_.value.code, capsys.readouterr().err


@pytest.mark.parametrize("argv, message", [
    (["--TOTAL_STEP=3"], "error: unknown constant --TOTAL_STEP; did you mean --TOTAL_STEPS?"),
    (["--GROUP_SIZE=many"], "error: --GROUP_SIZE=many: expected an integer (default is 8)"),
    (["TOTAL_STEPS=3"], "error: argument 'TOTAL_STEPS=3' is not of the form --KEY=value"),
    (["--GROUP_SIZE=1"], "error: GROUP_SIZE=1: must be at least 2"),
    (["--DATASET=missing/train.jsonl"], "error: DATASET='missing/train.jsonl': no such file or folder"),
    (["--DATASET=x.parquet", "--EVAL_DATASET=./gone"], "error: DATASET='x.parquet': no such file or folder"),
    (["--MODEL_NAME_OR_PATH=./no/such/model"], "error: MODEL_NAME_OR_PATH='./no/such/model': no such folder"),
    (["--REPORT_TO=mlflow"], "error: REPORT_TO='mlflow': unknown tracker 'mlflow'"),
])
def test_user_errors_are_one_line_and_exit_status_2(argv, message, tmp_path, capsys):
    code, err = run_main(dapo, argv + [f"--RUNS_DIR={tmp_path}"], capsys)
    assert code == 2 and err.startswith(message) and err.count("\n") == 1, err
    assert not os.listdir(tmp_path)  # nothing was started


@pytest.mark.parametrize("package", ["wandb", "tensorboard"])
def test_a_tracker_that_is_not_installed_names_its_package(package, tmp_path, capsys):
    if tracker_names.__globals__["importlib"].util.find_spec(package):
        pytest.skip(f"{package} is installed")
    code, err = run_main(ppo, [f"--REPORT_TO={package}", f"--RUNS_DIR={tmp_path}"], capsys)
    assert code == 2 and f"needs the {package} package: pip install {package}" in err and err.count("\n") == 1


def test_an_unsupported_model_type_is_one_line(tmp_path, capsys):
    model = tmp_path / "bert"
    model.mkdir()
    (model / "config.json").write_text(json.dumps({"model_type": "bert"}))
    code, err = run_main(grpo, [f"--MODEL_NAME_OR_PATH={model}", f"--RUNS_DIR={tmp_path}/runs"], capsys)
    assert code == 2 and err.startswith(f"error: {model} is a 'bert' model; this codebase supports Qwen2-VL")
    assert err.count("\n") == 1 and not os.path.exists(tmp_path / "runs")


def test_trackers_get_the_finite_numbers():
    assert scalars({"step": 3, "a": 1, "b": float("nan"), "c": None, "d": True, "e": 2.5}) == {"a": 1.0, "e": 2.5}
    assert tracker_names("") == [] and make_tracker("", "unused", {}).trackers == []

    class Recorder:
        def __init__(self):
            self.logged, self.closed = [], False

        def log(self, metrics, step):
            self.logged.append((step, scalars(metrics)))

        def close(self):
            self.closed = True

    recorder = Recorder()
    trackers = Trackers([recorder])
    trackers.log({"step": 1, "reward/total/mean": 0.5}, 1)
    trackers.close()
    assert recorder.logged == [(1, {"reward/total/mean": 0.5})] and recorder.closed


def test_tensorboard_tracker_writes_events(tmp_path):
    pytest.importorskip("tensorboard")
    tracker = make_tracker("tensorboard", str(tmp_path), {"SEED": 0})
    tracker.log({"step": 1, "reward/total/mean": 0.5}, 1)
    tracker.close()
    assert os.listdir(tmp_path / "tensorboard")


def test_every_trainer_runs_through_run_cli():
    for script in ("dapo.py", "grpo.py", "ppo.py"):
        tree = ast.parse(open(os.path.join(ROOT, script)).read())
        assert ast.unparse(tree.body[-1]) == "if __name__ == '__main__':\n    run_cli(main)"


def test_an_interrupt_is_one_line_saying_what_was_saved(capsys, monkeypatch):
    """Ctrl-C before the step loop (loading the model, say) or a second one inside it: no traceback, exit 130."""
    monkeypatch.delenv("RL_TRACEBACK", raising=False)

    def interrupted(argv):
        raise KeyboardInterrupt

    def aborted(argv):
        raise KeyboardInterrupt("second SIGINT; the stop checkpoint runs/x/checkpoints/step_3 was written: resume")

    for main, expected in ((interrupted, "before the first training step; nothing was saved"),
                           (aborted, "the stop checkpoint runs/x/checkpoints/step_3 was written")):
        with pytest.raises(SystemExit) as exit_:
            run_cli(main, [])
        err = capsys.readouterr().err
        assert exit_.value.code == 130 and err.count("\n") == 1 and expected in err and "Traceback" not in err


def test_a_broken_terminal_does_not_stop_the_run(tmp_path, monkeypatch):
    """`python dapo.py | tee log` and Ctrl-C: tee dies, the pipe breaks; the run's messages still reach
    run_terminal.md and the run goes on to its stop checkpoint."""
    import utils.runlog as runlog

    def broken(message):
        raise BrokenPipeError(32, "Broken pipe")

    monkeypatch.setattr(runlog.tqdm, "write", broken)
    log = runlog.RunLog(str(tmp_path), "dapo", {"TOTAL_STEPS": 1}, os.path.join(ROOT, "dapo.py"))
    log.print("checkpoint: somewhere")
    log.warn("SIGINT received")
    terminal = open(os.path.join(log.dir, "run_terminal.md")).read()
    assert "checkpoint: somewhere" in terminal and "SIGINT received" in terminal



FREE_FORM = {  # constants whose every value of their type is allowed (names, splits, instructions, folders)
    "TRAIN_SPLIT", "EVAL_SPLIT", "IMAGE_KEY", "PROBLEM_KEY", "ANSWER_KEY", "SYSTEM_PROMPT", "MODEL_CACHE_DIR",
    "RUNS_DIR", "COMPARE_WITH", "RESUME_OVERRIDES", "SEED", "ENTROPY_COEF",
    "CLIP_COV_LOW", "CLIP_COV_HIGH"}  # the covariance bounds: any numbers, CLIP_COV_LOW < CLIP_COV_HIGH
OUT_OF_DOMAIN_TEXT = {"MODEL_NAME_OR_PATH": "./no/such/model", "DATASET": "./no_such.jsonl",
                      "EVAL_DATASET": "./no_such.jsonl", "REPORT_TO": "nope", "RESUME": "./no_such_run",
                      "POLICY_DEVICE": "gpu", "ROLLOUT_DEVICE": "gpu", "LORA_TARGET_MODULES": "q-proj", "REWARD_WEIGHTS_EARLY": "{'nope': 1.0}"}


def out_of_domain(name, field):
    """A command-line value outside the constant's domain (its field in utils/specs.py), or None for a free-form one."""
    if name in OUT_OF_DOMAIN_TEXT:
        return OUT_OF_DOMAIN_TEXT[name]
    if name.startswith("W_") or field is None:
        return "abc"  # a weight must be a number
    meta = field.metadata
    if meta["choices"]:
        return "['nope']" if field.type is list else "nope"
    for bound, value in (("above", meta["above"]), ("low", meta["low"] is not None and meta["low"] - 1),
                         ("high", meta["high"] is not None and meta["high"] + 1)):
        if meta[bound] is not None:
            return str(value)
    if field.type is bool:
        return "maybe"
    return None


@pytest.mark.parametrize("module", [dapo, grpo, ppo], ids=["dapo", "grpo", "ppo"])
def test_every_constant_outside_its_domain_is_one_error_line_and_no_run_folder(module, tmp_path, capsys,
                                                                                monkeypatch):
    from dataclasses import fields

    from utils.specs import SPEC_CLASSES, CriticSpec

    monkeypatch.delenv("RL_TRACEBACK", raising=False)
    by_constant = {f.metadata["constant"]: f for cls in (*SPEC_CLASSES.values(), CriticSpec) for f in fields(cls)
                   if f.metadata.get("constant")}
    checked = []
    for name in constants_of(vars(module)):
        value = out_of_domain(name, by_constant.get(name))
        if value is None:
            assert name in FREE_FORM, f"{name} has no domain: give its spec field one, or list it as free-form"
            continue
        code, err = run_main(module, [f"--{name}={value}", f"--RUNS_DIR={tmp_path}"], capsys)
        assert code == 2 and err.startswith("error: ") and err.count("\n") == 1, (name, value, err)
        assert name in err or name.lower() in err, (name, err)  # the error names the constant
        assert not os.listdir(tmp_path), f"--{name}={value} left a run folder"
        checked.append(name)
    assert len(checked) >= len(constants_of(vars(module))) - len(FREE_FORM)


def test_a_start_that_fails_before_step_0_leaves_no_run_folder(tmp_path, capsys, monkeypatch):
    """A data set whose content is wrong, or Ctrl-C while the model loads: one line, and no folder that RESUME=auto
    or COMPARE_WITH=auto could take for a run. A failure after step 0 keeps the folder (it is a run)."""
    monkeypatch.delenv("RL_TRACEBACK", raising=False)
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    runs = tmp_path / "runs"
    header = tmp_path / "header.jsonl"
    header.write_text("image,problem,solution\n")
    for bad, message in ((empty, "the file is empty"), (header, "first line is not a JSON object")):
        code, err = run_main(dapo, [f"--DATASET={bad}", f"--EVAL_DATASET={bad}", f"--RUNS_DIR={runs}"], capsys)
        assert code == 2 and err.startswith("error: DATASET=") and message in err and err.count("\n") == 1, err
        assert not runs.exists()  # checked before any folder or model
    row = '{"image": "no_such.png", "problem": "How many?", "solution": "A"}\n'
    broken = tmp_path / "broken.jsonl"  # its rows fail only when loaded: after the folder was made
    broken.write_text(row * 3)
    code, err = run_main(dapo, [f"--DATASET={broken}", f"--EVAL_DATASET={broken}", f"--RUNS_DIR={runs}"], capsys)
    last = err.strip().splitlines()[-1]  # (above it: the progress bar of the model load)
    assert code == 2 and last.startswith("error: ") and (not runs.exists() or not os.listdir(runs)), err

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    with monkeypatch.context() as patch:
        patch.setattr(dapo, "load_models", interrupted)
        code, err = run_main(dapo, [f"--RUNS_DIR={runs}"], capsys)
    assert code == 130 and err.strip().splitlines()[-1].startswith("interrupted: ") and not os.listdir(runs)

    def fails_after_step_0(*args, **kwargs):
        raise ValueError("the reward server went away")

    monkeypatch.setattr(dapo, "sample_step", fails_after_step_0)
    code, err = run_main(dapo, [f"--RUNS_DIR={runs}", "--EVAL_SAMPLES=4", "--PLOT_EVERY=0"], capsys)
    assert code == 2 and "reward server" in err
    (kept,) = os.listdir(runs)
    assert os.path.getsize(runs / kept / "metrics.jsonl") > 0  # its step 0 is there
