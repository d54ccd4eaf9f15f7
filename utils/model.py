"""Loading a VLM and its processor, placing models on devices, and keeping the rollout copy in sync."""

import copy
import os

import torch
from transformers import (
    AutoConfig,
    AutoImageProcessor,
    AutoTokenizer,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2_5_VLProcessor,
    Qwen2VLForConditionalGeneration,
)

EMBEDDED_MODEL = "embedded-tiny-vlm"
# Tokens a policy must never sample: they only ever come from the processor.
VISION_SPECIAL_TOKENS = ("<|image_pad|>", "<|video_pad|>", "<|vision_start|>", "<|vision_end|>", "<|vision_pad|>")


class ImageOnlyProcessor(Qwen2_5_VLProcessor):
    """The Qwen2/2.5-VL processor without its video processor.

    The stock processor insists on a video processor, which needs torchvision; images do not.
    Saving and loading work as for the stock processor (`save_pretrained` / `from_pretrained`).
    """

    def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
        super().__init__(image_processor, tokenizer, video_processor=None, chat_template=chat_template, **kwargs)


def load_processor(path, trust_remote_code=False):
    """Processor for a Qwen2-VL / Qwen2.5-VL checkpoint (hub name or folder), tokenizer padded on the left."""
    tokenizer = AutoTokenizer.from_pretrained(path, padding_side="left", trust_remote_code=trust_remote_code)
    image_processor = AutoImageProcessor.from_pretrained(path, backend="pil", trust_remote_code=trust_remote_code)
    chat_template = getattr(tokenizer, "chat_template", None)
    template_file = os.path.join(path, "chat_template.jinja")
    if os.path.isfile(template_file):
        with open(template_file) as f:
            chat_template = f.read()
    return ImageOnlyProcessor(image_processor=image_processor, tokenizer=tokenizer, chat_template=chat_template)


def model_class_for(path, trust_remote_code=False):
    model_type = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code).model_type
    classes = {"qwen2_5_vl": Qwen2_5_VLForConditionalGeneration, "qwen2_vl": Qwen2VLForConditionalGeneration}
    if model_type not in classes:
        raise ValueError(
            f"{path} is a {model_type!r} model; this codebase supports Qwen2-VL and Qwen2.5-VL checkpoints "
            f"({', '.join(classes)})"
        )
    return classes[model_type]


def load_model(path, device, dtype, trust_remote_code=False):
    cls = model_class_for(path, trust_remote_code)
    model = cls.from_pretrained(path, dtype=dtype, attn_implementation="sdpa", trust_remote_code=trust_remote_code)
    return model.to(device)


def load_trainable_model(path, device, trust_remote_code=False, gradient_checkpointing=False,
                         freeze_vision_tower=False):
    """load_model in the device's default dtype, in train mode; optionally with gradient checkpointing, and with
    the vision tower frozen (its vision-language merger still trains)."""
    model = load_model(path, device, default_dtype(device), trust_remote_code)
    if gradient_checkpointing:
        model.gradient_checkpointing_enable()
    if freeze_vision_tower:
        model.model.visual.requires_grad_(False)
        model.model.visual.merger.requires_grad_(True)
    return model.train()


def resolve_devices(policy_device, rollout_device):
    """("auto", "auto") -> two GPUs: cuda:0 / cuda:1; one GPU: cuda:0 for both; none: cpu for both."""
    n_gpu = torch.cuda.device_count()
    if policy_device == "auto":
        policy_device = "cuda:0" if n_gpu else "cpu"
    if rollout_device == "auto":
        rollout_device = "cuda:1" if n_gpu >= 2 else policy_device
    for d in (policy_device, rollout_device):
        if d.startswith("cuda") and not torch.cuda.is_available():
            raise ValueError(f"device {d!r} requested but torch sees no GPU; use 'cpu' or 'auto'")
    return torch.device(policy_device), torch.device(rollout_device)


def default_dtype(device):
    """bf16 on GPU, fp32 on CPU (SPEC §2)."""
    return torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32


def make_rollout_model(policy, rollout_device):
    """The model that generates: the policy itself when it lives on the rollout device, else a frozen copy."""
    if next(policy.parameters()).device == torch.device(rollout_device):
        return policy
    rollout = copy.deepcopy(policy).to(rollout_device).eval()
    rollout.requires_grad_(False)
    return rollout


@torch.no_grad()
def sync_rollout_model(policy, rollout):
    """Copy the policy's weights into the rollout copy (after every optimizer step)."""
    if rollout is policy:
        return
    for p_dst, p_src in zip(rollout.parameters(), policy.parameters()):
        p_dst.copy_(p_src, non_blocking=True)


def suppressed_token_ids(tokenizer):
    ids = [tokenizer.convert_tokens_to_ids(t) for t in VISION_SPECIAL_TOKENS]
    return [i for i in ids if i is not None and i != tokenizer.unk_token_id]
