"""PPO with a learned critic for vision-language models (Schulman et al. 2017; the RLHF recipe of Ouyang et al.
2022), the third member of the family next to grpo.py and dapo.py.

Where GRPO compares G completions of the same prompt to get a baseline, PPO learns one: a critic V(s_t)
predicts, at every completion token, the reward still to come. Each step:

1. sample one completion for each of 128 prompts (GROUP_SIZE = 1; more are allowed) and score it as GRPO does;
2. token rewards: the outcome reward on the last token, minus KL_COEF·(logp_old − logp_ref) on every token
   (the KL penalty lives in the reward, not in the loss: KL_BETA = 0);
3. GAE (γ = GAMMA, λ = LAMBDA) over the valid tokens gives per-token advantages and returns, and the advantages
   are whitened over the batch;
4. the clipped surrogate (symmetric clip 0.2, token-mean) plus VF_COEF × the clipped value loss, for PPO_EPOCHS
   passes of MINI_BATCHES optimizer steps; the first CRITIC_WARMUP_STEPS steps train the critic alone.

PPO samples 128 completions per step, a budget close to GRPO's 24 × 8 = 192. With 64 prompts it trailed
(held-out accuracy 0.808 at step 40 instead of 0.958, in 100-step runs on an earlier machine). Its steps cost three
times DAPO's (π_old, reference and critic passes, 2 epochs × 2 mini-batches), but it learns in fewer: 60 by default.

The constants are grpo.py's, in the same order, plus the "Critic" block. The group-only options (dynamic
sampling, the replay buffer, the MDI reward) need GROUP_SIZE ≥ 2; SCALE_ADVANTAGE_BY_STD does not apply (GAE
advantages are whitened instead). Run `python ppo.py` (or override constants: `python ppo.py --TOTAL_STEPS=10`).
"""

import torch

from data import PromptSampler, load_datasets
from utils.attention import add_mdi_reward, attention_summary, token_weight_metrics, token_weights
from utils.config import constants_of, run_cli
from utils.critic import build_critic
from utils.distributed import rank_rows
from utils.grounding import grounding_metrics, visual_dependency
from utils.logprobs import batched_logprobs
from utils.model import sync_rollout_model
from utils.rl import explained_variance, gae, loss_tokens, rollout_gap, token_rewards, whiten
from utils.rollout import ReplayBuffer, sample_and_score, sample_step
from utils.trainer import StepTimer, load_models, start_run, trainable
from utils.update import Targets, policy_update, set_learning_rate

# ── Model and devices ─────────────────────────────────────────────────────────────────────────────
MODEL_NAME_OR_PATH = "embedded-tiny-vlm"  # Qwen2-VL / Qwen2.5-VL hub name or folder, or the built-in tiny VLM
MODEL_CACHE_DIR = ".cache"  # where the tiny VLM is built if its RECIPE differs from the shipped models/tiny-vlm/
TRUST_REMOTE_CODE = False  # bool; only for checkpoints whose code you trust
POLICY_DEVICE = "auto"  # "auto" | "cpu" | "cuda:N"; auto: cuda:0 if there is a GPU, else cpu
ROLLOUT_DEVICE = "auto"  # "auto" | "cpu" | "cuda:N"; reference + generation copy; auto: cuda:1 with 2 GPUs
PRECISION = "auto"  # "auto" (GPU: bf16-mixed, CPU: fp32) | "bf16-mixed" (fp32 weights + AdamW, bf16 compute) | "fp32"
MIN_PIXELS = 0  # fewest pixels per image after resizing; 0 = the processor's own (Qwen: 56·56)
MAX_PIXELS = 0  # most pixels per image after resizing; 0 = the processor's own, at most 1280 visual tokens (1280·28·28)
CPU_THREADS = 2  # torch threads on CPU; 0 = torch's default. Use 1 when another job shares the cores
GRADIENT_CHECKPOINTING = False  # bool; trade compute for memory on large models
OFFLOAD_OPTIMIZER = False  # bool; torchrun: sharded weights, gradients and AdamW state in CPU memory
FREEZE_VISION_TOWER = False  # bool; train only the language model (and the vision-language merger)
LORA_RANK = 0  # r of the LoRA adapters (PEFT) that train instead of the weights; 0 = full fine-tuning
LORA_ALPHA = 32.0  # LoRA scale: an adapter adds (LORA_ALPHA / LORA_RANK)·B·A to its layer's weight
LORA_DROPOUT = 0.0  # dropout on the adapters' inputs in training
LORA_TARGET_MODULES = "language"  # "language" (every linear layer of the text decoder) | "vision" | names, "q_proj,v_proj"
SEED = 0  # int; seeds torch, data order and sampling

# ── Data ──────────────────────────────────────────────────────────────────────────────────────────
DATASET = "synthetic"  # "synthetic" | HF hub name | save_to_disk folder | .parquet | .jsonl (image paths)
EVAL_DATASET = ""  # held-out source of the same kinds; "" = the EVAL_SPLIT of DATASET
TRAIN_SPLIT = "train"  # split name for HF sources with named splits
EVAL_SPLIT = "test"  # held-out split name for HF sources with named splits
QUESTION_KINDS = ["count"]  # synthetic only: any of "colour", "shape", "count" (the warm start left count to RL)
IMAGE_SIZE = 56  # synthetic only: pixels per side (multiple of 14)
MAX_OBJECTS = 4  # synthetic only: 1..4 objects per image
SHUFFLE_OPTIONS = False  # synthetic only: list options A-D in random order (much harder for a tiny model)
TRAIN_SIZE = 100_000  # synthetic only: number of training examples
IMAGE_KEY = "auto"  # image column (one image or a list): "auto" = "image" or "images" (none: text only) | name | ""
PROBLEM_KEY = "auto"  # problem column: "auto" = "problem", "question" or "prompt" | column name
ANSWER_KEY = "auto"  # solution column: "auto" = "solution" or "answer" | column name
SYSTEM_PROMPT = "auto"  # "auto" = letter form for multiple choice, \boxed{}/Answer: otherwise | your instruction
MAX_PROMPT_TOKENS = 1024  # rows whose prompt (image tokens included) is longer are skipped at load; 0 = no limit
EVAL_SAMPLES = 240  # held-out examples scored at each evaluation
EVAL_TEMPERATURE = 0.0  # 0 = greedy; above 0, EVAL_SAMPLES_PER_PROMPT completions per question are sampled at it
EVAL_TOP_P = 1.0  # nucleus sampling of the evaluation when EVAL_TEMPERATURE > 0; 1.0 = off
EVAL_SAMPLES_PER_PROMPT = 1  # k; above 1 also logs eval/mean_at_k and eval/pass_at_k (needs EVAL_TEMPERATURE > 0)
EVAL_BLANK_IMAGE = True  # bool; also score the questions with blank images: eval/accuracy_blank_image, grounding_gap

# ── Rollout ───────────────────────────────────────────────────────────────────────────────────────
TRAIN_BATCH_PROMPTS = 128  # prompts (groups) per training batch
GROUP_SIZE = 1  # G: completions sampled per prompt
MAX_NEW_TOKENS = 24  # L_max: completion length limit in tokens
TEMPERATURE = 1.0  # sampling temperature (log-probs are computed at the same temperature)
TOP_P = 1.0  # nucleus sampling; 1.0 = off
GENERATION_BATCH_SIZE = 128  # sequences generated at once
COMPILED_DECODE = False  # bool; static KV cache + torch.compile'd decode step (slower than eager on a CPU: docs)

# ── Rewards ───────────────────────────────────────────────────────────────────────────────────────
W_ACCURACY = 3.0  # weight of the accuracy reward (1 right / 0 wrong)
W_FORMAT = 1.0  # weight of the format reward (<think>…</think> then the answer)
NEGATIVE_ACCURACY_REWARD = False  # bool; accuracy is +1/-1 instead of 1/0 (DAPO paper's rule-based reward)
SOFT_OVERLONG_PUNISHMENT = False  # bool; DAPO Eq. 13 length penalty in the last OVERLONG_BUFFER tokens
OVERLONG_BUFFER = 8  # L_cache in tokens
REWARD_SWITCH_STEP = 0  # two-stage rewards: steps 1..N use REWARD_WEIGHTS_EARLY, later steps the W_* above; 0 = off
REWARD_WEIGHTS_EARLY = {"accuracy": 1.0, "format": 2.0}  # first-stage weights by reward ("accuracy", "format", "mdi")

# ── Algorithm ─────────────────────────────────────────────────────────────────────────────────────
POLICY_LOSS = "clip"  # "clip" | "gspo" | "gspo_token" | "cispo" | "sapo" | "gmpo" | "clip_cov" | "kl_cov"
LOSS_AGGREGATION = "token"  # "token" (DAPO: mean over tokens) | "sample" (GRPO: of sequence means) | "constant"
CLIP_EPS_LOW = 0.2  # ratio lower clip: 1 - CLIP_EPS_LOW
CLIP_EPS_HIGH = 0.2  # ratio upper clip: 1 + CLIP_EPS_HIGH (DAPO's Clip-Higher)
DUAL_CLIP_C = 0.0  # dual clip: a token with A < 0 loses at most -c·A, whatever its ratio (c > 1, e.g. 3.0); 0 = off
GSPO_CLIP_EPS_LOW = 3e-4  # gspo, gspo_token: the sequence ratio is clipped to [1 - this, 1 + GSPO_CLIP_EPS_HIGH]
GSPO_CLIP_EPS_HIGH = 4e-4  # (published 3e-4 and 4e-4: a sequence ratio moves far less than a token's)
CISPO_CLIP_EPS_LOW = 1.0  # cispo: the importance weight is clipped to [1 - this, 1 + CISPO_CLIP_EPS_HIGH]; 1.0 = no
CISPO_CLIP_EPS_HIGH = 4.0  # lower bound (as published); 4.0 as in ScaleRL (MiniMax-M1 published no value)
SAPO_TAU_POS = 1.0  # sapo: temperature of the soft gate for A > 0 (published 1.0) ...
SAPO_TAU_NEG = 1.05  # ... and for A < 0 (published 1.05); larger = a gate that closes faster
GMPO_CLIP_EPS = 0.4  # gmpo: each token's log-ratio is clipped to [-this, this] (published 0.4)
CLIP_COV_FRACTION = 2e-4  # clip_cov: fraction of the batch's tokens whose gradient is removed (published 2e-4) ...
CLIP_COV_LOW = 1.0  # ... drawn among tokens whose log-prob/advantage covariance is above this (published 1) ...
CLIP_COV_HIGH = 5.0  # ... and below this (published 5)
KL_COV_FRACTION = 2e-3  # kl_cov: fraction of the tokens, of highest covariance, given a KL penalty (published 2e-3)
KL_COV_COEF = 1.0  # kl_cov: coefficient of their |log ratio| penalty (published 1.0)
TOP_ENTROPY_QUANTILE = 1.0  # fraction of tokens, of highest entropy, that get the policy loss; 1 = off (published 0.2)
ROLLOUT_CORRECTION = ""  # "" (off) | "tis" (cap the sampler-to-learner weights) | "mis" (mask the tokens beyond bounds)
ROLLOUT_CORRECTION_LEVEL = "token"  # "token" | "sequence": one weight per token, or their product per sequence
ROLLOUT_TIS_CAP = 2.0  # tis: weights above this are capped at it
ROLLOUT_MIS_LOW = 0.5  # mis: tokens (sequences) whose weight is below this ...
ROLLOUT_MIS_HIGH = 2.0  # ... or above this leave the loss
KL_BETA = 0.0  # β of the k3 KL penalty to the reference model; 0 = no reference model is loaded
ENTROPY_COEF = 0.0  # entropy bonus coefficient (0 = off)
SCALE_ADVANTAGE_BY_STD = True  # bool; False = Dr.GRPO advantages (R - mean, no division by std)
DYNAMIC_SAMPLING = False  # bool; train only on informative groups (not all right / all wrong)
DYNAMIC_SAMPLING_MODE = "refill"  # "refill": drop flat groups, sample new prompts | "topup": add completions to them
MAX_GEN_BATCHES = 4  # refill: generation rounds per step at most; then train on what is there
MAX_DYNAMIC_SAMPLES = 16  # topup: a flat group grows one completion at a time up to this size, then is dropped
REPLAY_BUFFER_SIZE = 0  # groups stored to stand in for later flat (or missing) groups; 0 = off
REPLAY_MIN_REWARD_STD = 0.5  # replay: store only groups whose total rewards have at least this std ...
REPLAY_MAX_SUCCESS_RATE = 0.75  # ... and at most this fraction of correct completions (hard prompts)
OVERLONG_FILTERING = False  # bool; truncated completions get loss weight 0

# ── Critic (PPO only) ─────────────────────────────────────────────────────────────────────────────
CRITIC_SHARED_BACKBONE = True  # bool; True: value head on the policy's backbone; False: on a separate copy
VF_COEF = 0.5  # weight of the value loss in the optimised loss
CRITIC_LEARNING_RATE = 5e-3  # AdamW peak for the critic (its head, and its copy of the model when not shared)
CLIP_RANGE_VALUE = 0.2  # value clipping: V may move at most this far from V_old per rollout batch; 0 = off
GAMMA = 1.0  # discount over completion tokens
LAMBDA = 0.95  # GAE λ: 1 = Monte-Carlo returns (high variance), 0 = one-step TD (high bias)
KL_COEF = 0.05  # per-token penalty -KL_COEF·(logp_old - logp_ref) in the reward; 0 = no reference model
CRITIC_WARMUP_STEPS = 5  # first steps train only the critic (the policy waits for a useful baseline)

# ── Attention diagnostics (SPEC §6) ───────────────────────────────────────────────────────────────
ATTENTION_METRICS = True  # bool; attention mass on image / text / completion keys, logged every step
ATTENTION_EXCLUDE_SINK = True  # bool; keep the first prompt token (the attention sink) out of the text bucket
VGR_LAYERS = "late"  # layers whose attention defines VGR: "early" | "middle" | "late" | "all"
USE_TOKEN_WEIGHTS = False  # bool; scale each token's advantage by a weight from TOKEN_WEIGHT_SOURCE (ablation)
TOKEN_WEIGHT_SOURCE = "vgr"  # "vgr" (attention: more weight to tokens that look at the image) | "visual_kl" (grounding)
TOKEN_WEIGHT_MIN = 0.2  # lower clip of the token weights (their mean is 1)
TOKEN_WEIGHT_MAX = 3.0  # upper clip of the token weights
TOKEN_WEIGHT_SMOOTHING = 0.0  # σ in tokens of a Gaussian smoothing of the weights; 0 = off
W_MDI = 0.0  # weight of the group-relative MDI reward (more attention to the image than the group); 0 = off
GROUNDING_EVERY = 10  # steps between visual-dependency passes (grounding/: KL with the image vs blank); 0 = off

# ── Optimisation ──────────────────────────────────────────────────────────────────────────────────
TOTAL_STEPS = 60  # training steps (one rollout batch each)
LEARNING_RATE = 5e-4  # AdamW peak; the tiny model wants ~5e-4, a 3B model ~1e-6
LR_SCHEDULE = "cosine"  # "constant" | "cosine" (from LEARNING_RATE at step 1 down to 0 after TOTAL_STEPS)
LR_WARMUP_STEPS = 10  # first steps ramp the rate up linearly (step/N of it); 0 = off (docs/algorithms.md: why 10)
WEIGHT_DECAY = 0.0  # AdamW weight decay
PPO_EPOCHS = 2  # passes over each rollout batch
MINI_BATCHES = 2  # optimizer steps per pass (the batch is split into this many mini-batches)
MICRO_BATCH_SIZE = 64  # sequences per forward/backward (gradient accumulation); lower it to save memory
MAX_GRAD_NORM = 1.0  # gradient clipping

# ── Evaluation, logging, checkpoints ──────────────────────────────────────────────────────────────
EVAL_EVERY = 20  # steps between held-out evaluations (also at step 0 and at the end)
SAVE_EVERY = 10  # steps between checkpoints; 0 = only at the end (docs/run_folder.md)
KEEP_CHECKPOINTS = 2  # newest checkpoints kept, older ones deleted (the final one is the newest); 0 = keep all
LOG_EVERY = 10  # steps between entries of rollout_results.md, attention_diagnostics.md, token_weights.md
LOG_SAMPLES = 2  # completions shown in full per log entry
PLOT_EVERY = 50  # steps between plot refreshes in <run>/plots/ (always at the end); 0 = only at the end
COMPARE_WITH = "auto"  # run folder for the DAPO-vs-GRPO plot; "auto" = newest run of the other trainer; "" = none
RUNS_DIR = "runs"  # run folders go to RUNS_DIR/<trainer>_<timestamp>/, e.g. runs/dapo_20261122_101500/
REPORT_TO = ""  # also send the metrics to "wandb" | "tensorboard" | "wandb,tensorboard" (pip install it); "" = none
PEAK_TFLOPS = 0.0  # device peak for perf/mfu_*; 0 = measured (CPU) or looked up (A100, H100, H200, L40S, 4090)
RESUME = ""  # "" = new run | "auto" = newest run of this trainer in RUNS_DIR | a run folder | a checkpoint folder
RESUME_OVERRIDES = ""  # on resume: comma-separated math constants allowed to change anyway, e.g. "LEARNING_RATE"


def main(argv=None):
    run = start_run(__file__, constants_of(globals()), argv)  # checked constants, resume point, run folder, seeds
    if run.finished:
        return run.dir
    s = run.specs  # the constants above, grouped and checked (utils/specs.py); s.critic: the "Critic" block
    models = load_models(s, run, reference=s.critic.kl_coef > 0 or s.loss.kl_beta > 0)  # no KL: no reference
    critic = build_critic(s, models)  # a value head on the policy's backbone, or on a separate copy of the model
    in_policy = {id(p) for p in trainable(models.policy)}  # a shared backbone is trained once, with the policy
    optimizer = torch.optim.AdamW(
        [{"params": trainable(models.policy), "base_lr": s.optim.learning_rate},
         {"params": [p for p in trainable(critic) if id(p) not in in_policy], "base_lr": s.critic.learning_rate}],
        lr=s.optim.learning_rate, weight_decay=s.optim.weight_decay)
    run.print(f"critic: {'value head on the policy' if s.critic.shared_backbone else 'separate copy'}, "
              f"{sum(p.numel() for g in optimizer.param_groups for p in g['params']) / 1e6:.2f}M trained parameters")
    train_data, eval_data = load_datasets(s.data, s.model.seed, models.processor, run.print, run.warn)
    prompts = PromptSampler(train_data, s.model.seed, models.processor, warn=run.warn)  # skips rows that fail
    replay = ReplayBuffer.of(s.rollout)  # None when REPLAY_BUFFER_SIZE = 0 (it needs GROUP_SIZE >= 2)
    run.begin(models, optimizer, prompts, eval_data, replay, critic)  # resume, or evaluate at step 0
    micro = s.optim.micro_batch_size

    for step in run.steps():
        timer = StepTimer()
        lr = set_learning_rate(optimizer, step, s.optim)  # the policy's and the critic's, each from its base_lr
        # ── 1. Sample and score (as grpo.py; dynamic sampling and replay only with GROUP_SIZE >= 2) ──
        reward_weights = s.rewards.at(step)  # two-stage rewards: REWARD_WEIGHTS_EARLY until REWARD_SWITCH_STEP
        sample = lambda examples, n: sample_and_score(models, examples, n, s, reward_weights)  # noqa: E731
        everything, batch, padding, sampling = sample_step(sample, prompts.next, s.rollout, models.pad_id, replay,
                                                           run.warn)  # batch: the groups to train on, or None
        metrics, logged = {"step": step, "policy/lr": lr, **sampling}, None
        timer.lap("generate")
        if batch is not None:
            pool = rank_rows(padding)  # statistics over the rows of every rank (torchrun)
            valid = batch.completion_mask.bool()  # [B, L]

            # ── 2. π_old and the reference's log-probs (the attention masses on the way); the critic's V_old ──
            logp_old, masses = batched_logprobs(models.old_policy, batch, micro, models.passes)  # [B, L]
            attention, vgr, attention_log = attention_summary(masses, batch.prompt_inputs, batch.completion_mask,
                                                              models.image_token_id, s.attention.exclude_sink,
                                                              s.attention.vgr_layers, pool)
            metrics.update(attention_log)
            metrics.update(rollout_gap(logp_old, batch.sampler_logp, batch.sampler_log_kept, batch.completion_mask,
                                       pool))  # the sampler's numbers against π_old's (rollout/)
            ref_logp = batched_logprobs(models.reference, batch, micro, models.passes, record=False)[0]
            values_old = critic.batched(batch, micro, models.precision)  # [B, L]
            visual = visual_dependency(models.old_policy, batch, micro, models.passes.temperature) \
                if s.attention.grounding_due(step) else None  # per token: KL(π(·|image) ‖ π(·|blank image))
            metrics.update(grounding_metrics(visual, batch.completion_mask, masses, pool))  # {} when not measured
            timer.lap("logprob")

            # ── 3. Token rewards (outcome on the last token − KL penalty), GAE, whitened advantages ──
            metrics.update(add_mdi_reward(batch, attention, reward_weights["mdi"], pool))  # W_MDI (0: off)
            loss_mask = loss_tokens(batch, s.loss.overlong_filtering)  # [B, L]
            rewards = token_rewards(batch.rewards["total"], logp_old, ref_logp, batch.completion_mask,
                                    s.critic.kl_coef)  # [B, L]
            advantages, returns = gae(rewards, values_old, batch.completion_mask, s.critic.gamma, s.critic.lam)
            advantages = whiten(advantages, loss_mask, pool=pool)  # [B, L], over the global batch
            metrics.update({
                "critic/values/mean": pool(values_old[valid]).mean().item(),
                "critic/returns/mean": pool(returns[valid]).mean().item(),
                "critic/explained_variance": explained_variance(values_old, returns, batch.completion_mask, pool),
                "reward/kl_penalty/mean": pool(rewards.sum(1) - batch.rewards["total"]).mean().item(),
            })
            weights = None
            if s.attention.use_token_weights:  # from VGR (attention) or the visual dependency
                signal = visual.kl if s.attention.token_weight_source == "visual_kl" else vgr
                weights = token_weights(signal, batch.completion_mask, *s.attention.token_weight_settings)  # [B, L]
                advantages = advantages * weights  # [B, L]
                metrics.update(token_weight_metrics(weights, batch.completion_mask, pool))

            # ── 4. Policy and critic update (the critic alone while warming up), then refresh the generation copy ──
            train_policy = step > s.critic.warmup_steps
            targets = Targets(advantages, loss_mask, logp_old, ref_logp, values_old, returns, padding)
            stats = policy_update(models.policy, optimizer, batch, targets, s.loss, s.optim, models.passes, critic,
                                  train_policy, run.warn)
            if train_policy:
                sync_rollout_model(models.policy, models.rollout)
            timer.lap("update")
            critic_stats = {k: stats.pop(k) for k in ("value_loss", "value_clip_frac")}
            metrics.update({f"policy/{k}": v for k, v in stats.items()})
            metrics.update({f"critic/{k}": v for k, v in critic_stats.items()})
            metrics["critic/warmup"] = float(not train_policy)
            metrics["policy/advantage_abs_mean"] = pool(advantages[valid].abs()).mean().item()
            logged = (batch, advantages, attention, vgr, weights, visual)

        # ── 5. Log, evaluate, checkpoint ──
        run.end_step(metrics, timer, everything, logged)
    return run.finish()


if __name__ == "__main__":
    run_cli(main)
