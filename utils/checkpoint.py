"""Checkpoints a killed run resumes from exactly (SPEC §7, §8).

`<run>/checkpoints/step_N/` holds
* the policy's weights (safetensors via `save_pretrained`) and the processor: a folder transformers loads
  directly, usable as MODEL_NAME_OR_PATH;
* `run_config.json`: the run's resolved config (the trainer's constants with their overrides);
* `training_state.pt`: the step, the optimizer state, every random number generator that influences the run
  (torch CPU and CUDA, python `random`, numpy), the PromptSampler's position, the ReplayBuffer's groups and
  PPO's critic (its head; with a separate backbone, that too);
* `COMPLETE`: written last. A checkpoint is written into `step_N.tmp/`, every file is fsynced, then the folder
  is renamed to `step_N/`; a folder without `COMPLETE` (a run killed while writing) is never loaded.

Resuming (the trainers' RESUME constant) reloads all of it, so the resumed run computes the same numbers as a
run that was never stopped. `PreemptionGuard` turns SIGTERM / SIGINT into "checkpoint after this step, then exit".
"""

import glob
import json
import os
import random
import re
import shutil
import signal
import threading

import numpy as np
import torch
from tqdm import tqdm

MARKER = "COMPLETE"
STATE_FILE = "training_state.pt"
CONFIG_FILE = "run_config.json"  # not config.json: save_pretrained writes the model's config there
# Constants a resumed run may change: they change what is logged, kept, or where, not the run's numbers.
# TOTAL_STEPS extends (or shortens) the run; with LR_SCHEDULE="cosine" it also re-plans the remaining decay.
# MICRO_BATCH_SIZE, GRADIENT_CHECKPOINTING, the devices and CPU_THREADS trade memory or speed for rounding only.
RESUMABLE = ("RESUME", "RESUME_OVERRIDES", "TOTAL_STEPS", "EVAL_EVERY", "SAVE_EVERY", "KEEP_CHECKPOINTS",
             "LOG_EVERY", "LOG_SAMPLES", "PLOT_EVERY", "COMPARE_WITH", "RUNS_DIR", "REPORT_TO", "MODEL_CACHE_DIR",
             "CPU_THREADS", "MICRO_BATCH_SIZE", "GRADIENT_CHECKPOINTING", "POLICY_DEVICE", "ROLLOUT_DEVICE")


def warn(message):
    tqdm.write(f"WARNING: {message}")


# ── random number generators ────────────────────────────────────────────────────────────────────
def rng_state():
    """Every global generator a run draws from: torch (CPU, every CUDA device), python `random`, numpy."""
    return {"torch": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            "python": random.getstate(), "numpy": np.random.get_state()}


def set_rng_state(state):
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])


# ── writing ─────────────────────────────────────────────────────────────────────────────────────
def critic_state(critic, policy):
    """PPO's critic without what the policy's weights already hold: its head, plus its backbone when separate."""
    if critic is None:
        return None
    shared = critic.backbone is policy.model
    return {"head": critic.head.state_dict(), "backbone": None if shared else critic.backbone.state_dict()}


def write_weights(path, model, processor):
    model.save_pretrained(path, safe_serialization=True)
    processor.save_pretrained(path)


def write_training_state(path, step, config, optimizer, prompts, replay, critic):
    with open(os.path.join(path, CONFIG_FILE), "w") as f:
        json.dump(config, f, indent=2)
    torch.save({"step": step, "optimizer": optimizer.state_dict(), "rng": rng_state(), "prompts": prompts.state_dict(),
                "replay": replay.state_dict() if replay is not None else None, "critic": critic},
               os.path.join(path, STATE_FILE))


def fsync_tree(path):
    """Flush every file under `path`, and the folders themselves, to disk."""
    for folder, _, files in os.walk(path):
        for name in files:
            with open(os.path.join(folder, name), "rb") as f:
                os.fsync(f.fileno())
        fsync_dir(folder)


def fsync_dir(path):
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def finalize(tmp, final, step):
    """Mark `tmp` complete and move it to `final` in one rename: a kill before the rename leaves only a `.tmp`
    folder (ignored), a kill after it leaves a complete checkpoint."""
    with open(os.path.join(tmp, MARKER), "w") as f:
        f.write(f"step {step}\n")
    fsync_tree(tmp)
    if os.path.exists(final):  # the same step saved again (a resumed run that re-saves its first step)
        shutil.rmtree(final)
    os.rename(tmp, final)
    fsync_dir(os.path.dirname(final))


def save_checkpoint(run_dir, step, model, processor, config, optimizer, prompts, replay=None, critic=None, keep=0):
    """Write `run_dir/checkpoints/step_<step>/` atomically, then delete all but the newest `keep` complete
    checkpoints (0 = keep every one) and any half-written folder. Returns the checkpoint's path.

    config: the resolved config; prompts: the PromptSampler; replay: the ReplayBuffer or None; critic: PPO's
    Critic or None (its backbone is stored only when it is not the policy's)."""
    final = os.path.join(run_dir, "checkpoints", f"step_{step}")
    tmp = final + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)  # left by a run killed while writing this very step
    os.makedirs(tmp)
    write_weights(tmp, model, processor)
    write_training_state(tmp, step, config, optimizer, prompts, replay, critic_state(critic, model))
    finalize(tmp, final, step)
    prune_checkpoints(run_dir, keep)
    return final


def checkpoint_step(path):
    match = re.fullmatch(r"step_(\d+)", os.path.basename(os.path.normpath(path)))
    return int(match.group(1)) if match else None


def complete_checkpoints(run_dir):
    """The complete checkpoints of a run folder, oldest first."""
    paths = [p for p in glob.glob(os.path.join(run_dir, "checkpoints", "step_*")) if checkpoint_step(p) is not None]
    return sorted((p for p in paths if os.path.isfile(os.path.join(p, MARKER))), key=checkpoint_step)


def prune_checkpoints(run_dir, keep):
    """Delete every complete checkpoint but the newest `keep` (0 = none), and every folder a kill left
    half-written."""
    complete = complete_checkpoints(run_dir)
    for path in complete[:-keep] if keep else []:
        shutil.rmtree(path)
    for path in glob.glob(os.path.join(run_dir, "checkpoints", "step_*")):
        if path not in complete:
            shutil.rmtree(path, ignore_errors=True)


# ── resuming ────────────────────────────────────────────────────────────────────────────────────
def find_resume_checkpoint(resume, runs_dir, algo):
    """The checkpoint RESUME names: None for "" (a new run); for "auto" the newest complete checkpoint of the
    newest `<algo>_*` run folder in runs_dir, or None (a new run, with a warning) when there is none, so that a job
    script can always pass "auto"; for a run folder its newest complete checkpoint; for a checkpoint folder itself.
    Half-written checkpoints are skipped with a warning; a named folder without a complete checkpoint is an error."""
    if not resume:
        return None
    if resume == "auto":
        runs = sorted(p for p in glob.glob(os.path.join(runs_dir, f"{algo}_*")) if os.path.isdir(p))  # by timestamp
        if not runs or not complete_checkpoints(runs[-1]):
            where = f"no complete checkpoint in {runs[-1]}" if runs else f"no {algo}_* run in {runs_dir}"
            warn(f"RESUME='auto': {where}; starting a new run")
            return None
        resume = runs[-1]
    run_name = os.path.basename(run_dir_of(resume) if checkpoint_step(resume) is not None else os.path.normpath(resume))
    if not run_name.startswith(f"{algo}_"):
        raise ValueError(f"RESUME={resume}: not a run of {algo}.py (its folder is {run_name}); resume it with the "
                         f"trainer that started it")
    if checkpoint_step(resume) is not None:
        if not os.path.isfile(os.path.join(resume, MARKER)):
            raise ValueError(f"RESUME={resume}: this checkpoint is incomplete (no {MARKER} file: the run was killed "
                             f"while writing it); resume from its run folder to take the newest complete one")
        return os.path.normpath(resume)
    complete = complete_checkpoints(resume)
    for path in sorted(glob.glob(os.path.join(resume, "checkpoints", "step_*"))):
        if path not in complete:
            warn(f"{path} is half-written (no {MARKER} file: the run was killed while writing it); ignored")
    if not complete:
        raise ValueError(f"RESUME={resume}: no complete checkpoint in {os.path.join(resume, 'checkpoints')}")
    return os.path.normpath(complete[-1])


def run_dir_of(checkpoint):
    return os.path.dirname(os.path.dirname(os.path.normpath(checkpoint)))


def overridden_keys(argv):
    """The constants named on a `--KEY=value` command line."""
    return [arg[2:].split("=", 1)[0] for arg in argv]


def resumed_config(checkpoint, config, argv):
    """The config a resumed run continues with: the one saved with `checkpoint`, plus the constants given in argv
    (already applied to `config`). Constants outside RESUMABLE and RESUME_OVERRIDES that would change the saved
    value are refused with a ValueError naming them. Constants the saved config lacks take their current value."""
    with open(os.path.join(checkpoint, CONFIG_FILE)) as f:
        saved = json.load(f)
    given = overridden_keys(argv)
    insisted = {k.strip() for k in config.get("RESUME_OVERRIDES", "").split(",") if k.strip()}
    same = lambda a, b: json.dumps(a, sort_keys=True) == json.dumps(b, sort_keys=True)  # noqa: E731 (tuple == list)
    changed = [k for k in given if k in saved and not same(config[k], saved[k])]
    refused = [k for k in changed if k not in RESUMABLE and k not in insisted]
    if refused:
        raise ValueError(f"resuming from {checkpoint}: {', '.join(refused)} would change the run "
                         f"({', '.join(f'{k}={saved[k]!r} -> {config[k]!r}' for k in refused)}). Drop them, or accept "
                         f"a run that is not the one you started with --RESUME_OVERRIDES={','.join(refused)}")
    if "TOTAL_STEPS" in changed and saved.get("LR_SCHEDULE") == "cosine":
        warn(f"TOTAL_STEPS {saved['TOTAL_STEPS']} -> {config['TOTAL_STEPS']} re-plans the cosine learning-rate decay "
             f"from step {checkpoint_step(checkpoint)} on: the rate jumps to the new schedule's value there")
    return {k: config[k] if k in given or k not in saved else saved[k] for k in config}


def load_checkpoint(checkpoint, optimizer, prompts, replay=None, critic=None):
    """Restore everything but the policy's weights (the trainer loads those from the checkpoint folder): the
    optimizer, the PromptSampler, the ReplayBuffer, the critic, and last the random number generators, so call it
    after every model is built. Returns the checkpoint's step."""
    # Not weights_only: the file holds python objects (RNG states, the replay groups with their images); load only
    # checkpoints you (or a run of yours) wrote.
    state = torch.load(os.path.join(checkpoint, STATE_FILE), map_location="cpu", weights_only=False)
    optimizer.load_state_dict(state["optimizer"])
    prompts.load_state_dict(state["prompts"])
    if replay is not None:
        replay.load_state_dict(state["replay"])
    if critic is not None:
        critic.head.load_state_dict(state["critic"]["head"])
        if state["critic"]["backbone"] is not None:
            critic.backbone.load_state_dict(state["critic"]["backbone"])
    set_rng_state(state["rng"])
    return state["step"]


# ── preemption ──────────────────────────────────────────────────────────────────────────────────
class PreemptionGuard:
    """SIGTERM or SIGINT (Ctrl-C) sets `signal_name`; the trainer checks it after each step, writes a checkpoint
    and exits. A second signal aborts at once (KeyboardInterrupt). Only installed in the main thread."""

    def __init__(self, log=warn):
        self.signal_name, self.log = None, log
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                signal.signal(sig, self.handle)

    def handle(self, signum, frame):
        name = signal.Signals(signum).name
        if self.signal_name is not None:
            raise KeyboardInterrupt(f"second signal ({name}): aborted without a checkpoint")
        self.signal_name = name
        self.log(f"{name} received: finishing this step, then writing a checkpoint and exiting "
                 f"(send it again to abort at once)")
