"""LoRA (utils/lora.py): which layers get adapters, what trains, the reference without adapters, the merged
generation copy, bf16-mixed, PPO's critic, checkpoints PEFT loads, the merge command, and the trainers end to end."""

import glob
import json
import os
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch

from utils import layout
from utils.config import UserError
from utils.critic import build_critic
from utils.generation import Decoding
from utils.logprobs import Passes, batched_logprobs
from utils.lora import lora_layers, merged_copy
from utils.model import load_model, load_processor, load_trainable_model, suppressed_token_ids, sync_rollout_model
from utils.rollout import generate
from utils.trainer import trainable
from utils.update import Targets, policy_update

from tests.test_model import examples
from tests.test_trainers import run_trainer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def rollout(tiny_vlm_path):
    processor = load_processor(tiny_vlm_path)
    model = load_model(tiny_vlm_path, "cpu", torch.float32)
    torch.manual_seed(0)
    return generate(model, processor, examples(3, seed=4), 2,
                    Decoding(10, temperature=2.0, suppress_ids=suppressed_token_ids(processor.tokenizer)))


def lora_policy(path, make_specs, precision="fp32", **overrides):
    specs = make_specs(**{"LORA_RANK": 4, "LORA_ALPHA": 8.0, **overrides})
    return load_trainable_model(path, "cpu", specs.model, specs.lora, precision), specs


def perturb_adapters(model, seed=0):
    """B starts at zero (the run starts at the starting model); a trained adapter's B does not."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(0.05 * torch.randn(p.shape, generator=generator))


@pytest.mark.parametrize("targets, expected", [
    ("language", {f"model.language_model.layers.{i}.{m}" for i in range(4) for m in (
        "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj",
        "mlp.up_proj", "mlp.down_proj")}),
    ("q_proj, v_proj", {f"model.language_model.layers.{i}.self_attn.{m}" for i in range(4) for m in ("q_proj",
                                                                                                      "v_proj")}),
    ("vision", {f"model.visual.blocks.{i}.{m}" for i in range(2) for m in (
        "attn.qkv", "attn.proj", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")} | {
        "model.visual.merger.mlp.0", "model.visual.merger.mlp.2"}),
])
def test_targets_name_the_adapted_layers_and_only_adapters_train(tiny_vlm_path, make_specs, targets, expected):
    policy, _ = lora_policy(tiny_vlm_path, make_specs, LORA_TARGET_MODULES=targets)
    assert layout.is_lora(policy) and {name for name, _ in lora_layers(policy)} == expected
    names = [n for n, p in policy.named_parameters() if p.requires_grad]
    assert names and all(".lora_A." in n or ".lora_B." in n for n in names)
    assert len(names) == 2 * len(expected)
    assert all(p.dtype == torch.float32 for p in trainable(policy))


def test_bad_targets_are_refused(tiny_vlm_path, make_specs):
    with pytest.raises(ValueError, match="no linear layer of the text decoder is named 'qproj'"):
        lora_policy(tiny_vlm_path, make_specs, LORA_TARGET_MODULES="language,qproj")
    for bad in (" , ", "q-proj"):
        with pytest.raises(UserError, match="expected comma-separated names, at least one"):
            make_specs(LORA_RANK=8, LORA_TARGET_MODULES=bad)
    with pytest.raises(UserError, match="FREEZE_VISION_TOWER=True with LORA_TARGET_MODULES naming 'vision'"):
        make_specs(LORA_RANK=8, LORA_TARGET_MODULES="language,vision", FREEZE_VISION_TOWER=True)


def test_reference_is_the_base_and_the_merged_copy_is_the_policy(tiny_vlm_path, make_specs, rollout):
    base = load_model(tiny_vlm_path, "cpu", torch.float32)
    policy, _ = lora_policy(tiny_vlm_path, make_specs)
    copy = merged_copy(policy, "cpu", torch.float32)
    logp = lambda model: batched_logprobs(model, rollout, 6)[0]  # noqa: E731
    assert torch.equal(logp(policy), logp(base))  # B = 0: the run starts at the starting model
    perturb_adapters(policy)
    assert (logp(policy) - logp(base)).abs().max() > 1e-2  # the adapters change the policy ...
    assert torch.equal(logp(layout.AdaptersOff(policy)), logp(base))  # ... not its base, the reference
    assert (logp(policy) - logp(base)).abs().max() > 1e-2  # the adapters are back on after the reference pass
    assert (logp(copy) - logp(base)).abs().max() < 1e-6  # the copy holds what it was made with, until ...
    sync_rollout_model(policy, copy)  # ... the refresh after an optimizer step
    assert (logp(copy) - logp(policy)).abs().max() < 1e-4
    assert not any(p.requires_grad for p in copy.parameters()) and not layout.is_lora(copy)


@pytest.mark.parametrize("checkpointing", [False, True])
def test_bf16_mixed_keeps_the_base_in_bf16_and_trains_fp32_adapters(tiny_vlm_path, make_specs, rollout,
                                                                     checkpointing):
    policy, specs = lora_policy(tiny_vlm_path, make_specs, "bf16-mixed", GRADIENT_CHECKPOINTING=checkpointing)
    frozen = {n: p.detach().clone() for n, p in policy.named_parameters() if not p.requires_grad}
    assert frozen and all(p.dtype == torch.bfloat16 for p in frozen.values())
    adapters = {n: p.detach().clone() for n, p in policy.named_parameters() if p.requires_grad}
    optimizer = torch.optim.AdamW(trainable(policy), lr=1e-2)
    mask = rollout.completion_mask.float()
    targets = Targets(torch.linspace(-1, 1, len(rollout)), mask, batched_logprobs(policy, rollout, 6)[0])
    stats = policy_update(policy, optimizer, rollout, targets, specs.loss, specs.optim, Passes(precision="bf16-mixed"))
    assert stats["skipped_updates"] == 0
    after = dict(policy.named_parameters())
    # B (zero at the start) takes the gradient of the first step; A's is B·(...) = 0 then, it moves by weight decay
    assert all(not torch.equal(after[n], p) for n, p in adapters.items() if "lora_B" in n)
    assert all(torch.equal(after[n], p) for n, p in frozen.items())  # the base did not
    states = [s for s in optimizer.state.values()]
    assert len(states) == len(adapters) and all(s["exp_avg"].dtype == torch.float32 for s in states)


@pytest.mark.parametrize("shared", [True, False])
def test_ppo_critic_with_lora(tiny_vlm_path, make_specs, rollout, shared):
    """Shared: the value head on the policy's backbone, trained through the policy's adapters. Separate: a copy of
    the starting model with adapters of its own; the policy's stay where they are."""
    specs = make_specs("ppo", LORA_RANK=4, LORA_ALPHA=8.0, CRITIC_SHARED_BACKBONE=shared, MICRO_BATCH_SIZE=6,
                       CLIP_RANGE_VALUE=0.0)
    policy = load_trainable_model(tiny_vlm_path, "cpu", specs.model, specs.lora)
    critic = build_critic(specs, SimpleNamespace(policy=policy, path=tiny_vlm_path, policy_device="cpu",
                                                 precision="fp32"))
    body = [p for n, p in critic.named_parameters() if p.requires_grad and not n.startswith("head.")]
    policy_adapters = {id(p) for p in trainable(policy)}
    assert len(body) == len(policy_adapters)  # the critic's base is frozen: its backbone trains through adapters
    assert all(id(p) in policy_adapters for p in body) if shared else not any(id(p) in policy_adapters for p in body)
    before = {n: p.detach().clone() for n, p in [*policy.named_parameters(), *critic.named_parameters()]}
    optimizer = torch.optim.AdamW({id(p): p for p in [*trainable(policy), *trainable(critic)]}.values(), lr=1e-2,
                                  weight_decay=0.0)
    mask = rollout.completion_mask.float()
    rollout.rewards = {"total": torch.arange(6.0)}
    targets = Targets(torch.zeros_like(mask), mask, torch.zeros_like(mask), values_old=torch.zeros_like(mask),
                      returns=rollout.rewards["total"].unsqueeze(1) * mask)  # zero advantages: no policy gradient
    for _ in range(2):  # the second step: the head is no longer zero, so the value loss reaches the backbone
        policy_update(policy, optimizer, rollout, targets, specs.loss, specs.optim, critic=critic)
    moved = lambda named: {n for n, p in named if not torch.equal(p, before[n])}  # noqa: E731
    assert {"head.weight", "head.bias"} <= moved(critic.named_parameters())
    critic_body = moved((n, p) for n, p in critic.named_parameters() if not n.startswith("head."))
    assert critic_body and all(".lora_" in n for n in critic_body)  # the critic's adapters (shared or its own)
    assert bool(moved(policy.named_parameters())) == shared  # the policy's only through a shared backbone


def test_trainer_checkpoint_holds_peft_adapters_and_the_merge_command(tiny_vlm_path, tmp_path):
    """grpo.py with LoRA and a KL term (the reference: the policy without adapters): the checkpoint holds the
    adapters in PEFT's format, PeftModel loads them, and `python -m utils.lora` writes a model transformers loads
    on its own, with the same log-probs."""
    from peft import PeftModel
    from transformers import Qwen2_5_VLForConditionalGeneration

    run_dir = run_trainer("grpo.py", tmp_path / "runs", "--LORA_RANK=4", "--LEARNING_RATE=3e-2", "--PLOT_EVERY=0")
    rows = [json.loads(line) for line in open(os.path.join(run_dir, "metrics.jsonl"))]
    assert json.load(open(os.path.join(run_dir, "config.json")))["KL_BETA"] > 0
    assert rows[1]["policy/kl"] == pytest.approx(0, abs=1e-6)  # step 1 samples from the starting model
    moved = rows[1]["policy/advantage_abs_mean"] > 0  # (unless every group of step 1 happened to be flat)
    assert rows[2]["policy/kl"] > 0 or not moved  # step 2 from the trained adapters: the reference is the base
    log = open(os.path.join(run_dir, "run_terminal.md")).read()
    assert "generation by a merged torch.float32 copy" in log and "reference: the policy without its adapters" in log
    assert "M of them in LoRA adapters" in log
    checkpoint = os.path.join(run_dir, "checkpoints", "step_2")
    assert {"adapter_config.json", "adapter_model.safetensors"} <= set(os.listdir(checkpoint))
    assert not glob.glob(os.path.join(checkpoint, "model*.safetensors"))  # no copy of the frozen base
    peft_model = PeftModel.from_pretrained(load_model(tiny_vlm_path, "cpu", torch.float32), checkpoint)
    merged_dir = tmp_path / "merged"
    done = subprocess.run([sys.executable, "-m", "utils.lora", checkpoint, str(merged_dir)], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    merged = Qwen2_5_VLForConditionalGeneration.from_pretrained(merged_dir)
    processor = load_processor(str(merged_dir))  # the processor travels with it
    torch.manual_seed(1)
    batch = generate(merged, processor, examples(2, seed=9), 2, Decoding(8, temperature=2.0))
    got, want = batched_logprobs(merged, batch, 4)[0], batched_logprobs(peft_model, batch, 4)[0]
    assert (got - want).abs().max() < 1e-4
    base = load_model(tiny_vlm_path, "cpu", torch.float32)
    trained = any(r["policy/advantage_abs_mean"] > 0 for r in rows[1:])
    assert (batched_logprobs(base, batch, 4)[0] - want).abs().max() > 1e-4 or not trained  # the adapters trained
    refused = subprocess.run([sys.executable, "-m", "utils.lora", tiny_vlm_path, str(tmp_path / "x")], cwd=ROOT,
                             capture_output=True, text=True, timeout=300)
    assert refused.returncode != 0 and "not the checkpoint of a LoRA run" in refused.stderr


@pytest.mark.parametrize("script, extra", [("dapo.py", ("--DYNAMIC_SAMPLING=False", "--PRECISION=bf16-mixed")),
                                           ("ppo.py", ("--GROUP_SIZE=1", "--TRAIN_BATCH_PROMPTS=6",
                                                       "--CRITIC_WARMUP_STEPS=1"))])
def test_trainers_train_adapters(tiny_vlm_path, tmp_path, script, extra):
    run_dir = run_trainer(script, tmp_path / "runs", "--LORA_RANK=4", "--PLOT_EVERY=0", "--SAVE_EVERY=1", *extra)
    rows = [json.loads(line) for line in open(os.path.join(run_dir, "metrics.jsonl"))]
    trained = [r for r in rows[1:] if r.get("policy/updates")]
    assert trained and all(r["policy/skipped_updates"] == 0 for r in trained)
    assert all(r["policy/grad_norm"] > 0 for r in trained if r["policy/advantage_abs_mean"] > 0)
    from safetensors.torch import load_file

    first, second = (load_file(os.path.join(run_dir, "checkpoints", f"step_{s}", "adapter_model.safetensors"))
                     for s in (1, 2))
    assert set(first) == set(second) and all(w.dtype == torch.float32 for w in second.values())
    if rows[2].get("policy/advantage_abs_mean", 0) > 0:  # (a step whose groups are all flat has no gradient)
        assert any(not torch.equal(first[k], second[k]) for k in first)  # the adapters trained in step 2


def test_gpu_check_without_a_gpu_says_so_and_its_commands_are_valid(make_specs, capsys, monkeypatch):
    """benchmarks/gpu_check.py: on this CPU machine it exits 0 with one line; the trainer overrides of its checks are
    constants dapo.py accepts (OFFLOAD_OPTIMIZER's under torchrun), and its memory-plan check runs (the other checks
    need the GPU). The offload check runs with 2 GPUs or more."""
    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
    import gpu_check

    if torch.cuda.is_available():
        pytest.skip("a GPU is present: run benchmarks/gpu_check.py itself")
    assert gpu_check.main([]) == 0
    assert "torch sees no GPU on this machine" in capsys.readouterr().out
    assert len(gpu_check.commands(1, "/tmp/workdir")) == 5
    checks = gpu_check.commands(2, "/tmp/workdir")
    assert len(checks) == 6 and all(limit > 0 for _, _, limit in checks)
    monkeypatch.setenv("WORLD_SIZE", "2")  # as under torchrun
    value = lambda v: json.loads(v.lower()) if v[:1].isdigit() or v in ("True", "False") else v  # noqa: E731
    for name, command, _ in checks:
        overrides = [a[2:].split("=", 1) for a in command if a.startswith("--") and a[2:3].isupper()]
        if overrides:  # a trainer run: every override names a constant with a valid value (the GPU's: here the CPU)
            make_specs(**{k: value(v.replace("cuda:0", "cpu")) for k, v in overrides})
        if "--plan" in command:
            done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=120)
            assert done.returncode == 0 and "one GPU, DAPO, gradient checkpointing" in done.stdout, done.stderr
