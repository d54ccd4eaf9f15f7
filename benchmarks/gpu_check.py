"""What only a GPU can show, in one command: run it on a machine with at least one NVIDIA GPU (~8 minutes on one
H100-class GPU), paste what it prints into the README's GPU figures, naming the GPU.

    python benchmarks/gpu_check.py                   # every check
    python benchmarks/gpu_check.py --print-commands  # the commands, without running them

1. A bf16-mixed DAPO step at the random-init Qwen2.5-VL-3B shape (benchmarks/real_shape.py: 8 prompts x 8, a
   1,280-visual-token image, 512 new tokens, gradient checkpointing), full fine-tuning and LoRA rank 64, with its
   peak memory and model FLOPs utilisation (against the GPU's dense bf16 peak, utils/flops.py) per part, next to
   the plan's estimate for the same shape (`real_shape.py --plan`).
2. Generation speed at that shape: the step's generated tokens per second (8 x 8 completions of 512 new tokens).
3. `torchrun --nproc_per_node=<GPUs>` of dapo.py for 2 steps on NCCL (the tiny VLM); with 2 or more GPUs again with
   OFFLOAD_OPTIMIZER=True (the shards in CPU memory: the gradient norm's collectives on gloo, the generation copy's
   refresh gathering through NCCL).
4. 20 steps of the default tiny DAPO run on the GPU, and its held-out accuracy.

Each check runs in its own process with a time limit; the script exits 1 when any failed. Without a GPU it says so
and exits 0.
"""

import argparse
import glob
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHAPE = ["--model", "3b", "--max-new-tokens", "512", "--checkpointing", "on", "--device", "cuda:0"]
TINY_STEPS = 20


def commands(n_gpus, workdir):
    """(name, command, seconds allowed) of every check."""
    python, real_shape = sys.executable, os.path.join(ROOT, "benchmarks", "real_shape.py")
    torchrun = shutil.which("torchrun", path=os.path.dirname(sys.executable)) or "torchrun"
    short = ["--EVAL_SAMPLES=48", "--PLOT_EVERY=0", "--SAVE_EVERY=0", "--COMPARE_WITH="]
    return [
        ("3B step, full fine-tuning", [python, real_shape, *SHAPE, "--json", os.path.join(workdir, "full.json")], 240),
        ("3B step, LoRA rank 64", [python, real_shape, *SHAPE, "--lora-rank", "64",
                                   "--json", os.path.join(workdir, "lora.json")], 200),
        ("memory plan at that shape", [python, real_shape, "--plan", "--max-new-tokens", "512"], 60),
        (f"torchrun, {n_gpus} GPU(s), NCCL", [torchrun, "--standalone", f"--nproc_per_node={n_gpus}",
                                              os.path.join(ROOT, "dapo.py"), "--TOTAL_STEPS=2", "--EVAL_EVERY=2",
                                              f"--RUNS_DIR={os.path.join(workdir, 'torchrun')}", *short], 90),
        *([(f"torchrun, {n_gpus} GPUs, OFFLOAD_OPTIMIZER", [torchrun, "--standalone", f"--nproc_per_node={n_gpus}",
                                                              os.path.join(ROOT, "dapo.py"), "--TOTAL_STEPS=2",
                                                              "--EVAL_EVERY=2", "--OFFLOAD_OPTIMIZER=True",
                                                              f"--RUNS_DIR={os.path.join(workdir, 'offload')}",
                                                              *short], 90)] if n_gpus >= 2 else []),
        (f"tiny DAPO, {TINY_STEPS} steps on the GPU", [python, os.path.join(ROOT, "dapo.py"),
                                                       f"--TOTAL_STEPS={TINY_STEPS}", "--EVAL_EVERY=20",
                                                       "--POLICY_DEVICE=cuda:0", "--ROLLOUT_DEVICE=cuda:0",
                                                       f"--RUNS_DIR={os.path.join(workdir, 'tiny')}", *short], 90),
    ]


def step_summary(path):
    """Peak memory by part and generation speed from real_shape.py's --json file."""
    (result,) = json.load(open(path)).values()
    if "oom" in result:
        return f"out of memory: {result['oom']}"
    parts, peak = result["parts"], result.get("peak_flops")

    def mfu(rec):
        return f", MFU {100 * rec['flops'] / rec['seconds'] / peak:.1f}%" if rec.get("flops") and peak else ""

    lines = [f"{part}: peak {rec['peak'] / 2**30:.1f} GiB, {rec['seconds']:.1f} s{mfu(rec)}" for part, rec in
             parts.items()]
    tokens = result["completion_tokens"] / parts["generation"]["seconds"]
    lines.append(f"generation: {tokens:,.0f} tokens/s ({result['completion_tokens']} tokens)")
    return "\n    ".join(lines)


def accuracy_summary(runs_dir):
    rows = [json.loads(line) for line in open(glob.glob(os.path.join(runs_dir, "*", "metrics.jsonl"))[0])]
    evals = [(r["step"], r["eval/accuracy"]) for r in rows if "eval/accuracy" in r]
    return "held-out accuracy " + ", ".join(f"step {s}: {a:.3f}" for s, a in evals)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--print-commands", action="store_true", help="print the checks' commands and exit")
    args = parser.parse_args(argv)
    import torch

    n_gpus = torch.cuda.device_count()
    if args.print_commands:
        for name, command, limit in commands(max(n_gpus, 1), "WORKDIR"):
            print(f"{name} (<= {limit} s): {' '.join(command)}")
        return 0
    if not n_gpus:
        print("gpu_check: torch sees no GPU on this machine (torch.cuda.is_available() is False); nothing to check. "
              "Run it where `nvidia-smi` lists a GPU, with torch's CUDA build.")
        return 0
    print(f"gpu_check: {n_gpus} x {torch.cuda.get_device_name(0)}, torch {torch.__version__}, CUDA "
          f"{torch.version.cuda}", flush=True)
    failed = []
    with tempfile.TemporaryDirectory() as workdir:
        for name, command, limit in commands(n_gpus, workdir):
            start = time.time()
            try:
                done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=limit,
                                      env=dict(os.environ, TQDM_DISABLE="1"))
                ok = done.returncode == 0
                output = done.stdout + done.stderr
            except subprocess.TimeoutExpired as e:
                ok, output = False, f"timed out after {limit} s\n{(e.stdout or b'')[-2000:]!r}"
            print(f"\n[{'ok' if ok else 'FAILED'}] {name} ({time.time() - start:.0f} s)")
            if not ok:
                failed.append(name)
                print(output[-3000:])
                continue
            if "--json" in command:
                print("    " + step_summary(command[command.index("--json") + 1]))
            elif "--plan" in command:
                print("\n".join(line for line in done.stdout.splitlines() if "one GPU" in line or "bf16-mixed" in line))
            else:
                runs_dir = next(a for a in command if a.startswith("--RUNS_DIR=")).split("=", 1)[1]
                print("    " + accuracy_summary(runs_dir))
    print(f"\ngpu_check: {len(failed)} of {len(commands(n_gpus, ''))} checks failed" + (f": {', '.join(failed)}"
                                                                                         if failed else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
