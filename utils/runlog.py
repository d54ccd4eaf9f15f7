"""The run folder (SPEC §7): config.json, a copy of the trainer, metrics.jsonl, the markdown logs of
utils/markdown_logs.py, plots/ (utils/plot_metrics.py) and checkpoints/step_N/."""

import glob
import json
import math
import os
import shutil
import time

from tqdm import tqdm

from utils.attention import per_row
from utils.markdown_logs import TerminalLog, append_attention_diagnostics, append_rollout_results, append_token_weights


class RunLog:
    """Writes one run's folder `runs/<algo>_<timestamp>/` and prints what it logs."""

    def __init__(self, root, algo, config, script_path):
        stamp = time.strftime("%Y%m%d_%H%M%S")
        self.dir = os.path.join(root, f"{algo}_{stamp}")
        suffix = 1
        while os.path.exists(self.dir):  # two runs started in the same second
            self.dir = os.path.join(root, f"{algo}_{stamp}_{suffix}")
            suffix += 1
        os.makedirs(self.dir)
        with open(os.path.join(self.dir, "config.json"), "w") as f:
            json.dump(config, f, indent=2)
        shutil.copy(script_path, os.path.join(self.dir, os.path.basename(script_path)))
        self.metrics_path = os.path.join(self.dir, "metrics.jsonl")
        self.terminal = TerminalLog(os.path.join(self.dir, "run_terminal.md"))
        self.terminal.config(config)

    def print(self, message):
        tqdm.write(message)  # keeps progress bars intact
        self.terminal.line(message)

    def warn(self, message):
        tqdm.write(f"WARNING: {message}")
        self.terminal.warning(message)

    def log_metrics(self, metrics):
        """Append one step's metrics (a flat dict of numbers) as a JSON line; NaN is written as null."""
        clean = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in metrics.items()}
        with open(self.metrics_path, "a") as f:
            f.write(json.dumps(clean) + "\n")
        self.terminal.metrics(metrics["step"], clean)

    def log_samples(self, step, rollout, advantages, tokenizer, n_samples, attention=None, vgr=None, weights=None):
        """rollout_results.md, attention_diagnostics.md and token_weights.md entries for this step's batch.

        attention: {stage: {metric: [B]}} (utils.attention.sample_metrics) or None; vgr, weights: [B, L] or None.
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
                             weights=weights, vgr=vgr)

    def print_metrics(self, metrics, keys):
        def label(key):  # "reward/accuracy/mean" -> "accuracy/mean"; eval keys keep their namespace
            return key if key.startswith("eval/") else key.split("/", 1)[-1]

        parts = [f"{label(k)}={metrics[k]:.3g}" for k in keys if metrics.get(k) is not None]
        tqdm.write(f"step {metrics['step']:>4} | " + "  ".join(parts))  # run_terminal.md has the full block

    def save_checkpoint(self, model, processor, step, state_dict=None):
        """checkpoints/step_N/ with safetensors weights and the processor: loadable by transformers directly.
        state_dict: the full weights of a sharded model (utils.distributed.gather_full_state_dict)."""
        path = os.path.join(self.dir, "checkpoints", f"step_{step}")
        model.save_pretrained(path, state_dict=state_dict, safe_serialization=True)
        processor.save_pretrained(path)
        return path


class QuietRunLog:
    """What the ranks other than 0 hold instead of a RunLog under torchrun: the same calls, nothing written."""

    dir = None

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

    def save_checkpoint(self, model, processor, step, state_dict=None):
        return None


# What the terminal shows each step (everything goes to metrics.jsonl).
SHOWN_METRICS = ("reward/total/mean", "reward/accuracy/mean", "reward/format/mean", "policy/loss",
                 "policy/entropy", "policy/kl", "response/length/mean", "dapo/gen_batches",
                 "dapo/kept_group_frac", "critic/value_loss", "critic/explained_variance", "perf/step_s",
                 "eval/accuracy")


def mean_std(values):
    values = values.float()
    return values.mean().item(), (values.std().item() if values.numel() > 1 else 0.0)


def rollout_metrics(rollout):
    """reward/<component>/{mean,std} and response/* over every completion generated this step."""
    metrics = {}
    for name, values in rollout.rewards.items():
        metrics[f"reward/{name}/mean"], metrics[f"reward/{name}/std"] = mean_std(values)
    lengths = rollout.completion_mask.sum(1)
    metrics["response/length/mean"] = lengths.float().mean().item()
    metrics["response/length/max"] = lengths.max().item()
    metrics["response/truncated_frac"] = rollout.truncated.float().mean().item()
    return metrics


def perf_metrics(step_start, generate_s, logprob_s, update_s, generated_tokens):
    """perf/*: wall time of the step and of its parts; generated completion tokens per second of the step."""
    step_s = time.time() - step_start
    return {"perf/step_s": step_s, "perf/generate_s": generate_s, "perf/logprob_s": logprob_s,
            "perf/update_s": update_s, "perf/tokens_per_s": generated_tokens / step_s}


def comparison_run(runs_dir, algo, compare_with):
    """The run folder to plot against: `compare_with` itself, or for "auto" the newest finished-or-not run of
    the other trainer (dapo <-> grpo; ppo -> grpo) in runs_dir; None when there is none or compare_with is ""."""
    if compare_with != "auto":
        return compare_with or None
    other = {"dapo": "grpo", "grpo": "dapo", "ppo": "grpo"}.get(algo)
    candidates = sorted(glob.glob(os.path.join(runs_dir, f"{other}_*", "metrics.jsonl"))) if other else []
    return os.path.dirname(candidates[-1]) if candidates else None
