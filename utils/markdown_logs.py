"""Markdown logs for a researcher to read, written into the run folder next to metrics.jsonl.

* rollout_results.md       per logged step: reward summary, MDI by stage, a few samples (problem, completion,
                           rewards, advantage, attention, token counts, the image as a small PNG under images/)
* attention_diagnostics.md per logged step: MDI / AEI / text and vision ratios by stage, token counts
* token_weights.md         per logged step: each logged completion as word(weight), with its reward and advantage
* run_terminal.md          what the terminal shows: config, progress lines, metrics grouped by kind, warnings

Attention metrics (MDI / AEI per stage) are optional everywhere: `attention` is a list with one dict per
completion, {"early": {"mdi", "aei_text", "aei_vision", "text_ratio", "vision_ratio"}, "middle": ..., "late": ...,
"all": ...}; values may be NaN. When it is None the logs say ATTENTION_OFF. Every call appends, so a crash
leaves everything written so far.
"""

import json
import math
import os
import re

import torch

from utils.attention import STAGES, geometric_mean

ATTENTION_OFF = "attention metrics are off in this run"
STAGE_FIELDS = ("mdi", "aei_text", "aei_vision", "text_ratio", "vision_ratio")
IMAGE_TOKEN = "<|image_pad|>"
THUMBNAIL_SIDE = 128


# ── numbers ──────────────────────────────────────────────────────────────────────────────────────
def to_float(value):
    """float(value), or NaN for None / anything that is not a number."""
    try:
        return float(value.item() if hasattr(value, "item") else value)
    except (TypeError, ValueError, RuntimeError):
        return math.nan


def num(value, digits=3):
    value = to_float(value)
    return "nan" if math.isnan(value) else f"{value:.{digits}f}"


def finite(values):
    return [v for v in (to_float(x) for x in values) if math.isfinite(v)]


def mean_std(values):
    """Mean and sample std of the finite values (NaN, NaN when there are none)."""
    vals = finite(values)
    if not vals:
        return math.nan, math.nan
    mean = sum(vals) / len(vals)
    std = math.sqrt(sum((v - mean) ** 2 for v in vals) / (len(vals) - 1)) if len(vals) > 1 else 0.0
    return mean, std


def pm(values):
    mean, std = mean_std(values)
    return f"{num(mean)} ± {num(std)}"


def as_list(values, n):
    """A tensor / list / None as a list of n floats (NaN where missing)."""
    values = [] if values is None else (values.tolist() if torch.is_tensor(values) else list(values))
    return [to_float(values[i]) if i < len(values) else math.nan for i in range(n)]


# ── rollout helpers ──────────────────────────────────────────────────────────────────────────────
def token_counts(rollout, tokenizer=None):
    """(vision [B], text [B], completion [B]) token counts as long tensors.

    Vision tokens are the `<|image_pad|>` ids of the prompt (found through the tokenizer, else through
    mm_token_type_ids, else from image_grid_thw); text tokens are the other non-padding prompt tokens.
    """
    inputs = rollout.prompt_inputs
    ids, mask = inputs["input_ids"], inputs["attention_mask"].bool()
    image_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN) if tokenizer is not None else None
    if image_id is not None and image_id != getattr(tokenizer, "unk_token_id", None):
        is_vision = ids == image_id
    elif "mm_token_type_ids" in inputs:
        is_vision = inputs["mm_token_type_ids"] == 1
    else:  # Qwen merges 2x2 patches into one image token
        per_row = inputs["image_grid_thw"].prod(-1) // 4 if "image_grid_thw" in inputs else 0
        vision = torch.zeros(ids.shape[0], dtype=torch.long) + per_row
        return vision, mask.sum(1) - vision, rollout.completion_mask.sum(1)
    vision = (is_vision & mask).sum(1)
    return vision, mask.sum(1) - vision, rollout.completion_mask.sum(1)


def sample_rows(rollout, n_samples):
    """The first row of each of the first n_samples groups (a group: consecutive rows sharing one example)."""
    ex = rollout.examples
    if len(ex) != len(rollout):
        return list(range(min(n_samples, len(rollout))))
    firsts = [i for i in range(len(ex)) if i == 0 or ex[i] is not ex[i - 1]]
    return firsts[:n_samples]


def stage_value(attention, row, stage, field):
    try:
        return to_float(attention[row][stage][field])
    except (IndexError, KeyError, TypeError):
        return math.nan


def stage_summary(attention, stage, n):
    """{field: (mean, std)} over the n completions for one stage."""
    return {f: mean_std([stage_value(attention, i, stage, f) for i in range(n)]) for f in STAGE_FIELDS}


def fence(text, lang="text"):
    """A fenced code block long enough not to be closed by backticks inside `text`."""
    longest = max((len(run) for run in re.findall(r"`+", text)), default=0)
    tick = "`" * max(3, longest + 1)
    return f"{tick}{lang}\n{text}\n{tick}\n"


def append(path, text, title):
    """Append `text` to the markdown file at `path`, starting it with `# title` when it is new."""
    new = not os.path.exists(path) or os.path.getsize(path) == 0
    with open(path, "a", encoding="utf-8") as f:
        f.write((f"# {title}\n\n" if new else "") + text)
        f.flush()


# ── 1. rollout_results.md ────────────────────────────────────────────────────────────────────────
def stage_table(attention, n):
    if attention is None:
        return f"MDI by stage: {ATTENTION_OFF}.\n"
    lines = ["| Stage | MDI mean | MDI std | AEI text | AEI vision |", "|---|---|---|---|---|"]
    for stage in STAGES:
        s = stage_summary(attention, stage, n)
        lines.append(f"| {stage.capitalize()} | {num(s['mdi'][0])} | {num(s['mdi'][1])} | "
                     f"{num(s['aei_text'][0])} | {num(s['aei_vision'][0])} |")
    return "\n".join(lines) + "\n"


def sample_attention_table(attention, row):
    lines = ["| Stage | MDI | AEI text | AEI vision | Text ratio | Vision ratio |", "|---|---|---|---|---|---|"]
    for stage in STAGES:
        values = [num(stage_value(attention, row, stage, f)) for f in STAGE_FIELDS]
        lines.append(f"| {stage.capitalize()} | " + " | ".join(values) + " |")
    return "\n".join(lines) + "\n"


def sample_attention_line(attention, row):
    """One line per completion, each metric as early / middle / late / all."""
    names = {"mdi": "MDI", "aei_text": "AEI text", "aei_vision": "AEI vision", "text_ratio": "text ratio",
             "vision_ratio": "vision ratio"}
    return " · ".join(f"{names[f]} " + " / ".join(num(stage_value(attention, row, s, f)) for s in STAGES)
                      for f in STAGE_FIELDS)


def save_thumbnail(image, image_dir, step, k):
    os.makedirs(image_dir, exist_ok=True)
    path = os.path.join(image_dir, f"step_{step:04d}_sample_{k}.png")
    small = image.convert("RGB")
    small.thumbnail((THUMBNAIL_SIDE, THUMBNAIL_SIDE))
    small.save(path, format="PNG")
    return path


def append_rollout_results(path, step, rollout, advantages, n_samples, image_dir, attention=None, tokenizer=None):
    """Append `## Step N` to rollout_results.md: summary, MDI by stage, and n_samples sample details."""
    n = len(rollout)
    rewards = {k: as_list(v, n) for k, v in rollout.rewards.items()}
    adv = as_list(advantages, n)
    accuracy = rewards.get("accuracy", [math.nan] * n)
    if attention is None:
        mdi = "off"
    else:
        mdi_all = [stage_value(attention, i, "all", "mdi") for i in range(n)]
        mdi_mean = geometric_mean(torch.tensor(mdi_all, dtype=torch.float64))
        mdi = f"{num(mdi_mean)} ± {num(mean_std(mdi_all)[1])} (geometric mean ± std)"
    out = [f"## Step {step}\n", "| Metric | Value |", "|---|---|",
           f"| Accuracy | {pm(accuracy)} |", f"| Format | {pm(rewards.get('format', []))} |", f"| MDI | {mdi} |",
           f"| Total reward | {pm(rewards.get('total', []))} |",
           f"| Success rate | {num(sum(a > 0 for a in accuracy) / n if n else math.nan)} |",
           f"| Completions | {n} |", "", stage_table(attention, n)]
    vision, text, completion = token_counts(rollout, tokenizer)
    for k, row in enumerate(sample_rows(rollout, n_samples)):
        ex = rollout.examples[row] if row < len(rollout.examples) else {}
        out.append(f"### Sample {k} (row {row})\n")
        out.append("Problem:\n\n" + fence(str(ex.get("problem", ""))))
        out.append(f"Solution: {ex.get('solution', 'n/a')}" + (f" (answer {ex['answer']})" if "answer" in ex else ""))
        out.append("\nCompletion:\n\n" + fence(rollout.texts[row] if row < len(rollout.texts) else ""))
        out.append("| Reward | Value |\n|---|---|")
        out += [f"| {name} | {num(values[row])} |" for name, values in rewards.items()
                if name != "errors" or values[row]]  # a failed reward call shows up; none, no row
        out.append(f"| advantage | {num(adv[row])} |\n")
        attn = f" {ATTENTION_OFF}\n" if attention is None else "\n\n" + sample_attention_table(attention, row)
        out.append(f"Attention by stage:{attn}")
        out.append(f"Tokens: vision {int(vision[row])}, text {int(text[row])}, completion {int(completion[row])}\n")
        if ex.get("image") is not None:
            png = save_thumbnail(ex["image"], image_dir, step, k)
            rel = os.path.relpath(png, os.path.dirname(os.path.abspath(path))).replace(os.sep, "/")
            out.append(f"![sample {k} image]({rel})\n")
        else:
            out.append("Image: none\n")
    append(path, "\n".join(out) + "\n", "Rollout results")


# ── 2. attention_diagnostics.md ──────────────────────────────────────────────────────────────────
def append_attention_diagnostics(path, step, rollout, attention=None, tokenizer=None):
    """Append `## Step N` to attention_diagnostics.md: metrics by stage, token counts, per-sample lines."""
    n = len(rollout)
    out = [f"## Step {step}\n"]
    if attention is None:
        out.append(f"Attention by stage: {ATTENTION_OFF}.\n")
    else:
        summaries = {stage: stage_summary(attention, stage, n) for stage in STAGES}
        out += ["| Metric | Early | Middle | Late | All |", "|---|---|---|---|---|"]
        rows = (("MDI mean", "mdi", 0), ("MDI std", "mdi", 1), ("AEI text", "aei_text", 0),
                ("AEI vision", "aei_vision", 0), ("Text ratio", "text_ratio", 0), ("Vision ratio", "vision_ratio", 0))
        for label, field, which in rows:
            out.append(f"| {label} | " + " | ".join(num(summaries[s][field][which]) for s in STAGES) + " |")
        out.append("")
    vision, text, completion = token_counts(rollout, tokenizer)
    out += ["| Tokens | Mean ± std |", "|---|---|", f"| Vision tokens | {pm(vision)} |",
            f"| Text tokens | {pm(text)} |", f"| Completion tokens | {pm(completion)} |", ""]
    if attention is not None:
        out.append("Per sample (each metric as early / middle / late / all):\n")
        out += [f"- row {i} (vision {int(vision[i])}, text {int(text[i])}): {sample_attention_line(attention, i)}"
                for i in range(n)]
    append(path, "\n".join(out) + "\n\n", "Attention diagnostics")


# ── 3. token_weights.md ──────────────────────────────────────────────────────────────────────────
def word_mean(values):
    vals = finite(values)
    return sum(vals) / len(vals) if vals else math.nan


def words_of(tokenizer, ids, values):
    """Merge tokens into words: [(word text, [values of its tokens])]. "".join(words) is the decoded text.

    A token starts a new word when its text starts with whitespace, or it or the token before it is a marker
    (special / added token such as <think>). Tokens that decode to a partial character join the next token.
    """
    markers = set(tokenizer.all_special_ids) | set(getattr(tokenizer, "added_tokens_decoder", None) or {})
    words, pending, pending_vals, prev_marker = [], [], [], False
    for i, (token_id, value) in enumerate(zip(ids, values)):
        pending.append(token_id)
        pending_vals.append(value)
        text = tokenizer.decode(pending, skip_special_tokens=False, clean_up_tokenization_spaces=False)
        if text.endswith("\ufffd") and i + 1 < len(ids):
            continue  # part of a multi-byte character
        marker = len(pending) == 1 and (token_id in markers or bool(re.fullmatch(r"<[^<>\s]+>", text)))
        if not words or marker or prev_marker or text[:1].isspace():
            words.append((text, list(pending_vals)))
        else:
            words[-1] = (words[-1][0] + text, words[-1][1] + pending_vals)
        pending, pending_vals, prev_marker = [], [], marker
    return words


def append_token_weights(path, step, tokenizer, rollout, advantages, n_samples, weights=None, vgr=None,
                         visual_kl=None):
    """Append `## Step N` to token_weights.md: each logged completion as word(weight), then reward and advantage;
    on the steps that measured it, the completion again as word(visual dependency).

    weights / vgr / visual_kl: per-token values [B, L] aligned with completion_ids; a word shows the mean over its
    tokens.
    """
    n = len(rollout)
    values = weights if weights is not None else vgr
    if weights is not None:
        note = "Token weights: each word shows the mean weight of its tokens, as word(weight)."
    elif vgr is not None:
        note = "token weights are off; showing VGR: each word shows the mean VGR of its tokens, as word(vgr)."
    else:
        note = "token weights and attention metrics are off in this run; words are separated by ·."
    total, adv = as_list(rollout.rewards.get("total"), n), as_list(advantages, n)
    out = [f"## Step {step}\n", note + "\n"]
    for k, row in enumerate(sample_rows(rollout, n_samples)):
        keep = rollout.completion_mask[row].bool()
        ids = rollout.completion_ids[row][keep].tolist()
        vals = as_list(None if values is None else values[row][keep], len(ids))
        words = words_of(tokenizer, ids, vals)
        if values is None:
            line = "·".join(w for w, _ in words)
        else:
            line = "".join(f"{w}({num(word_mean(vs), 2)})" for w, vs in words)
        out.append(f"### Sample {k} (row {row})\n\n" + fence(line))
        if visual_kl is not None:
            kl = words_of(tokenizer, ids, visual_kl[row][keep].tolist())
            out.append("Visual dependency, word(KL with the image ‖ with a blank image, nats):\n\n" +
                       fence("".join(f"{w}({num(word_mean(vs), 3)})" for w, vs in kl)))
        out.append(f"Total reward {num(total[row])} · advantage {num(adv[row])}\n")
    append(path, "\n".join(out) + "\n", "Token weights")


# ── 4. run_terminal.md ───────────────────────────────────────────────────────────────────────────
METRIC_GROUPS = (("Rewards", "reward/"), ("Policy", "policy/"), ("Critic", "critic/"),
                 ("Dynamic sampling", "dapo/"), ("Attention", "attention/"), ("Grounding", "grounding/"),
                 ("Sampler vs learner", "rollout/"), ("Progress", "progress/"),
                 ("Perf", "perf/"), ("Eval", "eval/"), ("Response", "response/"))


def metric_value(value):
    if isinstance(value, (bool, int)):
        return str(value)
    value = to_float(value)
    return "nan" if math.isnan(value) else f"{value:.4g}"


class TerminalLog:
    """Mirrors the terminal into run_terminal.md; every call appends and flushes."""

    def __init__(self, path):
        self.path = path
        append(path, "", "Run terminal log")

    def write(self, text):
        append(self.path, text, "Run terminal log")

    def config(self, cfg):
        width = max((len(k) for k in cfg), default=0)
        shown = {k: repr(v) if isinstance(v, str) else json.dumps(v, default=str) for k, v in cfg.items()}
        self.write("## Config\n\n" + fence("\n".join(f"{k:<{width}} = {v}" for k, v in shown.items()), "") + "\n")

    def line(self, text):
        self.write("".join(f"{part}  \n" for part in str(text).split("\n")))

    def metrics(self, step, metrics):
        shown = {k: v for k, v in metrics.items() if v is not None and k != "step"}
        out = [f"\n### Step {step}\n"]
        for title, prefix in METRIC_GROUPS:
            keys = [k for k in shown if k.startswith(prefix)]
            if title == "Attention" and not keys:
                out.append(f"**Attention**: off ({ATTENTION_OFF})\n")
            elif keys:
                out.append(f"**{title}**\n\n" + "\n".join(f"- {k}: {metric_value(shown[k])}" for k in keys) + "\n")
        other = [k for k in shown if not any(k.startswith(p) for _, p in METRIC_GROUPS)]
        if other:
            out.append("**Other**\n\n" + "\n".join(f"- {k}: {metric_value(shown[k])}" for k in other) + "\n")
        self.write("\n".join(out) + "\n")

    def warning(self, text):
        self.write(f"\n> **WARNING** {text}\n\n")

    def error(self, text):
        self.write(f"\n> **ERROR** {text}\n\n")
