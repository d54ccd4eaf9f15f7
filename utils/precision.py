"""Numerics of training (SPEC §2): fp32 master weights with bf16 compute, or plain fp32.

"bf16-mixed": the trained parameters, their gradients and the AdamW state are fp32; forward and backward run
    under `torch.autocast(dtype=bfloat16)`, so matrix products are bf16. The reference model and the generation
    copy are bf16 inference copies, refreshed from the fp32 policy. Log-probs, entropy, the loss and the critic's
    values come from fp32 logits / hidden states. Pure-bf16 AdamW is not offered: a bf16 weight near 0.02 cannot
    represent a step of 1e-6 (ten AdamW steps at lr 1e-6 changed 1.9% of a bf16 weight's entries, 99.99% in fp32).
"fp32": everything in fp32 (the CPU default).
"auto": bf16-mixed on a GPU, fp32 on a CPU.

    precision = resolve_precision("auto", policy_device)
    with autocast(precision, policy_device):
        loss = ...  # forward passes of a trainable model
    loss.backward()
"""

import contextlib

import torch

PRECISIONS = ("auto", "bf16-mixed", "fp32")


def resolve_precision(precision, device):
    """"auto" -> "bf16-mixed" on a GPU, "fp32" on a CPU; the other values as they are."""
    if precision not in PRECISIONS:
        raise ValueError(f"PRECISION={precision!r}: expected one of {', '.join(map(repr, PRECISIONS))}")
    if precision == "auto":
        return "bf16-mixed" if torch.device(device).type == "cuda" else "fp32"
    return precision


def autocast(precision, device):
    """The context the forward passes of a trainable (fp32) model run in: bf16 autocast, or nothing for fp32."""
    if precision == "bf16-mixed":
        return torch.autocast(device_type=torch.device(device).type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def no_autocast(device):
    """A context with autocast off: for the fp32 computations inside an autocast region (logits, values)."""
    return torch.autocast(device_type=torch.device(device).type, enabled=False)


def inference_dtype(precision):
    """dtype of the models that only infer (reference, generation copy): bf16 in bf16-mixed, else fp32."""
    return torch.bfloat16 if precision == "bf16-mixed" else torch.float32
