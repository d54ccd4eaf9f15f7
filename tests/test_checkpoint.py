"""utils/checkpoint.py and the state of PromptSampler, ReplayBuffer and RunLog that a resumed run needs."""

import json
import os
import random
import signal

import numpy as np
import pytest
import torch

from data import PromptSampler
from utils import checkpoint as ck
from utils.rollout import ReplayBuffer, Rollout
from utils.runlog import RunLog


class FakeModel(torch.nn.Module):
    """Stands in for the policy: save_pretrained writes its weights, `model` is its backbone."""

    def __init__(self):
        super().__init__()
        self.model = torch.nn.Linear(3, 3)

    def save_pretrained(self, path, state_dict=None, safe_serialization=True):
        torch.save(self.state_dict(), os.path.join(path, "weights.pt"))


class FakeProcessor:
    def save_pretrained(self, path):
        open(os.path.join(path, "processor.json"), "w").write("{}")


def test_prompt_sampler_resumes_where_it_was():
    data = list(range(7))
    a = PromptSampler(data, seed=3)
    a.next(5)
    state = a.state_dict()
    expected = a.next(20)  # crosses two reshuffles
    b = PromptSampler(data, seed=99)
    b.load_state_dict(state)
    assert b.next(20) == expected
    with pytest.raises(ValueError, match="data set has 5"):
        PromptSampler(list(range(5)), 0).load_state_dict(state)


def group(correct):
    n = len(correct)
    example = {"solution": "A"}
    return Rollout({"input_ids": torch.ones(n, 2, dtype=torch.long)}, torch.ones(n, 3, dtype=torch.long),
                   torch.ones(n, 3, dtype=torch.long), torch.zeros(n, dtype=torch.bool), ["x"] * n, [example] * n,
                   {"accuracy": torch.tensor(correct, dtype=torch.float), "total": 3 * torch.tensor(correct)})


def test_replay_buffer_round_trip(tmp_path):
    buffer = ReplayBuffer(2, 0.5, 0.75)
    buffer.swap_flat_groups([group([1.0, 0.0, 0.0, 0.0]), group([0.0, 1.0, 0.0, 0.0]), group([1.0, 0.0, 1.0, 0.0])], 3)
    assert len(buffer) == 2
    torch.save(buffer.state_dict(), tmp_path / "replay.pt")
    restored = ReplayBuffer(2, 0.5, 0.75)
    restored.load_state_dict(torch.load(tmp_path / "replay.pt", weights_only=True))  # plain values only
    assert [g.rewards["accuracy"].tolist() for g in restored.groups] == [g.rewards["accuracy"].tolist()
                                                                         for g in buffer.groups]
    assert restored.groups.maxlen == 2
    examples = restored.groups[0].examples
    assert examples[0] is examples[1]  # the markdown logs find a group's rows by the identity of its example


def test_rng_state_round_trip():
    state = ck.rng_state()
    draws = torch.rand(3), random.random(), np.random.rand()
    torch.manual_seed(123), random.seed(4), np.random.seed(5)
    ck.set_rng_state(state)
    again = torch.rand(3), random.random(), np.random.rand()
    assert torch.equal(draws[0], again[0]) and draws[1:] == again[1:]


def save(run_dir, step, keep=0, **config):
    model = FakeModel()
    optimizer = torch.optim.AdamW(model.parameters())
    return ck.save_checkpoint(str(run_dir), step, model, FakeProcessor(), {"TOTAL_STEPS": 4, **config}, optimizer,
                              PromptSampler(list(range(4)), 0), keep=keep)


def test_checkpoint_is_complete_and_restores_state(tmp_path):
    path = save(tmp_path, 2)
    assert sorted(os.listdir(path)) == ["COMPLETE", "processor.json", "run_config.json", "training_state.pt",
                                        "weights.pt"]
    model = FakeModel()
    optimizer = torch.optim.AdamW(model.parameters())
    model.model.weight.sum().backward()
    optimizer.step()
    prompts = PromptSampler(list(range(4)), 7)
    assert ck.load_checkpoint(path, model, optimizer, prompts) == 2
    assert optimizer.state_dict()["state"] == {}  # the saved optimizer had taken no step
    assert prompts.state_dict() == PromptSampler(list(range(4)), 0).state_dict()


def test_keep_newest_checkpoints_and_drop_half_written_ones(tmp_path):
    for step in (1, 2, 3):
        save(tmp_path, step, keep=2)
    assert sorted(os.listdir(tmp_path / "checkpoints")) == ["step_2", "step_3"]
    save(tmp_path, 4, keep=0)
    assert sorted(os.listdir(tmp_path / "checkpoints")) == ["step_2", "step_3", "step_4"]


def test_a_kill_while_writing_leaves_the_previous_checkpoint(tmp_path, monkeypatch, capsys):
    tmp_path = tmp_path / "dapo_20260101_000000"
    save(tmp_path, 2)

    def killed(tmp, final, step):
        raise SystemExit("killed")

    monkeypatch.setattr(ck, "finalize", killed)
    with pytest.raises(SystemExit):
        save(tmp_path, 4)
    assert os.path.isdir(tmp_path / "checkpoints" / "step_4.tmp")
    os.makedirs(tmp_path / "checkpoints" / "step_5")  # a folder without its marker (e.g. a copy cut short)
    assert ck.find_resume_checkpoint(str(tmp_path), "unused", "dapo") == str(tmp_path / "checkpoints" / "step_2")
    assert "step_5 is half-written" in capsys.readouterr().out
    with pytest.raises(ValueError, match="incomplete"):
        ck.find_resume_checkpoint(str(tmp_path / "checkpoints" / "step_5"), "unused", "dapo")
    monkeypatch.undo()
    save(tmp_path, 6)  # the next save clears the debris
    assert sorted(os.listdir(tmp_path / "checkpoints")) == ["step_2", "step_6"]


def test_find_resume_checkpoint_auto(tmp_path, capsys):
    assert ck.find_resume_checkpoint("", str(tmp_path), "dapo") is None
    assert ck.find_resume_checkpoint("auto", str(tmp_path), "dapo") is None  # nothing to resume: a new run
    assert "no dapo_* run in" in capsys.readouterr().out
    old, new = tmp_path / "dapo_20260101_000000", tmp_path / "dapo_20260102_000000"
    save(old, 3)
    save(new, 1)
    save(tmp_path / "grpo_20260103_000000", 2)
    assert ck.find_resume_checkpoint("auto", str(tmp_path), "dapo") == str(new / "checkpoints" / "step_1")
    with pytest.raises(ValueError, match="not a run of grpo.py"):
        ck.find_resume_checkpoint(str(old), str(tmp_path), "grpo")
    # A later start that failed (an empty folder) or was killed before its first save does not hide the run that has
    # a checkpoint: a requeued job goes on from it instead of starting again.
    os.makedirs(tmp_path / "dapo_20260104_000000" / "checkpoints" / "step_1.tmp")  # killed before its first save
    os.makedirs(tmp_path / "dapo_20260105_000000")  # a start that failed
    capsys.readouterr()
    assert ck.find_resume_checkpoint("auto", str(tmp_path), "dapo") == str(new / "checkpoints" / "step_1")
    out = capsys.readouterr().out
    assert "dapo_20260104_000000" in out and "dapo_20260105_000000" in out and "have no complete checkpoint" in out
    empty = tmp_path / "only_failed"
    os.makedirs(empty / "dapo_20260106_000000")
    assert ck.find_resume_checkpoint("auto", str(empty), "dapo") is None
    assert "no complete checkpoint in any dapo_* run" in capsys.readouterr().out


def test_resumed_config_allows_scheduling_and_refuses_math(tmp_path, capsys):
    path = save(tmp_path, 2, LEARNING_RATE=1e-3, QUESTION_KINDS=["count"], RESUME_OVERRIDES="", RESUME="",
                LR_SCHEDULE="cosine")
    current = {"TOTAL_STEPS": 8, "LEARNING_RATE": 5e-4, "QUESTION_KINDS": ("count",), "RESUME_OVERRIDES": "",
               "RESUME": "auto", "NEW_CONSTANT": 1}
    cfg = ck.resumed_config(path, current, ["--TOTAL_STEPS=8", "--QUESTION_KINDS=['count']", "--RESUME=auto"])
    assert cfg == {"TOTAL_STEPS": 8, "LEARNING_RATE": 1e-3, "QUESTION_KINDS": ("count",), "RESUME_OVERRIDES": "",
                   "RESUME": "auto", "NEW_CONSTANT": 1}  # the saved learning rate, not the file's
    assert "TOTAL_STEPS 4 -> 8 re-plans the cosine learning-rate decay from step 2" in capsys.readouterr().out
    with pytest.raises(ValueError, match=r"LEARNING_RATE would change the run \(LEARNING_RATE=0.001 -> 0.0005\)"):
        ck.resumed_config(path, current, ["--LEARNING_RATE=5e-4"])
    insisted = {**current, "RESUME_OVERRIDES": "LEARNING_RATE"}
    assert ck.resumed_config(path, insisted, ["--LEARNING_RATE=5e-4"])["LEARNING_RATE"] == 5e-4


def test_runlog_resume_drops_what_came_after_the_checkpoint(tmp_path):
    script = tmp_path / "dapo.py"
    script.write_text("# trainer\n")
    run = RunLog(str(tmp_path / "runs"), "dapo", {"TOTAL_STEPS": 4}, str(script))
    for step in range(4):
        run.log_metrics({"step": step, "x": float(step)})
    with open(os.path.join(run.dir, "metrics.jsonl"), "a") as f:
        f.write('{"step": 4, "x"')  # torn by the kill
    for name in ("rollout_results.md", "token_weights.md"):
        with open(os.path.join(run.dir, name), "w") as f:
            f.write("# Title\n\n" + "".join(f"## Step {s}\n\ntext {s}\n\n" for s in (1, 2, 10, 3)))
    resumed = RunLog("unused", "dapo", {"TOTAL_STEPS": 6}, str(script), resume=(run.dir, 2))
    assert resumed.dir == run.dir
    assert [json.loads(line)["step"] for line in open(resumed.metrics_path)] == [0, 1, 2]
    kept = "# Title\n\n## Step 1\n\ntext 1\n\n## Step 2\n\ntext 2\n\n"
    assert open(os.path.join(run.dir, "token_weights.md")).read() == kept
    assert json.load(open(os.path.join(run.dir, "config.json"))) == {"TOTAL_STEPS": 6}
    terminal = open(os.path.join(run.dir, "run_terminal.md")).read()
    assert "### Step 3" in terminal and "## Resumed after step 2" in terminal  # the terminal log keeps its history


def test_preemption_guard_stops_after_the_step_then_aborts():
    previous = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
    messages = []
    try:
        guard = ck.PreemptionGuard(messages.append)
        os.kill(os.getpid(), signal.SIGTERM)
        assert guard.signal_name == "SIGTERM" and "SIGTERM received" in messages[0]
        with pytest.raises(KeyboardInterrupt, match="second SIGINT: aborted during the step, before the stop"):
            os.kill(os.getpid(), signal.SIGINT)
        guard.saved = "runs/dapo_x/checkpoints/step_14"  # the stop checkpoint is on disk: the message says so
        with pytest.raises(KeyboardInterrupt, match="second SIGINT; the stop checkpoint runs/dapo_x/checkpoints/"
                                                    "step_14 was written"):
            os.kill(os.getpid(), signal.SIGINT)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def test_replay_groups_with_images_survive_a_weights_only_load(tmp_path):
    from PIL import Image

    image = Image.new("RGB", (6, 4), (10, 200, 30))
    image.putpixel((1, 2), (255, 0, 0))
    stored = group([1.0, 0.0])
    stored.examples = [{"image": image, "problem": "?", "solution": "A"}] * 2
    buffer = ReplayBuffer(2, 0.0, 1.0)
    buffer.groups.append(stored)
    torch.save(buffer.state_dict(), tmp_path / "replay.pt")
    restored = ReplayBuffer(2, 0.0, 1.0)
    restored.load_state_dict(torch.load(tmp_path / "replay.pt", weights_only=True))
    (again,) = restored.groups
    assert again.examples[0] is again.examples[1] and again.examples[0]["problem"] == "?"
    assert again.examples[0]["image"].mode == "RGB" and list(again.examples[0]["image"].getdata()) == list(
        image.getdata())
    assert torch.equal(again.completion_ids, stored.completion_ids) and again.texts == stored.texts


class CodeOnLoad:
    """What a crafted checkpoint could hold: unpickling it would create a file (or run anything else)."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        import pathlib

        return pathlib.Path.touch, (pathlib.Path(self.path),)


def test_a_crafted_training_state_is_refused_without_running_its_code(tmp_path):
    marker = tmp_path / "ran"
    state = tmp_path / "training_state.pt"
    torch.save({"step": 3, "prompts": CodeOnLoad(str(marker))}, state)
    with pytest.raises(ValueError, match="refused to load"):
        ck.load_state_file(str(state))
    assert not marker.exists()  # nothing ran
    torch.save({"step": 3, "rng": ck.rng_state()}, state)  # a real one loads
    assert ck.load_state_file(str(state))["step"] == 3


def test_a_full_disk_while_checkpointing_keeps_the_previous_checkpoint_and_says_so(tmp_path, capsys, monkeypatch):
    import errno

    import dapo
    from utils.config import run_cli

    monkeypatch.delenv("RL_TRACEBACK", raising=False)
    write = ck.write_training_state

    def disk_full_at_step_4(path, step, *args, **kwargs):
        if step == 4:
            raise OSError(errno.ENOSPC, "No space left on device")
        return write(path, step, *args, **kwargs)

    monkeypatch.setattr(ck, "write_training_state", disk_full_at_step_4)
    args = ["--TOTAL_STEPS=4", "--SAVE_EVERY=2", "--EVAL_EVERY=4", "--EVAL_SAMPLES=4", "--TRAIN_BATCH_PROMPTS=2",
            "--GROUP_SIZE=4", "--MAX_NEW_TOKENS=12", "--OVERLONG_BUFFER=4", "--PLOT_EVERY=0", "--COMPARE_WITH=",
            "--CPU_THREADS=1", f"--RUNS_DIR={tmp_path}"]
    with pytest.raises(SystemExit) as exit_:
        run_cli(dapo.main, args)
    err = capsys.readouterr().err.strip().splitlines()[-1]
    (run,) = os.listdir(tmp_path)
    checkpoints = tmp_path / run / "checkpoints"
    assert exit_.value.code == 2 and err.startswith("error: checkpoint step_4 could not be written (No space left")
    assert f"{checkpoints / 'step_2'} is intact" in err
    assert sorted(os.listdir(checkpoints)) == ["step_2"] and (checkpoints / "step_2" / ck.MARKER).exists()
