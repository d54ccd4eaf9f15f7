"""Plots of the metrics a trainer writes to `runs/<trainer>_<timestamp>/metrics.jsonl`.

Usage:
    python -m utils.plot_metrics RUN_DIR [--compare OTHER_RUN_DIR]
        writes RUN_DIR/plots/training_metrics.png (and attention_mdi.png when the run logged
        attention/<stage>/mdi, rollout_gap.png when it logged rollout/*, grounding.png when it logged grounding/* or
        eval/accuracy_blank_image, and with --compare the figure a trainer draws against COMPARE_WITH's run), then prints
        the paths (this is how the trainers draw their plots: in a child process)
    python -m utils.plot_metrics RUN_DIR [RUN_DIR ...] [--out FILE] [--x step|samples|tokens|time] [--labels ...]
        overlays the runs in one figure, FILE (default: runs_comparison.png in the current folder). Runs whose
        configs differ only in SEED form a group, drawn as its mean with a band (min–max of 2 seeds, ± one std of
        3 or more); --labels A,A,B,B groups by label instead. --x puts steps, completions generated, completion
        tokens generated or training seconds on the x-axis (cumulative counts every run logs).

From Python: `plot_run(run_dir, compare_dir=None)` also writes dapo_vs_grpo.png next to the others when
given a second run (comparison.png, an overlay, when one of the two is a PPO run). Every raw series is drawn
faintly with its exponential moving average on top; held-out evaluations (eval/*, logged every EVAL_EVERY
steps) are drawn as markers, unsmoothed.
"""

import argparse
import gc
import json
import math
import os
import sys
import warnings

import matplotlib
import numpy as np

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.lines import Line2D  # noqa: E402
from matplotlib.ticker import FuncFormatter, LogLocator, MaxNLocator, NullFormatter  # noqa: E402

DAPO_COLOR, GRPO_COLOR = "tab:blue", "tab:orange"
DPI = 100
# --x: the metrics.jsonl key on the x-axis and its axis label. All but "step" are cumulative counts since step 0
# (utils/runlog.py, continued on resume): comparing at equal samples is fair to DAPO, which samples 2-4 rounds a step.
X_AXES = {"step": ("step", "step"), "samples": ("progress/completions", "completions generated"),
          "tokens": ("progress/completion_tokens", "completion tokens generated"),
          "time": ("perf/elapsed_s", "training time (s)")}


# ── Reading a run ──────────────────────────────────────────────────────────────────────────────────────────
def read_metrics(run_dir):
    """One dict per line of `run_dir/metrics.jsonl`; lines that are not valid JSON are skipped with a warning."""
    path = os.path.join(run_dir, "metrics.jsonl")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no metrics.jsonl in {run_dir!r} (is it a run folder?)")
    records = []
    with open(path) as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                warnings.warn(f"{path}: line {number} is not valid JSON (truncated write?); skipped", stacklevel=2)
                continue
            if isinstance(record, dict):
                records.append(record)
    return records


def read_config(run_dir):
    """The trainer's constants from `run_dir/config.json`; {} when the file is missing."""
    path = os.path.join(run_dir, "config.json")
    if not os.path.isfile(path):
        return {}
    with open(path) as f:
        return json.load(f)


def _finite(value):
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def series(records, key, transform=None, x="step"):
    """(xs, values) of `key` over the records, leaving out rows where it is absent, None or NaN; xs are the rows'
    steps, or with x = "samples" | "tokens" | "time" their cumulative count (X_AXES)."""
    x_key = X_AXES[x][0]
    xs, values = [], []
    for record in records:
        value = record.get(key)
        if _finite(value) and _finite(record.get(x_key)):
            xs.append(record[x_key])
            values.append(transform(value) if transform else value)
    return xs, values


def smooth(values, weight=0.8):
    """Exponential moving average; None/NaN entries stay NaN in the output and do not move the average."""
    out, average = [], None
    for value in values:
        if not _finite(value):
            out.append(float("nan"))
            continue
        average = value if average is None else weight * average + (1 - weight) * value
        out.append(average)
    return out


# ── Drawing ────────────────────────────────────────────────────────────────────────────────────────────────
def draw(ax, records, key, label=None, color=None, transform=None, smoothing=0.8, x="step"):
    """Draw one series on `ax`: faint raw line + smoothed line of the same colour, or markers for eval/*.

    Returns the number of points drawn (0 when the run never logged the key)."""
    steps, values = series(records, key, transform, x)
    if not steps:
        return 0
    if key.startswith("eval/"):  # sparse: every EVAL_EVERY steps, no smoothing
        ax.plot(steps, values, marker="o", markersize=4, linewidth=1.5, color=color, label=label)
    else:
        (raw,) = ax.plot(steps, values, alpha=0.3, linewidth=1, color=color,
                         marker="o" if len(steps) == 1 else None)
        ax.plot(steps, smooth(values, smoothing), linewidth=1.8, color=raw.get_color(), label=label)
    return len(steps)


def band(runs, key, transform=None, smoothing=0.8, x="step"):
    """(xs, mean, low, high) of `key` over several runs (seeds) — each run's series smoothed as `draw` smooths it
    (eval/* raw) — on the x values they share: the steps all of them logged, or for a cumulative x-axis 100 points
    (the number of evaluations for eval/*) over the range all of them reached, each run interpolated linearly. The
    band is min–max with 2 runs and mean ± one standard deviation with 3 or more. None when a run lacks the key."""
    curves = [series(records, key, transform, x) for records in runs]
    if not curves or not all(xs for xs, _ in curves):
        return None
    if not key.startswith("eval/"):
        curves = [(xs, smooth(values, smoothing)) for xs, values in curves]
    if x == "step":
        grid = sorted(set.intersection(*(set(xs) for xs, _ in curves)))
    else:
        low, high = max(xs[0] for xs, _ in curves), min(xs[-1] for xs, _ in curves)
        grid = np.linspace(low, high, min(len(xs) for xs, _ in curves) if key.startswith("eval/") else 100)
    if len(grid) == 0:
        return None
    ys = np.array([np.interp(grid, xs, values) for xs, values in curves])
    mean = ys.mean(0)
    if len(runs) >= 3:
        std = ys.std(0)
        return np.asarray(grid, dtype=float), mean, mean - std, mean + std
    return np.asarray(grid, dtype=float), mean, ys.min(0), ys.max(0)


def draw_group(ax, runs, key, label=None, color=None, transform=None, x="step"):
    """One run drawn as `draw` draws it; several (seeds of one configuration) as their mean line with a band
    (`band`). Returns the number of points drawn."""
    if len(runs) == 1:
        return draw(ax, runs[0], key, label, color, transform, x=x)
    drawn = band(runs, key, transform, x=x)
    if drawn is None:
        return 0
    xs, mean, low, high = drawn
    marker = {"marker": "o", "markersize": 4} if key.startswith("eval/") else {}
    (line,) = ax.plot(xs, mean, linewidth=1.8, color=color, label=label, **marker)
    ax.fill_between(xs, low, high, color=line.get_color(), alpha=0.2, linewidth=0)
    return len(xs)


def _style(ax, title, ylabel, legend=False, x="step"):
    ax.set_title(title, fontsize=10)
    ax.set_xlabel(X_AXES[x][1])
    ax.set_ylabel(ylabel)
    ax.grid(True, alpha=0.3)
    if not ax.get_lines():
        ax.text(0.5, 0.5, "no data", transform=ax.transAxes, ha="center", va="center", color="grey")
    if legend and ax.get_lines():
        ax.legend(fontsize=8, loc="best")


def _save(fig, out_path, top=1.0):
    os.makedirs(os.path.dirname(os.path.abspath(out_path)), exist_ok=True)
    fig.tight_layout(rect=(0, 0, 1, top))
    fig.savefig(out_path, dpi=DPI)
    return fig


def _name(run_dir):
    return os.path.basename(os.path.normpath(run_dir))


# ── Figures ────────────────────────────────────────────────────────────────────────────────────────────────
def plot_dapo_metrics(run_dir, out_path):
    """2x3 panels of one run: loss, held-out accuracy (the entropy bonus term instead when ENTROPY_COEF > 0),
    reward, entropy, dynamic sampling (for a PPO run: the critic's value loss and explained variance), response
    length."""
    records, config = read_metrics(run_dir), read_config(run_dir)
    coef = config.get("ENTROPY_COEF", 0.0)
    fig, axes = plt.subplots(2, 3, figsize=(12, 6.5))
    (loss_ax, bonus_ax, reward_ax), (entropy_ax, sampling_ax, length_ax) = axes

    draw(loss_ax, records, "policy/loss", color="tab:blue")
    _style(loss_ax, "Policy loss", "loss (per token)")

    if coef:  # the bonus is part of the loss: show it
        draw(bonus_ax, records, "policy/entropy", color="tab:purple", transform=lambda h: -coef * h)
        _style(bonus_ax, f"Entropy bonus term (−ENTROPY_COEF·entropy)\nENTROPY_COEF = {coef:g}",
               "loss term (coef × nats / token)")
    else:  # no bonus: the panel shows the number that matters
        draw(bonus_ax, records, "eval/accuracy", color="tab:red")
        temperature = config.get("EVAL_TEMPERATURE", 0)
        _style(bonus_ax, "Held-out accuracy " + (f"(T = {temperature:g}, mean of {config.get('EVAL_SAMPLES_PER_PROMPT')}"
                                                 " per question)" if temperature else "(greedy)"),
               "accuracy (fraction)")

    draw(reward_ax, records, "reward/total/mean", label="total (mean)", color="tab:green")
    draw(reward_ax, records, "reward/accuracy/mean", label="accuracy (mean)", color="tab:red")
    _style(reward_ax, "Reward", "reward (per completion)", legend=True)

    draw(entropy_ax, records, "policy/entropy", color="tab:purple")
    _style(entropy_ax, "Entropy (nats / token)", "entropy (nats / token)")

    if any("critic/value_loss" in r for r in records):
        draw(sampling_ax, records, "critic/value_loss", color="tab:blue")
        _style(sampling_ax, "Critic", "value loss (per token)")
        sampling_ax.set_ylabel("value loss (per token)", color="tab:blue")
        variance_ax = sampling_ax.twinx()
        draw(variance_ax, records, "critic/explained_variance", color="tab:orange")
        variance_ax.set_ylabel("explained variance", color="tab:orange")
        variance_ax.set_ylim(min(-0.05, *series(records, "critic/explained_variance")[1]), 1.05)
    else:
        draw(sampling_ax, records, "dapo/gen_batches", label="generation rounds", color="tab:blue")
        off = " (off: DYNAMIC_SAMPLING = False)" if config.get("DYNAMIC_SAMPLING") is False else ""
        _style(sampling_ax, "Dynamic sampling" + off, "generation rounds / step")
        sampling_ax.set_ylim(0, max(series(records, "dapo/gen_batches")[1], default=1) + 0.5)
        sampling_ax.yaxis.set_major_locator(MaxNLocator(integer=True))
        sampling_ax.set_ylabel("generation rounds / step", color="tab:blue")
        kept_ax = sampling_ax.twinx()
        draw(kept_ax, records, "dapo/kept_group_frac", label="kept group fraction", color="tab:orange")
        kept_ax.set_ylabel("kept groups (fraction)", color="tab:orange")
        kept_ax.set_ylim(0, 1.05)

    draw(length_ax, records, "response/length/mean", color="tab:brown")
    _style(length_ax, "Response length (tokens)", "length (tokens, mean)")

    fig.suptitle(_name(run_dir), fontsize=12)
    return _save(fig, out_path)


COMPARISON_PANELS = [("policy/loss", "Policy loss", "loss (per token)"),
                     ("reward/total/mean", "Reward (total, mean)", "reward (per completion)"),
                     ("policy/entropy", "Entropy (nats / token)", "entropy (nats / token)"),
                     ("eval/accuracy", "Held-out accuracy", "accuracy (fraction)")]
OVERLAY_PANELS = [("reward/total/mean", "Reward (total, mean)", "reward (per completion)"),
                  ("reward/accuracy/mean", "Sampled accuracy (mean)", "accuracy (fraction)"),
                  ("eval/accuracy", "Held-out accuracy", "accuracy (fraction)"),
                  ("policy/loss", "Policy loss", "loss (per token)"),
                  ("policy/entropy", "Entropy (nats / token)", "entropy (nats / token)"),
                  ("response/length/mean", "Response length (tokens)", "length (tokens, mean)")]


def overlay(groups, panels, out_path, x="step", colors=None, title=None):
    """One colour per group of runs [(label, [run_dir, ...])], drawn by draw_group on each panel (key, title, ylabel);
    the legend on top, and `title` (with a note when the runs differ in model or data: different_setups)."""
    colors = colors or plt.get_cmap("tab10").colors
    groups = [(label, [read_metrics(d) for d in dirs], dirs) for label, dirs in groups]
    columns = 2 if len(panels) == 4 else 3
    fig, axes = plt.subplots(math.ceil(len(panels) / columns), columns, figsize=(4 * columns + 0.5, 6.5))
    for ax, (key, panel_title, ylabel) in zip(axes.flat, panels):
        for i, (label, runs, _) in enumerate(groups):
            draw_group(ax, runs, key, label=label, color=colors[i % len(colors)], x=x)
        _style(ax, panel_title, ylabel, x=x)
    note = different_setups([d for _, _, dirs in groups for d in dirs])
    heading = [line for line in (title, note) if line]
    if heading:
        fig.suptitle("\n".join(heading), fontsize=11, y=0.995, va="top", color="tab:red" if note else "black")
    handles = [Line2D([], [], color=colors[i % len(colors)], linewidth=2) for i in range(len(groups))]
    per_row = max(1, min(len(groups), 4, 130 // max(len(label) for label, _, _ in groups)))  # long labels: fewer
    fig.legend(handles, [label for label, _, _ in groups], loc="upper center", ncol=per_row, fontsize=9,
               bbox_to_anchor=(0.5, 1 - 0.045 * len(heading)), frameon=False)
    return _save(fig, out_path, top=1 - 0.045 * (len(heading) + math.ceil(len(groups) / per_row)))  # room on top


def plot_dapo_vs_grpo_comparison(dapo_dir, grpo_dir, out_path, x="step"):
    """2x2 panels: policy loss, total reward, entropy, held-out accuracy of a DAPO run and a GRPO run."""
    groups = [(f"DAPO: {_name(dapo_dir)}", [dapo_dir]), (f"GRPO: {_name(grpo_dir)}", [grpo_dir])]
    return overlay(groups, COMPARISON_PANELS, out_path, x, colors=(DAPO_COLOR, GRPO_COLOR), title="DAPO vs GRPO")


SETUP_KEYS = ("MODEL_NAME_OR_PATH", "DATASET", "EVAL_DATASET", "QUESTION_KINDS", "IMAGE_SIZE", "MAX_OBJECTS",
              "SHUFFLE_OPTIONS", "EVAL_SAMPLES", "EVAL_TEMPERATURE", "EVAL_SAMPLES_PER_PROMPT")


def different_setups(run_dirs):
    """A one-line warning when the runs did not train the same model on the same task (their accuracies are then
    not comparable): "note: the runs differ in DATASET, MODEL_NAME_OR_PATH"; None when they agree."""
    configs = [read_config(d) for d in run_dirs]
    differing = [k for k in SETUP_KEYS if len({json.dumps(c.get(k), sort_keys=True) for c in configs if k in c}) > 1]
    return f"note: the runs differ in {', '.join(differing)}" if differing else None


def plot_attention(run_dir, out_path):
    """MDI by stage over steps (log scale); None, and no file, when the run logged no attention/*/mdi."""
    from utils.attention import STAGES  # here, not at the top: utils.attention loads transformers (seconds)

    records = read_metrics(run_dir)
    keys = {k for r in records for k in r if k.startswith("attention/") and k.endswith("/mdi")}
    if not keys:
        return None
    ordered = [f"attention/{s}/mdi" for s in STAGES if f"attention/{s}/mdi" in keys] + \
              sorted(keys - {f"attention/{s}/mdi" for s in STAGES})
    fig, ax = plt.subplots(figsize=(8, 4.5))
    for key in ordered:  # log scale: only positive values can be drawn
        draw(ax, records, key, label=key.split("/")[1], transform=lambda v: v if v > 0 else float("nan"))
    ax.axhline(1.0, color="grey", linestyle="--", linewidth=1, label="text = vision")
    ax.set_yscale("log")
    # Plain-number ticks at 1, 2 and 5 of each decade, finer within about a decade: a range such as 0.4-1.6 gets
    # labels on both sides of 1.
    low, high = ax.get_ylim()
    ax.yaxis.set_major_locator(LogLocator(base=10, subs=(1, 1.5, 2, 3, 5, 7) if high / low < 20 else (1, 2, 5)))
    ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    ax.yaxis.set_minor_formatter(NullFormatter())
    ax.grid(True, which="minor", axis="y", alpha=0.15)
    _style(ax, f"Modality dominance by stage — {_name(run_dir)}",
           "MDI (text/vision attention per token;\n>1 = text dominates)", legend=True)
    return _save(fig, out_path)


def plot_rollout_gap(run_dir, out_path):
    """The sampler against the learner (rollout/*, log scales): |Δ log-prob| per token, KL and χ², and the tokens
    and sequences whose ratio left [0.5, 2]; None, and no file, when the run logged no rollout/ metrics."""
    records = read_metrics(run_dir)
    if not any("rollout/logp_diff_mean" in r for r in records):
        return None
    positive = lambda v: v if v > 0 else float("nan")  # noqa: E731  (log scale: 0 is not drawn)
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    for ax, keys, title, ylabel in (
            (axes[0], ("rollout/logp_diff_mean", "rollout/logp_diff_max"), "|log π_learner − log π_sampler|",
             "nats / token"),
            (axes[1], ("rollout/kl_k3", "rollout/chi2"), "KL (k3) and χ² of the ratio", "per token"),
            (axes[2], ("rollout/ratio_outside_frac", "rollout/seq_ratio_outside_frac"),
             "Ratio outside [0.5, 2]", "fraction")):
        for key in keys:
            draw(ax, records, key, label=key.split("/")[1], transform=positive)
        if any(not math.isnan(v) for line in ax.get_lines() for v in line.get_ydata()):
            ax.set_yscale("log")
        _style(ax, title, ylabel, legend=True)
    fig.suptitle(f"Sampler vs learner — {_name(run_dir)}", fontsize=12)
    return _save(fig, out_path)


def plot_grounding(run_dir, out_path):
    """Does the model use the image? Held-out accuracy with the images and with blank ones (eval/), and the visual
    dependency per token (grounding/): its mean and quantiles, by third of the completion, and its correlation with
    the token's entropy and attention on image keys. None, and no file, when the run logged neither."""
    records = read_metrics(run_dir)
    if not any("grounding/visual_kl_mean" in r or "eval/accuracy_blank_image" in r for r in records):
        return None
    fig, axes = plt.subplots(1, 4, figsize=(17, 3.9))
    for ax, keys, title, ylabel in (
            (axes[0], ("eval/accuracy", "eval/accuracy_blank_image"), "Held-out accuracy: image vs blank image",
             "accuracy (fraction)"),
            (axes[1], ("grounding/visual_kl_mean", "grounding/visual_kl_p90", "grounding/visual_kl_p50"),
             "Visual dependency per token", "KL(image ‖ blank), nats"),
            (axes[2], ("grounding/visual_kl_first", "grounding/visual_kl_middle", "grounding/visual_kl_last"),
             "... by third of the completion", "KL(image ‖ blank), nats"),
            (axes[3], ("grounding/corr_entropy", "grounding/corr_image_attention"),
             "Its correlation over tokens with", "Pearson r")):
        for key in keys:
            draw(ax, records, key, label=key.split("/")[-1].replace("visual_kl_", ""))
        _style(ax, title, ylabel, legend=True)
    axes[3].axhline(0.0, color="grey", linewidth=1, linestyle="--")
    axes[3].set_ylim(-1.05, 1.05)
    fig.suptitle(f"Grounding — {_name(run_dir)}", fontsize=12)
    return _save(fig, out_path)


NOT_A_DIFFERENCE = {"RUNS_DIR", "RESUME", "RESUME_OVERRIDES", "COMPARE_WITH", "REPORT_TO", "PLOT_EVERY", "LOG_EVERY",
                    "LOG_SAMPLES", "SAVE_EVERY", "KEEP_CHECKPOINTS", "CPU_THREADS", "MODEL_CACHE_DIR"}


def run_labels(run_dirs, ignore=()):
    """A label per run saying what sets it apart: its trainer when the runs come from several (`dapo.py`), and the
    constants whose values differ between runs of one trainer (`POLICY_LOSS=gspo SEED=1`) — not those that differ
    only because the trainers' defaults do, nor those that change only logging, places or speed, nor `ignore`. The
    folder name when nothing differs."""
    configs = [read_config(d) for d in run_dirs]
    trainers = [_trainer(d) for d in run_dirs]
    keys = sorted({k for c in configs for k in c} - NOT_A_DIFFERENCE - set(ignore))
    differing = [k for k in keys if any(
        len({json.dumps(c.get(k), sort_keys=True) for c, t in zip(configs, trainers) if t == trainer}) > 1
        for trainer in set(trainers))]
    labels = []
    for run_dir, config, trainer in zip(run_dirs, configs, trainers):
        parts = [f"{trainer}.py"] if len(set(trainers)) > 1 else []
        labels.append(" ".join(parts + [f"{k}={config.get(k)}" for k in differing]) or _name(run_dir))
    return labels


def group_runs(run_dirs, labels=None):
    """[(label, [run_dir, ...])], in the order first seen: runs of one trainer whose configs agree apart from SEED
    (and the constants NOT_A_DIFFERENCE) form a group, labelled by what sets it apart from the other groups
    (run_labels) and its number of seeds; with `labels` (one per run), the runs of one label form a group."""
    if labels is not None:
        if len(labels) != len(run_dirs):
            raise ValueError(f"{len(labels)} labels for {len(run_dirs)} runs: give one label per run")
        keys = list(labels)
    else:
        keys = [_trainer(d) + json.dumps({k: v for k, v in read_config(d).items()
                                          if k not in NOT_A_DIFFERENCE | {"SEED"}}, sort_keys=True) for d in run_dirs]
    members = {}
    for key, run_dir in zip(keys, run_dirs):
        members.setdefault(key, []).append(run_dir)
    groups = list(members.values())
    names = list(members) if labels is not None else run_labels([g[0] for g in groups], ignore={"SEED"})
    out = []
    for name, group in zip(names, groups):
        if len(group) > 1:
            seeds = {read_config(d).get("SEED") for d in group}
            name = (f"{_trainer(group[0])}.py" if name == _name(group[0]) else name) + \
                f" ({len(group)} {'seeds' if len(seeds) == len(group) else 'runs'}, " + \
                ("mean ± std)" if len(group) >= 3 else "mean, min–max)")
        out.append((name, group))
    return out


def plot_runs(run_dirs, out_path, x="step", labels=None):
    """Overlay any number of runs, one colour per group (group_runs: the seeds of one configuration, drawn as a mean
    with a band): rewards, accuracies, loss, entropy, response length."""
    return overlay(group_runs(run_dirs, labels), OVERLAY_PANELS, out_path, x)


def _trainer(run_dir):
    return _algorithm(run_dir) or _name(run_dir).split("_")[0]


def _algorithm(run_dir):
    """"ppo" (a config with critic constants), "dapo" / "grpo" from config.json's DYNAMIC_SAMPLING, else from
    the folder name; None when unknown."""
    config, name = read_config(run_dir), _name(run_dir).lower()
    if "VF_COEF" in config or name.startswith("ppo"):
        return "ppo"
    if isinstance(config.get("DYNAMIC_SAMPLING"), bool):
        return "dapo" if config["DYNAMIC_SAMPLING"] else "grpo"
    return next((algo for algo in ("dapo", "grpo") if name.startswith(algo)), None)


def plot_run(run_dir, compare_dir=None):
    """Write the run's figures into `run_dir/plots/`; returns the paths written."""
    plots = os.path.join(run_dir, "plots")
    written = []

    def keep(fig, path):
        if fig is not None:
            plt.close(fig)
            written.append(path)

    path = os.path.join(plots, "training_metrics.png")
    keep(plot_dapo_metrics(run_dir, path), path)
    path = os.path.join(plots, "attention_mdi.png")
    keep(plot_attention(run_dir, path), path)
    path = os.path.join(plots, "rollout_gap.png")
    keep(plot_rollout_gap(run_dir, path), path)
    path = os.path.join(plots, "grounding.png")
    keep(plot_grounding(run_dir, path), path)
    if compare_dir is not None:
        algorithms = (_algorithm(run_dir), _algorithm(compare_dir))
        if "ppo" in algorithms:
            path = os.path.join(plots, "comparison.png")
            keep(plot_runs([run_dir, compare_dir], path), path)
        else:
            dapo_dir, grpo_dir = run_dir, compare_dir  # when undecided: the run first
            if algorithms[0] != "dapo" and (algorithms[0] == "grpo" or algorithms[1] == "dapo"):
                dapo_dir, grpo_dir = compare_dir, run_dir
            path = os.path.join(plots, "dapo_vs_grpo.png")
            keep(plot_dapo_vs_grpo_comparison(dapo_dir, grpo_dir, path), path)
    gc.collect()  # a closed figure is a web of reference cycles (~45,000 objects a redraw): free it now, not whenever
    return written  # Python's next full collection comes round (a caller that redraws often would keep them)


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m utils.plot_metrics", description=__doc__.split("\n")[0])
    parser.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="run folder(s) holding metrics.jsonl")
    parser.add_argument("--out", help="comparison figure (default: runs_comparison.png)")
    parser.add_argument("--compare", metavar="RUN_DIR", help="with one run folder: also draw its comparison with this "
                        "run (dapo_vs_grpo.png, or comparison.png with a PPO run) into its plots/, as a trainer does")
    parser.add_argument("--x", choices=X_AXES, default="step", help="x-axis of the comparison: steps, completions "
                        "generated, completion tokens generated, or training seconds (default: step)")
    parser.add_argument("--labels", help="comma-separated, one per run folder: runs of one label are drawn as one "
                        "group (mean and band); default: group the runs whose configs differ only in SEED")
    args = parser.parse_args(argv)
    labels = args.labels.split(",") if args.labels else None
    if labels is not None and len(labels) != len(args.run_dirs):
        sys.exit(f"plot_metrics: error: --labels has {len(labels)} labels for {len(args.run_dirs)} run folders")
    for run_dir in args.run_dirs:
        if not os.path.isfile(os.path.join(run_dir, "metrics.jsonl")):
            sys.exit(f"plot_metrics: error: {run_dir!r} is not a run folder (no metrics.jsonl)")
        if args.x != "step" and not any(X_AXES[args.x][0] in r for r in read_metrics(run_dir)):
            sys.exit(f"plot_metrics: error: {run_dir!r} logged no {X_AXES[args.x][0]} (a run from before the "
                     f"cumulative counts were logged): plot it with --x step")
    if len(args.run_dirs) == 1 and args.out is None:
        for path in plot_run(args.run_dirs[0], args.compare):
            print(path)
    else:
        out = args.out or "runs_comparison.png"
        plt.close(plot_runs(args.run_dirs, out, args.x, labels))
        print(out)


if __name__ == "__main__":
    main()
