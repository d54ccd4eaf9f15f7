"""Run a trainer for several seeds and print the learning table: held-out accuracy at step 0, halfway and at the end,
the gain, the wall time, and the minimum over seeds — so anyone can check the README's claim on their own machine.

    python benchmarks/seeds.py dapo.py --seeds 0-9
    python benchmarks/seeds.py dapo.py --seeds 0-9 --jobs 2                   # two at once, one CPU thread each
    python benchmarks/seeds.py grpo.py --seeds 0,1,2 -- --TOTAL_STEPS=100     # after --: overrides for every run
    python benchmarks/seeds.py dapo.py --table runs_seeds/dapo_seed*/dapo_*   # only print the table of done runs

Each run is `python <trainer> --SEED=<s> --RUNS_DIR=<runs-dir>/<trainer>_seed<s>`; its metrics.jsonl gives the
numbers (the halfway evaluation is the last one at or before TOTAL_STEPS / 2). By default runs go one after another:
run nothing else on the machine while they go, or the wall times mean little. `--jobs N` runs N at once with
CPU_THREADS = cores / N each; on the AMD EPYC we measured, the thread count did not change a run's numbers (its
metrics were bit-identical with 1 and 2 threads), only its wall time.
"""

import argparse
import glob
import json
import os
import platform
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def parse_seeds(text):
    """"0-9" -> [0, ..., 9]; "0,2,5" -> [0, 2, 5]."""
    if "-" in text:
        first, last = (int(x) for x in text.split("-"))
        return list(range(first, last + 1))
    return [int(x) for x in text.split(",")]


def run_summary(run_dir):
    """{seed, step0, halfway, halfway_step, end, end_step, gain} of a run folder's metrics.jsonl."""
    config = json.load(open(os.path.join(run_dir, "config.json")))
    rows = [json.loads(line) for line in open(os.path.join(run_dir, "metrics.jsonl"))]
    evals = [(r["step"], r["eval/accuracy"]) for r in rows if r.get("eval/accuracy") is not None]
    half = config["TOTAL_STEPS"] // 2
    halfway = [e for e in evals if e[0] <= half][-1]
    return {"seed": config["SEED"], "step0": evals[0][1], "halfway": halfway[1], "halfway_step": halfway[0],
            "end": evals[-1][1], "end_step": evals[-1][0], "gain": 100 * (evals[-1][1] - evals[0][1])}


def table(summaries, walls):
    lines = ["| seed | step 0 | halfway | end | gain (points) | wall |", "|---|---|---|---|---|---|"]
    for s in summaries:
        wall = walls.get(s["seed"])
        lines.append(f"| {s['seed']} | {s['step0']:.3f} | {s['halfway']:.3f} (step {s['halfway_step']}) | "
                     f"{s['end']:.3f} | {s['gain']:+.1f} | {f'{wall:.0f} s' if wall else '—'} |")
    gains = [s["gain"] for s in summaries]
    worst = min(summaries, key=lambda s: s["gain"])
    lines.append(f"\n{len(summaries)} seeds: mean gain {sum(gains) / len(gains):+.1f} points, minimum "
                 f"{worst['gain']:+.1f} (seed {worst['seed']}), mean end accuracy "
                 f"{sum(s['end'] for s in summaries) / len(summaries):.3f}")
    if walls:
        lines.append(f"wall time: mean {sum(walls.values()) / len(walls):.0f} s")
    return "\n".join(lines)


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    extra = argv[argv.index("--") + 1:] if "--" in argv else []
    argv = argv[: argv.index("--")] if "--" in argv else argv
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("trainer", help="dapo.py, grpo.py or ppo.py")
    parser.add_argument("--seeds", default="0-2", help='"0-9" or "0,1,2" (default 0-2)')
    parser.add_argument("--runs-dir", default="runs_seeds", help="where the run folders go (default runs_seeds/)")
    parser.add_argument("--jobs", type=int, default=1, help="runs at once, each with CPU_THREADS = cores / jobs "
                        "(default 1: one after another, each alone on the machine)")
    parser.add_argument("--table", nargs="*", help="run folders already done: print their table, run nothing")
    args = parser.parse_args(argv)
    if args.table:
        print(table([run_summary(d) for d in sorted(args.table)], {}))
        return
    trainer = os.path.join(ROOT, os.path.basename(args.trainer))
    name = os.path.splitext(os.path.basename(trainer))[0]
    print(f"{name}, seeds {args.seeds}, on {platform.processor() or platform.machine()} "
          f"({os.cpu_count()} cores), {args.jobs} at a time; overrides: {' '.join(extra) or 'none'}", flush=True)
    summaries, walls, running = [], {}, []
    seeds = parse_seeds(args.seeds)
    threads = [f"--CPU_THREADS={max(1, os.cpu_count() // args.jobs)}"] if args.jobs > 1 else []
    while seeds or running:
        while seeds and len(running) < args.jobs:  # start runs until `jobs` are going
            seed = seeds.pop(0)
            runs_dir = os.path.join(args.runs_dir, f"{name}_seed{seed}")  # one folder per seed: its run is alone in it
            command = [sys.executable, trainer, f"--SEED={seed}", f"--RUNS_DIR={runs_dir}", *threads, *extra]
            process = subprocess.Popen(command, cwd=ROOT, env=dict(os.environ, TQDM_DISABLE="1"),
                                       stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
            running.append((seed, runs_dir, process, time.time()))
        seed, runs_dir, process, start = running.pop(0)  # wait for the oldest
        stderr = process.communicate()[1]
        if process.returncode:
            print(f"seed {seed}: exit {process.returncode}\n{stderr[-2000:]}", file=sys.stderr)
            continue
        walls[seed] = time.time() - start
        run_dir = max(glob.glob(os.path.join(runs_dir, f"{name}_*")))
        summaries.append(run_summary(run_dir))
        s = summaries[-1]
        print(f"seed {seed}: {s['step0']:.3f} -> {s['end']:.3f} ({s['gain']:+.1f} points), "
              f"{walls[seed]:.0f} s, {run_dir}", flush=True)
    if summaries:
        print(table(summaries, walls))


if __name__ == "__main__":
    main()
