"""The run folder (SPEC §7): config.json, a copy of the trainer, metrics.jsonl, checkpoints/step_N/."""

import json
import math
import os
import shutil
import time

from tqdm import tqdm


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

    def print(self, message):
        tqdm.write(message)  # keeps progress bars intact

    def log_metrics(self, metrics):
        """Append one step's metrics (a flat dict of numbers) as a JSON line; NaN is written as null."""
        clean = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in metrics.items()}
        with open(self.metrics_path, "a") as f:
            f.write(json.dumps(clean) + "\n")

    def print_metrics(self, metrics, keys):
        def label(key):  # "reward/accuracy/mean" -> "accuracy/mean"; eval keys keep their namespace
            return key if key.startswith("eval/") else key.split("/", 1)[-1]

        parts = [f"{label(k)}={metrics[k]:.3g}" for k in keys if metrics.get(k) is not None]
        self.print(f"step {metrics['step']:>4} | " + "  ".join(parts))

    def save_checkpoint(self, model, processor, step):
        """checkpoints/step_N/ with safetensors weights and the processor: loadable by transformers directly."""
        path = os.path.join(self.dir, "checkpoints", f"step_{step}")
        model.save_pretrained(path, safe_serialization=True)
        processor.save_pretrained(path)
        return path


# What the terminal shows each step (everything goes to metrics.jsonl).
SHOWN_METRICS = ("reward/total/mean", "reward/accuracy/mean", "reward/format/mean", "policy/loss",
                 "policy/entropy", "policy/kl", "response/length/mean", "dapo/gen_batches",
                 "dapo/kept_group_frac", "perf/step_s", "eval/accuracy")


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
