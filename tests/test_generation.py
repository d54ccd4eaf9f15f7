"""The shared-prefill decode loop (utils/generation.py) against transformers' generate and teacher forcing; the
compiled static-cache decode against the eager loop."""

import shutil
from dataclasses import replace

import pytest
import torch

from utils import generation

from data.prompts import encode_prompts
from tests.test_model import examples, qwen2_vl_checkpoint
from utils import layout
from utils.batch import slice_inputs
from utils.generation import Decoding, sample_completions, top_p_filter
from utils.logprobs import completion_logprobs
from utils.model import load_model, load_processor, suppressed_token_ids
from utils.rollout import completion_mask_from_ids


def eos_ids_of(model):
    eos = model.generation_config.eos_token_id
    return [eos] if isinstance(eos, int) else list(eos)


def assert_greedy_matches_hf_generate(model, processor, n_prompts=5, group_size=2, max_new_tokens=16):
    """Greedy tokens from one prefill per prompt equal model.generate's on the prompts repeated G times."""
    pad = processor.tokenizer.pad_token_id
    inputs = encode_prompts(processor, examples(n_prompts))
    assert (inputs["attention_mask"] == 0).any(), "the check needs left padding"
    eos = eos_ids_of(model)
    ids, _, _ = sample_completions(model, inputs, group_size, Decoding(max_new_tokens, greedy=True), eos_ids=eos,
                                pad_id=pad)
    repeated = slice_inputs(inputs, [i for i in range(n_prompts) for _ in range(group_size)])
    out = model.generate(**repeated, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=pad, eos_token_id=eos)
    expected = out[:, repeated["input_ids"].shape[1] :]
    mask, _ = completion_mask_from_ids(expected, eos)
    assert torch.equal(ids, expected.masked_fill(mask == 0, pad))


def test_greedy_matches_transformers_generate(tiny_vlm_path):
    assert_greedy_matches_hf_generate(load_model(tiny_vlm_path, "cpu", torch.float32), load_processor(tiny_vlm_path))


def test_a_policy_in_training_with_gradient_checkpointing_samples_the_same(tiny_vlm_path):
    """transformers drops the KV cache of checkpointed layers in training mode; sampling must not notice."""
    processor, model = load_processor(tiny_vlm_path), load_model(tiny_vlm_path, "cpu", torch.float32)
    inputs, pad, eos = encode_prompts(processor, examples(3)), processor.tokenizer.pad_token_id, eos_ids_of(model)
    greedy = Decoding(12, greedy=True)
    expected, _, _ = sample_completions(model.eval(), inputs, 2, greedy, eos_ids=eos, pad_id=pad)
    model.gradient_checkpointing_enable()
    model.train()
    ids, _, _ = sample_completions(model, inputs, 2, greedy, eos_ids=eos, pad_id=pad)
    assert torch.equal(ids, expected) and model.training


def test_greedy_matches_transformers_generate_on_qwen2_vl(tmp_path):
    path = qwen2_vl_checkpoint(tmp_path)
    assert_greedy_matches_hf_generate(load_model(path, "cpu", torch.float32), load_processor(path), max_new_tokens=8)


# COMPILED_DECODE's step through torch.compile with Inductor (C++ kernels: a compiler is needed) and through the
# "eager" backend (the same graph, uncompiled: the static cache's bookkeeping on any machine).
BACKENDS = ["eager", pytest.param("inductor", marks=pytest.mark.skipif(
    not any(shutil.which(c) for c in ("g++", "c++", "clang++")), reason="Inductor needs a C++ compiler"))]


@pytest.mark.parametrize("backend", [None, *BACKENDS], ids=["eager loop", "static, eager", "static, inductor"])
def test_sampling_logprobs_are_the_teacher_forced_ones(tiny_vlm_path, backend, monkeypatch):
    """The returned log-probs equal a forward pass over prompt + completion (at the sampling temperature);
    vision tokens are never sampled; each row ends at its first end token and is padded after it. The same holds
    for the compiled static-cache decode (COMPILED_DECODE), whose rows stay in the batch after they end."""
    processor, model = load_processor(tiny_vlm_path), load_model(tiny_vlm_path, "cpu", torch.float32)
    pad, eos, G = processor.tokenizer.pad_token_id, eos_ids_of(model), 4
    suppress = suppressed_token_ids(processor.tokenizer)
    inputs = encode_prompts(processor, examples(3, seed=4))
    generator = torch.Generator().manual_seed(0)
    monkeypatch.setattr(generation, "COMPILE_BACKEND", backend or "inductor")
    decoding = Decoding(20, temperature=2.0, top_p=0.95, suppress_ids=tuple(suppress), compiled=backend is not None)
    ids, logp, log_kept = sample_completions(model, inputs, G, decoding, eos_ids=eos, pad_id=pad,
                                             generator=generator)
    mask, ended = completion_mask_from_ids(ids, eos)
    assert ids.shape[0] == 3 * G and ids.shape[1] <= 20 and (~ended).any() and ended.any()
    assert (ids[mask == 0] == pad).all() and (logp[mask == 0] == 0).all()
    assert not torch.isin(ids, torch.tensor(suppress)).any()
    repeated = slice_inputs(inputs, [i for i in range(3) for _ in range(G)])
    expected, _ = completion_logprobs(model, repeated, ids, mask, temperature=2.0)
    assert logp.dtype == torch.float32
    assert torch.allclose(logp[mask.bool()], expected[mask.bool()], atol=1e-4)
    # log_kept: the mass top-p and suppression left (< 0 where they cut, never above 0); under the distribution
    # actually sampled a token is at least as likely as under the full one.
    assert (log_kept <= 1e-6).all() and (log_kept[mask.bool()] < -1e-3).any() and (log_kept[mask == 0] == 0).all()
    assert (logp - log_kept <= 1e-6).all()
    # The same generator state gives the same completions.
    again, _, _ = sample_completions(model, inputs, G, decoding, eos_ids=eos, pad_id=pad,
                                     generator=torch.Generator().manual_seed(0))
    assert torch.equal(ids, again)


@pytest.mark.parametrize("backend", BACKENDS)
def test_compiled_static_cache_decode_gives_the_eager_loops_greedy_tokens(tiny_vlm_path, backend, monkeypatch):
    """COMPILED_DECODE: greedy decoding on the static KV cache through the compiled step gives the eager loop's tokens
    (left-padded prompts, rows ending at different steps), a second call reuses the compiled step, and it decodes
    with the weights as they are now (an optimizer step changes them in place)."""
    monkeypatch.setattr(generation, "COMPILE_BACKEND", backend)
    processor, model = load_processor(tiny_vlm_path), load_model(tiny_vlm_path, "cpu", torch.float32).eval()
    inputs, pad, eos = encode_prompts(processor, examples(5)), processor.tokenizer.pad_token_id, eos_ids_of(model)
    assert (inputs["attention_mask"] == 0).any(), "the check needs left padding"
    greedy = Decoding(16, greedy=True)
    expected, expected_logp, _ = sample_completions(model, inputs, 2, greedy, eos_ids=eos, pad_id=pad)
    mask, ended = completion_mask_from_ids(expected, eos)
    assert ended.any() and len(set(mask.sum(1).tolist())) > 1, "the check needs rows that end at different steps"
    compiled = replace(greedy, compiled=True)
    for _ in range(2):
        ids, logp, _ = sample_completions(model, inputs, 2, compiled, eos_ids=eos, pad_id=pad)
        assert torch.equal(ids, expected)
        assert torch.allclose(logp, expected_logp, atol=1e-4)
    assert list(generation._COMPILED_STEPS[model]) == [backend]
    with torch.no_grad():  # as an optimizer step does: in place
        for p in layout.decoder_layers(model)[0].mlp.parameters():
            p.mul_(3.0)
    updated, _, _ = sample_completions(model, inputs, 2, greedy, eos_ids=eos, pad_id=pad)
    assert not torch.equal(updated, expected)
    assert torch.equal(sample_completions(model, inputs, 2, compiled, eos_ids=eos, pad_id=pad)[0], updated)


def test_top_p_keeps_the_smallest_set_reaching_p():
    scores = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    kept = top_p_filter(scores, 0.8).isfinite()
    assert kept.tolist() == [[True, True, False, False]]
    assert top_p_filter(scores, 0.01).isfinite().tolist() == [[True, False, False, False]]
