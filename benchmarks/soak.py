"""A long run with fast settings, watched for leaks: resident memory and step time at steps 100, 500, 1,000, 2,000,
and how fast the run folder grows.

    python benchmarks/soak.py                       # DAPO, 2,000 steps (or --minutes, whichever comes first)
    python benchmarks/soak.py --steps 500 --minutes 10 -- --CPU_THREADS=1

The trainer runs as a child process with small batches (2 prompts × 4 completions, 16 new tokens; evaluation every
100 steps on 16 questions, a checkpoint every 100 steps, 2 kept, plots every 50 steps as in the default run:
by step 100, the first mark, every kind of work of a run has happened once); its resident memory (VmRSS) is sampled every
second and matched to the step metrics.jsonl has reached. Printed: memory and mean step time around each mark, the
growth after step 100, and the bytes per step of metrics.jsonl and of the markdown logs.
"""

import argparse
import glob
import json
import os
import subprocess
import sys
import tempfile
import time

from seeds import split_overrides  # noqa: E402  (benchmarks/ is on the path when a script here runs)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FAST = ["--TRAIN_BATCH_PROMPTS=2", "--GROUP_SIZE=4", "--MAX_NEW_TOKENS=16", "--OVERLONG_BUFFER=4", "--EVAL_EVERY=100",
        "--EVAL_SAMPLES=16", "--SAVE_EVERY=100", "--KEEP_CHECKPOINTS=2", "--LOG_EVERY=50", "--PLOT_EVERY=50",
        "--COMPARE_WITH=", "--MAX_GEN_BATCHES=2"]
MARKS = (100, 500, 1000, 2000)


def rss_mib(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def steps_logged(metrics_path):
    """(last step, {step: perf/step_s}) of a metrics.jsonl being written."""
    times, last = {}, 0
    if os.path.exists(metrics_path):
        for line in open(metrics_path):
            try:
                row = json.loads(line)
            except json.JSONDecodeError:  # a line being written
                continue
            last = row["step"]
            if "perf/step_s" in row:
                times[row["step"]] = row["perf/step_s"]
    return last, times


def folder_bytes(run_dir, pattern):
    return sum(os.path.getsize(p) for p in glob.glob(os.path.join(run_dir, pattern)))


def main(argv=None):
    argv, extra = split_overrides(argv)
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trainer", default="dapo.py")
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--minutes", type=float, default=30.0, help="stop the run after this long (default 30)")
    args = parser.parse_args(argv)
    runs = tempfile.mkdtemp(prefix="soak_")
    command = [sys.executable, os.path.join(ROOT, args.trainer), f"--TOTAL_STEPS={args.steps}", f"--RUNS_DIR={runs}",
               *FAST, *extra]
    log = open(os.path.join(runs, "trainer.log"), "w")  # a file, not a pipe nobody reads: a full pipe blocks the run
    child = subprocess.Popen(command, cwd=ROOT, env=dict(os.environ, TQDM_DISABLE="1"), stdout=log, stderr=log)
    memory = {}  # step -> resident MiB when metrics.jsonl had reached it
    start, run_dir = time.time(), None
    while child.poll() is None and time.time() - start < args.minutes * 60:
        time.sleep(1.0)
        run_dir = run_dir or next(iter(glob.glob(os.path.join(runs, "*_*"))), None)
        if run_dir is None:
            continue
        step, _ = steps_logged(os.path.join(run_dir, "metrics.jsonl"))
        try:
            memory.setdefault(step, rss_mib(child.pid))
        except FileNotFoundError:
            break
    if child.poll() is None:
        child.terminate()  # a stop checkpoint, then exit
        child.wait(timeout=300)
    elif child.returncode:
        sys.exit(f"the run failed:\n{open(log.name).read()[-3000:]}")
    last, times = steps_logged(os.path.join(run_dir, "metrics.jsonl"))
    print(f"{args.trainer} with {' '.join(FAST + extra)}: {last} steps in {time.time() - start:.0f} s")
    print("| step | resident memory (MiB) | step time (s, mean of the 50 steps before) |\n|---|---|---|")
    base = None
    for mark in (m for m in MARKS if m <= last):
        seen = [s for s in memory if s <= mark]
        mib = memory[max(seen)] if seen else float("nan")
        base = mib if mark == 100 else base
        window = [times[s] for s in range(mark - 49, mark + 1) if s in times]
        print(f"| {mark} | {mib:.0f} | {sum(window) / max(len(window), 1):.3f} |")
    if base and last >= 500:
        final = memory[max(memory)]
        print(f"memory after step 100: {100 * (final - base) / base:+.1f}% by step {max(memory)}")
    metrics = os.path.getsize(os.path.join(run_dir, "metrics.jsonl"))
    logs = folder_bytes(run_dir, "*.md") + folder_bytes(run_dir, os.path.join("images", "*"))
    checkpoints = sum(folder_bytes(c, "*") for c in glob.glob(os.path.join(run_dir, "checkpoints", "*")))
    terminal = os.path.getsize(os.path.join(run_dir, "run_terminal.md"))
    kept = len(os.listdir(os.path.join(run_dir, "checkpoints")))
    print(f"run folder: metrics.jsonl {metrics / last:.0f} bytes/step, markdown logs and their images "
          f"{logs / last:.0f} bytes/step (of which run_terminal.md {terminal / last:.0f}; LOG_EVERY=50), "
          f"checkpoints {checkpoints / 1e6:.1f} MB in {kept} folders (KEEP_CHECKPOINTS=2); {run_dir}")


if __name__ == "__main__":
    main()
