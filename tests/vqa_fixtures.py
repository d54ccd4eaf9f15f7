"""Small local data sets shaped like the public ones the README names, and one full of odd and bad rows.

Built by the tests (nothing is downloaded): geometry3k (a list of images, `<image>` placeholders, LaTeX answers),
CLEVR counting as in R1-V (`<answer> 3 </answer>` solutions), multimodal-open-r1-8k (`image`, `problem`,
`solution` with reasoning), ViRL39K (`\\boxed{}` answers), MMK12 (`question`, `answer`).
"""

import json

from PIL import Image


def picture(colour="red", size=(56, 56), mode="RGB"):
    return Image.new("RGB", size, colour).convert(mode)


def save_rows(rows, features, path):
    import datasets

    ds = datasets.Dataset.from_list(rows, features=datasets.Features(features))
    ds.to_parquet(str(path))
    return str(path)


def geometry3k(folder):
    """save_to_disk folder with train/test splits: images (a list), problem (with <image>), answer (LaTeX)."""
    import datasets

    features = datasets.Features({"images": datasets.List(datasets.Image()), "problem": datasets.Value("string"),
                                  "answer": datasets.Value("string")})
    rows = [
        {"images": [picture("red")], "problem": "<image>Find x. Round to the nearest tenth.", "answer": "3\\sqrt{2}"},
        {"images": [picture("blue")], "problem": "<image>Find the area of the triangle.", "answer": "\\frac{4}{3}"},
        {"images": [picture("green"), picture("yellow")],
         "problem": "Compare <image> with <image>. Find y.", "answer": "-12.5"},
    ]
    splits = datasets.DatasetDict({"train": datasets.Dataset.from_list(rows, features=features),
                                   "test": datasets.Dataset.from_list(rows[:1], features=features)})
    splits.save_to_disk(str(folder))
    return str(folder)


def clevr_counting(folder):
    """jsonl with image paths: image, problem, solution `<answer> N </answer>` (R1-V's CLEVR counting)."""
    folder.mkdir(exist_ok=True)
    rows = []
    for i, n in enumerate((3, 5)):
        picture("gray").save(folder / f"clevr_{i}.png")
        rows.append({"image": f"clevr_{i}.png", "problem": "How many items are there in the image?",
                     "solution": f"<answer> {n} </answer>"})
    path = folder / "clevr.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def open_r1(path):
    """parquet: image, problem, solution (reasoning ending in a boxed answer)."""
    import datasets

    rows = [{"image": picture("red"), "problem": "What is the perimeter of the square of side 6?",
             "solution": "Four sides of 6 make \\boxed{24}."},
            {"image": picture("blue"), "problem": "Which option is correct? A. 1 B. 2", "solution": "<answer>B</answer>"}]
    return save_rows(rows, {"image": datasets.Image(), "problem": datasets.Value("string"),
                            "solution": datasets.Value("string")}, path)


def virl(path):
    """parquet: image (a list), question (with <image>), answer `\\boxed{…}`."""
    import datasets

    rows = [{"image": [picture("red")], "question": "<image>What fraction of the figure is shaded?",
             "answer": "\\boxed{\\frac{1}{4}}"},
            {"image": [picture("blue")], "question": "<image>Which choice is right?\nA. 1\nB. 2\nC. 3",
             "answer": "\\boxed{C}"}]
    return save_rows(rows, {"image": datasets.List(datasets.Image()), "question": datasets.Value("string"),
                            "answer": datasets.Value("string")}, path)


def mmk12(path):
    """parquet: image, question, answer (a bare number or letter)."""
    import datasets

    rows = [{"image": picture("green"), "question": "Solve for x: 2x = 7.", "answer": "3.5"},
            {"image": picture("green"), "question": "Pick one. A. up B. down", "answer": "A"}]
    return save_rows(rows, {"image": datasets.Image(), "question": datasets.Value("string"),
                            "answer": datasets.Value("string")}, path)


def mixed_with_bad_rows(folder, long_words=2000):
    """jsonl mixing single-image, two-image and text-only prompts, letter and free-form answers, odd but valid
    images (modes P / L / RGBA / CMYK / I;16, formats PNG / JPEG / GIF / BMP / WEBP / TIFF, tiny and wide), and bad
    rows. Returns (path, usable row numbers, {bad row number: reason it is skipped}, the bad rows that pass the
    load-time checks and fail on use)."""
    folder.mkdir(exist_ok=True)
    odd = {"p.png": picture("blue", mode="P"), "l.jpg": picture("white", mode="L"),
           "rgba.png": Image.new("RGBA", (40, 30), (255, 0, 0, 0)), "cmyk.jpg": picture("green", mode="CMYK"),
           "i16.png": Image.new("I;16", (30, 30)), "anim.gif": picture("red", mode="P"), "b.bmp": picture("red"),
           "w.webp": picture("yellow"), "t.tiff": picture("blue", (90, 20)), "tiny.png": picture("red", (1, 1)),
           "wide.png": picture("red", (300, 3)), "big.png": picture("red", (1200, 900))}
    for name, image in odd.items():
        image.save(folder / name)
    picture("red", (600, 2)).save(folder / "ratio300.png")  # 300:1, the processor's smart_resize refuses it
    (folder / "garbage.png").write_bytes(b"not an image at all")
    png = (folder / "big.png").read_bytes()
    (folder / "truncated.png").write_bytes(png[: len(png) // 3])  # a valid header, pixels cut off
    count = "How many shapes are there?\nA. 1\nB. 2\nC. 3\nD. 4"
    usable = [{"image": name, "problem": count, "solution": "B"} for name in odd]
    usable += [{"image": ["p.png", "b.bmp"], "problem": "Is <image> the same colour as <image>?", "solution": "no"},
               {"problem": "What is 1/2 + 1/4?", "solution": "\\frac{3}{4}"},  # text only
               {"image": None, "problem": "What is 2 + 3?", "solution": "<answer> 5 </answer>"}]
    bad = [({"image": "garbage.png", "problem": count, "solution": "A"}, "could not be decoded"),
           ({"image": "missing.png", "problem": count, "solution": "A"}, "could not be decoded"),
           ({"image": "ratio300.png", "problem": count, "solution": "A"}, "aspect ratio"),
           ({"image": "b.bmp", "problem": "word " * long_words, "solution": "A"}, "MAX_PROMPT_TOKENS"),
           ({"image": "b.bmp", "problem": count, "solution": "The answer is unclear"}, "no answer"),
           ({"image": "b.bmp", "problem": count, "solution": "\\frac{"}, "math-verify"),  # fails on use
           ({"image": "truncated.png", "problem": count, "solution": "C"}, "could not be decoded"),  # on use
           ({"image": ["b.bmp"], "problem": "<image> and <image>?", "solution": "A"}, "placeholders")]
    rows = usable[:6] + [r for r, _ in bad[:4]] + usable[6:] + [r for r, _ in bad[4:]]
    path = folder / "mixed.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    usable_rows = [rows.index(r) for r in usable]
    bad_rows = {rows.index(r): reason for r, reason in bad}
    on_use = {rows.index(bad[5][0]), rows.index(bad[6][0])}
    return str(path), usable_rows, bad_rows, on_use
