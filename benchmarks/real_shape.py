"""Real model shapes: one DAPO step of a random-init Qwen2.5-VL-3B (or 7B), peak memory by part; or the memory plan.

(a) One full DAPO training step in bf16-mixed, made of the trainer's calls (dapo.py): the fp32 policy and its bf16
    generation copy (utils.model.make_rollout_model), utils.rollout.generate, utils.logprobs.batched_logprobs of
    π_old with the attention bucket masses (Passes.image_token_id), utils.update.policy_update (Passes precision
    "bf16-mixed") with AdamW on the fp32 policy, then the copy's refresh (sync_rollout_model); the settings are
    dapo.py's specs (utils/specs.py) with this script's shape. Printed per part (model load:
    fp32 policy + bf16 copy; generation; log-probs + attention; update incl. AdamW state): seconds and peak memory,
    and generated / trained tokens per second, with gradient checkpointing off and on. Each setting runs in its
    own subprocess. GPU: torch.cuda.max_memory_allocated after reset_peak_memory_stats, per part, and a sync before
    every clock read. CPU: peak RSS per part (freed heap handed back with malloc_trim, the kernel's high-water mark
    VmHWM reset with /proc/self/clear_refs, glibc malloc with a fixed mmap threshold so that RSS follows the live
    tensors; as in attention_overhead.py).
    The model is the exact Qwen2.5-VL configuration (below; nothing is downloaded), randomly initialised, with the
    embedded tiny tokenizer (its special-token ids; the model keeps the full vocabulary) and a Qwen image
    processor (patch 14, merge 2, CLIP normalisation; MAX_PIXELS via utils.model.set_pixel_limits). The prompts are
    synthetic images resized to --image-size with filler text up to --prompt-tokens. Unlike the trainer: one
    generation round, every group kept, rewards drawn at random (a random model answers nothing right, and all-zero
    rewards would give zero advantages), and every completion token trained on (a random model never stops, so
    overlong filtering would mask all of them; the compute is the same either way).
(b) --plan: no model is built. The parameter counts of the exact 3B and 7B configurations (built on the meta
    device) give the memory of bf16-mixed training at the default shapes, for the two-GPU layout and for one GPU;
    --plan --fsdp: per GPU under torchrun + FSDP2 (utils/distributed.py) for 3B, 7B and 32B on 1, 2, 4, 8 GPUs.

  python benchmarks/real_shape.py --plan
  python benchmarks/real_shape.py --plan --fsdp
  python benchmarks/real_shape.py --device cuda:0                        # full 3B, one GPU, default shapes
  python benchmarks/real_shape.py --device cuda:0 --model 7b --micro-batch-size 2
  python benchmarks/real_shape.py --device cuda:0 --model 7b --lora-rank 64       # LoRA: bf16 base, fp32 adapters
  python benchmarks/real_shape.py --layers 2 --vision-depth 2 --image-size 224x224 --prompt-tokens 0 \\
      --max-new-tokens 32 --prompts 2 --group-size 4 --micro-batch-size 4  # CPU cut-down (~10 GB RAM)
"""

import argparse
import ctypes
import dataclasses
import gc
import json
import math
import os
import subprocess
import sys
import tempfile
import time

os.environ["TQDM_DISABLE"] = "1"  # must precede the first tqdm import: tqdm reads TQDM_* once, at import
os.environ["HF_HUB_OFFLINE"] = "1"  # nothing is downloaded
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import torch  # noqa: E402
from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration  # noqa: E402
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil  # noqa: E402

import dapo as D  # noqa: E402  (the trainer's constants)
from data.prompts import encode_prompts  # noqa: E402
from data.synthetic import SyntheticVQA  # noqa: E402
from utils import flops, layout  # noqa: E402
from utils.config import constants_of  # noqa: E402
from utils.generation import Decoding  # noqa: E402
from utils.logprobs import LOGITS_BUDGET_BYTES, Passes, batched_logprobs  # noqa: E402
from utils.lora import add_adapters  # noqa: E402
from utils.model import (  # noqa: E402
    ImageOnlyProcessor, make_rollout_model, set_pixel_limits, suppressed_token_ids, sync_rollout_model)
from utils.rl import group_advantages  # noqa: E402
from utils.rollout import generate, select_rows  # noqa: E402
from utils.specs import LoraSpec, build_specs  # noqa: E402
from utils.tiny_vlm import CHAT_TEMPLATE, SPECIAL_TOKENS, train_tokenizer  # noqa: E402
from utils.update import Targets, policy_update  # noqa: E402

# Qwen2.5-VL-3B/7B-Instruct's config.json, as written there (head_dim 128 for both: mrope 16+24+24 = 64 = 128/2).
VISION = dict(depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16, patch_size=14, spatial_merge_size=2,
              temporal_patch_size=2, window_size=112, fullatt_block_indexes=[7, 15, 23, 31], hidden_act="silu")
PRESETS = {
    "3b": dict(text=dict(hidden_size=2048, intermediate_size=11008, num_hidden_layers=36, num_attention_heads=16,
                         num_key_value_heads=2, vocab_size=151936), tie_word_embeddings=True),
    "7b": dict(text=dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
                         num_key_value_heads=4, vocab_size=152064), tie_word_embeddings=False),
    "32b": dict(text=dict(hidden_size=5120, intermediate_size=27648, num_hidden_layers=64, num_attention_heads=40,
                          num_key_value_heads=8, vocab_size=152064), tie_word_embeddings=False),
}
ROPE = {"rope_type": "default", "rope_theta": 1e6, "mrope_section": [16, 24, 24]}
CLIP_MEAN, CLIP_STD = [0.48145466, 0.4578275, 0.40821073], [0.26862954, 0.26130258, 0.27577711]  # Qwen's processor
FILLER = "the shapes are red. "  # words of the tiny tokenizer's own vocabulary, to lengthen prompts
GiB = 2**30

# Activation bytes saved for backward under bf16 autocast with fp32 weights, measured on this CPU with
# torch.autograd.graph.saved_tensors_hooks (one vs two layers, 256 vs 512 tokens; exact 3B widths, sdpa):
TEXT_SAVED_PER_TOKEN_LAYER = 150_600  # bytes per token per decoder layer (hidden 2048, MLP 11008) = 73.5 × hidden
VISION_SAVED_PER_PATCH_BLOCK = 155_144  # bytes per patch per vision block (hidden 1280, MLP 3420)
# plus a bf16 copy of every weight (autocast casts each fp32 weight once and the graph saves the copy): 2 B/param.


def model_config(preset, ids, layers=None, vision_depth=None):
    """Qwen2_5_VLConfig of `preset` ("3b" | "7b" | "32b"); layers / vision_depth cut the depth (a CPU-sized run)."""
    p = PRESETS[preset]
    text = dict(p["text"], rms_norm_eps=1e-6, hidden_act="silu", max_position_embeddings=128000,
                rope_parameters=ROPE, bos_token_id=ids["<|endoftext|>"], eos_token_id=ids["<|im_end|>"],
                pad_token_id=ids["<|endoftext|>"])
    vision = dict(VISION, out_hidden_size=p["text"]["hidden_size"])
    if layers:
        text["num_hidden_layers"] = layers
    if vision_depth:  # keep the full-attention blocks that remain, else make the last block one
        vision["depth"] = vision_depth
        vision["fullatt_block_indexes"] = [i for i in VISION["fullatt_block_indexes"] if i < vision_depth] or [
            vision_depth - 1]
    return Qwen2_5_VLConfig(
        text_config=text, vision_config=vision, tie_word_embeddings=p["tie_word_embeddings"],
        image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"],
    )


def build_model(config, device):
    """Random-init fp32 Qwen2.5-VL, built directly on `device` (a 7B model never passes through CPU memory)."""
    torch.manual_seed(D.SEED)
    with torch.device(device):
        model = Qwen2_5_VLForConditionalGeneration._from_config(config, attn_implementation="sdpa")
    ids = config.text_config
    model.generation_config.eos_token_id = [ids.eos_token_id, ids.pad_token_id]
    model.generation_config.pad_token_id = ids.pad_token_id
    return model


def build_processor(tokenizer, max_pixels):
    image_processor = Qwen2VLImageProcessorPil(patch_size=14, merge_size=2, temporal_patch_size=2,
                                               image_mean=CLIP_MEAN, image_std=CLIP_STD,
                                               size={"shortest_edge": 56 * 56, "longest_edge": 28 * 28 * 16384})
    set_pixel_limits(image_processor, 0, max_pixels)
    return ImageOnlyProcessor(image_processor=image_processor, tokenizer=tokenizer, chat_template=CHAT_TEMPLATE)


def make_examples(processor, n, width, height, prompt_tokens):
    """n synthetic examples, images resized to width × height, problems lengthened with filler text until the
    tokenised prompt (image tokens included) has at least prompt_tokens tokens."""
    data = SyntheticVQA(n, seed=D.SEED, split="train")
    examples = [dict(data[i]) for i in range(n)]
    for ex in examples:
        ex["image"] = ex["image"].resize((width, height))
    width_now = encode_prompts(processor, examples[:1])["input_ids"].shape[1]
    per_filler = len(processor.tokenizer(FILLER)["input_ids"])
    reps = max(0, math.ceil((prompt_tokens - width_now) / per_filler))
    for ex in examples:
        ex["problem"] = ("Notes: " + FILLER * reps + "\n" if reps else "") + ex["problem"]
    return examples


# ── (a) one measured step, in a subprocess per setting ─────────────────────────────────────────────────────────
def proc_status_kb(field):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


class PartMeter:
    """Seconds, model FLOPs (utils/flops.py) and peak memory of each part: GPU allocated bytes, or CPU resident bytes
    (RSS)."""

    def __init__(self, device):
        self.device, self.parts = device, {}

    def sync(self):  # GPU kernels run asynchronously: wait for them before reading the clock or memory
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def current(self):
        if self.device.type == "cuda":
            return torch.cuda.memory_allocated(self.device)
        return proc_status_kb("VmRSS") * 1024

    def reset_peak(self):
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
            return
        ctypes.CDLL("libc.so.6").malloc_trim(0)  # hand freed heap back to the OS
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # peak RSS := current RSS

    def peak(self):
        if self.device.type == "cuda":
            return torch.cuda.max_memory_allocated(self.device)
        return proc_status_kb("VmHWM") * 1024

    def run(self, part, fn):
        self.sync()
        self.reset_peak()
        start_bytes, start = self.current(), time.perf_counter()
        record = {"start": start_bytes}
        self.parts[part] = record
        flops.take()  # the FLOPs counted from here are this part's
        try:
            out = fn()
        except torch.OutOfMemoryError:
            record.update(oom=True, peak=self.peak())
            raise
        self.sync()
        record.update(seconds=time.perf_counter() - start, peak=self.peak(), end=self.current(), flops=flops.take())
        return out


def step_specs(args):
    """dapo.py's specs (utils/specs.py, from its constants) with this step's shape: the batch, the length limit, the
    micro-batch; one epoch of one mini-batch, no KL (no reference model). Fields are replaced one by one, so a
    cut-down shape the trainer would refuse as a whole can still be measured."""
    s = build_specs(constants_of(vars(D)))
    return dataclasses.replace(
        s, rollout=dataclasses.replace(s.rollout, train_batch_prompts=args.prompts, group_size=args.group_size,
                                       max_new_tokens=args.max_new_tokens),
        loss=dataclasses.replace(s.loss, kl_beta=0.0),
        optim=dataclasses.replace(s.optim, epochs=1, mini_batches=1, micro_batch_size=args.micro_batch_size))


def child(args):
    """Hidden entry point: one step with gradient checkpointing args.child ("on" | "off"); JSON to --child-out."""
    specs = step_specs(args)
    device = torch.device(args.device)
    meter = PartMeter(device)
    tokenizer = train_tokenizer(512)
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}
    processor = build_processor(tokenizer, args.max_pixels)
    width, height = map(int, args.image_size.split("x"))
    examples = make_examples(processor, args.prompts, width, height, args.prompt_tokens)
    config = model_config(args.model, ids, args.layers, args.vision_depth)
    result = {"parts": meter.parts, "device": str(device)}

    def load():
        policy = build_model(config, device)
        if args.lora_rank:
            policy.to(torch.bfloat16)  # the frozen base in bf16, as utils.model.load_trainable_model holds it
        if args.child == "on":
            policy.gradient_checkpointing_enable()
            if args.lora_rank:
                policy.enable_input_require_grads()
        if args.lora_rank:  # fp32 adapters on every linear layer of the text decoder (LORA_TARGET_MODULES default)
            policy = add_adapters(policy, LoraSpec(args.lora_rank, 2.0 * args.lora_rank, 0.0, "language"))
        policy.train()
        rollout_model = make_rollout_model(policy, device, torch.bfloat16)  # the bf16 (LoRA: merged) generation copy
        optimizer = torch.optim.AdamW([p for p in policy.parameters() if p.requires_grad], lr=1e-6,
                                      weight_decay=specs.optim.weight_decay)  # state allocated at the first step
        return policy, rollout_model, optimizer

    try:
        policy, rollout_model, optimizer = meter.run("load", load)
        result["parameters"] = sum(p.numel() for p in policy.parameters())
        r, suppress, image_id = specs.rollout, suppressed_token_ids(tokenizer), policy.config.image_token_id
        decoding = Decoding(r.max_new_tokens, r.temperature, r.top_p, suppress_ids=suppress)
        rollout = meter.run("generation", lambda: generate(
            rollout_model, processor, examples, r.group_size, decoding, r.generation_batch_size))
        batch = select_rows(rollout, list(range(len(rollout))))  # every group kept
        batch.group_sizes = [r.group_size] * r.train_batch_prompts
        rewards = torch.rand(len(batch), generator=torch.Generator().manual_seed(specs.model.seed))
        advantages = group_advantages(rewards, batch.group_sizes, specs.loss.scale_advantage_by_std)  # [B]
        loss_mask = batch.completion_mask.float()  # [B, L]
        passes = Passes(r.temperature, "bf16-mixed", image_id)  # the attention masses are recorded with π_old
        logp_old, _masses = meter.run("logprobs", lambda: batched_logprobs(rollout_model, batch,
                                                                           specs.optim.micro_batch_size, passes))

        def update():
            stats = policy_update(policy, optimizer, batch, Targets(advantages, loss_mask, logp_old), specs.loss,
                                  specs.optim, passes)
            sync_rollout_model(policy, rollout_model)
            return stats

        stats = meter.run("update", update)
        result.update(updates=stats["updates"], completion_tokens=int(batch.completion_mask.sum()),
                      prompt_tokens=int(batch.prompt_inputs["attention_mask"].sum()),
                      prompt_width=batch.prompt_inputs["input_ids"].shape[1],
                      image_tokens=int((batch.prompt_inputs["input_ids"] == image_id).sum()) // len(batch))
    except torch.OutOfMemoryError as e:
        result["oom"] = str(e).split("\n")[0]
    result["peak_flops"] = flops.peak_flops(device, "bf16-mixed")  # the GPU's dense bf16 peak (or this CPU's)
    with open(args.child_out, "w") as f:
        json.dump(result, f)


def run_child(args, setting, workdir):
    out = os.path.join(workdir, setting)
    cmd = [sys.executable, os.path.abspath(__file__), "--child", setting, "--child-out", out]
    for name in ("model", "device", "layers", "vision_depth", "prompts", "group_size", "max_new_tokens",
                 "image_size", "prompt_tokens", "max_pixels", "micro_batch_size", "threads", "lora_rank"):
        value = getattr(args, name)
        if value is not None:
            cmd += [f"--{name.replace('_', '-')}", str(value)]
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="131072")  # large tensors mmapped: RSS follows the live tensors
    done = subprocess.run(cmd, capture_output=True, text=True, check=False, env=env)
    if done.returncode != 0:
        raise SystemExit(f"the run with gradient checkpointing {setting} failed ({done.returncode}):\n"
                         f"{done.stderr[-4000:]}")
    with open(out) as f:
        return json.load(f)


def report(args, results):
    first = next(iter(results.values()))
    kind = "GPU allocated" if args.device.startswith("cuda") else "CPU RSS"
    depth = (f"{args.layers or 'all'} text layers, vision depth {args.vision_depth or VISION['depth']}")
    print(f"\nQwen2.5-VL-{args.model.upper()} shape, random init, {depth}: {first.get('parameters', 0) / 1e9:.3f}B "
          f"parameters | {args.prompts} prompts x {args.group_size} = {args.prompts * args.group_size} sequences, "
          f"prompt {first.get('prompt_width', '?')} tokens ({first.get('image_tokens', '?')} image tokens), "
          f"<= {args.max_new_tokens} new tokens, micro-batch {args.micro_batch_size} | bf16-mixed | {first['device']}"
          f" | threads {torch.get_num_threads()}")
    load = f"bf16 base + LoRA rank {args.lora_rank} + merged bf16 copy" if args.lora_rank else \
        "fp32 policy + bf16 copy"
    labels = {"load": f"model load ({load})", "generation": "generation (bf16 copy)",
              "logprobs": "log-probs + attention (bf16 copy)", "update": "update incl. AdamW state"}
    print(f"peak memory ({kind}) per part: held at the start of the part -> peak during it, GiB; seconds")
    print(f"{'part':<38}" + "".join(f"{'checkpointing ' + s:>32}" for s in results))
    for part, label in labels.items():
        cells = []
        for r in results.values():
            rec = r["parts"].get(part)
            if rec is None:
                cells.append("-")
            elif rec.get("oom"):
                cells.append(f"OOM (peak {rec['peak'] / GiB:.2f})")
            else:
                cells.append(f"{rec['start'] / GiB:6.2f} -> {rec['peak'] / GiB:6.2f}  {rec['seconds']:7.1f} s")
        print(f"{label:<38}" + "".join(f"{c:>32}" for c in cells))
    for setting, r in results.items():
        if "oom" in r:
            print(f"checkpointing {setting}: out of memory ({r['oom']})")
            continue
        p = r["parts"]
        trained = r["prompt_tokens"] + r["completion_tokens"]
        print(f"checkpointing {setting}: generated {r['completion_tokens'] / p['generation']['seconds']:,.1f} tokens/s "
              f"({r['completion_tokens']} tokens), trained {trained / p['update']['seconds']:,.1f} tokens/s "
              f"({trained} prompt + completion tokens; update part), step "
              f"{sum(p[k]['seconds'] for k in ('generation', 'logprobs', 'update')):.1f} s")


# ── (b) the plan: memory from parameter counts ─────────────────────────────────────────────────────────────────
def meta_model(preset):
    ids = {t: 151643 + i for i, t in enumerate(SPECIAL_TOKENS)}  # any ids in the vocabulary: counts do not change
    with torch.device("meta"):
        return Qwen2_5_VLForConditionalGeneration._from_config(model_config(preset, ids))


def parameter_counts(preset):
    """(total, vision tower incl. merger) parameters of the exact configuration, counted on the meta device."""
    model = meta_model(preset)
    total = sum(p.numel() for p in model.parameters())
    return total, sum(p.numel() for p in layout.vision_tower(model).parameters())


def fsdp_plan(args):
    """Per-GPU memory of bf16-mixed training under torchrun + FSDP2 (utils/distributed.py: one unit per vision
    block and text layer, the backbone + lm_head as the root), from the meta-device parameter counts."""
    width, height = map(int, args.image_size.split("x"))
    patches = (width // 14) * (height // 14)
    seq, n_seq = args.prompt_tokens + args.max_new_tokens, args.prompts * args.group_size
    ranks = (1, 2, 4, 8)
    print(f"bf16-mixed under torchrun + FSDP2, per GPU, GiB: the global batch of {n_seq} sequences (~{seq} tokens, "
          f"{patches} patches each) split over the GPUs, micro-batch min({args.micro_batch_size}, sequences per "
          f"GPU), gradient checkpointing on. An 80 GB GPU holds ~74.5 GiB.")
    print("| model | parameters | " + " | ".join(f"{r} GPU{'s' if r > 1 else ''}: DAPO (GRPO)" for r in ranks)
          + " |\n|---|---:|" + "---:|" * len(ranks))
    for preset in ("3b", "7b", "32b"):
        model = meta_model(preset)
        n = sum(p.numel() for p in model.parameters())
        units = layout.vision_blocks(model) + layout.decoder_layers(model)
        unit_params = [sum(p.numel() for p in u.parameters()) for u in units]
        root = n - sum(unit_params)  # embedding, lm_head (untied), norms, patch embedding, merger
        t = PRESETS[preset]["text"]
        h, layers, kv = t["hidden_size"], t["num_hidden_layers"], t["num_key_value_heads"]
        scale = h / 2048
        cells = []
        for world in ranks:
            per_rank = -(-n_seq // world)
            mb = min(args.micro_batch_size, per_rank)
            text_tokens, vision_patches = mb * seq, mb * patches
            states = 16 * n / world  # fp32 weights, gradients, AdamW m and v: sharded
            # Gathered in bf16 while they run: the root for the whole forward and backward, two units at a time
            # (the one running and the one prefetched), and one unit's unsharded fp32 gradient before its
            # reduce-scatter. FSDP's bf16 gather replaces autocast's weight copies.
            gathered = 2 * root + 2 * 2 * max(unit_params) + 4 * max(unit_params)
            act = (layers * text_tokens * 4 * h + VISION["depth"] * vision_patches * 2 * VISION["hidden_size"]
                   + max(text_tokens * TEXT_SAVED_PER_TOKEN_LAYER * scale,
                         vision_patches * VISION_SAVED_PER_PATCH_BLOCK))
            logits = 2 * LOGITS_BUDGET_BYTES  # chunk temporaries (the lm_head gradient is one buffer, in the states)
            copy = 2 * n  # each rank's whole bf16 generation copy
            kv_cache = per_rank * seq * layers * 2 * kv * 128 * 2
            dapo = states + gathered + act + logits + copy + kv_cache
            grpo = dapo + 2 * n  # + the bf16 reference
            fits = lambda b: "" if b / GiB <= 74.5 else " ✗"  # noqa: E731
            cells.append(f"{dapo / GiB:.0f}{fits(dapo)} ({grpo / GiB:.0f}{fits(grpo)})")
        print(f"| {preset.upper()} | {n / 1e9:.2f}B | " + " | ".join(cells) + " |")
    print("✗: over 74.5 GiB. Per GPU = 16 B/parameter / GPUs (fp32 weights, gradients, AdamW; sharded) + the "
          "whole bf16 generation copy (2 B/parameter, not sharded) + its KV cache for the GPU's sequences + the "
          "gathered units + activations with checkpointing + chunked log-probs; GRPO adds the whole bf16 reference.")


def plan(args):
    width, height = map(int, args.image_size.split("x"))
    patches = (width // 14) * (height // 14)
    image_tokens = patches // 4
    mb, seq = args.micro_batch_size, args.prompt_tokens + args.max_new_tokens
    n_seq = args.prompts * args.group_size
    print(f"bf16-mixed memory at the default shapes: {args.prompts} prompts x {args.group_size} = {n_seq} sequences "
          f"of ~{args.prompt_tokens} prompt tokens ({image_tokens} image tokens, {patches} patches) + "
          f"{args.max_new_tokens} completion tokens, micro-batch {mb}. GiB.")
    rows = {}
    for preset in ("3b", "7b"):
        t = PRESETS[preset]["text"]
        n, n_vision = parameter_counts(preset)
        h, layers, kv = t["hidden_size"], t["num_hidden_layers"], t["num_key_value_heads"]
        scale = h / 2048  # the measured per-token bytes are for the 3B width; 7B's layers are wider
        text_tokens, vision_patches = mb * seq, mb * patches
        no_ckpt = (layers * text_tokens * TEXT_SAVED_PER_TOKEN_LAYER * scale
                   + VISION["depth"] * vision_patches * VISION_SAVED_PER_PATCH_BLOCK + 2 * n)
        ckpt = (layers * text_tokens * 4 * h + VISION["depth"] * vision_patches * 2 * VISION["hidden_size"]
                + max(2 * n, text_tokens * TEXT_SAVED_PER_TOKEN_LAYER * scale,  # forward: autocast's weight
                      vision_patches * VISION_SAVED_PER_PATCH_BLOCK))  # copies; backward: one layer recomputed
        logits = 2 * LOGITS_BUDGET_BYTES  # chunk temporaries; the lm_head gradient is one buffer, among the gradients
        kv_cache = n_seq * seq * layers * 2 * kv * 128 * 2  # generation: K and V, bf16, head_dim 128
        rows[preset] = dict(n=n, n_vision=n_vision, weights=4 * n, grads=4 * n, adam=8 * n, rollout=2 * n,
                            reference=2 * n, kv=kv_cache, act=no_ckpt, act_ckpt=ckpt, logits=logits)
    names = [("parameters (vision tower incl. merger)", None), ("fp32 master weights (GPU 0)", "weights"),
             ("fp32 gradients (GPU 0)", "grads"), ("AdamW state, 2 x fp32 (GPU 0)", "adam"),
             ("bf16 rollout copy (GPU 1)", "rollout"), ("bf16 reference, GRPO only (GPU 1)", "reference"),
             ("generation KV cache, bf16 (GPU 1)", "kv"),
             (f"activations, micro-batch {mb}, no checkpointing (GPU 0)", "act"),
             (f"activations, micro-batch {mb}, gradient checkpointing (GPU 0)", "act_ckpt"),
             ("chunked fp32 log-probs (GPU 0)", "logits")]
    print(f"| {'':<62} | {'3B':>14} | {'7B':>14} |\n|{'-' * 64}|{'-' * 16}:|{'-' * 16}:|")
    for label, key in names:
        if key is None:
            cells = [f"{r['n'] / 1e9:.2f}B ({r['n_vision'] / 1e9:.2f}B)" for r in rows.values()]
        else:
            cells = [f"{r[key] / GiB:.1f}" for r in rows.values()]
        print(f"| {label:<62} | {cells[0]:>14} | {cells[1]:>14} |")
    for label, keys in (("GPU 0 (DAPO; gradient checkpointing)", ("weights", "grads", "adam", "act_ckpt", "logits")),
                        ("GPU 1 (GRPO: + reference)", ("rollout", "reference", "kv")),
                        ("one GPU, DAPO, gradient checkpointing", ("weights", "grads", "adam", "rollout", "kv",
                                                                   "act_ckpt", "logits")),
                        ("one GPU, DAPO, no checkpointing", ("weights", "grads", "adam", "rollout", "kv", "act",
                                                             "logits"))):
        cells = [f"**{sum(r[k] for k in keys) / GiB:.1f}**" for r in rows.values()]
        print(f"| **{label}**{'':<{58 - len(label)}} | {cells[0]:>14} | {cells[1]:>14} |")
    print("activations: no checkpointing = layers x tokens x bytes saved per token and layer (measured: "
          f"{TEXT_SAVED_PER_TOKEN_LAYER:,} B at hidden 2048, scaled by width) + vision blocks x patches x "
          f"{VISION_SAVED_PER_PATCH_BLOCK:,} B + 2 B/parameter (autocast's bf16 weight copies); checkpointing = "
          "each layer's input (text fp32 4 x hidden, vision bf16 2 x 1280 per token / patch) + the larger of autocast's bf16 weight copies (held until the forward ends) and one layer recomputed.")


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--plan", action="store_true", help="print the memory plan for 3B and 7B; no model is built")
    p.add_argument("--fsdp", action="store_true", help="with --plan: per GPU under torchrun + FSDP2, 1-8 GPUs")
    p.add_argument("--model", default="3b", choices=sorted(PRESETS))
    p.add_argument("--device", default="cpu", help="cpu | cuda:N (one device holds everything)")
    p.add_argument("--layers", type=int, help="text decoder layers (default: the model's); cut down on a CPU")
    p.add_argument("--vision-depth", type=int, help="vision blocks (default: 32); cut down on a CPU")
    p.add_argument("--prompts", type=int, default=D.TRAIN_BATCH_PROMPTS)
    p.add_argument("--group-size", type=int, default=D.GROUP_SIZE)
    p.add_argument("--max-new-tokens", type=int, default=1024)
    p.add_argument("--image-size", default="1120x896", help="WIDTHxHEIGHT pixels; 1120x896 = 1,280 visual tokens")
    p.add_argument("--prompt-tokens", type=int, default=1400, help="prompt length (image included) at least")
    p.add_argument("--max-pixels", type=int, default=1280 * 28 * 28, help="MAX_PIXELS of the image processor")
    p.add_argument("--micro-batch-size", type=int, default=8)
    p.add_argument("--checkpointing", choices=["off", "on", "both"], default="both", help="gradient checkpointing")
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads; 0 = torch's default")
    p.add_argument("--lora-rank", type=int, default=0, help="LoRA adapters of this rank instead of full fine-tuning")
    p.add_argument("--json", help="also write the measured parts to this file")
    p.add_argument("--child", choices=["on", "off"], help=argparse.SUPPRESS)
    p.add_argument("--child-out", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.plan:
        return fsdp_plan(args) if args.fsdp else plan(args)
    if args.child:
        return child(args)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit(f"--device {args.device}: torch sees no GPU; use --device cpu with a cut-down depth")
    settings = ("off", "on") if args.checkpointing == "both" else (args.checkpointing,)
    with tempfile.TemporaryDirectory() as workdir:
        results = {}
        for s in settings:
            start = time.time()
            results[s] = run_child(args, s, workdir)
            print(f"  gradient checkpointing {s}: measured in {time.time() - start:.0f}s", flush=True)
    report(args, results)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
