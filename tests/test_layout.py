"""utils/layout.py on tiny random Qwen2.5-VL and Qwen2-VL models: each function returns the very submodule it
names, from the whole model and from its backbone alike."""

import pytest
import torch
from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration

from utils import layout
from utils.tiny_vlm import SPECIAL_TOKENS, build_model

HIDDEN, LAYERS, VISION_DEPTH = 32, 3, 2


class SpecialTokenIds:
    """Stands in for a tokenizer in build_model, which only needs the special tokens' ids and a vocabulary size."""

    def __len__(self):
        return 64

    def convert_tokens_to_ids(self, token):
        return SPECIAL_TOKENS.index(token)


def tiny_qwen2_5_vl():
    text = {"hidden_size": HIDDEN, "intermediate_size": 64, "num_hidden_layers": LAYERS, "num_attention_heads": 2,
            "num_key_value_heads": 1, "mrope_section": [2, 3, 3]}  # mrope sums to head_dim/2 = 8
    vision = {"depth": VISION_DEPTH, "hidden_size": 32, "intermediate_size": 64, "num_heads": 2, "patch_size": 7}
    return build_model(SpecialTokenIds(), text, vision, seed=0)


def tiny_qwen2_vl():
    ids = {t: i for i, t in enumerate(SPECIAL_TOKENS)}
    config = Qwen2VLConfig(
        text_config={"vocab_size": 64, "hidden_size": HIDDEN, "intermediate_size": 64, "num_hidden_layers": LAYERS,
                     "num_attention_heads": 2, "num_key_value_heads": 1,
                     "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]}},
        vision_config={"depth": VISION_DEPTH, "embed_dim": 32, "hidden_size": HIDDEN, "num_heads": 2, "patch_size": 7},
        image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"],
    )
    torch.manual_seed(0)
    return Qwen2VLForConditionalGeneration(config)


@pytest.fixture(scope="module", params=["Qwen2.5-VL", "Qwen2-VL"])
def model(request):
    return tiny_qwen2_5_vl() if request.param == "Qwen2.5-VL" else tiny_qwen2_vl()


def same_modules(got, expected):
    return isinstance(got, list) and len(got) == len(expected) and all(a is b for a, b in zip(got, expected))


def test_model_parts(model):
    assert layout.backbone(model) is model.model
    assert layout.lm_head(model) is model.lm_head
    assert layout.hidden_size(model) == HIDDEN == layout.lm_head(model).in_features


@pytest.mark.parametrize("part", ["model", "backbone"])
def test_vision_and_decoder_parts_from_the_model_or_its_backbone(model, part):
    module = model if part == "model" else layout.backbone(model)
    assert layout.vision_tower(module) is model.model.visual
    assert layout.vision_merger(module) is model.model.visual.merger
    assert same_modules(layout.vision_blocks(module), list(model.model.visual.blocks))
    assert same_modules(layout.decoder_layers(module), list(model.model.language_model.layers))
    assert len(layout.vision_blocks(module)) == VISION_DEPTH
    assert len(layout.decoder_layers(module)) == LAYERS == model.config.get_text_config().num_hidden_layers
