"""What the grounding diagnostics cost on the default task: the step time with the visual-dependency pass every step
(GROUNDING_EVERY=1) against off (0), and the time of a held-out evaluation with and without the blank-image half
(EVAL_BLANK_IMAGE).

    python benchmarks/grounding_cost.py                   # 30 steps each way, 2 rounds, 2 threads
    python benchmarks/grounding_cost.py --steps 20 --rounds 1 --threads 1

(a) The trainer itself (dapo.py, its defaults) runs --steps steps with GROUNDING_EVERY=1 and with 0, alternating,
    --rounds times, with one seed: the two runs train identically (the pass changes no number), so their steps are
    paired. Printed: the mean perf/step_s and perf/logprob_s (the pass is timed in the log-prob phase) over steps 3..N
    of each configuration, and the difference. With the default GROUNDING_EVERY = 10 the cost per step is a tenth.
(b) utils.evaluate.evaluate on the default run's EVAL_SAMPLES held-out questions (greedy), with and without the
    blank-image half, median of --rounds after one warm-up.
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
import time

os.environ["TQDM_DISABLE"] = "1"
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def run_steps(grounding_every, steps, threads):
    """(mean perf/step_s, mean perf/logprob_s) over steps 3..N of a dapo.py run."""
    with tempfile.TemporaryDirectory() as runs:
        command = [sys.executable, os.path.join(ROOT, "dapo.py"), f"--TOTAL_STEPS={steps}", f"--RUNS_DIR={runs}",
                   f"--GROUNDING_EVERY={grounding_every}", f"--CPU_THREADS={threads}", "--EVAL_EVERY=100000",
                   "--EVAL_SAMPLES=16", "--PLOT_EVERY=0", "--SAVE_EVERY=0", "--LOG_EVERY=100000", "--COMPARE_WITH="]
        subprocess.run(command, cwd=ROOT, check=True, capture_output=True, env=dict(os.environ, TQDM_DISABLE="1"))
        rows = [json.loads(line) for line in open(glob.glob(os.path.join(runs, "*", "metrics.jsonl"))[0])]
    timed = [r for r in rows if r["step"] >= 3]
    return (statistics.mean(r["perf/step_s"] for r in timed), statistics.mean(r["perf/logprob_s"] for r in timed))


def time_evaluation(blank, rounds, threads):
    import torch

    import dapo
    from data.synthetic import SyntheticVQA
    from utils.evaluate import evaluate
    from utils.model import load_model, load_processor, suppressed_token_ids
    from utils.specs import EvalSpec
    from utils.tiny_vlm import ensure_tiny_vlm

    torch.set_num_threads(threads)
    path = ensure_tiny_vlm(os.path.join(ROOT, ".cache"))
    model, processor = load_model(path, "cpu", torch.float32), load_processor(path)
    data = SyntheticVQA(dapo.EVAL_SAMPLES, seed=dapo.SEED, split="test", kinds=tuple(dapo.QUESTION_KINDS))
    spec = EvalSpec(dapo.EVAL_SAMPLES, 0.0, 1.0, 1, blank)
    times = []
    for _ in range(rounds + 1):
        start = time.perf_counter()
        evaluate(model, processor, data, spec, dapo.MAX_NEW_TOKENS, dapo.GENERATION_BATCH_SIZE,
                 suppressed_token_ids(processor.tokenizer))
        times.append(time.perf_counter() - start)
    return statistics.median(times[1:])


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    print(f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, {args.threads} threads")
    results = {1: [], 0: []}
    for _ in range(args.rounds):
        for every in (1, 0):
            results[every].append(run_steps(every, args.steps, args.threads))
    on = [statistics.mean(v[i] for v in results[1]) for i in (0, 1)]
    off = [statistics.mean(v[i] for v in results[0]) for i in (0, 1)]
    print(f"(a) step time, mean over steps 3..{args.steps} of {args.rounds} run(s) each:")
    print(f"    GROUNDING_EVERY=0: step {off[0]:.3f} s (log-prob phase {off[1]:.3f} s)")
    print(f"    GROUNDING_EVERY=1: step {on[0]:.3f} s (log-prob phase {on[1]:.3f} s)")
    print(f"    the pass costs {on[0] - off[0]:+.3f} s a step ({100 * (on[0] - off[0]) / off[0]:+.0f}%); every 10 "
          f"steps (the default): {100 * (on[0] - off[0]) / off[0] / 10:+.1f}% on average")
    plain, blank = (time_evaluation(b, args.rounds, args.threads) for b in (False, True))
    print(f"(b) one evaluation of the default run's held-out questions: {plain:.2f} s greedy, {blank:.2f} s with the "
          f"blank-image half ({blank / plain:.2f}x)")


if __name__ == "__main__":
    main()
