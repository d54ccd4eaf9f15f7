"""What OFFLOAD_OPTIMIZER costs: FSDP2's CPUOffloadPolicy keeps each rank's sharded fp32 weights, gradients and AdamW
state in CPU memory, so AdamW steps on the CPU and every step moves the shards between host and GPU.

    python benchmarks/offload_cost.py                       # all three parts, 2 ranks, 2 rounds x 6 timed steps
    python benchmarks/offload_cost.py --rounds 3 --steps 8 --adam-params 100e6

1. The CPU path, measured: `torchrun --nproc_per_node=2 dapo.py` (the tiny VLM, gloo) with OFFLOAD_OPTIMIZER off
   and on, alternating, each in a subprocess with one warm-up step dropped; the median `perf/step_s` of each.
   On a CPU the "host" is the device: this is the offload policy's bookkeeping, not a transfer.
2. AdamW on this CPU, measured: one torch.optim.AdamW step (the trainers' optimizer, its default CPU path) over --adam-params fp32
   parameters with every core, in seconds per billion parameters — the step a GPU run hands to the host.
3. What that means for Qwen2.5-VL-7B (the exact configuration, counted on the meta device) on 2 GPUs: each rank's
   shard, the CPU AdamW time of both ranks sharing this host's cores (by 2.), and the bytes each rank moves per
   forward + backward pass (its fp32 shards to the GPU for the forward's and the backward's all-gathers, its fp32
   gradient shards back; a step runs one pass per micro-batch, and no-grad passes add a forward's worth each), and
   their time at --pcie-gbps (an assumed bandwidth, printed as such: measure it with benchmarks/gpu_check.py on a
   GPU).
"""

import argparse
import glob
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

os.environ["HF_HUB_OFFLINE"] = "1"
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import torch  # noqa: E402

GiB = 2**30
SMALL = ["--DYNAMIC_SAMPLING=False", "--EVAL_EVERY=1000000", "--EVAL_SAMPLES=8", "--LOG_EVERY=1000000",
         "--PLOT_EVERY=0", "--SAVE_EVERY=0", "--COMPARE_WITH=", "--CPU_THREADS=1"]


def trainer_step_times(offload, ranks, steps):
    """perf/step_s of a `torchrun dapo.py` run of 1 + steps steps, the warm-up step dropped."""
    launcher = shutil.which("torchrun", path=os.path.dirname(sys.executable)) or "torchrun"
    with tempfile.TemporaryDirectory() as runs:
        command = [launcher, "--standalone", f"--nproc_per_node={ranks}", "dapo.py", f"--TOTAL_STEPS={steps + 1}",
                   f"--OFFLOAD_OPTIMIZER={offload}", f"--RUNS_DIR={runs}", *SMALL]
        env = dict(os.environ, TQDM_DISABLE="1", OMP_NUM_THREADS="1")
        done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True)
        if done.returncode:
            raise SystemExit(f"{' '.join(command)} failed:\n{done.stderr[-3000:]}")
        (metrics,) = glob.glob(os.path.join(runs, "*", "metrics.jsonl"))
        rows = [json.loads(line) for line in open(metrics)]
    return [r["perf/step_s"] for r in rows if r["step"] >= 2]


def adam_seconds_per_billion(n_params, repeats=3):
    """Median seconds of one AdamW step (moments already there) over n_params fp32 parameters, per 1e9 of them."""
    torch.set_num_threads(os.cpu_count())
    params = [torch.nn.Parameter(torch.randn(int(n_params) // 8)) for _ in range(8)]
    for p in params:
        p.grad = torch.randn_like(p)
    optimizer = torch.optim.AdamW(params, lr=1e-6)
    optimizer.step()  # creates the moments
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        optimizer.step()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e9 / sum(p.numel() for p in params)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--ranks", type=int, default=2)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--steps", type=int, default=6, help="timed steps per run")
    p.add_argument("--adam-params", type=float, default=50e6, help="parameters of the AdamW measurement")
    p.add_argument("--pcie-gbps", type=float, default=25.0, help="assumed host-GPU bandwidth per GPU, GB/s")
    args = p.parse_args()
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")),
               "this CPU") if os.path.exists("/proc/cpuinfo") else "this CPU"
    print(f"{cpu}, {os.cpu_count()} cores, torch {torch.__version__}", flush=True)

    times = {False: [], True: []}
    for r in range(args.rounds):
        for offload in (False, True):
            times[offload] += trainer_step_times(offload, args.ranks, args.steps)
            print(f"  round {r + 1}, OFFLOAD_OPTIMIZER={offload}: median so far "
                  f"{statistics.median(times[offload]):.3f} s", flush=True)
    off, on = statistics.median(times[False]), statistics.median(times[True])
    print(f"1. the CPU path, `torchrun --nproc_per_node={args.ranks} dapo.py` (tiny VLM, gloo), median step: "
          f"{off:.3f} s off, {on:.3f} s on ({100 * (on / off - 1):+.1f}%)")

    per_billion = adam_seconds_per_billion(args.adam_params)
    print(f"2. AdamW on this CPU ({os.cpu_count()} cores, {args.adam_params / 1e6:.0f}M fp32 parameters): "
          f"{per_billion:.2f} s per billion parameters")

    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from real_shape import parameter_counts

    total, _ = parameter_counts("7b")
    shard = total / 2
    moved = 3 * 4 * shard  # fp32 shards in for the forward and the backward gathers, fp32 gradient shards out
    print(f"3. Qwen2.5-VL-7B ({total / 1e9:.2f}B parameters) on 2 GPUs: {shard / 1e9:.2f}B per rank, "
          f"{16 * shard / GiB:.1f} GiB of fp32 weights, gradients and AdamW state per rank in CPU memory; "
          f"AdamW of both ranks on this host's {os.cpu_count()} cores: {per_billion * total / 1e9:.1f} s a step; "
          f"host-GPU traffic {moved / GiB:.1f} GiB per rank per forward + backward pass (one per micro-batch), "
          f"{moved / 1e9 / args.pcie_gbps:.1f} s at an assumed {args.pcie_gbps:.0f} GB/s (overlapped with compute by "
          f"FSDP2's prefetching, in part)")


if __name__ == "__main__":
    main()
