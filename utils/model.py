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
from transformers.image_utils import SizeDict

from utils import layout
from utils.distributed import current_world, full_tensor, is_distributed
from utils.lora import add_adapters, load_adapters, merged_copy, sync_merged
from utils.precision import inference_dtype

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


def load_processor(path, trust_remote_code=False, min_pixels=0, max_pixels=0):
    """Processor for a Qwen2-VL / Qwen2.5-VL checkpoint (hub name or folder), tokenizer padded on the left, with
    the image size limits of `set_pixel_limits`."""
    tokenizer = AutoTokenizer.from_pretrained(path, padding_side="left", trust_remote_code=trust_remote_code)
    image_processor = AutoImageProcessor.from_pretrained(path, backend="pil", trust_remote_code=trust_remote_code)
    set_pixel_limits(image_processor, min_pixels, max_pixels)
    chat_template = getattr(tokenizer, "chat_template", None)
    template_file = os.path.join(path, "chat_template.jinja")
    if os.path.isfile(template_file):
        with open(template_file) as f:
            chat_template = f.read()
    return ImageOnlyProcessor(image_processor=image_processor, tokenizer=tokenizer, chat_template=chat_template)


# A Qwen2.5-VL checkpoint's processor allows up to 16,384 visual tokens per image (12.8 M pixels), the first cause of
# out-of-memory reports in VLM RL; without MAX_PIXELS an image is capped at this many visual tokens.
DEFAULT_MAX_VISUAL_TOKENS = 1280


def set_pixel_limits(image_processor, min_pixels=0, max_pixels=0):
    """Bound the pixels of each resized image (Qwen's resize keeps the aspect ratio, a multiple of the visual
    token's side, and min_pixels <= height·width <= max_pixels). A visual token covers (patch·merge)² pixels,
    28² for Qwen. min_pixels 0: the processor's own; max_pixels 0: the processor's own, at most
    DEFAULT_MAX_VISUAL_TOKENS visual tokens (the embedded model's own limit is lower and stays)."""
    token_pixels = (image_processor.patch_size * image_processor.merge_size) ** 2
    own = image_processor.size
    low = min_pixels or own.shortest_edge
    high = max_pixels or min(own.longest_edge, DEFAULT_MAX_VISUAL_TOKENS * token_pixels)
    if not token_pixels <= low <= high:
        raise ValueError(f"image size limits MIN_PIXELS={low}, MAX_PIXELS={high}: need {token_pixels} (one visual "
                         f"token) <= MIN_PIXELS <= MAX_PIXELS")
    image_processor.size = SizeDict(shortest_edge=low, longest_edge=high)


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


def load_trainable_model(path, device, spec, lora, precision="fp32", checkpoint=None):
    """The model that trains, in train mode, by ModelSpec `spec` (gradient checkpointing, a frozen vision tower) and
    LoraSpec `lora`: the starting model `path`, or the run's `checkpoint` when resuming. Full fine-tuning: fp32
    weights (the master weights, whatever the compute precision: utils/precision.py), the checkpoint's; a frozen
    vision tower leaves the vision-language merger training. LoRA (utils/lora.py): the starting model as a frozen
    base, in bf16 under bf16-mixed (weights that never change need no fp32 master), with trainable fp32 adapters —
    new ones, or the checkpoint's."""
    weights = checkpoint if checkpoint and not lora.enabled else path
    model = load_model(weights, device, inference_dtype(precision) if lora.enabled else torch.float32,
                       spec.trust_remote_code)
    if spec.gradient_checkpointing:
        model.gradient_checkpointing_enable()
    if lora.enabled:
        if spec.gradient_checkpointing:  # a checkpointed layer of a frozen base needs inputs that require grad
            model.enable_input_require_grads()
        return load_adapters(model, checkpoint) if checkpoint else add_adapters(model, lora)
    if spec.freeze_vision_tower:
        layout.vision_tower(model).requires_grad_(False)
        layout.vision_merger(model).requires_grad_(True)
    return model.train()


def resolve_devices(policy_device, rollout_device):
    """("auto", "auto") -> two GPUs: cuda:0 / cuda:1; one GPU: cuda:0 for both; none: cpu for both.
    Under torchrun every model of a rank lives on the rank's device (its GPU, or the CPU), whatever the constants."""
    if is_distributed():
        device = current_world().device
        return device, device
    n_gpu = torch.cuda.device_count()
    if policy_device == "auto":
        policy_device = "cuda:0" if n_gpu else "cpu"
    if rollout_device == "auto":
        rollout_device = "cuda:1" if n_gpu >= 2 else policy_device
    for d in (policy_device, rollout_device):
        if d.startswith("cuda") and not torch.cuda.is_available():
            raise ValueError(f"device {d!r} requested but torch sees no GPU; use 'cpu' or 'auto'")
    return torch.device(policy_device), torch.device(rollout_device)


def load_reference_model(path, device, dtype, trust_remote_code=False):
    """The frozen reference model (the starting model) for the KL terms, in the inference dtype."""
    return load_model(path, device, dtype, trust_remote_code).eval().requires_grad_(False)


def make_rollout_model(policy, rollout_device, dtype):
    """The model that generates: the policy itself when it lives on the rollout device in `dtype` (fp32 training),
    else a frozen copy on `rollout_device` in `dtype` (bf16-mixed: a bf16 inference copy); for a LoRA policy always
    a copy with the merged weights (utils/lora.py). Under torchrun always a copy, made before the policy is sharded:
    each rank generates with a whole model of its own, so generation needs no communication and ranks may run
    different numbers of decode steps and rounds."""
    if layout.is_lora(policy):
        return merged_copy(policy, rollout_device, dtype)
    weights = next(policy.parameters())
    if weights.device == torch.device(rollout_device) and weights.dtype == dtype and not is_distributed():
        return policy
    rollout = copy.deepcopy(policy).to(rollout_device, dtype).eval()
    rollout.requires_grad_(False)
    return rollout


@torch.no_grad()
def sync_rollout_model(policy, rollout):
    """Copy the policy's weights into the rollout copy (after every optimizer step), rounding fp32 to the copy's
    dtype; a LoRA policy's merged weights. A sharded policy's parameters are gathered one at a time (every rank must
    call it)."""
    if rollout is policy:
        return
    if layout.is_lora(policy):
        return sync_merged(policy, rollout)
    for p_dst, p_src in zip(rollout.parameters(), policy.parameters()):
        p_dst.copy_(full_tensor(p_src), non_blocking=True)


def suppressed_token_ids(tokenizer):
    ids = [tokenizer.convert_tokens_to_ids(t) for t in VISION_SPECIAL_TOKENS]
    return [i for i in ids if i is not None and i != tokenizer.unk_token_id]
