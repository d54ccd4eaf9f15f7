"""The four markdown logs of utils/markdown_logs.py, written for a small fake rollout and parsed back."""

import math
import os
import re

import pytest
import torch
from PIL import Image

from data.prompts import encode_prompts
from data.synthetic import SyntheticVQA
from utils.rewards import score_completions
from utils.rollout import Rollout
from utils.markdown_logs import (
    ATTENTION_OFF,
    TerminalLog,
    append_attention_diagnostics,
    append_rollout_results,
    append_token_weights,
    token_counts,
)
from utils.tiny_vlm import build_processor, train_tokenizer

G = 2
COMPLETIONS = [
    "<think>there are 1 shapes</think>Answer: A<|im_end|>",  # solutions: A, A, C, C, A, A
    "I see 3 Answer: C<|im_end|>",  # no <think>: format 0
    "<think>there are 3 shapes</think>Answer: C<|im_end|>",
    "<think>café count 4</think>Answer: D<|im_end|>",  # é: two byte-level tokens that decode only together
    "<think>two</think>Answer: B",  # no end token
    "<think>there are 1 shapes</think>Answer: A<|im_end|>",
]
STAGE_ROWS = ("Early", "Middle", "Late", "All")
NUMBER = r"(-?\d+\.\d{3}|nan)"


@pytest.fixture(scope="module")
def setup(make_specs):
    tok = train_tokenizer(512)
    processor = build_processor(tok, 7, 56)
    data = SyntheticVQA(3, seed=0, kinds=("count",))
    base = [data[i] for i in range(3)]
    base[1] = dict(base[1], problem=base[1]["problem"] + "\nLook carefully at the image.")  # longer: left padding
    examples = [ex for ex in base for _ in range(G)]  # groups share one example object, as in generate()
    prompt_inputs = encode_prompts(processor, examples)
    ids = [tok(c, add_special_tokens=False)["input_ids"] for c in COMPLETIONS]
    width = max(len(i) for i in ids)
    completion_ids = torch.full((len(ids), width), tok.pad_token_id, dtype=torch.long)
    completion_mask = torch.zeros((len(ids), width), dtype=torch.long)
    for row, i in enumerate(ids):
        completion_ids[row, : len(i)] = torch.tensor(i)
        completion_mask[row, : len(i)] = 1
    texts = tok.batch_decode(completion_ids, skip_special_tokens=True)
    specs = make_specs(W_ACCURACY=3.0, W_FORMAT=1.0, MAX_NEW_TOKENS=24, OVERLONG_BUFFER=8)
    rewards = score_completions(texts, [ex["solution"] for ex in examples], completion_mask.sum(1).tolist(),
                                specs.rewards.at(1), specs.rewards, specs.rollout.max_new_tokens)
    rollout = Rollout(prompt_inputs, completion_ids, completion_mask, torch.zeros(len(ids), dtype=torch.bool), texts,
                      examples, {k: torch.tensor(v) for k, v in rewards.items()})
    advantages = torch.tensor([0.7, -0.7, 0.25, -0.25, 1.0, -1.0])
    g = torch.Generator().manual_seed(0)
    attention = []
    for row in range(len(ids)):
        r = torch.rand(4, 5, generator=g).tolist()
        attention.append({stage: {"mdi": 1 + 5 * r[s][0], "aei_text": r[s][1], "aei_vision": r[s][2],
                                  "text_ratio": r[s][3], "vision_ratio": 1 - r[s][3]}
                          for s, stage in enumerate(("early", "middle", "late", "all"))})
    attention[3]["middle"]["mdi"] = math.nan  # a NaN must show as nan per sample and not spoil the means
    attention[3]["all"]["aei_text"] = float("nan")
    return tok, rollout, advantages, attention


def step_sections(text):
    parts = re.split(r"^## Step (\d+)\n", text, flags=re.MULTILINE)
    return {int(parts[i]): parts[i + 1] for i in range(1, len(parts), 2)}


def table(body, header_start):
    """Rows (lists of cells) of the first table whose header line starts with `header_start`; header first."""
    lines = body.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(header_start))
    rows = []
    for line in lines[start:]:
        if not line.startswith("|"):
            break
        rows.append([c.strip() for c in line.strip().strip("|").split("|")])
    return [rows[0]] + rows[2:]  # drop the |---| line


def mean_std(values):
    t = torch.tensor(values, dtype=torch.float64)
    return t.mean().item(), t.std().item()


def pm_values(cell):
    m = re.fullmatch(NUMBER + r" ± " + NUMBER + r".*", cell)
    assert m, cell
    return float(m.group(1)), float(m.group(2))


def expected_counts(tok, rollout):
    ids, mask = rollout.prompt_inputs["input_ids"], rollout.prompt_inputs["attention_mask"]
    vision = (ids == tok.convert_tokens_to_ids("<|image_pad|>")).sum(1)
    return vision, mask.sum(1) - vision, rollout.completion_mask.sum(1)


def test_token_counts(setup):
    tok, rollout, _, _ = setup
    vision, text, completion = token_counts(rollout, tok)
    ev, et, _ = expected_counts(tok, rollout)
    assert vision.tolist() == [16] * 6  # 56x56 image, 7-pixel patches merged 2x2: 4x4 tokens
    assert (rollout.prompt_inputs["attention_mask"] == 0).any()  # the fixture really has left padding
    assert text.tolist() == et.tolist() and text[2] > text[0]  # the longer problem has more text tokens
    assert completion.tolist() == [len(tok(c, add_special_tokens=False)["input_ids"]) for c in COMPLETIONS]
    # Without a tokenizer the count comes from mm_token_type_ids, and then from image_grid_thw.
    assert token_counts(rollout)[0].tolist() == ev.tolist()
    inputs = {k: v for k, v in rollout.prompt_inputs.items() if k != "mm_token_type_ids"}
    bare = Rollout(inputs, rollout.completion_ids, rollout.completion_mask, rollout.truncated, rollout.texts)
    assert token_counts(bare)[0].tolist() == ev.tolist() and token_counts(bare)[1].tolist() == et.tolist()


def test_rollout_results(setup, tmp_path):
    tok, rollout, advantages, attention = setup
    path, image_dir = tmp_path / "rollout_results.md", tmp_path / "images"
    append_rollout_results(str(path), 5, rollout, advantages, 2, str(image_dir))
    append_rollout_results(str(path), 6, rollout, advantages, 2, str(image_dir), attention=attention, tokenizer=tok)
    sections = step_sections(path.read_text())
    assert sorted(sections) == [5, 6]
    acc = rollout.rewards["accuracy"].tolist()
    assert acc == [1, 0, 1, 0, 0, 1] and rollout.rewards["format"].tolist() == [1, 0, 1, 1, 1, 1]
    for step, body in sections.items():
        summary = {row[0]: row[1] for row in table(body, "| Metric | Value |")[1:]}
        assert {"Accuracy", "Format", "MDI", "Total reward", "Success rate"} <= set(summary)
        for name, key in (("Accuracy", "accuracy"), ("Format", "format"), ("Total reward", "total")):
            got, want = pm_values(summary[name]), mean_std(rollout.rewards[key].tolist())
            assert all(math.isfinite(v) for v in got) and got == pytest.approx(want, abs=1e-3), name
        assert float(summary["Success rate"]) == pytest.approx(sum(a > 0 for a in acc) / len(acc), abs=1e-3)
        # Sample details: the first completion of the first two groups (rows 0 and 2).
        samples = re.split(r"^### Sample \d+ \(row (\d+)\)\n", body, flags=re.MULTILINE)
        rows = [int(r) for r in samples[1::2]]
        assert rows == [0, 2]
        vision, text, completion = expected_counts(tok, rollout)
        for k, (row, detail) in enumerate(zip(rows, samples[2::2])):
            assert rollout.examples[row]["problem"] in detail and rollout.texts[row] in detail
            rewards = {r[0]: float(r[1]) for r in table(detail, "| Reward | Value |")[1:]}
            assert rewards.keys() == {"accuracy", "format", "overlong", "total", "advantage"}
            assert rewards["total"] == pytest.approx(rollout.rewards["total"][row].item(), abs=1e-3)
            assert rewards["advantage"] == pytest.approx(advantages[row].item(), abs=1e-3)
            assert f"Tokens: vision {vision[row]}, text {text[row]}, completion {completion[row]}" in detail
            link = re.search(r"!\[[^\]]*\]\(([^)]+)\)", detail).group(1)
            assert link == f"images/step_{step:04d}_sample_{k}.png"
            with Image.open(tmp_path / link) as im:
                assert im.format == "PNG" and max(im.size) <= 128
    off, on = sections[5], sections[6]
    assert summary_cell(off, "MDI") == "off" and ATTENTION_OFF in off and "| Stage |" not in off
    assert off.count(ATTENTION_OFF) == 1 + 2  # the stage table and each of the two samples
    stage = table(on, "| Stage |")
    assert stage[0] == ["Stage", "MDI mean", "MDI std", "AEI text", "AEI vision"]
    assert [r[0] for r in stage[1:]] == list(STAGE_ROWS)
    assert all(math.isfinite(float(c)) for r in stage[1:] for c in r[1:])
    middle = [a["middle"]["mdi"] for a in attention if math.isfinite(a["middle"]["mdi"])]
    assert float(stage[2][1]) == pytest.approx(mean_std(middle)[0], abs=1e-3)
    all_mdi = [a["all"]["mdi"] for a in attention]
    geo = math.exp(sum(math.log(v) for v in all_mdi) / len(all_mdi))
    assert pm_values(summary_cell(on, "MDI"))[0] == pytest.approx(geo, abs=1e-3)
    assert ATTENTION_OFF not in on
    per_sample = [table(d, "| Stage | MDI | AEI text") for d in re.split(r"^### Sample", on, flags=re.MULTILINE)[1:]]
    assert [[r[0] for r in t[1:]] for t in per_sample] == [list(STAGE_ROWS)] * 2
    assert float(per_sample[1][1][1]) == pytest.approx(attention[2]["early"]["mdi"], abs=1e-3)  # row 2, Early MDI


def summary_cell(body, name):
    return {row[0]: row[1] for row in table(body, "| Metric | Value |")[1:]}[name]


def test_attention_diagnostics(setup, tmp_path):
    tok, rollout, _, attention = setup
    path = tmp_path / "attention_diagnostics.md"
    append_attention_diagnostics(str(path), 1, rollout)
    append_attention_diagnostics(str(path), 2, rollout, attention=attention, tokenizer=tok)
    sections = step_sections(path.read_text())
    _, text, _ = expected_counts(tok, rollout)
    for body in sections.values():
        tokens = {r[0]: pm_values(r[1]) for r in table(body, "| Tokens |")[1:]}
        assert tokens["Vision tokens"] == (16.0, 0.0)
        assert tokens["Text tokens"] == pytest.approx(mean_std(text.tolist()), abs=1e-3)
    assert ATTENTION_OFF in sections[1] and "| Metric |" not in sections[1] and "- row" not in sections[1]
    metrics = table(sections[2], "| Metric |")
    assert metrics[0] == ["Metric", "Early", "Middle", "Late", "All"]
    assert [r[0] for r in metrics[1:]] == ["MDI mean", "MDI std", "AEI text", "AEI vision", "Text ratio",
                                           "Vision ratio"]
    assert all(math.isfinite(float(c)) for r in metrics[1:] for c in r[1:])
    early_ratio = mean_std([a["early"]["vision_ratio"] for a in attention])[0]
    assert float(metrics[6][1]) == pytest.approx(early_ratio, abs=1e-3)
    lines = [line for line in sections[2].splitlines() if line.startswith("- row")]
    assert len(lines) == len(rollout) and "nan" not in lines[0]
    mdi_row3 = re.search(r"MDI (\S+) / (\S+) / (\S+) / (\S+) ·", lines[3]).groups()
    assert mdi_row3[1] == "nan" and float(mdi_row3[0]) == pytest.approx(attention[3]["early"]["mdi"], abs=1e-3)
    assert ATTENTION_OFF not in sections[2]


def code_blocks(body):
    return re.findall(r"^```text\n(.*?)\n```$", body, flags=re.MULTILINE | re.DOTALL)


def test_token_weights(setup, tmp_path):
    tok, rollout, advantages, _ = setup
    path = tmp_path / "token_weights.md"
    L = rollout.completion_ids.shape[1]
    half = torch.full(rollout.completion_ids.shape, 0.5)
    position = torch.arange(L, dtype=torch.float).expand(len(rollout), L)
    append_token_weights(str(path), 1, tok, rollout, advantages, 3, weights=half)
    append_token_weights(str(path), 2, tok, rollout, advantages, 3, weights=position)
    append_token_weights(str(path), 3, tok, rollout, advantages, 3, vgr=position * 0.1)
    append_token_weights(str(path), 4, tok, rollout, advantages, 3)
    sections = step_sections(path.read_text())
    assert sorted(sections) == [1, 2, 3, 4]
    rows = [0, 2, 4]
    decoded = [tok.decode(rollout.completion_ids[r][rollout.completion_mask[r].bool()], skip_special_tokens=False)
               for r in rows]
    pair = re.compile(r"(.*?)\((-?\d+\.\d\d|nan)\)", re.DOTALL)
    for step in (1, 2, 3):
        blocks = code_blocks(sections[step])
        assert len(blocks) == 3
        for block, text, row in zip(blocks, decoded, rows):
            words = pair.findall(block)
            assert "".join(w for w, _ in words) == text  # the words re-join into the completion
            assert text.startswith(rollout.texts[row])
            if step == 1:
                assert {v for _, v in words} == {"0.50"} and "</think>(0.50)Answer:(0.50)" in block
        totals = re.findall(r"^Total reward " + NUMBER + " · advantage " + NUMBER, sections[step], flags=re.MULTILINE)
        assert [float(x) for pair in totals for x in pair] == pytest.approx(
            [x for r in rows for x in (rollout.rewards["total"][r].item(), advantages[r].item())], abs=1e-3)
    # Word weight = mean over its tokens: Answer + ':' are tokens 6 and 7; café's é spans two tokens.
    assert code_blocks(sections[2])[0] == ("<think>(0.00)there(1.00) are(2.00) 1(3.00) shapes(4.00)</think>(5.00)"
                                           "Answer:(6.50) A(8.00)<|im_end|>(9.00)")
    assert "token weights are off; showing VGR" in sections[3] and "Answer:(0.65)" in sections[3]
    assert "token weights and attention metrics are off in this run" in sections[4]
    plain = code_blocks(sections[4])
    assert not re.search(r"\(\d", "".join(plain))
    assert plain[0].split("·") == ["<think>", "there", " are", " 1", " shapes", "</think>", "Answer:", " A",
                                   "<|im_end|>"]
    assert ["".join(b.split("·")) for b in plain] == decoded


def test_token_weights_multibyte_word(setup, tmp_path):
    tok, rollout, advantages, _ = setup
    path = tmp_path / "token_weights.md"
    one = torch.ones(rollout.completion_ids.shape)
    sub = Rollout(rollout.prompt_inputs, rollout.completion_ids[3:4], rollout.completion_mask[3:4],
                  rollout.truncated[3:4], rollout.texts[3:4], [], {"total": rollout.rewards["total"][3:4]})
    append_token_weights(str(path), 1, tok, sub, advantages[3:4], 1, weights=one[3:4])
    block = code_blocks(path.read_text())[0]
    assert "café(1.00)" in block and "\ufffd" not in block


def test_terminal_log(tmp_path):
    path = tmp_path / "run_terminal.md"
    log = TerminalLog(str(path))
    log.config({"TOTAL_STEPS": 3, "DATASET": "synthetic", "QUESTION_KINDS": ["count"]})
    log.line("run folder: runs/dapo_x\npolicy on cpu")
    log.metrics(1, {"step": 1, "reward/accuracy/mean": 0.123456, "policy/loss": -0.0123456, "policy/kl": None,
                    "dapo/gen_batches": 3, "perf/step_s": 1.87654, "response/length/mean": 12.5})
    log.warning("step 2: no informative group in 8 sampled; no update this step")
    after_warning = path.read_text()  # written at once, without closing anything
    log.metrics(2, {"reward/total/mean": 2.5, "attention/early/mdi": 6.2345, "eval/accuracy": 0.9})
    log.error("loss is not finite")
    text = path.read_text()
    assert "> **WARNING** step 2: no informative group" in after_warning
    config = re.search(r"## Config\n\n```\n(.*?)\n```", text, re.DOTALL).group(1).splitlines()
    assert [re.sub(r"\s+=", " =", line) for line in config] == [
        "TOTAL_STEPS = 3", "DATASET = 'synthetic'", 'QUESTION_KINDS = ["count"]']
    assert "run folder: runs/dapo_x  \npolicy on cpu  \n" in text
    steps = step_sections(text.replace("### Step", "## Step"))
    assert "**Rewards**\n\n- reward/accuracy/mean: 0.1235" in steps[1]
    assert "**Policy**\n\n- policy/loss: -0.01235" in steps[1] and "policy/kl" not in steps[1]
    assert "**Dynamic sampling**\n\n- dapo/gen_batches: 3" in steps[1] and "- perf/step_s: 1.877" in steps[1]
    assert "**Attention**: off" in steps[1] and "**Eval**" not in steps[1]
    assert "**Attention**\n\n- attention/early/mdi: 6.234" in steps[2] and "off" not in steps[2]
    assert "**Eval**\n\n- eval/accuracy: 0.9" in steps[2]
    assert text.index("### Step 1") < text.index("WARNING") < text.index("### Step 2") < text.index("> **ERROR** loss")
    assert os.path.getsize(path) == len(text.encode())
