"""Loading a Hugging Face style VQA data set (SPEC §3).

Sources, one reader per format (READERS): a hub name (when online), a folder written by `datasets.save_to_disk`, a
`.parquet` file, or a `.jsonl` file whose image fields are paths (relative to the jsonl file). Columns: the
image(s), the problem and the solution, found by name ("auto": `image`/`images`, `problem`/`question`/`prompt`,
`solution`/`answer`) or named by the trainer's IMAGE_KEY / PROBLEM_KEY / ANSWER_KEY. An image column may hold one
image or a list (several images per prompt); a row without an image is a text-only prompt.

Rows are checked cheaply at load time — fields, image headers (size, without decoding the pixels), the
processor's rules (aspect ratio, min/max pixels) and the prompt length — and decoded on use. Bad rows are
skipped, counted and named in a warning. A source with no usable row is an error.
"""

import io
import json
import os
import warnings

from PIL import Image

from data.answers import gold_answer, solution_answer
from data.prompts import PromptLength, system_prompt_for, user_content

COLUMN_NAMES = {"image": ("image", "images"), "problem": ("problem", "question", "prompt"),
                "solution": ("solution", "answer")}
KEY_CONSTANTS = {"image": "IMAGE_KEY", "problem": "PROBLEM_KEY", "solution": "ANSWER_KEY"}


def resolve_columns(columns, keys=None):
    """{"image": column or None (text only), "problem": column, "solution": column} from the data set's
    `columns` and `keys` ({role: "auto" | column name | "" for no image column}); ValueError when one is missing."""
    keys = {role: "auto" for role in COLUMN_NAMES} | (keys or {})
    chosen = {}
    for role, key in keys.items():
        if key == "auto":
            chosen[role] = next((c for c in COLUMN_NAMES[role] if c in columns), None)
            if chosen[role] is None and role != "image":
                raise ValueError(f"no {role} column among {list(columns)} (looked for {', '.join(COLUMN_NAMES[role])})"
                                 f"; name it with --{KEY_CONSTANTS[role]}=COLUMN")
        elif key == "" and role == "image":
            chosen[role] = None
        elif key not in columns:
            raise ValueError(f"{KEY_CONSTANTS[role]}={key!r} is not a column; the columns are {list(columns)}")
        else:
            chosen[role] = key
    return chosen


def open_image(value, base_dir):
    """A lazily opened PIL image (header read, pixels not decoded) from a PIL image, a datasets image dict
    ({bytes, path}), raw bytes or a file path."""
    if isinstance(value, Image.Image):
        return value
    if isinstance(value, dict):
        if value.get("bytes"):
            value = value["bytes"]
        elif value.get("path"):
            value = value["path"]
        else:
            raise ValueError("image dict has neither bytes nor path")
    if isinstance(value, (bytes, bytearray)):
        return Image.open(io.BytesIO(value))
    if isinstance(value, str):
        return Image.open(value if os.path.isabs(value) else os.path.join(base_dir, value))
    raise ValueError(f"unsupported image value of type {type(value).__name__}")


def image_size(value, base_dir):
    """(width, height) from the image's header, without decoding its pixels."""
    if isinstance(value, Image.Image):
        return value.size
    with open_image(value, base_dir) as image:
        return image.size


def to_rgb(image):
    """RGB pixels of any PIL mode; transparent areas (RGBA, LA, P with transparency) become white."""
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        background = Image.new("RGB", rgba.size, (255, 255, 255))
        background.paste(rgba, mask=rgba.getchannel("A"))
        return background
    return image.convert("RGB")


def decode_image(value, base_dir):
    """A decoded PIL RGB image (see open_image for the accepted values)."""
    if isinstance(value, Image.Image):
        return to_rgb(value)
    with open_image(value, base_dir) as image:
        image.load()
        return to_rgb(image)


def image_values(value):
    """An image field as a list: [] for none, a list column as it is, one image as [image]."""
    if value is None:
        return []
    return list(value) if isinstance(value, (list, tuple)) else [value]


def read_jsonl(source, split):
    """The rows of a .jsonl file, one dict per non-empty line (a line that is not a JSON object becomes a row
    holding only its error, `__error__`); the file holds one split, so `split` is not used."""
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
    return rows


def read_parquet(source, split):
    """A .parquet file as a datasets.Dataset named `split`."""
    import datasets

    return datasets.load_dataset("parquet", data_files={split: source}, split=split)


def read_saved(source, split):
    """A folder written by `datasets.save_to_disk`: its Dataset, or the `split` of its DatasetDict."""
    import datasets

    ds = datasets.load_from_disk(source)
    if isinstance(ds, datasets.DatasetDict):
        if split not in ds:
            raise ValueError(f"{source} has splits {list(ds)}, not {split!r}")
        ds = ds[split]
    return ds


def read_hub(source, split):
    """The `split` of a data set on the Hugging Face hub."""
    import datasets

    return datasets.load_dataset(source, split=split)


READERS = {"jsonl": read_jsonl, "parquet": read_parquet, "save_to_disk": read_saved, "hub": read_hub}


def source_format(source):
    """The READERS key of a source: by its file extension, a folder, else a hub name."""
    if source.endswith(".jsonl"):
        return "jsonl"
    if source.endswith(".parquet"):
        return "parquet"
    if os.path.isdir(source):
        return "save_to_disk"
    return "hub"


def undecoded_images(ds):
    """`ds` (a datasets.Dataset) with its image columns, and list-of-image columns, left undecoded."""
    import datasets

    for name, feature in ds.features.items():
        if isinstance(feature, datasets.Image):
            ds = ds.cast_column(name, datasets.Image(decode=False))
        elif isinstance(getattr(feature, "feature", None), datasets.Image):
            ds = ds.cast_column(name, type(feature)(datasets.Image(decode=False)))
    return ds


def read_rows(source, split):
    """(rows, columns, base_dir) for any supported source (see READERS); rows is a sequence of dicts, with the
    images left undecoded: we decode them ourselves, on use."""
    rows = READERS[source_format(source)](source, split)
    if isinstance(rows, list):  # jsonl: the columns are the keys of any row, in order of first appearance
        columns = dict.fromkeys(k for row in rows for k in row if k != "__error__")
    else:  # a datasets.Dataset
        rows = undecoded_images(rows)
        columns = rows.column_names
    # Relative image paths are relative to the data set's folder (or the file's), else the current one.
    base_dir = source if os.path.isdir(source) else os.path.dirname(source) if os.path.isfile(source) else "."
    return rows, list(columns), os.path.abspath(base_dir)


class VQADataset:
    """The usable rows of a data set: checked once at load time (cheaply), decoded on access.

    keys: {"image", "problem", "solution"} column choices (see resolve_columns). With a `processor`, rows whose
    images it would reject or whose prompt is longer than `max_prompt_tokens` (0 = no limit) are skipped too.
    system_prompt: "auto" (chosen per row from its answer) or a fixed instruction, carried by every example.
    warn(message) names each skipped row (default: a Python warning).
    """

    def __init__(self, source, split="train", log=print, keys=None, processor=None, max_prompt_tokens=0,
                 system_prompt="auto", warn=None):
        warn = warn or (lambda message: warnings.warn(message, stacklevel=3))
        self.rows, columns, self.base_dir = read_rows(source, split)
        self.source, self.split, self.system_prompt = source, split, system_prompt
        self.columns = resolve_columns(columns, keys)
        log(f"{source} ({split}): " + ", ".join(f"{role} column {col!r}" if col else f"no {role} column (text only)"
                                                for role, col in self.columns.items()))
        prompt_length = PromptLength(processor) if processor is not None else None
        needed = [c for c in self.columns.values() if c]
        rows = self.rows.select_columns(needed) if hasattr(self.rows, "select_columns") else self.rows
        self.valid, skipped = [], []
        for i, row in enumerate(rows):
            try:
                self.check(row, prompt_length, max_prompt_tokens)
                self.valid.append(i)
            except (ValueError, OSError) as e:  # PIL raises OSError subclasses for unreadable files
                skipped.append(i)
                warn(f"{self.row_name(i)}: {e}; skipped")
        self.skipped = len(skipped)
        if not self.valid:
            raise ValueError(
                f"{source} ({split}) has no usable rows ({self.skipped} skipped, see the warnings): each row needs a "
                f"non-empty problem ({self.columns['problem']!r}), a solution with an answer "
                f"({self.columns['solution']!r}) and readable images"
            )
        if skipped:
            log(f"{source} ({split}): {len(self.valid)} usable rows, {self.skipped} skipped (named above)")

    def row_name(self, row):
        return f"row {row} of {self.source} ({self.split})"

    def fields(self, row):
        """(problem, solution text, image values) of a raw row; ValueError when a field is missing."""
        if "__error__" in row:
            raise ValueError(row["__error__"])
        problem, solution = row.get(self.columns["problem"]), row.get(self.columns["solution"])
        if not isinstance(problem, str) or not problem.strip():
            raise ValueError(f"missing or empty field {self.columns['problem']!r}")
        if solution in (None, ""):
            raise ValueError(f"missing or empty field {self.columns['solution']!r}")
        images = image_values(row.get(self.columns["image"])) if self.columns["image"] else []
        return problem, solution, images

    def check(self, row, prompt_length, max_prompt_tokens):
        """Raise ValueError for a row that cannot be used; cheap (image headers only, no math parsing)."""
        problem, solution, images = self.fields(row)
        answer = solution_answer(solution)
        if answer is None:
            raise ValueError(f"solution {solution!r} has no answer in it")
        user_content(problem, len(images))  # placeholders match the images
        sizes = []
        for k, value in enumerate(images):
            try:
                sizes.append(image_size(value, self.base_dir))
            except (OSError, ValueError) as e:
                raise ValueError(f"image {k} could not be decoded: {e}") from None
        if prompt_length is not None:
            n_tokens = prompt_length(problem, sizes, system_prompt_for(answer, self.system_prompt))
            if max_prompt_tokens and n_tokens > max_prompt_tokens:
                raise ValueError(f"prompt is {n_tokens} tokens, above MAX_PROMPT_TOKENS={max_prompt_tokens}")

    def __len__(self):
        return len(self.valid)

    def __getitem__(self, index):
        """The example (images decoded); ValueError when its images cannot be decoded or its answer parsed."""
        problem, solution, values = self.fields(self.rows[self.valid[index]])
        answer = gold_answer(solution)
        if answer is None:
            raise ValueError(f"solution {solution!r} has no answer math-verify can parse")
        try:
            images = [decode_image(value, self.base_dir) for value in values]
        except (OSError, ValueError) as e:
            raise ValueError(f"image could not be decoded: {e}") from None
        example = {"problem": problem, "solution": answer}
        example.update({"image": images[0]} if len(images) == 1 else {"images": images} if images else {"image": None})
        if self.system_prompt != "auto":
            example["system_prompt"] = self.system_prompt
        return example

    def name(self, index):
        """How warnings name example `index`."""
        return self.row_name(self.valid[index])

