"""The synthetic task and the Hugging Face style loader, bad rows included."""

import json
import warnings

import pytest
from PIL import Image

from data import PromptSampler, load_datasets
from data.answers import gold_answer
from data.hf import VQADataset
from data.synthetic import LETTERS, SyntheticVQA


def test_synthetic_is_deterministic_and_splits_differ():
    a, b = SyntheticVQA(20, seed=3), SyntheticVQA(20, seed=3)
    test = SyntheticVQA(20, seed=3, split="test")
    for i in range(20):
        assert a[i]["problem"] == b[i]["problem"] and a[i]["solution"] == b[i]["solution"]
        assert a[i]["image"].tobytes() == b[i]["image"].tobytes()
    train_images = {a[i]["image"].tobytes() for i in range(20)}
    assert not train_images & {test[i]["image"].tobytes() for i in range(20)}


def test_synthetic_answer_is_consistent_with_the_problem():
    data = SyntheticVQA(60, seed=1, shuffle_options=True, max_objects=3)
    for i in range(len(data)):
        ex = data[i]
        options = dict(line.split(". ", 1) for line in ex["problem"].splitlines()[1:])
        assert list(options) == list(LETTERS)
        assert options[ex["solution"]] == ex["answer"]
        if ex["kind"] == "count":
            assert 1 <= int(ex["answer"]) <= 3
            # Count the coloured blobs: every object has its own cell of the 2x2 grid.
            image, half = ex["image"], ex["image"].size[0] // 2
            cells = [image.crop((x, y, x + half, y + half)) for y in (0, half) for x in (0, half)]
            assert sum(c.convert("L").getextrema()[0] < 250 for c in cells) == int(ex["answer"])
    assert {data[i]["kind"] for i in range(3)} == {"colour", "shape", "count"}


def test_synthetic_rejects_bad_knobs():
    with pytest.raises(ValueError, match="question kinds"):
        SyntheticVQA(4, kinds=("texture",))
    with pytest.raises(ValueError, match="max_objects"):
        SyntheticVQA(4, max_objects=7)[0]


def test_prompt_sampler_covers_the_data_before_repeating():
    sampler = PromptSampler(SyntheticVQA(10, seed=0), seed=0)
    first = [ex["problem"].encode() + ex["image"].tobytes() for ex in sampler.next(10)]
    assert len(set(first)) == 10
    assert len(set(first) | {ex["problem"].encode() + ex["image"].tobytes() for ex in sampler.next(10)}) == 10


@pytest.mark.parametrize("raw, parsed", [("B", "B"), ("<answer> C </answer>", "C"), ("Answer: D", "D"), ("  ", None),
                                         ("Answer: (B)", "B"), ("B.", "B"), (3, "3"), ("The answer is B", None)])
def test_gold_answer(raw, parsed):
    assert gold_answer(raw) == parsed


def write_bad_jsonl(folder):
    Image.new("RGB", (32, 32), "red").save(folder / "ok.png")
    (folder / "broken.png").write_bytes(b"this is not a png")
    rows = [
        {"image": "ok.png", "problem": "What colour?\nA. red\nB. blue", "solution": "A"},
        {"image": "missing.png", "problem": "p", "solution": "A"},
        {"image": "broken.png", "problem": "p", "solution": "A"},
        {"image": "ok.png", "problem": "", "solution": "A"},
        {"image": "ok.png", "problem": "p", "solution": "<answer></answer>"},
        {"image": "ok.png", "problem": "Second good row", "solution": "<answer>B</answer>"},
    ]
    lines = [json.dumps(r) for r in rows[:3]] + ["{not json", "[1, 2]"] + [json.dumps(r) for r in rows[3:]]
    path = folder / "data.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


def test_bad_rows_are_skipped_counted_and_named(tmp_path):
    path = write_bad_jsonl(tmp_path)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        data = VQADataset(str(path), log=lambda *_: None)
    assert len(data) == 2 and data.skipped == 6
    messages = " | ".join(str(w.message) for w in caught)
    for row, reason in [(1, "could not be decoded"), (2, "could not be decoded"), (3, "not valid JSON"),
                        (4, "not a JSON object"), (5, "'problem'"), (6, "no answer")]:
        assert f"row {row} of" in messages and reason in messages
    assert data[0]["solution"] == "A" and data[1]["solution"] == "B"
    assert data[0]["image"].size == (32, 32)


def test_a_data_set_without_usable_rows_is_an_error(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps({"image": "nope.png", "problem": "p", "solution": "A"}) + "\n")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(ValueError, match="no usable rows"):
            VQADataset(str(path))


def test_save_to_disk_folder_and_parquet(tmp_path, make_specs):
    import datasets

    images = [Image.new("RGB", (28, 28), c) for c in ("red", "blue", "green")]
    ds = datasets.Dataset.from_dict({"image": images, "problem": ["p1", "p2", "p3"], "solution": ["A", "B", ""]})
    ds = ds.cast_column("image", datasets.Image())
    ds.save_to_disk(str(tmp_path / "folder"))
    ds.to_parquet(str(tmp_path / "data.parquet"))
    spec = make_specs(DATASET=str(tmp_path / "folder"), EVAL_DATASET=str(tmp_path / "data.parquet")).data
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        from_folder, from_parquet = load_datasets(spec, seed=0, log=lambda *_: None)
    for data in (from_folder, from_parquet):
        assert len(data) == 2 and data.skipped == 1
        assert data[1]["solution"] == "B" and data[1]["image"].getpixel((0, 0)) == (0, 0, 255)
    assert sum("row 2 of" in str(w.message) for w in caught) == 2
    # A single-split source cannot also be its own held-out set.
    with pytest.raises(ValueError, match="EVAL_DATASET"):
        load_datasets(make_specs(DATASET=str(tmp_path / "data.parquet"), EVAL_DATASET="").data, seed=0,
                      log=lambda *_: None)


def test_relative_image_paths_in_parquet_are_relative_to_the_file(tmp_path, monkeypatch):
    import datasets

    (tmp_path / "sub").mkdir()
    Image.new("RGB", (28, 28), "blue").save(tmp_path / "sub" / "img.png")
    datasets.Dataset.from_dict({"image": ["img.png"], "problem": ["p"], "solution": ["A"]}).to_parquet(
        str(tmp_path / "sub" / "data.parquet"))
    monkeypatch.chdir(tmp_path)
    data = VQADataset("sub/data.parquet", log=lambda *_: None)
    assert len(data) == 1 and data[0]["image"].getpixel((0, 0)) == (0, 0, 255)
