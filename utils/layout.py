"""Where the parts of the vision-language model sit: the one place that knows its inner layout.

The model is the whole VLM, a Qwen2VLForConditionalGeneration or Qwen2_5_VLForConditionalGeneration: Qwen2-VL
and Qwen2.5-VL share this layout. `model.model` is the backbone (the vision tower `visual`, with its `blocks`
and its vision-language `merger`, and the text decoder `language_model`, with its `layers`); `model.lm_head`
maps its final hidden states to logits. The rest of the code reaches the parts through these functions, so a
model laid out differently (another family) is added here and nowhere else.

A LoRA policy (utils/lora.py) is the model wrapped by PEFT: a `PeftModel` whose `get_base_model()` is the model
above, with adapters injected into its linear layers in place. Every function here takes either; `AdaptersOff`
is such a policy seen as its base model (the reference of the KL terms: the starting weights, adapters off).
"""

import contextlib
import sys


def unwrapped(model):
    """The transformers model itself: `model`, or the model a PEFT wrapper holds."""
    return model.get_base_model() if is_lora(model) else model


def is_lora(model):
    """Whether `model` is a PEFT-wrapped (LoRA) policy. PEFT is not imported for this (a full fine-tuning run never
    loads it, ~3 s): a model can only be PEFT's if PEFT was imported."""
    peft = sys.modules.get("peft")
    return peft is not None and isinstance(model, peft.PeftModel)


def _backbone_of(module):
    """The backbone of `module`, the whole model or already its backbone (only the whole model has an lm_head)."""
    module = unwrapped(module)
    return module.model if hasattr(module, "lm_head") else module


def backbone(model):
    """The decoder with the vision tower (`model.model`): prompt inputs in, final hidden states out."""
    return unwrapped(model).model


def lm_head(model):
    """The linear map from the backbone's final hidden states to the vocabulary's logits."""
    return unwrapped(model).lm_head


def vision_tower(model_or_backbone):
    """The vision encoder (patch embedding, vision blocks, merger), of the whole model or of its backbone."""
    return _backbone_of(model_or_backbone).visual


def vision_merger(model_or_backbone):
    """The vision-language merger: the vision tower's last module, mapping patch features to text embeddings."""
    return vision_tower(model_or_backbone).merger


def vision_blocks(model_or_backbone):
    """The vision tower's transformer blocks, as a list."""
    return list(vision_tower(model_or_backbone).blocks)


def text_decoder(model_or_backbone):
    """The text decoder: token embedding (`embed_tokens`), rotary embedding (`rotary_emb`), `layers`, final `norm`."""
    return _backbone_of(model_or_backbone).language_model


def decoder_layers(model_or_backbone):
    """The text decoder's layers, as a list."""
    return list(text_decoder(model_or_backbone).layers)


def hidden_size(model):
    """The width of the text decoder's hidden states (what the backbone returns, what lm_head reads)."""
    return model.config.get_text_config().hidden_size


# ── LoRA ─────────────────────────────────────────────────────────────────────────────────────────────


def lora_targets(model, targets):
    """The names (in the unwrapped model) of the linear layers LORA_TARGET_MODULES names: "language" = every linear
    layer of the text decoder's layers, "vision" = every linear layer of the vision tower (blocks and merger), any
    other name = the text decoder's linear layers of that name (e.g. "q_proj")."""
    import torch

    model = unwrapped(model)
    decoder = {id(m) for layer in decoder_layers(model) for m in layer.modules()}
    vision = {id(m) for m in vision_tower(model).modules()}
    names = []
    for name, module in model.named_modules():
        if not isinstance(module, torch.nn.Linear):
            continue
        in_decoder = id(module) in decoder
        if (in_decoder and ("language" in targets or name.rsplit(".", 1)[-1] in targets)) or \
                (id(module) in vision and "vision" in targets):
            names.append(name)
    return names


class AdaptersOff:
    """A LoRA policy seen as its base model: `running()` switches its adapters off for the passes inside (PEFT's
    disable_adapter), so the reference of the KL terms costs no copy of the weights."""

    def __init__(self, policy):
        self.policy = policy


@contextlib.contextmanager
def running(model):
    """The module whose forward passes are `model`'s, for the span of the `with`: an AdaptersOff's policy with its
    adapters switched off; any other model as it is."""
    if isinstance(model, AdaptersOff):
        with model.policy.disable_adapter():
            yield model.policy
    else:
        yield model
