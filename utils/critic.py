"""PPO's critic: a value head on the policy's backbone, or on a separate copy of the model."""

import torch
from torch import nn

from utils import layout
from utils.batch import slice_inputs
from utils.distributed import compute_device, equal_passes
from utils.logprobs import completion_hidden_states
from utils.precision import autocast, no_autocast


class Critic(nn.Module):
    """V(s_t) for every completion token t: a linear head on the final hidden state at the position that predicts
    token t, i.e. the state after the prompt and the completion's first t tokens.

    backbone: the decoder of a Qwen-VL model, vision tower included (utils.layout.backbone). Passing the policy's
    own backbone gives the shared variant (one model in memory; the value loss trains the backbone too); passing
    a copy's gives a separate critic (twice the weights). The head is float32 and starts at zero (V = 0).
    """

    def __init__(self, backbone, hidden_size, spec=None):
        super().__init__()
        self.backbone, self.spec = backbone, spec  # spec: the CriticSpec (VF_COEF, CLIP_RANGE_VALUE, ...)
        self.head = nn.Linear(hidden_size, 1)
        nn.init.zeros_(self.head.weight)
        nn.init.zeros_(self.head.bias)

    def values(self, hidden):
        """Values [b, L] (float32) from completion_hidden_states of the backbone, [b, L+1, H]. A policy that
        shares the backbone passes the hidden states of its own forward pass, so both come from one pass. The head
        runs in fp32 even inside a bf16 autocast region."""
        with no_autocast(hidden.device):
            return self.head(hidden[:, :-1].float()).squeeze(-1)

    def forward(self, prompt_inputs, completion_ids, completion_mask):
        """Values [b, L] of a batch: prompt_inputs [b, P] processor batch, completion_ids/mask [b, L]."""
        return self.values(completion_hidden_states(self.backbone, prompt_inputs, completion_ids, completion_mask))

    @torch.no_grad()
    def batched(self, batch, micro_batch_size, precision="fp32"):
        """forward over a whole Rollout in micro-batches, without gradients, in `precision` (utils/precision.py).
        Returns [B, L] on CPU. Under torchrun every rank runs as many passes as the busiest (a sharded forward
        gathers weights from all ranks); the extra ones rerun the first rows and are dropped."""
        out = []
        device = compute_device(self)  # an offloaded head's weight is in CPU memory
        n = len(batch)
        for start in range(0, equal_passes(n, micro_batch_size) * micro_batch_size, micro_batch_size):
            rows = slice(start, start + micro_batch_size) if start < n else slice(0, 1)
            with autocast(precision, device):
                values = self(slice_inputs(batch.prompt_inputs, rows), batch.completion_ids[rows],
                              batch.completion_mask[rows])
            if start < n:
                out.append(values.cpu())
        return torch.cat(out)


def build_critic(specs, models):
    """PPO's critic for a run (CriticSpec specs.critic): a value head on the policy's own backbone
    (CRITIC_SHARED_BACKBONE), or on a separate copy of the starting model; on the policy's device, in train mode,
    sharded like the policy under torchrun."""
    from utils.distributed import shard_critic
    from utils.model import load_trainable_model

    if specs.critic.shared_backbone:
        body = layout.backbone(models.policy)
    else:  # a separate copy of the starting model, without its language-model head
        body = layout.backbone(load_trainable_model(models.path, models.policy_device, specs.model, specs.lora,
                                                    models.precision))  # LoRA: its own adapters
    critic = Critic(body, layout.hidden_size(models.policy), specs.critic).train()
    critic.head.to(models.policy_device)  # the backbone is there already (and the policy's may be sharded)
    return shard_critic(critic, models.policy, models.precision, specs.model.offload_optimizer)  # torchrun
