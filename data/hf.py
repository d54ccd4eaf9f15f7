"""Loading a Hugging Face style VQA data set with `image` / `problem` / `solution` columns (SPEC §3).

Sources: a hub name (when online), a folder written by `datasets.save_to_disk`, a `.parquet` file, or a
`.jsonl` file whose `image` field is a path (relative to the jsonl file) to an image. Bad rows — an image
that cannot be decoded, a missing or empty field, a solution with no answer in it — are skipped, counted,
and named in a warning. A source with no usable row is an error.
"""

import io
import json
import os
import re
import warnings

from PIL import Image

SOLUTION_PATTERNS = (re.compile(r"<answer>(.*?)</answer>", re.DOTALL), re.compile(r"Answer:\s*(\S*)"))
ANSWER_WORD = re.compile(r"[A-Za-z0-9]+")


def parse_solution(solution):
    """The answer inside a solution — `<answer>X</answer>`, `Answer: X` or the bare X, with surrounding
    brackets and full stops removed — or None when that is not one word of letters and digits (the accuracy
    reward could never match it)."""
    if solution is None:
        return None
    text = str(solution)
    for pattern in SOLUTION_PATTERNS:
        found = pattern.search(text)
        if found:
            text = found.group(1)
            break
    answer = text.strip().strip("().[]").strip()
    return answer if ANSWER_WORD.fullmatch(answer) else None


def decode_image(value, base_dir):
    """A PIL RGB image from a PIL image, a datasets image dict ({bytes, path}), raw bytes, or a file path."""
    if isinstance(value, Image.Image):
        return value.convert("RGB")
    if isinstance(value, dict):
        if value.get("bytes"):
            value = value["bytes"]
        elif value.get("path"):
            value = value["path"]
        else:
            raise ValueError("image dict has neither bytes nor path")
    if isinstance(value, (bytes, bytearray)):
        image = Image.open(io.BytesIO(value))
    elif isinstance(value, str):
        path = value if os.path.isabs(value) else os.path.join(base_dir, value)
        image = Image.open(path)
    else:
        raise ValueError(f"unsupported image value of type {type(value).__name__}")
    image.load()
    return image.convert("RGB")


def read_rows(source, split):
    """(rows, base_dir) for any supported source; rows is a sequence of dicts."""
    if source.endswith(".jsonl"):
        rows = []
        with open(source) as f:
            for line_no, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as e:
                    row = {"__error__": f"line {line_no} is not valid JSON ({e})"}
                if not isinstance(row, dict):
                    row = {"__error__": f"line {line_no} is not a JSON object"}
                rows.append(row)
        return rows, os.path.dirname(os.path.abspath(source))
    import datasets

    if source.endswith(".parquet"):
        ds = datasets.load_dataset("parquet", data_files={split: source}, split=split)
    elif os.path.isdir(source):
        ds = datasets.load_from_disk(source)
        if isinstance(ds, datasets.DatasetDict):
            if split not in ds:
                raise ValueError(f"{source} has splits {list(ds)}, not {split!r}")
            ds = ds[split]
    else:
        ds = datasets.load_dataset(source, split=split)
    if "image" in ds.column_names:
        ds = ds.cast_column("image", datasets.Image(decode=False))  # decode ourselves, row by row
    # Relative image paths are relative to the data set's folder (or the parquet file's), else the current one.
    base_dir = source if os.path.isdir(source) else os.path.dirname(source) if os.path.isfile(source) else "."
    return ds, os.path.abspath(base_dir)


def check_row(row, base_dir):
    """A clean example dict, or raise ValueError saying what is wrong with the row."""
    if "__error__" in row:
        raise ValueError(row["__error__"])
    for field in ("image", "problem", "solution"):
        if row.get(field) in (None, ""):
            raise ValueError(f"missing or empty field {field!r}")
    if not isinstance(row["problem"], str) or not row["problem"].strip():
        raise ValueError("problem is not a non-empty string")
    answer = parse_solution(row["solution"])
    if answer is None:
        raise ValueError(f"solution {row['solution']!r} has no answer in it")
    try:
        image = decode_image(row["image"], base_dir)
    except Exception as e:  # PIL raises many kinds of errors for bad files
        raise ValueError(f"image could not be decoded: {e}") from None
    return {"image": image, "problem": row["problem"], "solution": answer}


class VQADataset:
    """The usable rows of a data set; rows are checked once at load time and decoded again on access."""

    def __init__(self, source, split="train", log=print):
        rows, self.base_dir = read_rows(source, split)
        self.rows, self.source = rows, source
        self.valid, skipped = [], []
        for i in range(len(rows)):
            try:
                check_row(rows[i], self.base_dir)
                self.valid.append(i)
            except ValueError as e:
                skipped.append(i)
                warnings.warn(f"row {i} of {source} ({split}): {e}; skipped", stacklevel=2)
        self.skipped = len(skipped)
        if not self.valid:
            raise ValueError(
                f"{source} ({split}) has no usable rows ({self.skipped} skipped): each row needs a decodable "
                f"`image`, a non-empty `problem` and a `solution` with an answer"
            )
        if skipped:
            log(f"{source} ({split}): {len(self.valid)} usable rows, {self.skipped} skipped (see warnings above)")

    def __len__(self):
        return len(self.valid)

    def __getitem__(self, index):
        return check_row(self.rows[self.valid[index]], self.base_dir)
