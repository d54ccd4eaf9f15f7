"""Where the parts of the vision-language model sit: the one place that knows its inner layout.

The model is the whole VLM, a Qwen2VLForConditionalGeneration or Qwen2_5_VLForConditionalGeneration: Qwen2-VL
and Qwen2.5-VL share this layout. `model.model` is the backbone (the vision tower `visual`, with its `blocks`
and its vision-language `merger`, and the text decoder `language_model`, with its `layers`); `model.lm_head`
maps its final hidden states to logits. The rest of the code reaches the parts through these functions, so a
model laid out differently (a PEFT-wrapped one, another family) is added here and nowhere else.
"""


def _backbone_of(module):
    """The backbone of `module`, the whole model or already its backbone (only the whole model has an lm_head)."""
    return module.model if hasattr(module, "lm_head") else module


def backbone(model):
    """The decoder with the vision tower (`model.model`): prompt inputs in, final hidden states out."""
    return model.model


def lm_head(model):
    """The linear map from the backbone's final hidden states to the vocabulary's logits."""
    return model.lm_head


def vision_tower(model_or_backbone):
    """The vision encoder (patch embedding, vision blocks, merger), of the whole model or of its backbone."""
    return _backbone_of(model_or_backbone).visual


def vision_merger(model_or_backbone):
    """The vision-language merger: the vision tower's last module, mapping patch features to text embeddings."""
    return vision_tower(model_or_backbone).merger


def vision_blocks(model_or_backbone):
    """The vision tower's transformer blocks, as a list."""
    return list(vision_tower(model_or_backbone).blocks)


def decoder_layers(model_or_backbone):
    """The text decoder's layers, as a list."""
    return list(_backbone_of(model_or_backbone).language_model.layers)


def hidden_size(model):
    """The width of the text decoder's hidden states (what the backbone returns, what lm_head reads)."""
    return model.config.get_text_config().hidden_size
