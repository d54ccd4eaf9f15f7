"""Data sets shaped like the public ones (columns found automatically, several images or none per prompt), bad rows
skipped and named at load or on use, mixed batches sliced per prompt, and one DAPO run on a mixed set."""

import glob
import json
import math
import os
import subprocess
import sys
import warnings
from types import SimpleNamespace

import pytest
import torch

from data import PromptSampler, load_datasets
from data.hf import VQADataset, resolve_columns
from data.prompts import FREE_FORM_SYSTEM_PROMPT, SYSTEM_PROMPT, encode_prompts, image_token_count, user_content
from tests import vqa_fixtures
from utils.batch import concat_inputs, image_patch_counts, slice_inputs
from utils.rewards import accuracy_reward

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
THINK = "<think>reasoning</think>"


@pytest.fixture(scope="module")
def processor(tiny_vlm_path):
    from utils.model import load_processor

    return load_processor(tiny_vlm_path)


def load(source, processor=None, **options):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        data = VQADataset(source, processor=processor, max_prompt_tokens=1024, log=lambda *_: None, **options)
    return data, [str(w.message) for w in caught if "skipped" in str(w.message)]


# (builder, columns auto-detected, [(gold answer, images, right completion, wrong completion)] per row)
PUBLIC_SETS = {
    "geometry3k": (vqa_fixtures.geometry3k, ("images", "problem", "answer"), [
        ("3\\sqrt{2}", 1, "Answer: \\sqrt{18}", "Answer: 4.2"),
        ("\\frac{4}{3}", 1, "\\boxed{1.3333333333}", "\\boxed{\\frac{3}{4}}"),
        ("-12.5", 2, "Answer: -25/2", "Answer: 12.5")]),
    "clevr": (vqa_fixtures.clevr_counting, ("image", "problem", "solution"), [
        ("3", 1, "<answer> 3 </answer>", "<answer> 4 </answer>"), ("5", 1, "Answer: 5", "Answer: 3")]),
    "open_r1": (vqa_fixtures.open_r1, ("image", "problem", "solution"), [
        ("24", 1, "\\boxed{24}", "\\boxed{36}"), ("B", 1, "Answer: B", "Answer: A")]),
    "virl": (vqa_fixtures.virl, ("image", "question", "answer"), [
        ("\\frac{1}{4}", 1, "\\boxed{0.25}", "\\boxed{\\frac{1}{3}}"), ("C", 1, "Answer: C", "\\boxed{B}")]),
    "mmk12": (vqa_fixtures.mmk12, ("image", "question", "answer"), [
        ("3.5", 1, "Answer: \\frac{7}{2}", "Answer: 7"), ("A", 1, "Answer: A", "Answer: B")]),
}


@pytest.mark.parametrize("name", list(PUBLIC_SETS))
def test_public_set_shapes_load_and_grade(name, tmp_path, processor):
    build, columns, expected = PUBLIC_SETS[name]
    source = build(tmp_path / name if name in ("geometry3k", "clevr") else tmp_path / f"{name}.parquet")
    logged = []
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no row is skipped
        data = VQADataset(source, processor=processor, max_prompt_tokens=1024, log=logged.append)
    assert tuple(data.columns.values()) == columns and "column" in logged[0]  # the log says which it picked
    assert len(data) == len(expected)
    examples = [data[i] for i in range(len(data))]
    for example, (gold, n_images, right, wrong) in zip(examples, expected):
        assert example["solution"] == gold
        assert len(example.get("images", [example.get("image")])) == n_images
        assert accuracy_reward(THINK + right, example["solution"]) == 1.0
        assert accuracy_reward(THINK + wrong, example["solution"]) == 0.0
    inputs = encode_prompts(processor, examples)
    assert inputs["image_grid_thw"].shape[0] == sum(n for _, n, _, _ in expected)


def test_columns_and_system_prompt_choices(tmp_path, processor):
    assert resolve_columns(["question", "answer"]) == {"image": None, "problem": "question", "solution": "answer"}
    with pytest.raises(ValueError, match="PROBLEM_KEY"):
        resolve_columns(["image", "text", "answer"])
    with pytest.raises(ValueError, match="ANSWER_KEY='label' is not a column"):
        resolve_columns(["image", "problem", "answer"], {"solution": "label"})
    data, _ = load(vqa_fixtures.mmk12(tmp_path / "k.parquet"), processor, keys={"image": ""})
    assert data[0]["image"] is None  # IMAGE_KEY="": text only
    letter, number = data[1], data[0]
    prompts = encode_prompts(processor, [letter, number])
    decoded = processor.tokenizer.batch_decode(prompts["input_ids"])
    assert SYSTEM_PROMPT in decoded[0] and FREE_FORM_SYSTEM_PROMPT in decoded[1]
    fixed, _ = load(vqa_fixtures.mmk12(tmp_path / "k2.parquet"), processor, system_prompt="Be brief.")
    assert "Be brief." in processor.tokenizer.decode(encode_prompts(processor, [fixed[0]])["input_ids"][0])


def test_image_placeholders_place_the_images():
    assert user_content("Compare <image> with <image>.", 2) == [
        {"type": "text", "text": "Compare "}, {"type": "image"}, {"type": "text", "text": " with "},
        {"type": "image"}, {"type": "text", "text": "."}]
    assert user_content("What is it?", 2)[:2] == [{"type": "image"}] * 2  # no placeholder: images first
    with pytest.raises(ValueError, match="placeholders"):
        user_content("<image>", 2)


def test_image_token_count_follows_smart_resize(processor):
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize

    from data.prompts import image_limits

    limits = image_limits(processor)
    min_pixels, max_pixels, factor, _ = limits
    for w, h in [(56, 56), (1, 1), (300, 3), (1200, 900), (90, 20), (199, 1)]:
        rh, rw = smart_resize(h, w, factor, min_pixels, max_pixels)
        assert image_token_count(w, h, limits) == (rh // factor) * (rw // factor)
    with pytest.raises(ValueError, match="aspect ratio"):
        image_token_count(600, 2, limits)


def test_mixed_batches_slice_per_prompt(processor):
    from PIL import Image

    red, blue, green = (Image.new("RGB", size, c) for size, c in [((56, 56), "red"), ((28, 84), "blue"),
                                                                   ((84, 56), "green")])
    examples = [{"images": [red, blue], "problem": "<image> or <image>?", "solution": "A"},
                {"image": None, "problem": "1+1?", "solution": "2"},
                {"image": green, "problem": "Colour?", "solution": "B"}]
    inputs = encode_prompts(processor, examples)
    assert image_patch_counts(inputs)[0] == [2, 0, 1]
    alone = [encode_prompts(processor, [ex]) for ex in examples]
    for i, single in enumerate(alone):
        part = slice_inputs(inputs, [i])
        assert set(part) == set(single)
        for key in single:
            assert torch.equal(part[key], single[key]), (i, key)
    assert "pixel_values" not in slice_inputs(inputs, [1])
    rejoined = concat_inputs([slice_inputs(inputs, [0]), alone[1], slice_inputs(inputs, [2])])
    for key in inputs:
        assert torch.equal(rejoined[key], inputs[key]), key
    swapped = slice_inputs(inputs, [2, 0])
    assert torch.equal(swapped["image_grid_thw"], inputs["image_grid_thw"][[2, 0, 1]])


def test_bad_rows_are_skipped_and_named_at_load_or_on_use(tmp_path, processor):
    path, usable, bad, on_use = vqa_fixtures.mixed_with_bad_rows(tmp_path / "mixed")
    data, skipped = load(path, processor)
    assert data.skipped == len(skipped) == len(bad) - len(on_use) and len(data) == len(usable) + len(on_use)
    for row, reason in bad.items():
        if row not in on_use:
            assert any(f"row {row} of" in m and reason in m for m in skipped), (row, reason)
    messages = []
    sampler = PromptSampler(data, seed=0, processor=processor, warn=messages.append)
    drawn = sampler.next(len(usable))
    assert sampler.skipped == len(on_use) == len(messages)
    for row in on_use:
        assert any(f"row {row} of" in m and bad[row] in m for m in messages), row
    # The first pass draws every usable row once, odd modes and formats included, as RGB.
    rows = [json.loads(line) for line in open(path)]
    assert sorted(ex["problem"] + ex["solution"] for ex in drawn) == sorted(
        rows[i]["problem"] + data[data.valid.index(i)]["solution"] for i in usable)
    assert all(image.mode == "RGB" for ex in drawn for image in ex.get("images", [ex.get("image")]) if image)
    assert sum(len(ex.get("images", [])) == 2 for ex in drawn) == 1
    assert sum(ex.get("image", 1) is None for ex in drawn) == 2  # text only
    encode_prompts(processor, drawn)  # one mixed batch of every usable row


def test_a_data_set_whose_rows_all_fail_on_use_is_an_error(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps({"problem": "p", "solution": "\\frac{"}) + "\n")
    data, _ = load(str(path))
    with pytest.raises(ValueError, match="no usable example"):
        PromptSampler(data, seed=0, warn=lambda *_: None).next(1)


def test_missing_data_files_are_named(make_specs, specs):
    # The DataSpec names a missing file when it is built (from the constants) ...
    with pytest.raises(ValueError, match="DATASET='nope.jsonl': no such file"):
        make_specs(DATASET="nope.jsonl")
    with pytest.raises(ValueError, match="EVAL_DATASET='nope.jsonl': no such file"):
        make_specs(EVAL_DATASET="nope.jsonl")
    # ... and load_datasets does too, for any object with the DataSpec's attributes.
    spec = SimpleNamespace(**{**vars(specs.data), "dataset": "nope.jsonl", "eval_dataset": ""})
    with pytest.raises(ValueError, match="DATASET='nope.jsonl': no such file"):
        load_datasets(spec, seed=0, log=lambda *_: None)


def test_dapo_trains_on_a_mixed_set_with_bad_rows(tmp_path):
    """Two DAPO steps on text-only, one- and two-image prompts with letter, word and math answers; every bad row
    is named, every usable row is trained on, the attention metrics count the text-only prompts."""
    path, usable, bad, _ = vqa_fixtures.mixed_with_bad_rows(tmp_path / "mixed", long_words=1200)
    runs = tmp_path / "runs"
    args = [sys.executable, os.path.join(ROOT, "dapo.py"), f"--DATASET={path}", f"--EVAL_DATASET={path}",
            "--TOTAL_STEPS=2", "--EVAL_EVERY=2", "--EVAL_SAMPLES=4", f"--TRAIN_BATCH_PROMPTS={len(usable)}",
            "--GROUP_SIZE=2", "--DYNAMIC_SAMPLING=False", "--MAX_NEW_TOKENS=8", "--OVERLONG_BUFFER=2",
            "--LOG_EVERY=1", "--LOG_SAMPLES=2", "--PLOT_EVERY=0", "--COMPARE_WITH=", f"--RUNS_DIR={runs}"]
    done = subprocess.run(args, cwd=ROOT, env=dict(os.environ, TQDM_DISABLE="1"), capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    (run_dir,) = glob.glob(os.path.join(runs, "dapo_*"))
    terminal = open(os.path.join(run_dir, "run_terminal.md")).read()
    for row, reason in bad.items():
        assert f"row {row} of {path} (train)" in terminal, (row, reason)
    rows = [json.loads(line) for line in open(os.path.join(run_dir, "metrics.jsonl"))]
    assert [r["step"] for r in rows] == [0, 1, 2]
    text_only = 2  # two text-only rows, G = 2 completions each
    assert rows[1]["dapo/train_groups"] == len(usable)  # the first pass: every usable row once
    assert rows[1]["attention/text_only_count"] == text_only * 2
    assert math.isfinite(rows[1]["attention/all/mdi"]) and math.isfinite(rows[2]["reward/total/mean"])
    assert 0 <= rows[2]["eval/accuracy"] <= 1
    results = open(os.path.join(run_dir, "rollout_results.md")).read()
    assert results.count("## Step ") == 2
