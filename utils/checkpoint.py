"""Checkpoints a killed run resumes from exactly (SPEC §7, §8).

`<run>/checkpoints/step_N/` holds
* the policy's weights (safetensors via `save_pretrained`) and the processor: a folder transformers loads
  directly, usable as MODEL_NAME_OR_PATH; of a LoRA policy its adapters, in PEFT's format (utils/lora.py:
  `PeftModel.from_pretrained(base, folder)` loads them, `python -m utils.lora` writes the merged model);
* `run_config.json`: the run's resolved config (the trainer's constants with their overrides);
* `training_state.pt`: the step, the optimizer state, every random number generator that influences the run
  (torch CPU and CUDA, python `random`, numpy), the PromptSampler's position, the ReplayBuffer's groups and
  PPO's critic (its head; with a separate backbone, that too);
* `COMPLETE`: written last. A checkpoint is written into `step_N.tmp/`, every file is fsynced, then the folder
  is renamed to `step_N/`; a folder without `COMPLETE` (a run killed while writing) is never loaded.

Under torchrun (utils/distributed.py) rank 0 writes the consolidated weights (gathered from the shards) and
`training_state.pt`; the sharded training state is saved with `torch.distributed.checkpoint` into `sharded/`
(the AdamW state of every shard, PPO's critic), and each rank's random generators and replay buffer into
`rank_R.pt`. Such a checkpoint resumes with the same number of ranks.

Resuming (the trainers' RESUME constant) reloads all of it, so the resumed run computes the same numbers as a
run that was never stopped. `PreemptionGuard` turns SIGTERM / SIGINT into "checkpoint after this step, then exit".
"""

import glob
import json
import os
import pickle
import random
import re
import shutil
import signal
import threading

import numpy as np
import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_optimizer_state_dict,
                                                     set_optimizer_state_dict)
from tqdm import tqdm

from utils import layout
from utils.distributed import all_reduce_max, barrier, current_world, gather_full_state_dict, is_distributed
from utils.specs import resumable_constants

MARKER = "COMPLETE"
STATE_FILE = "training_state.pt"
CONFIG_FILE = "run_config.json"  # not config.json: save_pretrained writes the model's config there
def warn(message):
    tqdm.write(f"WARNING: {message}")


# ── random number generators ────────────────────────────────────────────────────────────────────
def rng_state():
    """Every global generator a run draws from: torch (CPU, every CUDA device), python `random`, numpy."""
    name, keys, position, has_gauss, cached = np.random.get_state()
    return {"torch": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            "python": random.getstate(), "numpy": [name, keys.tolist(), position, has_gauss, cached]}  # plain: see
    # load_checkpoint's weights_only


def set_rng_state(state):
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    random.setstate(state["python"])
    name, keys, position, has_gauss, cached = state["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), position, has_gauss, cached))


# ── writing ─────────────────────────────────────────────────────────────────────────────────────
def critic_modules(critic, policy):
    """PPO's critic without what the policy's weights already hold: {"head": ..., "backbone": ... when separate}."""
    if critic is None:
        return {}
    separate = critic.backbone is not layout.backbone(policy)
    return {"head": critic.head, **({"backbone": critic.backbone} if separate else {})}


def write_weights(path, model, processor, state_dict=None):
    """The model's weights and the processor; of a LoRA policy only its adapters, in PEFT's format."""
    lora = {"save_embedding_layers": False} if layout.is_lora(model) else {}  # (else PEFT may ask the hub)
    model.save_pretrained(path, state_dict=state_dict, safe_serialization=True, **lora)
    processor.save_pretrained(path)


def write_training_state(path, step, config, prompts, optimizer=None, replay=None, critic=None):
    """training_state.pt; in one process with the optimizer, the generators and the replay buffer too."""
    with open(os.path.join(path, CONFIG_FILE), "w") as f:
        json.dump(config, f, indent=2)
    state = {"step": step, "world_size": current_world().world_size, "prompts": prompts.state_dict(),
             "critic": critic}
    if not is_distributed():
        state.update(optimizer=optimizer.state_dict(), rng=rng_state(),
                     replay=replay.state_dict() if replay is not None else None)
    torch.save(state, os.path.join(path, STATE_FILE))


def sharded_state(policy, optimizer, critic, saved_keys=None):
    """What torch.distributed.checkpoint saves and loads in place: the AdamW state of every shard (named by the
    parameters' places in the policy and critic) and the critic's sharded modules. Returns (state, the module
    that names the optimizer's parameters).

    Saving: the optimizer's entry only once it has state (torch's state-dict helper would otherwise take an
    AdamW step of lr 0 to create it, changing the run). Loading: `saved_keys`, the checkpoint's keys, limit the
    template to the parameters that had state (a PPO checkpoint of the critic warm-up has none for the policy)."""
    trained = torch.nn.ModuleDict({"policy": policy, **({"critic": critic} if critic is not None else {})})
    state = {f"critic_{k}": m.state_dict() for k, m in critic_modules(critic, policy).items()}
    if saved_keys is None and optimizer.state:
        state["optimizer"] = get_optimizer_state_dict(trained, optimizer)
    elif saved_keys is not None and any(k.startswith("optimizer.") for k in saved_keys):
        template = get_optimizer_state_dict(trained, optimizer)  # the optimizer is reset by the load below
        template["state"] = {name: v for name, v in template["state"].items()
                             if any(k.startswith(f"optimizer.state.{name}.") for k in saved_keys)}
        state["optimizer"] = template
    return state, trained


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
    Critic or None (its backbone is stored only when it is not the policy's). Under torchrun every rank calls it:
    rank 0 writes the consolidated weights and training_state.pt, all ranks the sharded state and their rank_R.pt.
    """
    final = os.path.join(run_dir, "checkpoints", f"step_{step}")
    tmp = final + ".tmp"
    try:
        write_checkpoint(tmp, final, step, model, processor, config, optimizer, prompts, replay, critic)
    except OSError as e:  # a full disk, a quota: the previous checkpoints are untouched
        shutil.rmtree(tmp, ignore_errors=True)
        previous = complete_checkpoints(run_dir)
        kept = f"the previous checkpoint {previous[-1]} is intact: resume from it" if previous else \
            "there is no earlier checkpoint"
        raise OSError(f"checkpoint step_{step} could not be written ({e.strerror or e}); its partial folder was "
                      f"removed and {kept}") from None
    if current_world().is_main:
        prune_checkpoints(run_dir, keep)
    barrier()
    return final


def write_checkpoint(tmp, final, step, model, processor, config, optimizer, prompts, replay, critic):
    """save_checkpoint's writing: everything into `tmp`, then finalize() renames it to `final`."""
    main = current_world().is_main
    if main:
        shutil.rmtree(tmp, ignore_errors=True)  # left by a run killed while writing this very step
        os.makedirs(tmp)
    barrier()
    weights = gather_full_state_dict(model) if is_distributed() else None  # the whole model, on rank 0
    if main:
        write_weights(tmp, model, processor, weights)
    critic_weights = None  # PPO's critic, in training_state.pt; under torchrun in the sharded state
    if is_distributed():
        state, _ = sharded_state(model, optimizer, critic)
        dcp.save(state, checkpoint_id=os.path.join(tmp, "sharded"))
        torch.save({"rng": rng_state(), "replay": replay.state_dict() if replay is not None else None},
                   os.path.join(tmp, f"rank_{current_world().rank}.pt"))
    elif critic is not None:
        critic_weights = {k: m.state_dict() for k, m in critic_modules(critic, model).items()}
    if main:
        write_training_state(tmp, step, config, prompts, optimizer, replay, critic_weights)
    barrier()
    if main:
        finalize(tmp, final, step)


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
    newest `<algo>_*` run folder in runs_dir that has one (newer folders without one — a start that failed, a run
    killed before its first checkpoint — are passed over with a warning), or None (a new run, with a warning) when
    no run has one, so that a job script can always pass "auto"; for a run folder its newest complete checkpoint;
    for a checkpoint folder itself.
    Half-written checkpoints are skipped with a warning; a named folder without a complete checkpoint is an error."""
    if not resume:
        return None
    if resume == "auto":
        runs = sorted(p for p in glob.glob(os.path.join(runs_dir, f"{algo}_*")) if os.path.isdir(p))  # by timestamp
        resumable = [run for run in runs if complete_checkpoints(run)]
        if not resumable:
            where = f"no complete checkpoint in any {algo}_* run" if runs else f"no {algo}_* run"
            warn(f"RESUME='auto': {where} in {runs_dir}; starting a new run")
            return None
        newer = runs[runs.index(resumable[-1]) + 1:]  # e.g. starts that failed before their first checkpoint
        if newer:
            warn(f"RESUME='auto': {', '.join(newer)} {'has' if len(newer) == 1 else 'have'} no complete checkpoint; "
                 f"resuming {resumable[-1]}, the newest run that has one")
        resume = resumable[-1]
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
    (already applied to `config`). Constants that are not resumable (utils/specs.py) or named in RESUME_OVERRIDES that would change the saved
    value are refused with a ValueError naming them. Constants the saved config lacks take their current value."""
    with open(os.path.join(checkpoint, CONFIG_FILE)) as f:
        saved = json.load(f)
    given = overridden_keys(argv)
    insisted = {k.strip() for k in config.get("RESUME_OVERRIDES", "").split(",") if k.strip()}
    same = lambda a, b: json.dumps(a, sort_keys=True) == json.dumps(b, sort_keys=True)  # noqa: E731 (tuple == list)
    changed = [k for k in given if k in saved and not same(config[k], saved[k])]
    refused = [k for k in changed if k not in resumable_constants() and k not in insisted]
    if refused:
        raise ValueError(f"resuming from {checkpoint}: {', '.join(refused)} would change the run "
                         f"({', '.join(f'{k}={saved[k]!r} -> {config[k]!r}' for k in refused)}). Drop them, or accept "
                         f"a run that is not the one you started with --RESUME_OVERRIDES={','.join(refused)}")
    if "TOTAL_STEPS" in changed and saved.get("LR_SCHEDULE") == "cosine":
        warn(f"TOTAL_STEPS {saved['TOTAL_STEPS']} -> {config['TOTAL_STEPS']} re-plans the cosine learning-rate decay "
             f"from step {checkpoint_step(checkpoint)} on: the rate jumps to the new schedule's value there")
    return {k: config[k] if k in given or k not in saved else saved[k] for k in config}


def load_state_file(path):
    """A training-state file, read with torch.load(weights_only=True): tensors and plain python values only (the
    training state holds nothing else: RNG states as lists, the replay buffer's groups as dicts of tensors), so a
    crafted file cannot run code while it loads — it fails with one error line instead."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ValueError(f"{path}: refused to load: it holds more than tensors and plain values ({first}); "
                         f"training states are written by this project's trainers only") from None


def load_checkpoint(checkpoint, policy, optimizer, prompts, replay=None, critic=None):
    """Restore everything but the policy's weights (the trainer loads those from the checkpoint folder): the
    optimizer, the PromptSampler, the ReplayBuffer, the critic, and last the random number generators, so call it
    after every model is built (and sharded, under torchrun: then every rank calls it). `policy` names the
    optimizer's parameters and tells a separate critic backbone from a shared one. Returns the checkpoint's step."""
    state = load_state_file(os.path.join(checkpoint, STATE_FILE))
    world_size = current_world().world_size
    if state.get("world_size", 1) != world_size:
        raise ValueError(f"RESUME={checkpoint}: written by {state.get('world_size', 1)} process(es), resumed by "
                         f"{world_size}; resume with the same number (torchrun --nproc_per_node=...)")
    prompts.load_state_dict(state["prompts"])
    if is_distributed():
        folder = os.path.join(checkpoint, "sharded")
        saved_keys = dcp.FileSystemReader(folder).read_metadata().state_dict_metadata.keys()
        sharded, trained = sharded_state(policy, optimizer, critic, saved_keys)
        dcp.load(sharded, checkpoint_id=folder)
        if "optimizer" in sharded:  # not strict: parameters without state (yet) stay without
            set_optimizer_state_dict(trained, optimizer, sharded["optimizer"], options=StateDictOptions(strict=False))
        for name, module in critic_modules(critic, policy).items():
            module.load_state_dict(sharded[f"critic_{name}"])
        state.update(load_state_file(os.path.join(checkpoint, f"rank_{current_world().rank}.pt")))
    else:
        optimizer.load_state_dict(state["optimizer"])
        for name, module in critic_modules(critic, policy).items():
            module.load_state_dict(state["critic"][name])
    if replay is not None:
        replay.load_state_dict(state["replay"])
    set_rng_state(state["rng"])
    return state["step"]


# ── preemption ──────────────────────────────────────────────────────────────────────────────────
class PreemptionGuard:
    """SIGTERM or SIGINT (Ctrl-C) sets `signal_name`; the trainer checks `requested()` after each step, writes a
    checkpoint (then `saved` names it) and exits. A second signal aborts at once (KeyboardInterrupt, whose message
    says whether the stop checkpoint was written). Only installed in the main thread."""

    def __init__(self, log=warn):
        self.signal_name, self.log, self.saved = None, log, None
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                signal.signal(sig, self.handle)

    def handle(self, signum, frame):
        name = signal.Signals(signum).name
        if self.signal_name is not None:
            if self.saved:
                raise KeyboardInterrupt(f"second {name}; the stop checkpoint {self.saved} was written: resume from it")
            raise KeyboardInterrupt(f"second {name}: aborted during the step, before the stop checkpoint; resume "
                                    f"from the run's last checkpoint (RESUME=auto)")
        self.signal_name = name
        self.log(f"{name} received: finishing this step, then writing a checkpoint and exiting "
                 f"(send it again to abort at once)")

    def requested(self):
        """Whether a signal asked to stop, on any rank (under torchrun all ranks stop after the same step)."""
        if all_reduce_max(int(self.signal_name is not None)):
            self.signal_name = self.signal_name or "a signal to another rank"
        return self.signal_name is not None
