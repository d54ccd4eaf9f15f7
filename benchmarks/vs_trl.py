"""Step time of our DAPO trainer against TRL's GRPOTrainer(loss_type="dapo") on the same work.

Same work per step: the embedded tiny VLM and its processor, the synthetic count task, 8 prompts x 8 completions,
temperature 1, clip 0.2 / 0.28, no KL (no reference model), one optimizer step per batch at the same learning
rate, rewards = 3 x accuracy + 1 x format (utils.rewards), truncated completions masked (ours also adds its
soft overlong penalty and its attention diagnostics, as `dapo.py` does by default). Ours is the real trainer:
`python dapo.py --DYNAMIC_SAMPLING=False` in a subprocess, timed by its own perf/step_s; TRL runs in a subprocess
too, timed from on_step_begin to on_step_end. The two systems alternate (--rounds), each round runs one warm-up
step and --steps timed steps; we print the median step time of each and the ratio, on two workloads:

  default       56x56 images (16 image tokens), at most 24 new tokens
  vision-heavy  the largest images the embedded processor takes (its max_pixels: 112x112, 64 image tokens),
                at most 64 new tokens

and the tokens/s of our generation alone. TRL is optional (`pip install trl==1.16.0`, preferably in its own
virtual environment: it may move the pinned versions); without it only our side is measured. Nothing is downloaded.

  python benchmarks/vs_trl.py                        # both workloads, 2 rounds x 4 timed steps, 2 threads
  python benchmarks/vs_trl.py --workloads default --rounds 3 --steps 6 --threads 1
"""

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time

os.environ["TQDM_DISABLE"] = "1"
os.environ["HF_HUB_OFFLINE"] = "1"
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import dapo as D  # noqa: E402  (the trainer's constants: one source of truth for the shared settings)

PROMPTS, GROUP_SIZE = 8, 8


def workload_settings(name, processor):
    """(image side in pixels, max new tokens) of a workload."""
    if name == "default":
        return D.IMAGE_SIZE, D.MAX_NEW_TOKENS
    patch = processor.image_processor.patch_size * processor.image_processor.merge_size
    side = int(math.sqrt(processor.image_processor.size["longest_edge"])) // patch * patch  # the largest square
    return side, 64


PHASES = ("step_s", "generate_s", "logprob_s", "update_s", "mfu_generate", "mfu_update")


def run_ours(image_size, max_new_tokens, steps, threads, seed):
    """Per-step {phase: value} of `python dapo.py --DYNAMIC_SAMPLING=False` (its perf/* metrics: step time, the time
    of each phase, the MFU of generation and of the update), warm-up step dropped."""
    with tempfile.TemporaryDirectory() as runs:
        cmd = [sys.executable, "dapo.py", "--DYNAMIC_SAMPLING=False", f"--TOTAL_STEPS={steps + 1}",
               f"--TRAIN_BATCH_PROMPTS={PROMPTS}", f"--GROUP_SIZE={GROUP_SIZE}", f"--IMAGE_SIZE={image_size}",
               f"--MAX_NEW_TOKENS={max_new_tokens}", f"--CPU_THREADS={threads}", f"--SEED={seed}",
               "--EVAL_EVERY=1000000", "--EVAL_SAMPLES=8", "--LOG_EVERY=1000000", "--PLOT_EVERY=0",
               "--COMPARE_WITH=", f"--RUNS_DIR={runs}"]
        subprocess.run(cmd, cwd=ROOT, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        (run_dir,) = [os.path.join(runs, d) for d in os.listdir(runs)]
        with open(os.path.join(run_dir, "metrics.jsonl")) as f:
            rows = [json.loads(line) for line in f]
    return [{k: r[f"perf/{k}"] for k in PHASES} for r in rows if r.get("step", 0) >= 2]


def run_trl(image_size, max_new_tokens, steps, threads, seed):
    """Per-step seconds of TRL's GRPOTrainer in a subprocess (this script with --trl-worker)."""
    cmd = [sys.executable, os.path.abspath(__file__), "--trl-worker", str(image_size), str(max_new_tokens), str(steps),
           str(threads), str(seed)]
    out = subprocess.run(cmd, cwd=ROOT, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])[1:]  # warm-up step dropped


def trl_worker(image_size, max_new_tokens, steps, threads, seed):
    """Train TRL's GRPOTrainer for 1 + steps steps; print the list of step times (JSON) as the last line."""
    import torch
    from datasets import Dataset
    from transformers import TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from data.prompts import chat_messages
    from data.synthetic import SyntheticVQA
    from utils.model import load_model, load_processor
    from utils.rewards import accuracy_reward, format_reward
    from utils.tiny_vlm import ensure_tiny_vlm

    torch.set_num_threads(threads)
    path = ensure_tiny_vlm(os.path.join(ROOT, ".cache"))
    data = SyntheticVQA(PROMPTS * (steps + 1), seed=seed, split="train", kinds=tuple(D.QUESTION_KINDS),
                        image_size=image_size, max_objects=D.MAX_OBJECTS)
    examples = [data[i] for i in range(len(data))]
    dataset = Dataset.from_list([{"prompt": chat_messages(ex["problem"]), "image": ex["image"],
                                  "solution": ex["solution"]} for ex in examples])

    def text(completion):  # conversational completions are [{"role": "assistant", "content": ...}]
        return completion[0]["content"] if isinstance(completion, list) else completion

    def accuracy(completions, solution, **kwargs):
        return [accuracy_reward(text(c), s) for c, s in zip(completions, solution)]

    def format_(completions, **kwargs):
        return [format_reward(text(c)) for c in completions]

    class StepTimes(TrainerCallback):
        times = []

        def on_step_begin(self, args, state, control, **kwargs):
            self.start = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            self.times.append(time.perf_counter() - self.start)

    with tempfile.TemporaryDirectory() as out:
        config = GRPOConfig(
            output_dir=out, loss_type="dapo", epsilon=D.CLIP_EPS_LOW, epsilon_high=D.CLIP_EPS_HIGH, beta=D.KL_BETA,
            num_generations=GROUP_SIZE, per_device_train_batch_size=PROMPTS * GROUP_SIZE,
            gradient_accumulation_steps=1, num_iterations=D.PPO_EPOCHS, max_completion_length=max_new_tokens,
            temperature=D.TEMPERATURE, top_p=D.TOP_P, top_k=0, learning_rate=D.LEARNING_RATE,
            lr_scheduler_type="cosine", weight_decay=D.WEIGHT_DECAY, max_grad_norm=D.MAX_GRAD_NORM,
            reward_weights=[D.W_ACCURACY, D.W_FORMAT], mask_truncated_completions=D.OVERLONG_FILTERING,
            max_steps=steps + 1, use_cpu=True, bf16=False, report_to="none", save_strategy="no", logging_steps=1000,
            seed=seed, shuffle_dataset=False, dataloader_num_workers=0,
        )
        trainer = GRPOTrainer(model=load_model(path, "cpu", torch.float32), reward_funcs=[accuracy, format_],
                              args=config, train_dataset=dataset, processing_class=load_processor(path),
                              callbacks=[StepTimes()])
        trainer.train()
    print(json.dumps(StepTimes.times))


def generation_tokens_per_s(image_size, max_new_tokens, threads, seed, repeats=3):
    """Completion tokens per second of our generate() alone (8 prompts x 8), median over `repeats` after a warm-up."""
    import torch

    from data.synthetic import SyntheticVQA
    from utils.generation import Decoding
    from utils.model import load_model, load_processor, suppressed_token_ids
    from utils.rollout import generate
    from utils.tiny_vlm import ensure_tiny_vlm

    torch.set_num_threads(threads)
    torch.manual_seed(seed)
    path = ensure_tiny_vlm(os.path.join(ROOT, ".cache"))
    model, processor = load_model(path, "cpu", torch.float32), load_processor(path)
    decoding = Decoding(max_new_tokens, D.TEMPERATURE, D.TOP_P, suppress_ids=suppressed_token_ids(processor.tokenizer))
    data = SyntheticVQA(PROMPTS * (repeats + 1), seed=seed, split="train", kinds=tuple(D.QUESTION_KINDS),
                        image_size=image_size)
    rates = []
    for r in range(repeats + 1):
        examples = [data[r * PROMPTS + i] for i in range(PROMPTS)]
        start = time.perf_counter()
        rollout = generate(model, processor, examples, GROUP_SIZE, decoding, D.GENERATION_BATCH_SIZE)
        rates.append(int(rollout.completion_mask.sum()) / (time.perf_counter() - start))
    return statistics.median(rates[1:])


def main():
    if len(sys.argv) > 1 and sys.argv[1] == "--trl-worker":
        return trl_worker(*map(int, sys.argv[2:7]))
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--workloads", nargs="+", default=["default", "vision-heavy"], choices=["default", "vision-heavy"])
    p.add_argument("--rounds", type=int, default=2, help="alternations of the two systems per workload")
    p.add_argument("--steps", type=int, default=4, help="timed steps per round, after one warm-up step")
    p.add_argument("--threads", type=int, default=D.CPU_THREADS, help="torch CPU threads of both systems")
    args = p.parse_args()
    try:
        import trl  # noqa: F401
        has_trl = True
    except ImportError:
        has_trl = False
        print("TRL is not installed: measuring our trainer only. For the comparison: pip install trl==1.16.0 "
              "(in a virtual environment of its own, with -r requirements.txt)")
    from utils.model import load_processor
    from utils.tiny_vlm import ensure_tiny_vlm

    processor = load_processor(ensure_tiny_vlm(os.path.join(ROOT, ".cache")))
    print(f"{PROMPTS} prompts x {GROUP_SIZE} completions, {args.threads} thread(s), {args.rounds} round(s) x "
          f"{args.steps} timed steps; median step time in seconds")
    for name in args.workloads:
        image_size, max_new_tokens = workload_settings(name, processor)
        times = {"ours": [], "trl": []}
        for r in range(args.rounds):
            if has_trl:
                times["trl"] += run_trl(image_size, max_new_tokens, args.steps, args.threads, D.SEED + r)
            times["ours"] += run_ours(image_size, max_new_tokens, args.steps, args.threads, D.SEED + r)
        phase = {k: statistics.median(r[k] for r in times["ours"]) for k in PHASES}
        ours = phase["step_s"]
        line = f"{name:<13} ({image_size}x{image_size} images, <= {max_new_tokens} new tokens): ours {ours:.3f}"
        if has_trl:
            theirs = statistics.median(times["trl"])
            line += f" | TRL {theirs:.3f} | ours / TRL = {ours / theirs:.2f} (TRL is {theirs / ours:.2f}x slower)"
        rate = generation_tokens_per_s(image_size, max_new_tokens, args.threads, D.SEED)
        print(line + f" | our generation alone: {rate:.0f} completion tokens/s", flush=True)
        rest = ours - phase["generate_s"] - phase["logprob_s"] - phase["update_s"]
        print(f"  ours by phase (medians): generation and scoring {phase['generate_s']:.3f} s (MFU "
              f"{100 * phase['mfu_generate']:.1f}%), log-prob passes {phase['logprob_s']:.3f} s, update "
              f"{phase['update_s']:.3f} s (MFU {100 * phase['mfu_update']:.1f}%), the rest {rest:.3f} s (advantages, "
              f"metrics, logging)", flush=True)


if __name__ == "__main__":
    main()
