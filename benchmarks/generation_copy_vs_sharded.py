"""Why each rank generates with a whole copy of the policy under torchrun, not with the FSDP2-sharded policy itself.

Every rank decodes the same prompts greedily (so that the sharded policy's ranks run the same number of decode
steps: each step of a sharded model all-gathers every layer's weights from all ranks) with (a) a whole copy of the
policy, as the trainers do (utils/model.py make_rollout_model), and (b) the sharded policy (utils/distributed.py
shard_model). Prints the median seconds per generate() call and per generated token, on rank 0.

  torchrun --standalone --nproc_per_node=2 benchmarks/generation_copy_vs_sharded.py          # CPU, gloo
  torchrun --standalone --nproc_per_node=8 benchmarks/generation_copy_vs_sharded.py --model /models/Qwen2.5-VL-3B-Instruct
"""

import argparse
import copy
import os
import statistics
import sys
import time

os.environ["TQDM_DISABLE"] = "1"  # must precede the first tqdm import
os.environ["HF_HUB_OFFLINE"] = "1"
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import torch  # noqa: E402

from data.synthetic import SyntheticVQA  # noqa: E402
from utils.distributed import barrier, close_distributed, init_distributed, shard_model  # noqa: E402
from utils.generation import Decoding  # noqa: E402
from utils.model import load_model, load_processor, suppressed_token_ids  # noqa: E402
from utils.rollout import generate  # noqa: E402
from utils.tiny_vlm import ensure_tiny_vlm  # noqa: E402


def timed(model, processor, examples, args):
    """Median seconds of `args.repeats` generate() calls (after one warm-up) and the completion tokens of one."""
    decoding = Decoding(args.max_new_tokens, greedy=True, suppress_ids=suppressed_token_ids(processor.tokenizer))
    times, tokens = [], 0
    for i in range(args.repeats + 1):
        barrier()
        start = time.perf_counter()
        rollout = generate(model, processor, examples, args.group_size, decoding)
        barrier()
        if i:
            times.append(time.perf_counter() - start)
        tokens = int(rollout.completion_mask.sum())
    return statistics.median(times), tokens


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="embedded", help="'embedded' (the tiny VLM) or a local checkpoint folder")
    p.add_argument("--prompts", type=int, default=8)
    p.add_argument("--group-size", type=int, default=8)
    p.add_argument("--max-new-tokens", type=int, default=24)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads per rank")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    world = init_distributed()
    device = world.device or torch.device("cpu")
    path = ensure_tiny_vlm(os.path.join(ROOT, ".cache")) if args.model == "embedded" else args.model
    processor = load_processor(path)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    policy = load_model(path, device, torch.float32).eval()
    whole = copy.deepcopy(policy).to(dtype)
    examples = [SyntheticVQA(args.prompts, seed=1, split="test")[i] for i in range(args.prompts)]
    copy_s, tokens = timed(whole, processor, examples, args)
    shard_model(policy, "bf16-mixed" if dtype == torch.bfloat16 else "fp32")
    sharded_s, _ = timed(policy, processor, examples, args)
    if world.is_main:
        print(f"{world.world_size} ranks, {args.prompts} prompts x {args.group_size} completions of <= "
              f"{args.max_new_tokens} tokens per rank ({tokens} tokens), greedy, median of {args.repeats}:")
        print("| generation model | s per call | ms per token (per rank) |\n|---|---:|---:|")
        for name, s in (("whole copy on each rank (the trainers)", copy_s), ("FSDP2-sharded policy", sharded_s)):
            print(f"| {name} | {s:.3f} | {1000 * s / tokens:.2f} |")
    close_distributed()


if __name__ == "__main__":
    main()
