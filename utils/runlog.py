"""The run folder (SPEC §7): config.json, a copy of the trainer, metrics.jsonl, the markdown logs of
utils/markdown_logs.py, plots/ (utils/plot_metrics.py) and checkpoints/step_N/."""

import glob
import json
import math
import os
import re
import shutil
import subprocess
import sys
import time

from tqdm import tqdm

from utils.attention import per_row
from utils.distributed import all_reduce_max, all_reduce_sum, broadcast_object, current_world, is_main_process
from utils.markdown_logs import TerminalLog, append_attention_diagnostics, append_rollout_results, append_token_weights


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the repository: `-m utils.plot_metrics` runs here


def echo(message):
    """Print to the terminal above the progress bars. A terminal that went away (`python dapo.py | tee log` after
    tee was interrupted: a broken pipe) is dropped, so the run goes on to its checkpoint; run_terminal.md keeps
    everything."""
    try:
        tqdm.write(message)
    except (BrokenPipeError, OSError):
        pass


class RunLog:
    """Writes one run's folder `runs/<algo>_<timestamp>/` and prints what it logs."""

    def __init__(self, root, algo, config, script_path, resume=None):
        """A new folder under `root`; or, with `resume` = (run folder, step) of the checkpoint a run resumes from,
        that folder, with what the killed run logged after the checkpoint's step dropped (metrics.jsonl rows,
        markdown log entries): the resumed run writes those steps again. config.json is rewritten with `config`
        (which may differ from the saved one in the constants allowed on resume); run_terminal.md keeps
        everything and notes the resume."""
        if resume:
            self.dir, step = resume
            cut_logs_after(self.dir, step)
        else:
            self.dir = self.new_dir(root, algo)
            shutil.copy(script_path, os.path.join(self.dir, os.path.basename(script_path)))
        with open(os.path.join(self.dir, "config.json"), "w") as f:
            json.dump(config, f, indent=2)
        self.metrics_path = os.path.join(self.dir, "metrics.jsonl")
        self.terminal = TerminalLog(os.path.join(self.dir, "run_terminal.md"))
        if resume:
            self.terminal.write(f"\n## Resumed after step {resume[1]}\n\n")
        self.terminal.config(config)
        self.totals = progress_at(self.dir, resume[1]) if resume else dict.fromkeys(PROGRESS_KEYS, 0)

    def progress(self, completions=0, tokens=0, seconds=0.0):
        """The run's cumulative counts after adding one step's: completions and completion tokens generated, and
        the seconds spent in training steps (evaluations, logs, plots and checkpoints not counted)."""
        for key, value in zip(PROGRESS_KEYS, (completions, tokens, seconds)):
            self.totals[key] += value
        return dict(self.totals)

    @staticmethod
    def new_dir(root, algo):
        stamp = time.strftime("%Y%m%d_%H%M%S")
        path = os.path.join(root, f"{algo}_{stamp}")
        suffix = 1
        while os.path.exists(path):  # two runs started in the same second
            path = os.path.join(root, f"{algo}_{stamp}_{suffix}")
            suffix += 1
        os.makedirs(path)
        return path

    def print(self, message):
        echo(message)
        self.terminal.line(message)

    def warn(self, message):
        echo(f"WARNING: {message}")
        self.terminal.warning(message)

    def log_metrics(self, metrics):
        """Append one step's metrics (a flat dict of numbers) as a JSON line; NaN is written as null."""
        clean = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in metrics.items()}
        with open(self.metrics_path, "a") as f:
            f.write(json.dumps(clean) + "\n")
        self.terminal.metrics(metrics["step"], clean)

    def log_samples(self, step, rollout, advantages, tokenizer, n_samples, attention=None, vgr=None, weights=None,
                    visual=None):
        """rollout_results.md, attention_diagnostics.md and token_weights.md entries for this step's batch.

        attention: {stage: {metric: [B]}} (utils.attention.sample_metrics) or None; vgr, weights: [B, L] or None;
        visual: the step's utils.grounding.VisualDependency, or None.
        advantages: [B], or [B, L] with token weights (the sequence's advantage is then their mean).
        """
        path = lambda name: os.path.join(self.dir, name)  # noqa: E731
        rows = per_row(attention) if attention is not None else None
        if advantages.dim() == 2:
            advantages = (advantages * rollout.completion_mask).sum(1) / rollout.completion_mask.sum(1).clamp(min=1)
        append_rollout_results(path("rollout_results.md"), step, rollout, advantages, n_samples, path("images"),
                               attention=rows, tokenizer=tokenizer)
        append_attention_diagnostics(path("attention_diagnostics.md"), step, rollout, attention=rows,
                                     tokenizer=tokenizer)
        append_token_weights(path("token_weights.md"), step, tokenizer, rollout, advantages, n_samples,
                             weights=weights, vgr=vgr, visual_kl=None if visual is None else visual.kl)

    def plot(self, compare=None):
        """Redraw plots/ from metrics.jsonl, against the run folder `compare` if given, in a child process
        (`python -m utils.plot_metrics`): the trainer never loads matplotlib, whose figures and caches would otherwise
        sit in a long run's memory. Returns the files drawn; a failed drawing is a warning, not the run's end."""
        command = [sys.executable, "-m", "utils.plot_metrics", os.path.abspath(self.dir)] + \
            (["--compare", os.path.abspath(compare)] if compare else [])
        done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True)
        if done.returncode:
            self.warn(f"plots not drawn: {(done.stderr.strip().splitlines() or ['exit ' + str(done.returncode)])[-1]}")
        return done.stdout.split()

    def print_metrics(self, metrics, keys):
        def label(key):  # "reward/accuracy/mean" -> "accuracy/mean"; eval keys keep their namespace
            return key if key.startswith("eval/") else key.split("/", 1)[-1]

        parts = [f"{label(k)}={metrics[k]:.3g}" for k in keys if metrics.get(k) is not None]
        echo(f"step {metrics['step']:>4} | " + "  ".join(parts))  # run_terminal.md has the full block


class QuietRunLog:
    """What the ranks other than 0 hold under torchrun: the same calls as a RunLog, and the same folder, but
    nothing is written or printed. Rank 0 writes for the whole run: every rank draws the same prompts (so the same
    rows are skipped) and takes its decisions from global counts, so rank 0's warnings are the run's; the samples
    in the markdown logs are rank 0's."""

    def __init__(self, run_dir):
        self.dir = run_dir

    def print(self, message):
        pass

    def warn(self, message):
        pass

    def log_metrics(self, metrics):
        pass

    def log_samples(self, *args, **kwargs):
        pass

    def print_metrics(self, metrics, keys):
        pass

    def progress(self, *counts):
        return {}

    def plot(self, compare=None):
        return []


_UNSTARTED = []  # the folder of a new run of this process until its step 0 is logged (mark_started)


def open_run_log(root, algo, config, script_path, resume=None):
    """The run's log: a RunLog (arguments as there) on rank 0, the one writer, and under torchrun a QuietRunLog
    with the same folder on every other rank. A new run's folder counts as unstarted until mark_started()."""
    run = RunLog(root, algo, config, script_path, resume) if is_main_process() else None
    run_dir = broadcast_object(run.dir if run is not None else None)
    if resume is None and run is not None:
        _UNSTARTED[:] = [run_dir]
    return run if run is not None else QuietRunLog(run_dir)


def mark_started():
    """The run has logged its step 0 (or resumed): its folder is a run from now on, whatever happens."""
    _UNSTARTED.clear()


def discard_unstarted_run():
    """Remove the folder of a new run that failed before its step 0 was logged (a model or data set that would not
    load, Ctrl-C during the first model build), so that no folder that looks like a run is left behind for
    RESUME=auto or COMPARE_WITH=auto to find. Returns the folder removed, or None."""
    if not _UNSTARTED:
        return None
    path = _UNSTARTED.pop()
    shutil.rmtree(path, ignore_errors=True)
    return path


# What the terminal shows each step (everything goes to metrics.jsonl).
SHOWN_METRICS = ("reward/total/mean", "reward/accuracy/mean", "reward/format/mean", "policy/loss",
                 "policy/entropy", "policy/kl", "response/length/mean", "dapo/gen_batches",
                 "dapo/kept_group_frac", "critic/value_loss", "critic/explained_variance", "perf/step_s",
                 "eval/accuracy")


def cut_logs_after(run_dir, step):
    """Drop what a run logged after `step`: metrics.jsonl rows and `## Step N` entries of the markdown logs
    (each file is rewritten through a temporary file and a rename, so a kill leaves it whole)."""
    def rewrite(path, keep_text):
        if os.path.exists(path):
            with open(path, encoding="utf-8") as f:
                text = f.read()
            with open(path + ".tmp", "w", encoding="utf-8") as f:
                f.write(keep_text(text))
            os.replace(path + ".tmp", path)

    def metrics_rows(text):
        rows = [line for line in text.splitlines(keepends=True) if line.strip()]
        return "".join(r for r in rows if r.endswith("\n") and json.loads(r)["step"] <= step)  # a torn last row goes

    def markdown_entries(text):
        later = [m.start() for m in re.finditer(r"^## Step (\d+)$", text, re.M) if int(m.group(1)) > step]
        return text[: later[0]] if later else text

    rewrite(os.path.join(run_dir, "metrics.jsonl"), metrics_rows)
    for name in ("rollout_results.md", "attention_diagnostics.md", "token_weights.md"):
        rewrite(os.path.join(run_dir, name), markdown_entries)


def perf_metrics(timer, generated_tokens, completions, peak=None):
    """perf/*: wall time of the step and of its parts (the slowest rank's); completion tokens generated per second
    of the step, by all ranks together; the model FLOPs of the step (all ranks) and, given the device's `peak`
    FLOP/s, the model FLOPs utilisation of generation and of the update (utils/flops.py). Also returns (completions,
    completion tokens, step seconds) of the step, all ranks together, for the run's cumulative counts
    (RunLog.progress). timer: the step's utils.trainer.StepTimer."""
    names = ("generate", "logprob", "update")
    step_s, *seconds = all_reduce_max([time.time() - timer.start] + [timer.parts.get(n, 0.0) for n in names])
    tokens, completions, *flops = all_reduce_sum([generated_tokens, completions] + [timer.flops.get(n, 0.0)
                                                                                    for n in names])
    perf = {"perf/step_s": step_s, **{f"perf/{n}_s": s for n, s in zip(names, seconds)},
            "perf/tokens_per_s": tokens / step_s, "perf/flops_per_step": sum(flops)}
    if peak:
        ranks = current_world().world_size
        for name, f, s in zip(names, flops, seconds):
            if name != "logprob":
                perf[f"perf/mfu_{name}"] = f / s / (peak * ranks) if s > 0 else float("nan")
    return perf, (completions, tokens, step_s)


# Cumulative counts since step 0, in every metrics.jsonl row: the fair x-axes of `python -m utils.plot_metrics --x`.
PROGRESS_KEYS = ("progress/completions", "progress/completion_tokens", "perf/elapsed_s")


def progress_at(run_dir, step):
    """The cumulative counts of the metrics.jsonl row of `step` (zeros when it has none: a run logged before they
    existed), so that a resumed run continues them."""
    path = os.path.join(run_dir, "metrics.jsonl")
    rows = [json.loads(line) for line in open(path) if line.strip()] if os.path.exists(path) else []
    row = next((r for r in rows if r.get("step") == step), {})
    return {k: row.get(k) or 0 for k in PROGRESS_KEYS}


def comparison_run(runs_dir, algo, compare_with):
    """The run folder to plot against: `compare_with` itself, or for "auto" the newest finished-or-not run of
    the other trainer (dapo <-> grpo; ppo -> grpo) in runs_dir; None when there is none or compare_with is ""."""
    if compare_with != "auto":
        return compare_with or None
    other = {"dapo": "grpo", "grpo": "dapo", "ppo": "grpo"}.get(algo)
    candidates = sorted(glob.glob(os.path.join(runs_dir, f"{other}_*", "metrics.jsonl"))) if other else []
    return os.path.dirname(candidates[-1]) if candidates else None
