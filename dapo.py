"""DAPO for vision-language models (Yu et al. 2025, arXiv:2503.14476).

DAPO is GRPO with four changes, each a constant below (`diff grpo.py dapo.py` shows exactly these):

1. Clip-Higher: the ratio is clipped to [1 - 0.2, 1 + 0.28] instead of [0.8, 1.2], so unlikely tokens
   that turn out good can grow faster, which keeps entropy (exploration) from collapsing.
2. Dynamic sampling: groups whose G completions are all right or all wrong have zero advantage and give
   no gradient; DAPO drops them and samples new prompts until the batch is full of informative groups.
3. Token-level loss: the loss is the mean over all valid tokens of the batch, not the mean of per-sequence
   means, so every token counts the same however long its sequence is.
4. Overlong reward shaping: a soft length penalty near the limit, and truncated completions get no loss.

And no KL term: β = 0, so no reference model is loaded at all.

Further options from the DAPO notes, off by default (in every trainer): per-prompt top-up sampling
(DYNAMIC_SAMPLING_MODE="topup"), a replay buffer of informative groups (REPLAY_BUFFER_SIZE), two-stage reward
weights (REWARD_SWITCH_STEP), dual clip (DUAL_CLIP_C), Dr.GRPO advantages (SCALE_ADVANTAGE_BY_STD=False) and the
+1/-1 accuracy reward (NEGATIVE_ACCURACY_REWARD).

Run `python dapo.py` (edit the constants below, or override any of them: `python dapo.py --TOTAL_STEPS=10`).
"""

import os
import sys
import time

import torch
from tqdm import tqdm

from data import PromptSampler, load_datasets
from utils.attention import attention_summary, mdi_reward, token_weight_metrics, token_weights
from utils.checkpoint import (PreemptionGuard, checkpoint_step, find_resume_checkpoint, load_checkpoint,
                              resumed_config, run_dir_of, save_checkpoint)
from utils.config import apply_overrides, check_values, constants_of, format_config, run_cli
from utils.distributed import init_distributed, rank_rows, shard_model
from utils.evaluate import evaluate
from utils.logprobs import batched_logprobs
from utils.model import (
    EMBEDDED_MODEL,
    load_processor,
    load_reference_model,
    load_trainable_model,
    make_rollout_model,
    resolve_devices,
    suppressed_token_ids,
    sync_rollout_model,
)
from utils.rewards import reward_weights_at, score_completions
from utils.rl import group_advantages, overlong_loss_mask
from utils.rollout import ReplayBuffer, concat_rollouts, generate, sample_step
from utils.precision import inference_dtype, resolve_precision
from utils.runlog import SHOWN_METRICS, comparison_run, open_run_log, perf_metrics, rollout_metrics
from utils.tiny_vlm import ensure_tiny_vlm
from utils.trackers import make_tracker
from utils.update import learning_rate_at, needs_old_logprob_pass, policy_update

# ── Model and devices ─────────────────────────────────────────────────────────────────────────────
MODEL_NAME_OR_PATH = "embedded-tiny-vlm"  # Qwen2-VL / Qwen2.5-VL hub name or folder, or the built-in tiny VLM
MODEL_CACHE_DIR = ".cache"  # folder where the embedded tiny VLM is built once and reused
TRUST_REMOTE_CODE = False  # bool; only for checkpoints whose code you trust
POLICY_DEVICE = "auto"  # "auto" | "cpu" | "cuda:N"; auto: cuda:0 if there is a GPU, else cpu
ROLLOUT_DEVICE = "auto"  # "auto" | "cpu" | "cuda:N"; reference + generation copy; auto: cuda:1 with 2 GPUs
PRECISION = "auto"  # "auto" (GPU: bf16-mixed, CPU: fp32) | "bf16-mixed" (fp32 weights + AdamW, bf16 compute) | "fp32"
MIN_PIXELS = 0  # fewest pixels per image after resizing; 0 = the processor's own (Qwen: 56·56)
MAX_PIXELS = 0  # most pixels per image after resizing; 0 = the processor's own, at most 1280 visual tokens (1280·28·28)
CPU_THREADS = 2  # torch threads on CPU; 0 = torch's default. Use 1 when another job shares the cores
GRADIENT_CHECKPOINTING = False  # bool; trade compute for memory on large models
FREEZE_VISION_TOWER = False  # bool; train only the language model (and the vision-language merger)
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

# ── Rollout ───────────────────────────────────────────────────────────────────────────────────────
TRAIN_BATCH_PROMPTS = 8  # prompts (groups) per training batch
GROUP_SIZE = 8  # G: completions sampled per prompt
MAX_NEW_TOKENS = 24  # L_max: completion length limit in tokens
TEMPERATURE = 1.0  # sampling temperature (log-probs are computed at the same temperature)
TOP_P = 1.0  # nucleus sampling; 1.0 = off
GENERATION_BATCH_SIZE = 128  # sequences generated at once

# ── Rewards ───────────────────────────────────────────────────────────────────────────────────────
W_ACCURACY = 3.0  # weight of the accuracy reward (1 right / 0 wrong)
W_FORMAT = 1.0  # weight of the format reward (<think>…</think> then the answer)
NEGATIVE_ACCURACY_REWARD = False  # bool; accuracy is +1/-1 instead of 1/0 (DAPO paper's rule-based reward)
SOFT_OVERLONG_PUNISHMENT = True  # bool; DAPO Eq. 13 length penalty in the last OVERLONG_BUFFER tokens
OVERLONG_BUFFER = 8  # L_cache in tokens
REWARD_SWITCH_STEP = 0  # two-stage rewards: steps 1..N use REWARD_WEIGHTS_EARLY, later steps the W_* above; 0 = off
REWARD_WEIGHTS_EARLY = {"accuracy": 1.0, "format": 2.0}  # first-stage weights by reward ("accuracy", "format", "mdi")

# ── Algorithm ─────────────────────────────────────────────────────────────────────────────────────
LOSS_AGGREGATION = "token"  # "token" (DAPO: mean over all tokens) | "sample" (GRPO: mean of sequence means)
CLIP_EPS_LOW = 0.2  # ratio lower clip: 1 - CLIP_EPS_LOW
CLIP_EPS_HIGH = 0.28  # ratio upper clip: 1 + CLIP_EPS_HIGH (DAPO's Clip-Higher)
DUAL_CLIP_C = 0.0  # dual clip: a token with A < 0 loses at most -c·A, whatever its ratio (c > 1, e.g. 3.0); 0 = off
KL_BETA = 0.0  # β of the k3 KL penalty to the reference model; 0 = no reference model is loaded
ENTROPY_COEF = 0.0  # entropy bonus coefficient (0 = off)
SCALE_ADVANTAGE_BY_STD = True  # bool; False = Dr.GRPO advantages (R - mean, no division by std)
DYNAMIC_SAMPLING = True  # bool; train only on informative groups (not all right / all wrong)
DYNAMIC_SAMPLING_MODE = "refill"  # "refill": drop flat groups, sample new prompts | "topup": add completions to them
MAX_GEN_BATCHES = 4  # refill: generation rounds per step at most; then train on what is there
MAX_DYNAMIC_SAMPLES = 16  # topup: a flat group grows one completion at a time up to this size, then is dropped
REPLAY_BUFFER_SIZE = 0  # groups stored to stand in for later flat (or missing) groups; 0 = off
REPLAY_MIN_REWARD_STD = 0.5  # replay: store only groups whose total rewards have at least this std ...
REPLAY_MAX_SUCCESS_RATE = 0.75  # ... and at most this fraction of correct completions (hard prompts)
OVERLONG_FILTERING = True  # bool; truncated completions get loss weight 0

# ── Attention diagnostics (SPEC §6) ───────────────────────────────────────────────────────────────
ATTENTION_METRICS = True  # bool; attention mass on image / text / completion keys, logged every step
ATTENTION_EXCLUDE_SINK = True  # bool; keep the first prompt token (the attention sink) out of the text bucket
VGR_LAYERS = "late"  # layers whose attention defines VGR: "early" | "middle" | "late" | "all"
USE_TOKEN_WEIGHTS = False  # bool; scale each token's advantage by a weight from its VGR (ablation)
TOKEN_WEIGHT_MIN = 0.2  # lower clip of the token weights (their mean is 1)
TOKEN_WEIGHT_MAX = 3.0  # upper clip of the token weights
TOKEN_WEIGHT_SMOOTHING = 0.0  # σ in tokens of a Gaussian smoothing of the weights; 0 = off
W_MDI = 0.0  # weight of the group-relative MDI reward (more attention to the image than the group); 0 = off

# ── Optimisation ──────────────────────────────────────────────────────────────────────────────────
TOTAL_STEPS = 200  # training steps (one rollout batch each)
LEARNING_RATE = 5e-4  # AdamW peak; the tiny model wants ~5e-4, a 3B model ~1e-6
LR_SCHEDULE = "cosine"  # "constant" | "cosine" (from LEARNING_RATE at step 1 down to 0 after TOTAL_STEPS)
WEIGHT_DECAY = 0.0  # AdamW weight decay
PPO_EPOCHS = 1  # passes over each rollout batch
MINI_BATCHES = 1  # optimizer steps per pass (the batch is split into this many mini-batches)
MICRO_BATCH_SIZE = 64  # sequences per forward/backward (gradient accumulation); lower it to save memory
MAX_GRAD_NORM = 1.0  # gradient clipping

# ── Evaluation, logging, checkpoints ──────────────────────────────────────────────────────────────
EVAL_EVERY = 20  # steps between held-out evaluations (also at step 0 and at the end)
SAVE_EVERY = 10  # steps between checkpoints; 0 = only at the end (README: "Checkpoints and resuming")
KEEP_CHECKPOINTS = 2  # newest checkpoints kept, older ones deleted (the final one is the newest); 0 = keep all
LOG_EVERY = 10  # steps between entries of rollout_results.md, attention_diagnostics.md, token_weights.md
LOG_SAMPLES = 2  # completions shown in full per log entry
PLOT_EVERY = 50  # steps between plot refreshes in <run>/plots/ (always at the end); 0 = only at the end
COMPARE_WITH = "auto"  # run folder for the DAPO-vs-GRPO plot; "auto" = newest run of the other trainer; "" = none
RUNS_DIR = "runs"  # run folders go to RUNS_DIR/<trainer>_<timestamp>/, e.g. runs/dapo_20261122_101500/
REPORT_TO = ""  # also send the metrics to "wandb" | "tensorboard" | "wandb,tensorboard" (pip install it); "" = none
RESUME = ""  # "" = new run | "auto" = newest run of this trainer in RUNS_DIR | a run folder | a checkpoint folder
RESUME_OVERRIDES = ""  # on resume: comma-separated math constants allowed to change anyway, e.g. "LEARNING_RATE"


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    cfg = apply_overrides(constants_of(globals()), argv)
    algo = os.path.splitext(os.path.basename(__file__))[0]
    resume = find_resume_checkpoint(cfg["RESUME"], cfg["RUNS_DIR"], algo)  # None: a new run
    start = checkpoint_step(resume) if resume else 0  # the step the run continues after
    if resume:
        cfg = resumed_config(resume, cfg, argv)  # the run's saved config + the constants allowed to change
    check_values(cfg)
    if start >= cfg["TOTAL_STEPS"]:
        print(f"{resume}: the run is finished (TOTAL_STEPS={cfg['TOTAL_STEPS']}); nothing to train")
        return run_dir_of(resume)
    world = init_distributed()  # under torchrun: this process's rank (README: "Scaling out"); else one process
    run = open_run_log(cfg["RUNS_DIR"], algo, cfg, __file__, (run_dir_of(resume), start) if resume else None)
    tracker = make_tracker(cfg["REPORT_TO"], run.dir, cfg)
    log = run.print
    log(f"run folder: {run.dir}\nconfig:\n{format_config(cfg)}")
    torch.manual_seed(cfg["SEED"] + world.rank)  # each rank samples its own completions
    if cfg["CPU_THREADS"]:
        torch.set_num_threads(cfg["CPU_THREADS"])

    # ── Model, reference, rollout copy ──
    policy_device, rollout_device = resolve_devices(cfg["POLICY_DEVICE"], cfg["ROLLOUT_DEVICE"])
    precision = resolve_precision(cfg["PRECISION"], policy_device)  # fp32 master weights; bf16 compute if mixed
    path = cfg["MODEL_NAME_OR_PATH"]
    if path == EMBEDDED_MODEL:
        path = ensure_tiny_vlm(cfg["MODEL_CACHE_DIR"], log)
    processor = load_processor(path, cfg["TRUST_REMOTE_CODE"], cfg["MIN_PIXELS"], cfg["MAX_PIXELS"])
    policy = load_trainable_model(resume or path, policy_device, cfg["TRUST_REMOTE_CODE"],  # resume: its weights
                                  cfg["GRADIENT_CHECKPOINTING"], cfg["FREEZE_VISION_TOWER"])
    rollout_model = make_rollout_model(policy, rollout_device, inference_dtype(precision))  # bf16 copy if mixed
    policy = shard_model(policy, precision)  # torchrun: FSDP2 shards (fp32 master weights); one process: as it is
    reference = None
    if cfg["KL_BETA"] > 0:  # β = 0: no reference model at all
        reference = load_reference_model(path, rollout_device, inference_dtype(precision), cfg["TRUST_REMOTE_CODE"])
    optimizer = torch.optim.AdamW([p for p in policy.parameters() if p.requires_grad], lr=cfg["LEARNING_RATE"],
                                  weight_decay=cfg["WEIGHT_DECAY"])
    suppress = suppressed_token_ids(processor.tokenizer)
    image_id = policy.config.image_token_id if cfg["ATTENTION_METRICS"] else None  # None: no attention metrics
    log(f"policy on {policy_device} in {precision}, generation by "
        f"{'the policy' if rollout_model is policy else f'a {inference_dtype(precision)} copy on {rollout_device}'}, "
        f"reference: {'yes' if reference else 'none'}, "
        f"{sum(p.numel() for p in policy.parameters()) / 1e6:.2f}M parameters")

    # ── Data ──
    train_data, eval_data = load_datasets(
        cfg["DATASET"], cfg["EVAL_DATASET"], cfg["TRAIN_SPLIT"], cfg["EVAL_SPLIT"], cfg["TRAIN_SIZE"],
        cfg["EVAL_SAMPLES"], seed=cfg["SEED"], kinds=cfg["QUESTION_KINDS"], image_size=cfg["IMAGE_SIZE"],
        max_objects=cfg["MAX_OBJECTS"], shuffle_options=cfg["SHUFFLE_OPTIONS"], log=log,
        keys={"image": cfg["IMAGE_KEY"], "problem": cfg["PROBLEM_KEY"], "solution": cfg["ANSWER_KEY"]},
        system_prompt=cfg["SYSTEM_PROMPT"], processor=processor, max_prompt_tokens=cfg["MAX_PROMPT_TOKENS"],
        warn=run.warn,
    )
    prompts = PromptSampler(train_data, cfg["SEED"], processor, warn=run.warn)  # skips rows that fail on use
    G = cfg["GROUP_SIZE"]
    sampling_mode = cfg["DYNAMIC_SAMPLING_MODE"] if cfg["DYNAMIC_SAMPLING"] else "all"
    replay = None
    if cfg["REPLAY_BUFFER_SIZE"]:
        replay = ReplayBuffer(cfg["REPLAY_BUFFER_SIZE"], cfg["REPLAY_MIN_REWARD_STD"], cfg["REPLAY_MAX_SUCCESS_RATE"])
    regular_weights = {"accuracy": cfg["W_ACCURACY"], "format": cfg["W_FORMAT"], "mdi": cfg["W_MDI"]}

    def sample_and_score(examples, n, weights):
        """n completions for each example, with every reward component."""
        rollout = generate(rollout_model, processor, examples, n, cfg["MAX_NEW_TOKENS"], cfg["TEMPERATURE"],
                           cfg["TOP_P"], suppress_ids=suppress, batch_size=cfg["GENERATION_BATCH_SIZE"],
                           desc="generate")
        rewards = score_completions(
            rollout.texts, [ex["solution"] for ex in rollout.examples], rollout.completion_mask.sum(1).tolist(),
            weights, cfg["MAX_NEW_TOKENS"], cfg["OVERLONG_BUFFER"], cfg["SOFT_OVERLONG_PUNISHMENT"],
            cfg["NEGATIVE_ACCURACY_REWARD"],
        )
        rollout.rewards = {k: torch.tensor(v) for k, v in rewards.items()}
        return rollout

    def run_eval():
        return evaluate(rollout_model, processor, eval_data, cfg["EVAL_SAMPLES"], cfg["MAX_NEW_TOKENS"],
                        cfg["GENERATION_BATCH_SIZE"], suppress)

    if resume:  # optimizer, data position, replay buffer, RNGs: the run goes on as if never stopped
        load_checkpoint(resume, policy, optimizer, prompts, replay)
        log(f"resumed from {resume}: step {start} of {cfg['TOTAL_STEPS']}")
    else:
        eval_metrics = run_eval()
        log("step    0 | " + "  ".join(f"{k}={v:.3f}" for k, v in eval_metrics.items()))
        run.log_metrics({"step": 0, **eval_metrics})
        tracker.log(eval_metrics, 0)
    pad_id = processor.tokenizer.pad_token_id
    stop = PreemptionGuard(run.warn)  # SIGTERM / Ctrl-C: checkpoint after this step, then exit

    for step in tqdm(range(start + 1, cfg["TOTAL_STEPS"] + 1), initial=start, total=cfg["TOTAL_STEPS"], desc=algo,
                     dynamic_ncols=True, disable=not world.is_main):
        t0 = time.time()
        lr = learning_rate_at(step, cfg["TOTAL_STEPS"], cfg["LEARNING_RATE"], cfg["LR_SCHEDULE"])
        for group in optimizer.param_groups:
            group["lr"] = lr
        # ── 1. Sample and score. Dynamic sampling keeps only informative groups (0 < #correct < G): "refill"
        #       draws new prompts until TRAIN_BATCH_PROMPTS groups are kept or MAX_GEN_BATCHES rounds ran,
        #       "topup" adds completions to each flat group until it is informative or MAX_DYNAMIC_SAMPLES;
        #       a replay buffer (REPLAY_BUFFER_SIZE) swaps remaining flat groups for stored informative ones. ──
        reward_weights = reward_weights_at(step, cfg["REWARD_SWITCH_STEP"], cfg["REWARD_WEIGHTS_EARLY"],
                                           regular_weights)
        everything, train_groups, padding, sampling = sample_step(
            lambda examples, n: sample_and_score(examples, n, reward_weights), prompts.next,
            cfg["TRAIN_BATCH_PROMPTS"], G, pad_id, sampling_mode, cfg["MAX_GEN_BATCHES"], cfg["MAX_DYNAMIC_SAMPLES"],
            replay,
        )
        group_sizes = [len(g) for g in train_groups]
        generate_s, logprob_s, update_s = time.time() - t0, 0.0, 0.0
        metrics = {"step": step, "policy/lr": lr, **rollout_metrics(everything), **sampling}
        # What the logs show if there is no update:
        batch, advantages, attention, vgr, weights = everything, torch.zeros(len(everything)), None, None, None
        if not sampling["dapo/train_groups"]:  # (the count of every rank)
            run.warn(f"step {step}: no informative group sampled; no update this step")
        else:
            batch = concat_rollouts(train_groups, pad_id)
            pool = rank_rows(padding)  # the batch's statistics run over the rows of every rank (torchrun)

            # ── 2. Log-probs of the rollout policy (π_old) and of the reference; attention masses on the way. A
            #       batch used for one optimizer step by the policy that sampled it needs no π_old pass: the update's
            #       own log-probs (detached, ratio 1) are π_old, and its forward passes give the attention masses. ──
            t_lp = time.time()
            lp_args = (batch.prompt_inputs, batch.completion_ids, batch.completion_mask, cfg["MICRO_BATCH_SIZE"],
                       cfg["TEMPERATURE"])
            logp_old, masses = None, None  # [B, L], [layers, B, L, 4]
            if needs_old_logprob_pass(cfg["PPO_EPOCHS"] * cfg["MINI_BATCHES"], rollout_model is policy,
                                      cfg["USE_TOKEN_WEIGHTS"] or bool(reward_weights["mdi"])):
                logp_old = batched_logprobs(rollout_model, *lp_args, image_token_id=image_id)
                logp_old, masses = logp_old if image_id is not None else (logp_old, None)
            summarise = lambda masses: attention_summary(  # noqa: E731  (π_old's masses, or the update's below)
                masses, batch.prompt_inputs, batch.completion_mask, image_id, cfg["ATTENTION_EXCLUDE_SINK"],
                cfg["VGR_LAYERS"], pool)
            attention, vgr, attention_log = summarise(masses)
            ref_logp = batched_logprobs(reference, *lp_args) if reference is not None else None
            logprob_s = time.time() - t_lp

            # ── 3. Advantages: group-normalised rewards (+ the MDI reward), optionally weighted per token ──
            if reward_weights["mdi"]:
                batch.rewards["mdi"] = mdi_reward(attention["all"]["mdi"], group_sizes)
                batch.rewards["total"] = batch.rewards["total"] + reward_weights["mdi"] * batch.rewards["mdi"]
                metrics["reward/mdi/mean"] = pool(batch.rewards["mdi"]).mean().item()
            advantages = group_advantages(batch.rewards["total"], group_sizes, cfg["SCALE_ADVANTAGE_BY_STD"])  # [B]
            loss_mask = batch.completion_mask.float()  # [B, L]
            if cfg["OVERLONG_FILTERING"]:
                loss_mask = overlong_loss_mask(loss_mask, batch.truncated)
            if cfg["USE_TOKEN_WEIGHTS"]:
                weights = token_weights(vgr, batch.completion_mask, cfg["TOKEN_WEIGHT_MIN"], cfg["TOKEN_WEIGHT_MAX"],
                                        cfg["TOKEN_WEIGHT_SMOOTHING"])  # [B, L], mean 1 per sequence
                advantages = advantages.unsqueeze(1) * weights  # [B, L]
                metrics.update(token_weight_metrics(weights, batch.completion_mask, pool))

            # ── 4. Policy update, then refresh the generation copy for the next step ──
            t_up = time.time()
            stats = policy_update(
                policy, optimizer, batch, advantages, logp_old, loss_mask, ref_logp=ref_logp,
                clip_low=cfg["CLIP_EPS_LOW"], clip_high=cfg["CLIP_EPS_HIGH"], dual_clip=cfg["DUAL_CLIP_C"],
                kl_beta=cfg["KL_BETA"], entropy_coef=cfg["ENTROPY_COEF"], aggregation=cfg["LOSS_AGGREGATION"],
                epochs=cfg["PPO_EPOCHS"], mini_batches=cfg["MINI_BATCHES"], micro_batch_size=cfg["MICRO_BATCH_SIZE"],
                max_grad_norm=cfg["MAX_GRAD_NORM"], temperature=cfg["TEMPERATURE"], precision=precision,
                image_token_id=image_id, batch_is_padding=padding, warn=run.warn,
            )
            sync_rollout_model(policy, rollout_model)
            update_s = time.time() - t_up
            if logp_old is None:  # π_old and the masses came from the update
                logp_old, masses = stats.pop("logp_old"), stats.pop("attention_masses", None)
                attention, vgr, attention_log = summarise(masses)
            metrics.update(attention_log)
            metrics.update({f"policy/{k}": v for k, v in stats.items()})
            metrics["policy/advantage_abs_mean"] = pool(advantages.abs()).mean().item()

        # ── 5. Log, evaluate, checkpoint ──
        metrics.update(perf_metrics(t0, generate_s, logprob_s, update_s, everything.completion_mask.sum().item()))
        if step % cfg["EVAL_EVERY"] == 0 or step == cfg["TOTAL_STEPS"]:
            metrics.update(run_eval())
        run.log_metrics(metrics)
        tracker.log(metrics, step)
        run.print_metrics(metrics, SHOWN_METRICS)
        last = step == cfg["TOTAL_STEPS"]
        if step % cfg["LOG_EVERY"] == 0 or last:
            run.log_samples(step, batch, advantages, processor.tokenizer, cfg["LOG_SAMPLES"], attention, vgr, weights)
        if (cfg["PLOT_EVERY"] and step % cfg["PLOT_EVERY"] == 0) or last:
            compare = comparison_run(cfg["RUNS_DIR"], algo, cfg["COMPARE_WITH"])
            log(f"plots: {', '.join(run.plot(compare))}")
        stopped = stop.requested() and not last
        if (cfg["SAVE_EVERY"] and step % cfg["SAVE_EVERY"] == 0) or last or stopped:
            saved = save_checkpoint(run.dir, step, policy, processor, cfg, optimizer, prompts, replay,
                                    keep=cfg["KEEP_CHECKPOINTS"])
            log(f"checkpoint: {saved}")
        if stopped:
            log(f"stopped by {stop.signal_name} after step {step}; continue with --RESUME={run.dir}")
            tracker.close()
            return run.dir
    tracker.close()
    log(f"done: {run.dir}")
    return run.dir


if __name__ == "__main__":
    run_cli(main)
