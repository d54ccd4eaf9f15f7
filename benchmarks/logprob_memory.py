"""Peak memory of the log-prob + entropy computation (utils/logprobs.py logprobs_from_hidden), forward and backward,
at a Qwen2.5-VL-7B shape: batch 8, hidden 3584, vocabulary 151,936, 4,096 completion tokens.

Each computation runs alone in a subprocess (this script with a hidden flag): random fp32 hidden states
[b, L+1, 3584] and an fp32 lm_head weight [151936, 3584] (fp32 master weights), both requiring grad, are built
first; then freed heap is returned to the OS, the kernel's peak-RSS mark is reset, and the peak RSS increase (VmHWM)
of the forward (logp, entropy = ...) and, after another reset, of (logp·a + entropy·c).sum().backward() are recorded (glibc malloc with a fixed mmap threshold,
so peak RSS follows the live tensors; see benchmarks/attention_overhead.py (b)). It includes the lm_head weight's
gradient (2.2 GB), which any training step holds.

  before: the code before chunking (commit 61c5216, `unchunked_logprobs`): fp32 logits [b, L, vocab] and the
          log-softmax, its exp and product all at once, all kept for backward. Measured at --before-len tokens and
          twice that; the forward's and the backward's peaks are extrapolated linearly to 4,096 (fixed + per-token
          cost), the larger printed, next to the analytic size of one [8, 4096, 151936] fp32 tensor.
  after:  logprobs_from_hidden with its default budget (LOGITS_BUDGET_BYTES): chunks of the sequence,
          checkpointed. Measured at --after-len tokens (default 128: three chunks; 4,096 would take ~30 min of
          matmuls on a 2-core CPU). Beyond the chunks, memory grows with L only by the [b, L, 3584] hidden states'
          gradient (fp32: 470 MB at 4,096 tokens; printed) and the [b, L] outputs.
Chunked and unchunked log-probs and entropies are checked against each other (1e-5) at --before-len x 2 tokens
with a budget of 4 tokens per chunk.

  python benchmarks/logprob_memory.py               # ~3 GB RAM peak, a few minutes on 2 cores
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import types

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import torch  # noqa: E402

from attention_overhead import proc_status_kb, reset_peak_rss  # noqa: E402  (benchmarks/, the script's folder)
from utils import layout  # noqa: E402
from utils.logprobs import LOGITS_BUDGET_BYTES, logprobs_from_hidden  # noqa: E402

SHAPE = dict(batch=8, length=4096, hidden=3584, vocab=151_936)  # Qwen2.5-VL-7B's LM head, a 4,096-token batch


def unchunked_logprobs(model, hidden, completion_ids, temperature=1.0):
    """logprobs_from_hidden as it was before chunking (commit 61c5216), for the "before" figure."""
    logits = layout.lm_head(model)(hidden)[:, :-1].float() / temperature  # [b, L, V]
    log_probs = torch.log_softmax(logits, -1)
    logp = log_probs.gather(-1, completion_ids.unsqueeze(-1)).squeeze(-1)
    return logp, -(log_probs.exp() * log_probs).sum(-1)


def child(args):
    """Hidden entry point: peak-RSS increase of forward + backward for one mode and length; results to --child-out."""
    s, L = SHAPE, args.length
    g = torch.Generator().manual_seed(0)
    lm_head = torch.nn.Linear(s["hidden"], s["vocab"], bias=False)
    with torch.no_grad():
        lm_head.weight.normal_(0, 0.02, generator=g)
    model = types.SimpleNamespace(lm_head=lm_head)
    hidden = torch.randn(s["batch"], L + 1, s["hidden"], generator=g).requires_grad_()
    ids = torch.randint(s["vocab"], (s["batch"], L), generator=g)
    weights = torch.randn(2, s["batch"], L, generator=g)  # loss weights of logp and entropy
    reset, rss_before, _ = reset_peak_rss()
    if not reset:
        raise SystemExit("cannot reset the peak-RSS mark (/proc/self/clear_refs); this benchmark needs it")
    start = time.perf_counter()
    if args.mode == "unchunked":
        logp, entropy = unchunked_logprobs(model, hidden, ids)
    else:
        logp, entropy = logprobs_from_hidden(model, hidden, ids, with_entropy=True, budget_bytes=args.budget)
    forward_kb = proc_status_kb("VmHWM") - rss_before
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # the backward's own peak, from the same baseline
    ((logp * weights[0]).sum() + (entropy * weights[1]).sum()).backward()
    backward_kb = proc_status_kb("VmHWM") - rss_before
    seconds = time.perf_counter() - start
    torch.save({"logp": logp.detach(), "entropy": entropy.detach()}, args.child_out + ".pt")
    with open(args.child_out, "w") as f:
        json.dump({"forward_kb": forward_kb, "backward_kb": backward_kb, "peak_kb": max(forward_kb, backward_kb),
                   "seconds": seconds}, f)


def run(args, mode, length, workdir, budget=None):
    out = os.path.join(workdir, f"{mode}-{length}")
    budget = budget or args.budget
    cmd = [sys.executable, os.path.abspath(__file__), "--threads", str(args.threads), "--child", "--mode", mode,
           "--length", str(length), "--budget", str(budget), "--child-out", out]
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="131072")  # large blocks mmapped, unmapped on free
    done = subprocess.run(cmd, capture_output=True, text=True, check=False, env=env)
    if done.returncode != 0:
        raise SystemExit(f"subprocess ({mode}, {length} tokens) failed ({done.returncode}):\n{done.stderr[-4000:]}")
    with open(out) as f:
        result = json.load(f)
    result.update(torch.load(out + ".pt"))
    print(f"  {mode:<9} {length:5d} tokens (budget {budget / 2**20:6.2f} MiB): peak RSS +{result['peak_kb'] / 1024:7.1f} "
          f"MiB (forward +{result['forward_kb'] / 1024:.1f}, backward +{result['backward_kb'] / 1024:.1f}; "
          f"{result['seconds']:.1f} s)", flush=True)
    return result


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--before-len", type=int, default=16, help="the unchunked code runs at this length and twice it")
    p.add_argument("--after-len", type=int, default=128, help="the chunked code's measured length")
    p.add_argument("--budget", type=int, default=LOGITS_BUDGET_BYTES, help="bytes of fp32 logits per chunk")
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads; 0 = torch's default")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--mode", choices=["chunked", "unchunked"], help=argparse.SUPPRESS)
    p.add_argument("--length", type=int, help=argparse.SUPPRESS)
    p.add_argument("--child-out", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.child:
        return child(args)

    s, short = SHAPE, args.before_len
    print(f"log-prob + entropy, forward + backward: batch {s['batch']}, hidden {s['hidden']}, vocab {s['vocab']:,}, "
          "fp32 lm_head weight; each run in its own subprocess, peak RSS increase", flush=True)
    with tempfile.TemporaryDirectory() as workdir:
        before = [run(args, "unchunked", n, workdir) for n in (short, 2 * short)]
        check = run(args, "chunked", 2 * short, workdir, budget=4 * s["batch"] * s["vocab"] * 4)
        after = run(args, "chunked", args.after_len, workdir)
    diff = max((check[k] - before[1][k]).abs().max().item() for k in ("logp", "entropy"))
    assert diff < 1e-5, f"chunked and unchunked log-probs/entropies differ by {diff}"
    # forward and backward peaks are each linear in L (fixed + per token); at small L the backward's (the weight's
    # gradient) is the larger, at 4,096 tokens the forward's: extrapolate both, take the larger
    L = s["length"]
    extrapolated = {}
    for part in ("forward_kb", "backward_kb"):
        per_token = (before[1][part] - before[0][part]) * 1024 / short  # bytes
        extrapolated[part] = (before[0][part] * 1024 - per_token * short, per_token)
    logits = s["batch"] * L * s["vocab"] * 4
    grad_hidden = s["batch"] * (L + 1) * s["hidden"] * 4
    chunk = max(1, args.budget // (s["batch"] * s["vocab"] * 4))
    print(f"    fp32 logits [{s['batch']}, {L}, {s['vocab']}] alone (analytic): {logits / 2**30:.1f} GiB")
    (f_fixed, f_token), (b_fixed, b_token) = extrapolated["forward_kb"], extrapolated["backward_kb"]
    forward, backward = f_fixed + f_token * L, b_fixed + b_token * L
    print(f"    before (unchunked), {L} tokens: {max(forward, backward) / 2**30:.1f} GiB, extrapolated from {short} and "
          f"{2 * short} tokens: forward {forward / 2**30:.1f} GiB ({f_fixed / 2**20:.0f} MiB + {f_token / 2**20:.1f} MiB "
          f"per token = {f_token * L / logits:.1f} x the logits), backward {backward / 2**30:.1f} GiB "
          f"({b_fixed / 2**20:.0f} MiB + {b_token / 2**20:.1f} MiB per token)")
    print(f"    after (chunks of {chunk} tokens = {args.budget / 2**20:g} MiB of logits), {args.after_len} tokens: "
          f"{after['peak_kb'] / 1024:.0f} MiB measured ({after['seconds']:.0f} s on the CPU, under load: "
          f"not a timing); at {L} tokens add the hidden states' gradient, {grad_hidden / 2**20:.0f} MiB")
    print(f"    chunked vs unchunked (4 tokens per chunk): max |diff| {diff:.1e}")


if __name__ == "__main__":
    main()
