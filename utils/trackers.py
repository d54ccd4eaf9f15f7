"""Experiment trackers (REPORT_TO): the metrics of metrics.jsonl also sent to Weights & Biases and/or TensorBoard.

Both are optional dependencies: asking for one that is not installed is a clear error naming the package.
"""

import importlib.util
import math
import os

from utils.distributed import is_main_process

PACKAGES = {"wandb": "wandb", "tensorboard": "tensorboard"}  # REPORT_TO entry -> package it needs


def tracker_names(report_to):
    """The trackers named by REPORT_TO ("" | "wandb" | "tensorboard" | "wandb,tensorboard"); ValueError for an
    unknown one or one whose package is not installed."""
    names = [name.strip() for name in report_to.split(",") if name.strip()]
    for name in names:
        if name not in PACKAGES:
            raise ValueError(f"REPORT_TO={report_to!r}: unknown tracker {name!r}; expected \"\", "
                             f"{', '.join(map(repr, PACKAGES))} or both, comma-separated")
        if importlib.util.find_spec(PACKAGES[name]) is None:
            raise ValueError(f"REPORT_TO={report_to!r} needs the {PACKAGES[name]} package: pip install "
                             f"{PACKAGES[name]} (or set --REPORT_TO=\"\")")
    return names


def scalars(metrics):
    """The finite numbers of a metrics dict, without its step."""
    return {k: float(v) for k, v in metrics.items() if k != "step" and isinstance(v, (int, float))
            and not isinstance(v, bool) and math.isfinite(v)}


class WandbTracker:
    def __init__(self, run_dir, config):
        import wandb

        self.run = wandb.init(project=os.environ.get("WANDB_PROJECT", "vlm-rl"), name=os.path.basename(run_dir),
                              dir=run_dir, config=config)

    def log(self, metrics, step):
        self.run.log(scalars(metrics), step=step)

    def close(self):
        self.run.finish()


class TensorBoardTracker:
    """Event files under <run>/tensorboard/ (`tensorboard --logdir runs`)."""

    def __init__(self, run_dir, config):
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir=os.path.join(run_dir, "tensorboard"))
        self.writer.add_text("config", "\n".join(f"    {k} = {v!r}" for k, v in config.items()))

    def log(self, metrics, step):
        for key, value in scalars(metrics).items():
            self.writer.add_scalar(key, value, step)
        self.writer.flush()

    def close(self):
        self.writer.close()


class Trackers:
    """Every tracker REPORT_TO names, behind one log / close (none: both do nothing)."""

    def __init__(self, trackers):
        self.trackers = trackers

    def log(self, metrics, step):
        for tracker in self.trackers:
            tracker.log(metrics, step)

    def close(self):
        for tracker in self.trackers:
            tracker.close()


def make_tracker(report_to, run_dir, config):
    """The trackers of REPORT_TO for the run in `run_dir`, with the run's config; log(metrics, step), close().
    Under torchrun only rank 0 reports (the metrics are already global)."""
    kinds = {"wandb": WandbTracker, "tensorboard": TensorBoardTracker}
    names = tracker_names(report_to)  # checked on every rank
    return Trackers([kinds[name](run_dir, config) for name in names] if is_main_process() else [])
