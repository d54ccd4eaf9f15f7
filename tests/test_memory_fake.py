"""benchmarks/memory_fake.py: a DAPO update under fake tensors, at the 3B configuration's widths cut to one text
layer and one vision block. What it counts must be what the step holds: fp32 weights, gradients and AdamW state
for full fine-tuning, split over the ranks under FSDP2; a bf16 base with fp32 adapters under LoRA."""

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GiB = 2**30


def measure(*args):
    command = [sys.executable, os.path.join(ROOT, "benchmarks", "memory_fake.py"), "--model", "3b", "--layers", "1",
               "--vision-depth", "1", "--completion-tokens", "256", "--prompt-tokens", "64", *args]
    done = subprocess.run(command, capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("ranks", [1, 2])
def test_full_fine_tuning_shards_its_states_and_measures_the_step(ranks):
    r = measure("--ranks", str(ranks))
    n = r["parameters"] - r["vision_blocks"]  # the vision blocks leave the FSDP run (the table counts them)
    assert r["weights"] == pytest.approx(4 * n / ranks, rel=0.01) and r["trained"] == pytest.approx(n / ranks, rel=0.01)
    assert r["tracked_weights"] <= r["weights"] * 1.01  # the tracker sees the weights of the modules that ran
    # the step's peak holds at least the tracked weights, the gradients and AdamW's moments, plus activations that
    # are not zero and, the log-probs being chunked, far below the [8, 256, 151936] fp32 logits (1.2 GiB)
    assert r["peak"] >= r["tracked_weights"] + 0.9 * 12 * r["trained"]
    assert 0 < r["activations"] < 1.0 * GiB


def test_lora_trains_fp32_adapters_on_a_bf16_base():
    r = measure("--lora-rank", "8")
    n = r["parameters"]
    assert 0 < r["trained"] < 0.01 * n  # the adapters
    assert r["weights"] == pytest.approx(2 * n + 4 * r["trained"], rel=0.01)  # bf16 base, fp32 adapters
    # no fp32 master and no gradient of the base; the log-probs' fp32 copy of the bf16 lm_head (3B: 151,936 x 2,048)
    # is held from the forward to the backward
    head = 4 * 151_936 * 2_048
    assert r["peak"] < r["weights"] + 16 * r["trained"] + head + 1.0 * GiB
