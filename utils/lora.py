"""LoRA: low-rank adapters that train instead of the model's weights (Hu et al. 2021), with Hugging Face PEFT.

LORA_RANK > 0 wraps the policy in PEFT's `PeftModel`: each linear layer LORA_TARGET_MODULES names gets an adapter,
W x + (LORA_ALPHA / LORA_RANK)·B A x, with A [r, in] random and B [out, r] zero at the start (so the run starts at
the starting model), and only A and B train. What follows from it:

* the reference of the KL terms is the policy with its adapters switched off (utils.layout.AdaptersOff): no second
  copy of the weights;
* under bf16-mixed the frozen base is held in bf16 (it never changes, so it needs no fp32 master); the adapters and
  their AdamW state are fp32;
* the model that generates is a plain transformers model holding the merged weights W + (α/r)·B A, refreshed after
  each optimizer step (`sync_merged`). Decoding through unmerged adapters runs two more matrix products per
  adapted layer and token: benchmarks/lora_generation.py measured it at 1.36x the merged copy's time on the tiny
  VLM (rank 16) and 1.55x on an 8-layer 512-wide model (rank 64), while a refresh took 2.7 and 44 ms (2 CPU cores);
  the copy costs the memory of one more model in the inference dtype;
* checkpoints hold the adapters in PEFT's format (adapter_config.json, adapter_model.safetensors:
  `PeftModel.from_pretrained(base, checkpoint)` loads them), and `python -m utils.lora CHECKPOINT OUT` writes the
  merged model, a folder transformers loads on its own.
"""

import argparse
import contextlib
import copy
import json
import os
import warnings

import torch

from utils import layout
from utils.distributed import full_tensor

ADAPTER_NAME = "default"  # PEFT's name of the one adapter


def add_adapters(model, lora):
    """`model` wrapped by PEFT with the adapters `lora` (a LoraSpec) asks for, in train mode: the base's weights are
    frozen (whatever their dtype), the adapters fp32 and trainable."""
    from peft import LoraConfig, get_peft_model

    names = layout.lora_targets(model, lora.targets())
    unmatched = [t for t in lora.targets() if t not in ("language", "vision") and
                 not any(n.rsplit(".", 1)[-1] == t for n in names)]
    if unmatched or not names:
        raise ValueError(f"LORA_TARGET_MODULES={','.join(lora.targets())!r}: no linear layer of the text decoder is "
                         f"named {', '.join(map(repr, unmatched))} (names: 'language', 'vision', or a text decoder "
                         f"layer's, e.g. 'q_proj')")
    config = LoraConfig(r=lora.rank, lora_alpha=lora.alpha, lora_dropout=lora.dropout, target_modules=names)
    with quiet():
        return get_peft_model(model, config, autocast_adapter_dtype=True).train()


def load_adapters(model, checkpoint):
    """`model` with the trainable adapters saved in `checkpoint` (a PEFT adapter folder)."""
    from peft import PeftModel

    with quiet():
        return PeftModel.from_pretrained(model, checkpoint, is_trainable=True, autocast_adapter_dtype=True).train()


@contextlib.contextmanager
def quiet():
    """PEFT 0.21 asks transformers 5 a deprecated question (`is_gradient_checkpointing`): hide that warning."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        yield


def lora_layers(policy):
    """(name in the unwrapped model, layer) of every adapted linear layer of a LoRA policy."""
    from peft.tuners.lora import LoraLayer

    base = layout.unwrapped(policy)
    return [(name, m) for name, m in base.named_modules() if isinstance(m, LoraLayer)]


def merged_weight(layer):
    """W + (α/r)·B A of an adapted linear layer, in the base weight's dtype (every rank must call it under
    torchrun: the sharded pieces are gathered)."""
    a, b = full_tensor(layer.lora_A[ADAPTER_NAME].weight), full_tensor(layer.lora_B[ADAPTER_NAME].weight)
    weight = full_tensor(layer.base_layer.weight)
    return (weight.float() + (b.float() @ a.float()) * layer.scaling[ADAPTER_NAME]).to(weight.dtype)


def merged_copy(policy, device, dtype):
    """A plain transformers model with the LoRA policy's merged weights, on `device` in `dtype`, frozen: the model
    that generates. Made before the policy is sharded."""
    model = copy.deepcopy(policy).merge_and_unload().to(device, dtype).eval()
    return model.requires_grad_(False)


@torch.no_grad()
def sync_merged(policy, rollout):
    """Write the policy's merged weights into its generation copy (after every optimizer step): only the adapted
    layers change."""
    modules = dict(rollout.named_modules())
    for name, layer in lora_layers(policy):
        modules[name].weight.copy_(merged_weight(layer), non_blocking=True)


def write_merged(checkpoint, out):
    """Load the base model a LoRA checkpoint was trained from, add its adapters, merge them and save the result
    (weights, config, processor) to `out`: a folder transformers loads without PEFT. Returns the number of merged
    layers."""
    from utils.model import load_model, load_processor

    with open(os.path.join(checkpoint, "adapter_config.json")) as f:
        base_path = json.load(f)["base_model_name_or_path"]
    policy = load_adapters(load_model(base_path, "cpu", torch.float32), checkpoint)
    merged = len(lora_layers(policy))
    policy.merge_and_unload().save_pretrained(out, safe_serialization=True)
    load_processor(checkpoint).save_pretrained(out)
    print(f"{out}: {base_path} with the adapters of {checkpoint} merged into {merged} layers")
    return merged


def main(argv=None):
    parser = argparse.ArgumentParser(description="Write the merged model of a LoRA checkpoint: a folder that "
                                                 "transformers loads on its own (e.g. as MODEL_NAME_OR_PATH).")
    parser.add_argument("checkpoint", help="a LoRA run's checkpoint folder, <run>/checkpoints/step_N")
    parser.add_argument("out", help="the folder to write")
    args = parser.parse_args(argv)
    if not os.path.isfile(os.path.join(args.checkpoint, "adapter_config.json")):
        raise SystemExit(f"{args.checkpoint}: no adapter_config.json; not the checkpoint of a LoRA run "
                         f"(a full fine-tuning checkpoint is already a model folder)")
    write_merged(args.checkpoint, args.out)


if __name__ == "__main__":
    main()
