"""How close to the machine a trainer runs: model FLOPs per step and model FLOPs utilisation of generation and of the
update (perf/flops_per_step, perf/mfu_generate, perf/mfu_update: utils/flops.py), from a short run of the trainer.

    python benchmarks/mfu.py                         # dapo.py, 30 steps, 2 threads
    python benchmarks/mfu.py grpo.py --steps 20 -- --PRECISION=bf16-mixed

Run it alone on the machine: the CPU's peak is measured at the start of the run (the best of ten short matmul runs,
cached in .cache/cpu_peak_flops.json; delete that file first to measure it again) and every phase's time counts.
Printed: the peak, then the mean over steps 3..N of the step's model FLOPs, the seconds and MFU of each phase.
"""

import argparse
import glob
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile

from seeds import split_overrides  # noqa: E402  (benchmarks/ is on the path when a script here runs)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def main(argv=None):
    argv, extra = split_overrides(argv)
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("trainer", nargs="?", default="dapo.py")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as runs:
        command = [sys.executable, os.path.join(ROOT, os.path.basename(args.trainer)), f"--TOTAL_STEPS={args.steps}",
                   f"--RUNS_DIR={runs}", f"--CPU_THREADS={args.threads}", "--EVAL_EVERY=100000", "--EVAL_SAMPLES=16",
                   "--PLOT_EVERY=0", "--SAVE_EVERY=0", "--LOG_EVERY=100000", "--COMPARE_WITH=", *extra]
        subprocess.run(command, cwd=ROOT, check=True, capture_output=True, env=dict(os.environ, TQDM_DISABLE="1"))
        rows = [json.loads(line) for line in open(glob.glob(os.path.join(runs, "*", "metrics.jsonl"))[0])]
    cache = os.path.join(ROOT, ".cache", "cpu_peak_flops.json")
    peaks = json.load(open(cache)) if os.path.exists(cache) else {}
    print(f"{args.trainer} on {platform.processor() or platform.machine()} ({os.cpu_count()} cores), "
          f"{args.threads} threads; CPU peaks measured: " + ", ".join(f"{k}: {v / 1e9:.1f} GFLOP/s"
                                                                       for k, v in peaks.items()))
    timed = [r for r in rows if r["step"] >= 3]
    mean = lambda key: statistics.mean(r[key] for r in timed if r.get(key) is not None)  # noqa: E731
    print(f"steps 3..{args.steps}: {mean('perf/flops_per_step') / 1e9:.2f} GFLOP a step in {mean('perf/step_s'):.3f} s")
    for phase in ("generate", "logprob", "update"):
        mfu = f", MFU {100 * mean(f'perf/mfu_{phase}'):.1f}%" if any(f"perf/mfu_{phase}" in r for r in timed) else ""
        print(f"  {phase:8s} {mean(f'perf/{phase}_s'):.3f} s{mfu}")


if __name__ == "__main__":
    main()
