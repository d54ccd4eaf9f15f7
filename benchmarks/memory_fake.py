"""Peak GPU memory of one DAPO update at the exact Qwen2.5-VL-3B and -7B shapes, measured without a GPU: the model
runs under PyTorch's fake tensors (shapes and dtypes, no storage) and PyTorch's memory trackers count what the
step holds (`MemTracker`; `FSDPMemTracker` with a fake process group of N ranks for torchrun + FSDP2).

    python benchmarks/memory_fake.py                 # the table: 3B and 7B, full fine-tuning and LoRA rank 64
    python benchmarks/memory_fake.py --model 7b --ranks 2 --checkpointing on     # one setting

What runs under fake tensors, as the trainer runs it (bf16-mixed, utils/precision.py): the policy built from the
exact configuration (fp32 master weights; with --lora-rank a bf16 base and fp32 adapters, utils/lora.py), sharded
with utils.distributed.shard_model for N ranks, and one micro-batch of the update: 8 sequences of a 1,100-token
prompt and 4,096 completion tokens through the text decoder, the chunked log-probs and entropy of the completion
(utils.logprobs.logprobs_from_hidden), backward, and the AdamW step. Measured: the peak of the step per GPU by
kind (weights, gradients, AdamW state, activations and temporaries).

What does not run under fake tensors, added from the plan (benchmarks/real_shape.py --plan) and marked:
* the vision tower: Qwen2.5-VL's vision attention splits its windows by lengths read from a tensor
  (`cu_seqlens.tolist()`), which fake tensors cannot give; its activations for the prompt's image (1,280 visual
  tokens: the prompt embeddings stand in for them) come from the measured bytes per patch;
* generation: the decode loop reads sampled tokens; the bf16 generation copy is 2 bytes per parameter and its KV
  cache is counted for the 64 sequences of a step (8 prompts × 8) at prompt + completion length.
Each setting runs in its own process.
"""

import argparse
import json
import os
import subprocess
import sys

os.environ["HF_HUB_OFFLINE"] = "1"
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import torch  # noqa: E402

GiB = 2**30


def measure(args):
    """One setting, in this process: returns {kind: bytes} at the step's peak, and the parameter count."""
    import torch.distributed as dist
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.distributed._tools.fsdp2_mem_tracker import FSDPMemTracker
    from torch.distributed._tools.mem_tracker import MemTracker
    from torch.testing._internal.distributed.fake_pg import FakeStore
    from transformers import Qwen2_5_VLForConditionalGeneration

    from real_shape import SPECIAL_TOKENS, model_config  # noqa: E402  (benchmarks/ is on the path)
    from utils import layout
    from utils.distributed import shard_model
    from utils.logprobs import logprobs_from_hidden
    from utils.lora import add_adapters
    from utils.precision import autocast
    from utils.specs import LoraSpec

    if args.ranks > 1:
        import torch.distributed.fsdp._fully_shard._fully_shard as fsdp

        dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=args.ranks)
        mesh = dist.device_mesh.init_device_mesh("cpu", (args.ranks,))  # made from real tensors, outside fake mode,
        fsdp._init_default_mesh = lambda *_, **__: mesh  # for utils.distributed.shard_model's fully_shard calls
    config = model_config(args.model, {t: 151643 + i for i, t in enumerate(SPECIAL_TOKENS)}, args.layers,
                          args.vision_depth)
    b, prompt, completion = args.micro_batch_size, args.prompt_tokens, args.completion_tokens
    dtype = torch.bfloat16 if args.lora_rank else torch.float32  # LoRA: the frozen base in bf16 (load_trainable_model)
    with torch.device("meta"):  # built on the meta device (PEFT's dtype casts work there), then made fake below
        model = Qwen2_5_VLForConditionalGeneration._from_config(config, attn_implementation="sdpa", dtype=dtype)
    parameters = sum(p.numel() for p in model.parameters())
    vision_blocks = 0
    if args.ranks > 1:  # FSDPMemTracker fails on units that never run: the vision blocks leave, counted by the table
        vision_blocks = sum(p.numel() for block in layout.vision_blocks(model) for p in block.parameters())
        layout.vision_tower(model).blocks = torch.nn.ModuleList()
    if args.checkpointing == "on":
        model.gradient_checkpointing_enable()
    if args.lora_rank:
        model = add_adapters(model, LoraSpec(args.lora_rank, 2.0 * args.lora_rank, 0.0, "language"))
    skip_frozen_hooks()
    with FakeTensorMode() as mode:
        fake(model, mode)
        model = shard_model(model.train(), "bf16-mixed")
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-6)
        for param in optimizer.param_groups[0]["params"]:  # a later step's: AdamW's moments exist during backward
            optimizer.state[param] = {"step": torch.tensor(0.0), "exp_avg": torch.zeros_like(param),
                                      "exp_avg_sq": torch.zeros_like(param)}
        tracker = FSDPMemTracker(layout.backbone(model), optimizer) if args.ranks > 1 else MemTracker()
        if args.ranks == 1:
            tracker.track_external(model, optimizer)
        with tracker:
            embeds = torch.randn(b, prompt + completion, config.text_config.hidden_size, requires_grad=True)
            ids = torch.randint(0, 1000, (b, completion))
            with autocast("bf16-mixed", "cpu"):
                positions = torch.arange(prompt + completion).expand(3, b, -1)  # text positions: the same memory
                hidden = layout.backbone(model)(inputs_embeds=embeds, position_ids=positions, use_cache=False)
                logp, entropy = logprobs_from_hidden(model, hidden.last_hidden_state[:, -(completion + 1):], ids,
                                                     with_entropy=True)
            (-(logp.mean() + 1e-3 * entropy.mean())).backward()
            for param in optimizer.param_groups[0]["params"]:  # the vision tower's gradients, as a full step has them
                if param.grad is None:
                    param.grad = torch.zeros_like(param)
            optimizer.step()
            optimizer.zero_grad()
        peak = tracker.get_tracker_snapshot("peak")
        local = lambda p: p.to_local() if hasattr(p, "to_local") else p  # noqa: E731  (a rank's shard)
        states = {"weights": sum(local(p).nbytes for p in model.parameters()),
                  "trained": sum(local(p).numel() for p in model.parameters() if p.requires_grad)}
    (by_kind,) = peak.values()
    by_kind = {str(k).split(".")[-1]: v for k, v in by_kind.items()}
    tracked = lambda *names: sum(v for k, v in by_kind.items() if any(n in k for n in names))  # noqa: E731
    return {"parameters": parameters, "vision_blocks": vision_blocks, **states, "peak": by_kind["Total"],
            "tracked_weights": tracked("PARAM", "BUFFER"),
            "activations": by_kind["Total"] - tracked("PARAM", "BUFFER", "GRAD", "OPT")}


class _NoHandle:
    def remove(self):
        pass


def skip_frozen_hooks():
    """MemTracker hooks every parameter's gradient, and a frozen one (LoRA's base) refuses hooks: skip those."""
    for method in ("register_hook", "register_post_accumulate_grad_hook"):
        original = getattr(torch.Tensor, method)
        setattr(torch.Tensor, method, lambda self, hook, _original=original:
                _original(self, hook) if self.requires_grad else _NoHandle())


def fake(model, mode):
    """Replace every parameter and buffer of `model` (on the meta device) by a fake CPU tensor of its shape and dtype,
    in place; tied weights stay tied."""
    made = {}
    for module in model.modules():
        for store in (module._parameters, module._buffers):
            for name, tensor in store.items():
                if tensor is None:
                    continue
                if id(tensor) not in made:
                    value = mode.from_tensor(torch.empty(tensor.shape, dtype=tensor.dtype, device="meta")).to("cpu")
                    if isinstance(tensor, torch.nn.Parameter):
                        value = torch.nn.Parameter(value, requires_grad=tensor.requires_grad)
                    made[id(tensor)] = value
                store[name] = made[id(tensor)]


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", choices=["3b", "7b"])
    p.add_argument("--ranks", type=int, default=1)
    p.add_argument("--lora-rank", type=int, default=0)
    p.add_argument("--checkpointing", choices=["on", "off"], default="on")
    p.add_argument("--micro-batch-size", type=int, default=8)
    p.add_argument("--prompt-tokens", type=int, default=1100)
    p.add_argument("--completion-tokens", type=int, default=4096)
    p.add_argument("--layers", type=int, help="text decoder layers (default: the model's); a cut-down check")
    p.add_argument("--vision-depth", type=int, help="vision blocks (default: 32)")
    args = p.parse_args()
    if args.model:
        print(json.dumps(measure(args)))
        return
    table(args)


SETTINGS = [  # (GPUs, LoRA rank, gradient checkpointing)
    (1, 0, "on"), (1, 0, "off"), (2, 0, "on"), (8, 0, "on"), (1, 64, "on"), (1, 64, "off")]


def run_setting(args, model, ranks, lora_rank, checkpointing):
    command = [sys.executable, os.path.abspath(__file__), "--model", model, "--ranks", str(ranks), "--lora-rank",
               str(lora_rank), "--checkpointing", checkpointing, "--micro-batch-size", str(args.micro_batch_size),
               "--prompt-tokens", str(args.prompt_tokens), "--completion-tokens", str(args.completion_tokens)]
    done = subprocess.run(command, capture_output=True, text=True, cwd=os.path.dirname(os.path.abspath(__file__)))
    if done.returncode:
        raise SystemExit(f"{' '.join(command[1:])} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def vision_estimate(micro_batch_size, checkpointing, whole_rows, image_tokens=1280):
    """The vision tower's activations for the micro-batch's images (the plan's measured bytes per patch, marked *):
    every row runs its image when rows run whole (checkpointing, FSDP), else a group's rows share one prompt pass."""
    from real_shape import VISION, VISION_SAVED_PER_PATCH_BLOCK

    patches = 4 * image_tokens * (micro_batch_size if whole_rows else 1)
    if checkpointing == "on":
        return VISION["depth"] * patches * 2 * VISION["hidden_size"] + patches * VISION_SAVED_PER_PATCH_BLOCK
    return VISION["depth"] * patches * VISION_SAVED_PER_PATCH_BLOCK


def kv_cache_bytes(model, sequences, tokens):
    from real_shape import PRESETS

    t = PRESETS[model]["text"]
    head_dim = t["hidden_size"] // t["num_attention_heads"]
    return sequences * tokens * t["num_hidden_layers"] * 2 * t["num_key_value_heads"] * head_dim * 2  # K, V in bf16


def table(args):
    tokens = args.prompt_tokens + args.completion_tokens
    print(f"One DAPO update per GPU, bf16-mixed, micro-batch of {args.micro_batch_size} sequences of "
          f"{args.prompt_tokens} prompt + {args.completion_tokens} completion tokens; GiB. Measured under fake "
          f"tensors: weights, gradients, AdamW state, text activations + temporaries (the update's peak). Added, "
          f"marked *: the vision tower's activations (plan), the bf16 generation copy and the KV cache of 64 "
          f"sequences (counted).", flush=True)
    print("| model | setting | weights | gradients | AdamW | text act. + temp. | vision act.* | generation copy* "
          "| KV cache* | **peak per GPU** |\n|---|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for model in ("3b", "7b"):
        for ranks, lora_rank, checkpointing in SETTINGS:
            r = run_setting(args, model, ranks, lora_rank, checkpointing)
            blocks = r["vision_blocks"] / ranks  # FSDP: the vision blocks' fp32 shards, counted (marked)
            weights, grads, adam = r["weights"] + 4 * blocks, 4 * (r["trained"] + blocks), 8 * (r["trained"] + blocks)
            act = r["activations"]  # measured: activations, temporaries, collectives' buffers at the step's peak
            vision = vision_estimate(args.micro_batch_size, checkpointing, checkpointing == "on" or ranks > 1)
            copy = 2 * r["parameters"]
            kv = kv_cache_bytes(model, -(-64 // ranks), tokens)
            # the tracker's peak, plus weights it does not see (modules that never ran: the vision tower) and the
            # marked parts
            update = r["peak"] + (r["weights"] - r["tracked_weights"]) + 16 * blocks + vision + copy
            generation = weights + adam + copy + kv
            setting = (f"LoRA rank {lora_rank}" if lora_rank else "full") + f", {ranks} GPU{'s' if ranks > 1 else ''}" \
                + f", checkpointing {checkpointing}" + (" (vision blocks' states counted*)" if blocks else "")
            cells = [weights, grads, adam, act, vision, copy, kv]
            print(f"| {model.upper()} | {setting} | " + " | ".join(f"{c / GiB:.1f}" for c in cells)
                  + f" | **{max(update, generation) / GiB:.1f}** |", flush=True)
            if ranks > 1 and not lora_rank and checkpointing == "on":  # OFFLOAD_OPTIMIZER: an upper bound
                offloaded = max(update - weights - adam, copy + kv)
                cells = ["CPU", f"≤ {grads / GiB:.1f}", "CPU"] + [f"{c / GiB:.1f}" for c in (act, vision, copy, kv)]
                print(f"| {model.upper()} | {setting.split(' (')[0]}, OFFLOAD_OPTIMIZER | " + " | ".join(cells)
                      + f" | **≤ {offloaded / GiB:.1f}** |", flush=True)
    print("weights, gradients, AdamW: counted from the model's (sharded) parameters; text act. + temp.: measured, at "
          "the update's peak. Peak per GPU = the larger of the update (the measured peak + the vision activations + "
          "the generation copy) and generation (weights + AdamW state + generation copy + KV cache). OFFLOAD_OPTIMIZER: "
          "the sharded weights and AdamW state live in CPU memory, so the update's peak less them; the gradient "
          "shards go to CPU memory unit by unit as the backward reduces them, but are still counted (an upper "
          "bound). An 80 GB GPU holds ~74.5 GiB.")


if __name__ == "__main__":
    main()
