"""logprobs_from_hidden in chunks (ChunkedLogprobs: the backward recomputes them) equals the whole-sequence
computation, gradients included, and its logits are fp32 under bf16 autocast."""

import types

import pytest
import torch

from utils.logprobs import logprobs_from_hidden

B, L, HIDDEN, VOCAB = 3, 10, 16, 50
TEMPERATURE = 0.7


def tiny_head(bias=False):
    torch.manual_seed(0)
    model = types.SimpleNamespace(lm_head=torch.nn.Linear(HIDDEN, VOCAB, bias=bias))
    hidden = torch.randn(B, L + 1, HIDDEN, requires_grad=True)
    ids = torch.randint(VOCAB, (B, L))
    return model, hidden, ids


def reference(model, hidden, ids):
    """The whole [b, L, vocab] at once, in fp32 (what logprobs_from_hidden computed before chunking)."""
    log_probs = torch.log_softmax(model.lm_head(hidden.float())[:, :-1] / TEMPERATURE, -1)
    return log_probs.gather(-1, ids.unsqueeze(-1)).squeeze(-1), -(log_probs.exp() * log_probs).sum(-1)


def loss_and_grads(model, logp, entropy, hidden):
    """Gradients of a weighted sum of the log-probs and, unless entropy is None, of the entropies."""
    torch.manual_seed(1)
    loss = (logp * torch.randn_like(logp)).sum()
    if entropy is not None:
        loss = loss + (entropy * torch.randn_like(entropy)).sum()
    params = [hidden, model.lm_head.weight] + ([model.lm_head.bias] if model.lm_head.bias is not None else [])
    return torch.autograd.grad(loss, params, retain_graph=True)


@pytest.mark.parametrize("bias", [False, True])
def test_chunked_logprobs_entropy_and_gradients_equal_unchunked(bias):
    model, hidden, ids = tiny_head(bias)
    budget = 3 * B * VOCAB * 4  # 3 tokens per chunk: chunks of 3, 3, 3, 1
    logp, entropy = logprobs_from_hidden(model, hidden, ids, TEMPERATURE, with_entropy=True, budget_bytes=budget)
    whole_logp, whole_entropy = logprobs_from_hidden(model, hidden, ids, TEMPERATURE, with_entropy=True,
                                                     budget_bytes=2**40)
    ref_logp, ref_entropy = reference(model, hidden, ids)
    for value, expected in ((logp, whole_logp), (logp, ref_logp), (entropy, whole_entropy), (entropy, ref_entropy)):
        assert value.shape == (B, L) and value.dtype == torch.float32
        assert torch.allclose(value, expected, atol=1e-6)
    grads = loss_and_grads(model, logp, entropy, hidden)  # backward through the checkpointed chunks
    for expected in (loss_and_grads(model, whole_logp, whole_entropy, hidden),
                     loss_and_grads(model, ref_logp, ref_entropy, hidden)):
        for g, e in zip(grads, expected):
            assert torch.allclose(g, e, atol=1e-6)
    logp_only = loss_and_grads(model, logp, None, hidden)  # the entropy outside the loss: no gradient from it
    for g, e in zip(logp_only, loss_and_grads(model, ref_logp, None, hidden)):
        assert torch.allclose(g, e, atol=1e-6)
    with torch.no_grad():
        no_grad_logp, no_entropy = logprobs_from_hidden(model, hidden, ids, TEMPERATURE, budget_bytes=budget)
    assert no_entropy is None and torch.allclose(no_grad_logp, ref_logp, atol=1e-6)


def test_logits_are_fp32_under_bf16_autocast():
    """Mixed-precision training: the backbone runs under bf16 autocast (its hidden states come out bf16), the
    lm_head weight is an fp32 master weight. The log-probs must come from fp32 logits anyway."""
    model, hidden, ids = tiny_head()
    hidden_bf16 = hidden.detach().bfloat16().requires_grad_()
    expected_logp, expected_entropy = reference(model, hidden_bf16.float(), ids)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logp, entropy = logprobs_from_hidden(model, hidden_bf16, ids, TEMPERATURE, with_entropy=True,
                                             budget_bytes=3 * B * VOCAB * 4)
        bf16_logits = model.lm_head(hidden_bf16)  # what a plain lm_head call gives under autocast
    assert logp.dtype == entropy.dtype == torch.float32
    assert torch.allclose(logp, expected_logp, atol=1e-6)
    assert torch.allclose(entropy, expected_entropy, atol=1e-6)
    assert bf16_logits.dtype == torch.bfloat16  # the test can tell the two apart:
    bf16_logp = torch.log_softmax(bf16_logits[:, :-1].float() / TEMPERATURE, -1).gather(-1, ids.unsqueeze(-1))
    assert (bf16_logp.squeeze(-1) - expected_logp).abs().max() > 1e-3
    logp.sum().backward()  # gradients reach the bf16 hidden states and the fp32 master weight
    assert hidden_bf16.grad.dtype == torch.bfloat16 and model.lm_head.weight.grad.dtype == torch.float32
