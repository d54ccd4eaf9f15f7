"""Time one DAPO training step, part by part: generation, reward, log-probs, backward/optimizer, tokens/s.

The step makes the same calls as dapo.py, with its constants (temperature, reward weights, clip 0.2/0.28,
token-level loss, 1 epoch, 1 mini-batch, overlong filtering). Unlike the trainer it runs one generation round
and keeps every group (no dynamic-sampling refills), so the batch shape is exactly the one asked for.
One warm-up step, then --repeats timed steps; each part is the median over the repeats. Nothing is downloaded.

  python benchmarks/step_time.py                                    # embedded tiny VLM (built in .cache first)
  python benchmarks/step_time.py --model random:tiny --repeats 2 --threads 1
  python benchmarks/step_time.py --model random:small --prompts 2 --group-size 4 --repeats 1
  python benchmarks/step_time.py --model random:tiny --kl-beta 0.04  # adds the reference-model pass
  python benchmarks/step_time.py --model /models/Qwen2.5-VL-3B-Instruct --device cuda --micro-batch-size 16
"""

import argparse
import copy
import dataclasses
import os
import statistics
import sys
import time

os.environ["TQDM_DISABLE"] = "1"  # must precede the first tqdm import: tqdm reads TQDM_* once, at import
os.environ["HF_HUB_OFFLINE"] = "1"  # a name that is not a local folder fails instead of downloading
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import torch  # noqa: E402

import dapo as D  # noqa: E402  (the trainer's constants)
from data.synthetic import SyntheticVQA  # noqa: E402
from utils.config import UserError, constants_of  # noqa: E402
from utils.generation import Decoding  # noqa: E402
from utils.logprobs import Passes, batched_logprobs  # noqa: E402
from utils.model import load_model, load_processor, resolve_devices, suppressed_token_ids  # noqa: E402
from utils.rewards import score_completions  # noqa: E402
from utils.rl import group_advantages, loss_tokens  # noqa: E402
from utils.rollout import generate, select_rows  # noqa: E402
from utils.specs import build_specs  # noqa: E402
from utils.tiny_vlm import RECIPE, build_model, build_processor, ensure_tiny_vlm, train_tokenizer  # noqa: E402
from utils.update import Targets, policy_update  # noqa: E402

# "small": head_dim 512/8 = 64, mrope 8+12+12 = 32 = head_dim/2; vision head dim 256/4 = 64.
SMALL_TEXT = dict(hidden_size=512, intermediate_size=1408, num_hidden_layers=8, num_attention_heads=8,
                  num_key_value_heads=2, mrope_section=[8, 12, 12])
SMALL_VISION = dict(depth=4, hidden_size=256, intermediate_size=512, num_heads=4,
                    patch_size=RECIPE["vision"]["patch_size"])


def step_specs(args):
    """dapo.py's specs (utils/specs.py, from its constants) with this benchmark's batch shape, micro-batch and KL β.
    The fields are replaced one by one, so a shape the trainer would refuse as a whole (e.g. --max-new-tokens
    below OVERLONG_BUFFER) can still be timed."""
    s = build_specs(constants_of(vars(D)))
    return dataclasses.replace(
        s, rollout=dataclasses.replace(s.rollout, train_batch_prompts=args.prompts, group_size=args.group_size,
                                       max_new_tokens=args.max_new_tokens),
        loss=dataclasses.replace(s.loss, kl_beta=args.kl_beta),
        optim=dataclasses.replace(s.optim, micro_batch_size=args.micro_batch_size))


def load(spec, device):
    """(model, processor) for "embedded", "random:tiny", "random:small" or a local checkpoint folder."""
    if spec.startswith("random:"):
        sizes = {"tiny": (None, None), "small": (SMALL_TEXT, SMALL_VISION)}
        if spec[7:] not in sizes:
            raise SystemExit(f"unknown preset {spec!r}; expected random:tiny or random:small")
        tokenizer = train_tokenizer(RECIPE["vocab_size"])
        processor = build_processor(tokenizer, RECIPE["vision"]["patch_size"], RECIPE["image_size"])
        model = build_model(tokenizer, *sizes[spec[7:]], seed=0)
        return model.to(device), processor
    path = ensure_tiny_vlm(os.path.join(ROOT, ".cache")) if spec == "embedded" else spec
    if not os.path.isdir(path):
        raise SystemExit(f"--model {spec!r}: not 'embedded', 'random:<preset>' or a local folder")
    return load_model(path, device, torch.float32), load_processor(path)  # fp32: the trainers' CPU default


def one_step(specs, policy, reference, optimizer, processor, examples, suppress, device):
    """Run one training step; returns ({part: seconds}, completion tokens, prompt + completion tokens)."""
    times, r = {}, specs.rollout

    def sync():  # GPU kernels run asynchronously: wait for them before reading the clock
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    def timed(part, fn):
        sync()
        start = time.perf_counter()
        out = fn()
        sync()
        times[part] = time.perf_counter() - start
        return out

    t0 = time.perf_counter()
    decoding = Decoding(r.max_new_tokens, r.temperature, r.top_p, suppress_ids=suppress)
    rollout = timed("generation", lambda: generate(policy, processor, examples, r.group_size, decoding,
                                                   r.generation_batch_size))
    rewards = timed("reward", lambda: score_completions(
        rollout.texts, [ex["solution"] for ex in rollout.examples], rollout.completion_mask.sum(1).tolist(),
        specs.rewards.weights, specs.rewards, r.max_new_tokens))
    rollout.rewards = {k: torch.tensor(v) for k, v in rewards.items()}
    batch = select_rows(rollout, list(range(len(rollout))))  # every group kept
    batch.group_sizes = [r.group_size] * r.train_batch_prompts
    advantages = group_advantages(batch.rewards["total"], batch.group_sizes, specs.loss.scale_advantage_by_std)
    loss_mask = loss_tokens(batch, specs.loss.overlong_filtering)
    passes, micro = Passes(r.temperature), specs.optim.micro_batch_size  # fp32, no attention recording
    (logp_old, _), (ref_logp, _) = timed("log-probs", lambda: (
        batched_logprobs(policy, batch, micro, passes), batched_logprobs(reference, batch, micro, passes)))

    def update():
        targets = Targets(advantages, loss_mask, logp_old, ref_logp)
        policy_update(policy, optimizer, batch, targets, specs.loss, specs.optim, passes)

    timed("backward/optimizer", update)
    times["step"] = time.perf_counter() - t0
    times["other"] = times["step"] - sum(v for k, v in times.items() if k != "step")
    completion = int(batch.completion_mask.sum())
    return times, completion, completion + int(batch.prompt_inputs["attention_mask"].sum())


def seconds_of(fn):
    """(seconds fn() took, its result)."""
    start = time.perf_counter()
    out = fn()
    return time.perf_counter() - start, out


def rollout_arguments(p):
    """The options every generation benchmark here shares: the model and the rollout's shape."""
    p.add_argument("--model", default="embedded", help="embedded | random:tiny | random:small | checkpoint folder")
    p.add_argument("--prompts", type=int, default=8)
    p.add_argument("--group-size", type=int, default=8)
    p.add_argument("--max-new-tokens", type=int, default=24)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    rollout_arguments(p)
    p.add_argument("--micro-batch-size", type=int, default=64)
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads; 0 = torch's default")
    p.add_argument("--repeats", type=int, default=3, help="timed steps after one warm-up step")
    p.add_argument("--kl-beta", type=float, default=0.0, help="> 0 adds a reference model and its log-prob pass")
    p.add_argument("--device", default="cpu", help="cpu | cuda | cuda:N")
    args = p.parse_args()
    if min(args.prompts, args.group_size, args.max_new_tokens, args.micro_batch_size, args.repeats) < 1:
        p.error("--prompts, --group-size, --max-new-tokens, --micro-batch-size and --repeats must be >= 1")
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        device = resolve_devices(args.device, args.device)[0]
    except ValueError as e:
        raise SystemExit(str(e))
    try:
        specs = step_specs(args)
    except UserError as e:  # a value outside its constant's domain, e.g. --kl-beta -1
        p.error(str(e))
    torch.manual_seed(specs.model.seed)
    policy, processor = load(args.model, device)
    policy.train()
    reference = copy.deepcopy(policy).eval().requires_grad_(False) if args.kl_beta > 0 else None
    optimizer = torch.optim.AdamW([q for q in policy.parameters() if q.requires_grad], lr=specs.optim.learning_rate,
                                  weight_decay=specs.optim.weight_decay)
    suppress = suppressed_token_ids(processor.tokenizer)
    data = SyntheticVQA(10**6, seed=specs.model.seed, split="train")
    runs = []
    for step in range(1 + args.repeats):  # step 0 is the warm-up
        examples = [data[step * args.prompts + i] for i in range(args.prompts)]
        runs.append(one_step(specs, policy, reference, optimizer, processor, examples, suppress, device))
    runs = runs[1:]
    med = {k: statistics.median(r[0][k] for r in runs) for k in runs[0][0]}
    n_params = sum(q.numel() for q in policy.parameters()) / 1e6
    B = args.prompts * args.group_size
    print(f"\nmodel {args.model} ({n_params:.2f}M parameters, {next(policy.parameters()).dtype}) | batch "
          f"{args.prompts} prompts x {args.group_size} = {B} sequences, <= {args.max_new_tokens} new tokens, "
          f"micro-batch {args.micro_batch_size} | kl_beta {args.kl_beta} | threads {torch.get_num_threads()} | "
          f"device {device} | median of {args.repeats} step(s) after 1 warm-up")
    lp_label = "log-probs (pi_old + ref)" if reference is not None else "log-probs (pi_old)"
    labels = {"generation": "generation", "reward": "reward", "log-probs": lp_label,
              "backward/optimizer": "backward/optimizer", "other": "other (advantages, masks)", "step": "step total"}
    print(f"{'part':<26}{'seconds':>10}{'share':>9}")
    for key, label in labels.items():
        print(f"{label:<26}{med[key]:>10.3f}{100 * med[key] / med['step']:>8.1f}%")
    gen = statistics.median(r[1] for r in runs)
    trained = statistics.median(r[2] for r in runs)
    gen_rate = statistics.median(r[1] / r[0]["step"] for r in runs)
    trained_rate = statistics.median(r[2] / r[0]["step"] for r in runs)
    print(f"generated tokens/s  {gen_rate:>10.1f}   ({gen:.0f} completion tokens per step, {gen / B:.1f} per sequence)")
    print(f"trained tokens/s    {trained_rate:>10.1f}   ({trained:.0f} prompt + completion tokens per step)")


if __name__ == "__main__":
    main()
