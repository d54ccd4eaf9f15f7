"""Does the compiled static-cache decode (COMPILED_DECODE, utils/generation.py) pay on this machine?

    python benchmarks/decode_compile.py                         # embedded tiny VLM, 8 x 8 completions, 2 threads
    python benchmarks/decode_compile.py --model random:small --max-new-tokens 64 --threads 1

The same rollouts (--prompts x --group-size completions of at most --max-new-tokens, the same seeds) are generated
with the eager decode loop and with the compiled one, alternating, --repeats times after a warm-up. Printed: the
compile time (the compiled path's first call less a steady call), the median seconds of one generate() call and per
decode step (a call's time less its prefill's, over its decode steps), and whether greedy decoding gives the same
tokens on both paths.
"""

import argparse
import os
import statistics
import sys
from dataclasses import replace

os.environ["TQDM_DISABLE"] = "1"
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import torch  # noqa: E402
from step_time import load, rollout_arguments, seconds_of  # noqa: E402  (benchmarks/ is on the path)

from data.synthetic import SyntheticVQA  # noqa: E402
from utils.generation import Decoding  # noqa: E402
from utils.model import suppressed_token_ids  # noqa: E402
from utils.rollout import generate  # noqa: E402


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    rollout_arguments(p)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=7)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    model, processor = load(args.model, torch.device("cpu"))
    model.eval()
    data = SyntheticVQA(args.prompts, seed=1, kinds=["count"])
    examples = [data[i] for i in range(args.prompts)]
    eager = Decoding(args.max_new_tokens, suppress_ids=tuple(suppressed_token_ids(processor.tokenizer)))
    paths = {"eager": eager, "compiled": replace(eager, compiled=True)}

    def run(decoding, seed, max_new_tokens=None):
        decoding = replace(decoding, max_new_tokens=max_new_tokens or decoding.max_new_tokens)
        return seconds_of(lambda: generate(model, processor, examples, args.group_size, decoding,
                                      generator=torch.Generator().manual_seed(seed)))

    first, _ = run(paths["compiled"], 0)  # compiles
    times, steps, prefill = {name: [] for name in paths}, {name: [] for name in paths}, []
    for i in range(args.repeats + 1):  # round 0 warms up
        for name, decoding in paths.items():
            seconds, rollout = run(decoding, i)
            if i:
                times[name].append(seconds)
                steps[name].append(rollout.completion_ids.shape[1] - 1)  # decode steps after the prefill's token
        if i:
            prefill.append(run(eager, i, max_new_tokens=1)[0])  # the prefill and the first token alone
    greedy = {name: generate(model, processor, examples, args.group_size, replace(d, greedy=True)).completion_ids
              for name, d in paths.items()}
    base = statistics.median(prefill)
    print(f"{args.model}, {args.prompts}x{args.group_size} completions of <= {args.max_new_tokens} tokens, "
          f"{args.threads} threads, median of {args.repeats}; compile: {first - statistics.median(times['compiled']):.1f} s")
    for name in paths:
        call = statistics.median(times[name])
        per_step = statistics.median((t - base) / max(s, 1) for t, s in zip(times[name], steps[name]))
        print(f"  {name:8s} {call:.3f} s a call, {1000 * per_step:.2f} ms a decode step (prefill {base:.3f} s)")
    same = greedy["eager"].shape == greedy["compiled"].shape and torch.equal(greedy["eager"], greedy["compiled"])
    print(f"  greedy tokens equal on both paths: {same}")


if __name__ == "__main__":
    main()
