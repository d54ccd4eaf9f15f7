"""Grounding diagnostics: blank images, the visual dependency per token (utils/grounding.py), token weights from it,
and the evaluation protocol (blank-image accuracy, k samples per question, pass@k)."""

import math

import pytest
import torch
from PIL import Image

from data.prompts import blank_image, encode_prompts, with_blank_images
from data.synthetic import SyntheticVQA
from utils.attention import token_weights
from utils.config import UserError
from utils.evaluate import evaluate, pass_at_k
from utils.generation import Decoding
from utils.grounding import (VisualDependency, blank_pixel_values, correlation, grounding_metrics, position_thirds,
                             visual_dependency)
from utils.model import load_model, load_processor, suppressed_token_ids
from utils.rollout import generate
from utils.specs import EvalSpec


@pytest.fixture(scope="module")
def tiny(tiny_vlm_path):
    return load_model(tiny_vlm_path, "cpu", torch.float32), load_processor(tiny_vlm_path)


def test_blank_image_is_the_mean_colour_and_a_blank_image_maps_to_itself():
    image = Image.new("RGB", (28, 14), (0, 0, 0))
    image.paste((200, 100, 50), (0, 0, 14, 14))  # the left half coloured
    blank = blank_image(image)
    assert blank.size == image.size and blank.mode == "RGB"
    assert set(blank.getdata()) == {(100, 50, 25)}
    assert list(blank_image(blank).getdata()) == list(blank.getdata())
    text_only = {"problem": "2+2?", "solution": "4", "image": None}
    assert with_blank_images(text_only) is text_only
    two = with_blank_images({"problem": "x", "solution": "A", "images": [image, image]})
    assert [len(set(i.getdata())) for i in two["images"]] == [1, 1]


def test_blank_pixel_values_blank_each_image_and_leave_a_blank_one_unchanged(tiny):
    _, processor = tiny
    data = SyntheticVQA(2, seed=3, split="test")
    examples = [data[0], data[1]]
    inputs = encode_prompts(processor, examples)
    blanked = blank_pixel_values(inputs)
    assert not torch.allclose(blanked["pixel_values"], inputs["pixel_values"])
    for patches in blanked["pixel_values"].split(inputs["image_grid_thw"].prod(-1).tolist()):
        per_channel = patches.view(len(patches), 3, -1)  # one value per channel over the whole image
        assert torch.allclose(per_channel, per_channel[:1, :, :1].expand_as(per_channel), atol=1e-6)
    # An image that is already blank, through the processor: blanking its patches changes nothing (this also
    # checks that the patches are laid out channel first, as blank_pixel_values assumes).
    already = encode_prompts(processor, [with_blank_images(ex) for ex in examples])
    assert torch.allclose(blank_pixel_values(already)["pixel_values"], already["pixel_values"], atol=1e-5)
    text = encode_prompts(processor, [{"problem": "2+2?", "solution": "4", "image": None}])
    assert blank_pixel_values(text) is text


def test_visual_dependency_is_zero_when_the_image_is_already_blank(tiny):
    model, processor = tiny
    data = SyntheticVQA(3, seed=7, split="test")
    examples = [data[i] for i in range(3)]
    decoding = Decoding(12, greedy=True, suppress_ids=suppressed_token_ids(processor.tokenizer))
    rollout = generate(model, processor, examples, 2, decoding)
    visual = visual_dependency(model, rollout, micro_batch_size=4)
    mask = rollout.completion_mask.bool()
    assert visual.kl.shape == mask.shape and (visual.kl[mask] >= 0).all() and visual.kl[mask].max() > 0.1
    assert (visual.kl[~mask] == 0).all() and (visual.entropy[mask] >= 0).all()
    blank = generate(model, processor, [with_blank_images(ex) for ex in examples], 2, decoding)
    assert visual_dependency(model, blank, micro_batch_size=4).kl[blank.completion_mask.bool()].abs().max() < 1e-5
    text = generate(model, processor, [{"problem": "How many?", "solution": "A", "image": None}], 1, decoding)
    assert torch.isnan(visual_dependency(model, text, 4).kl).all()  # nothing to blank: not defined
    assert grounding_metrics(visual_dependency(model, text, 4), text.completion_mask) == {}


def test_grounding_metrics_by_hand():
    kl = torch.tensor([[0.0, 1.0, 2.0, 3.0, 4.0, 5.0], [6.0, 0.5, 0.0, 0.0, 0.0, 0.0]])
    entropy = torch.tensor([[0.1, 0.2, 0.3, 0.4, 0.5, 0.6], [0.0, 0.0, 0.0, 0.0, 0.0, 0.0]])
    mask = torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 0, 0, 0, 0]])
    assert position_thirds(mask).tolist() == [[0, 0, 1, 1, 2, 2], [0, 1, 2, 2, 2, 2]]  # 3·index // length
    masses = torch.zeros(2, 2, 6, 4)
    masses[..., 1] = kl / 10  # attention on image keys proportional to the KL, in both layers
    out = grounding_metrics(VisualDependency(kl, entropy), mask, masses)
    values = [0, 1, 2, 3, 4, 5, 6, 0.5]
    assert out["grounding/visual_kl_mean"] == pytest.approx(sum(values) / 8)
    assert out["grounding/visual_kl_max"] == 6.0 and out["grounding/visual_kl_p50"] == pytest.approx(2.5)
    assert out["grounding/visual_kl_first"] == pytest.approx((0 + 1 + 6) / 3)
    assert out["grounding/visual_kl_middle"] == pytest.approx((2 + 3 + 0.5) / 3)
    assert out["grounding/visual_kl_last"] == pytest.approx(4.5)
    assert out["grounding/corr_image_attention"] == pytest.approx(1.0)
    assert out["grounding/corr_entropy"] == pytest.approx(correlation(torch.tensor(values), torch.tensor(
        [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.0, 0.0])))
    assert "grounding/corr_image_attention" not in grounding_metrics(VisualDependency(kl, entropy), mask)
    assert grounding_metrics(None, mask) == {}
    assert math.isnan(correlation(torch.ones(4), torch.arange(4.0)))  # a constant: no correlation


def test_token_weights_from_visual_dependency():
    kl = torch.tensor([[1.0, 2.0, 3.0, 9.0], [0.0, 0.0, 0.0, 0.0]])
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1]])
    w = token_weights(kl, mask, low=0.0, high=10.0, source="visual_kl")
    assert w[0].tolist() == pytest.approx([0.5, 1.0, 1.5, 0.0])  # the KL over its mean; padding 0
    assert w[1].tolist() == [1.0] * 4  # no visual dependency anywhere: every token weight 1
    clipped = token_weights(kl, mask, low=0.2, high=1.2, source="visual_kl")
    assert clipped[0, :3].mean() == pytest.approx(1.0) and clipped[0, :3].max() <= 1.2 + 1e-6
    vgr = token_weights(kl, mask, low=0.0, high=10.0)  # the VGR source inverts: low VGR = looks at the image
    assert vgr[0, 0] > vgr[0, 1] > vgr[0, 2]


def test_pass_at_k_by_hand():
    assert pass_at_k(5, 2, 1) == pytest.approx(0.4)  # = c / n
    assert pass_at_k(5, 2, 2) == pytest.approx(1 - 3 / 10)  # 1 − C(3,2)/C(5,2)
    assert pass_at_k(4, 0, 4) == 0.0 and pass_at_k(4, 1, 4) == 1.0 and pass_at_k(5, 4, 2) == 1.0
    with pytest.raises(ValueError):
        pass_at_k(3, 1, 4)


def test_evaluation_with_k_samples_and_blank_images(tiny):
    model, processor = tiny
    data = SyntheticVQA(12, seed=11, split="test")
    suppress = suppressed_token_ids(processor.tokenizer)
    spec = EvalSpec(samples=12, temperature=1.0, top_p=1.0, samples_per_prompt=4, blank_image=True)
    state = torch.get_rng_state()
    first = evaluate(model, processor, data, spec, 24, 64, suppress, seed=3)
    assert torch.equal(torch.get_rng_state(), state)  # the training's random stream is not touched
    assert first == evaluate(model, processor, data, spec, 24, 64, suppress, seed=3)  # its own generator
    assert first["eval/mean_at_k"] == first["eval/accuracy"] <= first["eval/pass_at_k"] <= 1.0
    assert first["eval/grounding_gap"] == pytest.approx(first["eval/accuracy"] - first["eval/accuracy_blank_image"])
    greedy = evaluate(model, processor, data, EvalSpec(12, 0.0, 1.0, 1, False), 24, 64, suppress)
    assert "eval/pass_at_k" not in greedy and "eval/accuracy_blank_image" not in greedy
    assert {k for k in greedy} >= {"eval/accuracy", "eval/format"}
    with pytest.raises(UserError, match="EVAL_TEMPERATURE"):
        EvalSpec(12, 0.0, 1.0, 4, False)
