"""utils/plot_metrics.py on synthetic run folders: every figure draws data on every axis, files are written."""

import json
import math
import os
import subprocess
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pytest  # noqa: E402

from utils.plot_metrics import (  # noqa: E402
    plot_attention, plot_dapo_metrics, plot_dapo_vs_grpo_comparison, plot_rollout_gap, plot_run, plot_runs,
    read_config, read_metrics, smooth,
)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS = 40
STAGES = ("early", "middle", "late", "all")


def step_metrics(step, dapo, attention, critic=False, rollout=False):
    """One step's metrics from simple formulas; eval every 10 steps; a few nulls and absent policy/* keys."""
    t = step / STEPS
    m = {"step": step, "policy/lr": 5e-4 * (1 + math.cos(math.pi * t)) / 2,
         "reward/accuracy/mean": 0.5 + 0.4 * t, "reward/accuracy/std": 0.5 - 0.2 * t,
         "reward/format/mean": 1.0, "reward/format/std": 0.0, "reward/overlong/mean": -0.01 * (step % 3),
         "reward/total/mean": 1.0 + 3 * (0.5 + 0.4 * t) + 0.1 * math.sin(step),
         "reward/total/std": 1.5 - 0.5 * t, "response/length/mean": 10 + 2 * math.sin(step / 4),
         "response/truncated_frac": 0.0,
         "dapo/gen_batches": (1 + step % 3) if dapo else 1, "dapo/kept_group_frac": 0.3 + 0.01 * step if dapo else 1.0,
         "dapo/flat_group_frac": 0.7 - 0.01 * step,
         "perf/step_s": 1.8 + 0.1 * (step % 2), "perf/tokens_per_s": 500.0}
    if step % 7 != 0:  # policy/* absent on some steps (no informative group)
        m.update({"policy/loss": 0.01 * math.cos(step), "policy/entropy": 0.08 - 0.001 * step, "policy/kl": 0.0,
                  "policy/clip_frac_low": 0.0, "policy/clip_frac_high": 0.001 * step})
    if step % 11 == 5:
        m["reward/total/mean"] = None  # NaN is logged as null
        m["response/length/mean"] = None
    if step % 10 == 0:
        m.update({"eval/accuracy": 0.56 + 0.008 * step, "eval/format": 1.0, "eval/accuracy/count": 0.56 + 0.008 * step})
    if critic:
        m.update({"critic/value_loss": 2.0 / step, "critic/explained_variance": min(0.9, 0.05 * step) - 0.1,
                  "critic/values/mean": 3.0 * t, "critic/returns/mean": 3.0})
    if rollout and step % 7 != 0:  # a bf16 sampler: a small gap, some tokens far off
        m.update({"rollout/logp_diff_mean": 2e-3 * (1 + t), "rollout/logp_diff_max": 0.5 + t, "rollout/kl_k3": 1e-5,
                  "rollout/chi2": 2e-5, "rollout/ratio_outside_frac": 1e-3 * (step % 3),  # sometimes 0: not drawn
                  "rollout/seq_ratio_outside_frac": 0.01, "rollout/seq_logp_diff_mean": 0.02,
                  "rollout/log_kept_mean": 0.0})
    if attention:
        for i, stage in enumerate(STAGES):
            m[f"attention/{stage}/mdi"] = (0.5 + i) * (1 + 0.02 * step) if step % 13 != 3 else None
    return m


def make_run(root, name, dapo=True, attention=False, entropy_coef=0.0, tail="", critic=False, rollout=False):
    run_dir = os.path.join(root, name)
    os.makedirs(run_dir)
    config = {"ENTROPY_COEF": entropy_coef, "TOTAL_STEPS": STEPS, "DYNAMIC_SAMPLING": dapo, "EVAL_EVERY": 10}
    with open(os.path.join(run_dir, "config.json"), "w") as f:
        json.dump({**config, "VF_COEF": 0.5} if critic else config, f)
    with open(os.path.join(run_dir, "metrics.jsonl"), "w") as f:
        f.write(json.dumps({"step": 0, "eval/accuracy": 0.56, "eval/format": 1.0, "eval/accuracy/count": 0.56}) + "\n")
        for step in range(1, STEPS + 1):
            f.write(json.dumps(step_metrics(step, dapo, attention, critic, rollout)) + "\n")
        f.write(tail)
    return run_dir


@pytest.fixture
def dapo_run(tmp_path):
    return make_run(tmp_path, "dapo_20260101_000000", dapo=True, attention=True, entropy_coef=0.01, rollout=True)


@pytest.fixture
def grpo_run(tmp_path):
    return make_run(tmp_path, "grpo_20260101_000000", dapo=False)


def check_figure(fig, path):
    """PNG of a sensible size; every axis (twin axes too) holds a line of at least 2 points."""
    try:
        assert os.path.isfile(path)
        assert 10_000 <= os.path.getsize(path) <= 600_000, os.path.getsize(path)
        assert fig.axes
        for ax in fig.axes:
            assert any(len(line.get_xdata()) >= 2 for line in ax.get_lines()), ax.get_title()
    finally:
        plt.close(fig)


def test_read_metrics_config_and_smooth(dapo_run, tmp_path):
    records = read_metrics(dapo_run)
    assert len(records) == STEPS + 1 and records[0]["step"] == 0
    assert read_config(dapo_run)["ENTROPY_COEF"] == 0.01
    assert read_config(str(tmp_path)) == {}
    with pytest.raises(FileNotFoundError, match="metrics.jsonl"):
        read_metrics(str(tmp_path))
    out = smooth([1.0, None, float("nan"), 2.0], weight=0.5)
    assert out[0] == 1.0 and math.isnan(out[1]) and math.isnan(out[2]) and out[3] == 1.5


def test_dapo_metrics_figure(dapo_run, tmp_path):
    path = str(tmp_path / "training.png")
    fig = plot_dapo_metrics(dapo_run, path)
    assert len(fig.axes) == 7  # 2x3 panels + the twin axis of the dynamic-sampling panel
    assert "ENTROPY_COEF = 0.01" in fig.axes[1].get_title()
    check_figure(fig, path)


def test_without_an_entropy_bonus_the_panel_shows_held_out_accuracy(grpo_run, tmp_path):
    path = str(tmp_path / "training.png")
    fig = plot_dapo_metrics(grpo_run, path)  # ENTROPY_COEF = 0: a bonus panel would be a flat line at 0
    assert fig.axes[1].get_title() == "Held-out accuracy (greedy)"
    assert list(fig.axes[1].get_lines()[0].get_xdata()) == [0, 10, 20, 30, 40]  # the evaluations, step 0 included
    check_figure(fig, path)


def test_comparison_figure(dapo_run, grpo_run, tmp_path):
    path = str(tmp_path / "cmp.png")
    fig = plot_dapo_vs_grpo_comparison(dapo_run, grpo_run, path)
    assert len(fig.axes) == 4
    accuracy = [line for line in fig.axes[3].get_lines() if line.get_label().startswith("DAPO")]
    assert list(accuracy[0].get_xdata()) == [0, 10, 20, 30, 40]  # eval markers include step 0
    check_figure(fig, path)


def test_attention_figure_and_none_without_attention(dapo_run, grpo_run, tmp_path):
    path = str(tmp_path / "mdi.png")
    fig = plot_attention(dapo_run, path)
    assert fig.axes[0].get_yscale() == "log"
    check_figure(fig, path)
    missing = str(tmp_path / "none.png")
    assert plot_attention(grpo_run, missing) is None
    assert not os.path.exists(missing)


def test_rollout_gap_figure_and_none_without_it(dapo_run, grpo_run, tmp_path):
    path = str(tmp_path / "gap.png")
    fig = plot_rollout_gap(dapo_run, path)
    assert [ax.get_yscale() for ax in fig.axes] == ["log"] * 3
    assert [len(ax.get_lines()) for ax in fig.axes] == [4, 4, 4]  # two series each: raw and smoothed
    check_figure(fig, path)
    assert plot_rollout_gap(grpo_run, str(tmp_path / "none.png")) is None and not os.path.exists(tmp_path / "none.png")


def test_runs_overlay(dapo_run, grpo_run, tmp_path):
    path = str(tmp_path / "runs.png")
    fig = plot_runs([dapo_run, grpo_run], path)
    assert len(fig.axes) == 6
    check_figure(fig, path)


def test_plot_run_writes_expected_files(dapo_run, grpo_run):
    assert [os.path.basename(p) for p in plot_run(grpo_run)] == ["training_metrics.png"]
    written = plot_run(grpo_run, compare_dir=dapo_run)  # the DAPO run is found from config.json
    assert [os.path.basename(p) for p in written] == ["training_metrics.png", "dapo_vs_grpo.png"]
    written = plot_run(dapo_run, compare_dir=grpo_run)
    assert [os.path.basename(p) for p in written] == ["training_metrics.png", "attention_mdi.png", "rollout_gap.png",
                                                      "dapo_vs_grpo.png"]
    for path in written:
        assert os.path.dirname(path) == os.path.join(dapo_run, "plots")
        assert 10_000 <= os.path.getsize(path) <= 600_000
    assert not plt.get_fignums()  # plot_run closes its figures


def test_a_ppo_run_shows_its_critic_and_is_compared_by_overlay(grpo_run, tmp_path):
    ppo_run = make_run(tmp_path, "ppo_20260101_000000", dapo=False, critic=True)
    path = str(tmp_path / "ppo.png")
    fig = plot_dapo_metrics(ppo_run, path)
    titles = [ax.get_title() for ax in fig.axes]
    assert "Critic" in titles and not any(t.startswith("Dynamic sampling") for t in titles)
    check_figure(fig, path)
    written = plot_run(ppo_run, compare_dir=grpo_run)
    assert [os.path.basename(p) for p in written] == ["training_metrics.png", "comparison.png"]
    assert not plt.get_fignums()


def test_cli_on_two_runs_writes_one_png(dapo_run, grpo_run, tmp_path):
    out = tmp_path / "cli_out"
    out.mkdir()
    target = str(out / "X.png")
    result = subprocess.run([sys.executable, "-m", "utils.plot_metrics", dapo_run, grpo_run, "--out", target],
                            cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert os.listdir(out) == ["X.png"]
    assert result.stdout.strip() == target


def test_cli_bad_folder_is_a_one_line_error(tmp_path):
    result = subprocess.run([sys.executable, "-m", "utils.plot_metrics", str(tmp_path / "nope")],
                            cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode != 0
    assert len(result.stderr.strip().splitlines()) == 1 and "not a run folder" in result.stderr


def test_truncated_last_line_warns_and_still_plots(tmp_path):
    run_dir = make_run(tmp_path, "dapo_crashed", tail='{"step": 41, "reward/to')
    with pytest.warns(UserWarning, match="line 42"):
        records = read_metrics(run_dir)
    assert records[-1]["step"] == STEPS
    path = str(tmp_path / "crashed.png")
    with pytest.warns(UserWarning, match="line 42"):
        fig = plot_dapo_metrics(run_dir, path)
    check_figure(fig, path)


def test_overlay_labels_say_what_differs_between_runs(tmp_path):
    from utils.plot_metrics import run_labels

    def run(name, **config):
        folder = tmp_path / name
        folder.mkdir()
        base = {"DYNAMIC_SAMPLING": True, "POLICY_LOSS": "clip", "SEED": 0, "RUNS_DIR": str(tmp_path), "KL_BETA": 0.0}
        (folder / "config.json").write_text(json.dumps({**base, **config}))
        return str(folder)

    a, b, c = run("dapo_1"), run("dapo_2", POLICY_LOSS="gspo"), run("dapo_3", POLICY_LOSS="gspo", SEED=1,
                                                                      RUNS_DIR="elsewhere")
    assert run_labels([a, b, c]) == ["POLICY_LOSS=clip SEED=0", "POLICY_LOSS=gspo SEED=0", "POLICY_LOSS=gspo SEED=1"]
    grpo = run("grpo_1", DYNAMIC_SAMPLING=False, KL_BETA=0.04)  # its own defaults are not a difference
    assert run_labels([a, grpo]) == ["dapo.py", "grpo.py"]
    assert run_labels([a, b, grpo]) == ["dapo.py POLICY_LOSS=clip", "dapo.py POLICY_LOSS=gspo",
                                        "grpo.py POLICY_LOSS=clip"]
    assert run_labels([a]) == ["dapo_1"]


# ── Seed bands, fair x-axes, setup notes ───────────────────────────────────────────────────────────────────
def seed_run(root, name, seed, level, per_step=16, **config):
    """A run whose reward is the constant `level` and whose held-out accuracy is level·step/100 (evaluated every
    10 steps); it generates `per_step` completions a step (progress/completions)."""
    run_dir = os.path.join(root, name)
    os.makedirs(run_dir)
    with open(os.path.join(run_dir, "config.json"), "w") as f:
        json.dump({"DYNAMIC_SAMPLING": True, "SEED": seed, "POLICY_LOSS": "clip", "RUNS_DIR": root, **config}, f)
    with open(os.path.join(run_dir, "metrics.jsonl"), "w") as f:
        for step in range(0, 41):
            row = {"step": step, "progress/completions": per_step * step, "perf/elapsed_s": 0.5 * step}
            if step:
                row["reward/total/mean"] = level
            if step % 10 == 0:
                row["eval/accuracy"] = level * step / 100
            f.write(json.dumps(row) + "\n")
    return run_dir


def test_seeds_of_one_config_form_a_group_drawn_as_mean_and_band(tmp_path):
    from utils.plot_metrics import band, group_runs

    root = str(tmp_path)
    a = [seed_run(root, f"dapo_a{s}", s, level) for s, level in ((0, 1.0), (1, 2.0), (2, 6.0))]
    b = seed_run(root, "dapo_b0", 0, 3.0, POLICY_LOSS="gspo")
    groups = group_runs([a[0], b, a[1], a[2]])
    assert groups == [("POLICY_LOSS=clip (3 seeds, mean ± std)", a), ("POLICY_LOSS=gspo", [b])]
    assert group_runs([a[0], b], labels=["x", "x"]) == [("x (2 runs, mean, min–max)", [a[0], b])]  # an explicit label groups
    with pytest.raises(ValueError, match="one label per run"):
        group_runs([a[0], b], labels=["x"])

    runs = [read_metrics(d) for d in a]
    xs, mean, low, high = band(runs, "reward/total/mean")  # 3 seeds: mean ± population std
    assert list(xs) == list(range(1, 41))
    assert mean == pytest.approx([3.0] * 40) and low == pytest.approx([3 - math.sqrt(14 / 3)] * 40)
    xs, mean, low, high = band(runs[:2], "eval/accuracy")  # 2 seeds: min–max, at the evaluations
    assert list(xs) == [0, 10, 20, 30, 40]
    assert list(mean) == pytest.approx([0, 0.15, 0.3, 0.45, 0.6]) and list(high) == pytest.approx([0, .2, .4, .6, .8])
    assert band(runs, "policy/kl") is None  # never logged

    path = str(tmp_path / "bands.png")
    fig = plot_runs([a[0], b, a[1], a[2]], path)
    assert len(fig.axes[0].collections) == 1  # one band: the 3-seed group's; the single run is a plain line
    assert [t.get_text() for t in fig.legends[0].get_texts()] == ["POLICY_LOSS=clip (3 seeds, mean ± std)",
                                                                 "POLICY_LOSS=gspo"]
    plt.close(fig)


def test_x_axis_of_completions_compares_runs_at_equal_sampling(tmp_path):
    from utils.plot_metrics import band, series

    root = str(tmp_path)
    fast, slow = seed_run(root, "dapo_f", 0, 1.0, per_step=32), seed_run(root, "dapo_s", 1, 1.0, per_step=16)
    xs, values = series(read_metrics(fast), "eval/accuracy", x="samples")
    assert xs == [0, 320, 640, 960, 1280] and values == pytest.approx([0, 0.1, 0.2, 0.3, 0.4])
    assert series(read_metrics(fast), "eval/accuracy", x="time")[0] == [0, 5, 10, 15, 20]
    # Accuracy per completion: fast = c/3200, slow = c/1600; on the range both reached (0..640), interpolated.
    xs, mean, low, high = band([read_metrics(fast), read_metrics(slow)], "eval/accuracy", x="samples")
    assert xs[0] == 0 and xs[-1] == 640 and len(xs) == 5
    assert list(low) == pytest.approx(xs / 3200) and list(high) == pytest.approx(xs / 1600)
    path = str(tmp_path / "x.png")
    fig = plot_runs([fast, slow], path, x="samples", labels=["fast", "slow"])  # two groups of one run each
    assert fig.axes[2].get_xlabel() == "completions generated"
    assert list(fig.axes[2].get_lines()[0].get_xdata()) == [0, 320, 640, 960, 1280]
    assert list(fig.axes[2].get_lines()[1].get_xdata()) == [0, 160, 320, 480, 640]
    plt.close(fig)


def test_cli_x_axis_needs_the_counts_and_labels_one_per_run(dapo_run, tmp_path):
    def cli(*args):
        return subprocess.run([sys.executable, "-m", "utils.plot_metrics", *args, "--out", str(tmp_path / "o.png")],
                              cwd=ROOT, capture_output=True, text=True, timeout=120)

    result = cli(dapo_run, "--x", "samples")  # logged before the cumulative counts existed
    assert result.returncode != 0 and "logged no progress/completions" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    result = cli(dapo_run, dapo_run, "--labels", "a")
    assert result.returncode != 0 and "1 labels for 2 run folders" in result.stderr
    ok = seed_run(str(tmp_path), "dapo_ok", 0, 1.0)
    result = cli(ok, seed_run(str(tmp_path), "dapo_ok2", 1, 2.0), "--x", "tokens")
    assert result.returncode != 0 and "progress/completion_tokens" in result.stderr
    assert cli(ok, "--x", "time").returncode == 0 and (tmp_path / "o.png").exists()


def test_a_comparison_of_runs_on_different_tasks_says_so(tmp_path):
    from utils.plot_metrics import different_setups

    root = str(tmp_path)
    a, b = seed_run(root, "dapo_a", 0, 1.0, DATASET="synthetic"), seed_run(root, "grpo_b", 0, 1.0, DATASET="geo.jsonl")
    c = seed_run(root, "grpo_c", 0, 1.0, DATASET="synthetic", DYNAMIC_SAMPLING=False)
    assert different_setups([a, b]) == "note: the runs differ in DATASET"
    assert different_setups([a, c]) is None
    fig = plot_dapo_vs_grpo_comparison(a, b, str(tmp_path / "c.png"))
    assert "the runs differ in DATASET" in fig._suptitle.get_text()
    plt.close(fig)


def test_mdi_axis_labels_both_sides_of_one(tmp_path):
    run_dir = tmp_path / "dapo_mdi"
    run_dir.mkdir()
    rows = [{"step": s, "attention/early/mdi": 1.6 - 0.02 * s, "attention/late/mdi": 0.4 + 0.01 * s}
            for s in range(1, 41)]
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    fig = plot_attention(str(run_dir), str(tmp_path / "mdi.png"))
    fig.canvas.draw()
    low, high = fig.axes[0].get_ylim()
    shown = [float(t.get_text()) for t in fig.axes[0].get_yticklabels() if t.get_text()
             and low <= float(t.get_text()) <= high]
    assert any(v > 1 for v in shown) and any(v < 1 for v in shown), shown
    plt.close(fig)


def test_grounding_figure_and_none_without_it(grpo_run, tmp_path):
    from utils.plot_metrics import plot_grounding

    run_dir = tmp_path / "dapo_grounding"
    run_dir.mkdir()
    rows = []
    for step in range(0, 41):
        row = {"step": step}
        if step % 10 == 0:
            row.update({"eval/accuracy": 0.6 + 0.008 * step, "eval/accuracy_blank_image": 0.25,
                        "grounding/visual_kl_mean": 0.4 + 0.01 * step, "grounding/visual_kl_p50": 0.0,
                        "grounding/visual_kl_p90": 0.1, "grounding/visual_kl_first": 1.2,
                        "grounding/visual_kl_middle": 0.01, "grounding/visual_kl_last": 0.02,
                        "grounding/corr_entropy": 0.5, "grounding/corr_image_attention": 0.6 - 0.01 * step})
        rows.append(row)
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    path = str(tmp_path / "grounding.png")
    fig = plot_grounding(str(run_dir), path)
    assert [len(ax.get_lines()) for ax in fig.axes] == [2, 6, 6, 5]  # eval markers; raw + smoothed; + the zero line
    check_figure(fig, path)
    assert plot_grounding(grpo_run, str(tmp_path / "none.png")) is None and not os.path.exists(tmp_path / "none.png")


def test_plot_run_leaves_no_garbage_behind(dapo_run, grpo_run):
    """A closed matplotlib figure is a web of reference cycles; left to Python's occasional full collection, every
    redraw of a long run's plots added ~45,000 objects (tens of MiB) until one came round (benchmarks/soak.py)."""
    import gc

    gc.collect()  # what earlier tests left
    plot_run(dapo_run, compare_dir=grpo_run)
    assert gc.collect() < 2_000


def test_trainers_draw_their_plots_in_a_child_process(dapo_run, grpo_run, tmp_path):
    """RunLog.plot runs `python -m utils.plot_metrics RUN --compare OTHER`: the trainer never loads matplotlib (its
    figures and caches stay out of a long run's memory), and a drawing that fails is a warning."""
    import types

    from utils.runlog import RunLog

    warned = []
    log = types.SimpleNamespace(dir=dapo_run, warn=warned.append)
    written = RunLog.plot(log, grpo_run)
    assert [os.path.basename(p) for p in written] == ["training_metrics.png", "attention_mdi.png", "rollout_gap.png",
                                                      "dapo_vs_grpo.png"] and not warned
    assert RunLog.plot(log, str(tmp_path / "gone")) == [] and warned[0].startswith("plots not drawn: ")
    loaded = subprocess.run([sys.executable, "-c", "import sys, utils.trainer; print('matplotlib' in sys.modules)"],
                            cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert loaded.stdout.strip() == "False", loaded.stderr
