"""The trainers' constants as small frozen specs, each value checked beside the field it fills.

A trainer's UPPER_CASE constants (with their `--KEY=value` overrides) are the interface; `build_specs(config)` turns
them into one `Specs`: a spec per block of constants (model, LoRA, data, evaluation, rollout, rewards, loss,
attention, optimisation, run, and PPO's critic). Each field names its constant and its domain (type, choices, bounds); the check runs when
the spec is built, so a value outside its domain is one error naming the constant, the value and the domain,
before anything heavy is loaded. Relations between constants are checked in `check()` of the spec that holds them,
or in `build_specs` when they span specs.

    specs = build_specs(config)  # config: {"TOTAL_STEPS": 200, ...}
    specs.loss.clip_high         # 0.28
"""

import os
import re
from dataclasses import dataclass, field, fields

import torch

from utils.attention import STAGES
from utils.config import UserError
from utils.precision import PRECISIONS
from utils.rl import POLICY_LOSSES


def constant(name, *, choices=None, low=None, high=None, above=None, resumable=False):
    """A spec field filled from the constant `name`. choices: the allowed values (for a list, of each element);
    low / high: inclusive bounds; above: an exclusive lower bound. resumable: a resumed run may change it (it
    changes what is logged, kept or where, or trades memory or speed for rounding — not the run's numbers)."""
    return field(metadata={"constant": name, "choices": choices, "low": low, "high": high, "above": above,
                           "resumable": resumable})


def type_name(kind):
    return {float: "a number", int: "an integer", bool: "a boolean (True/False)", str: "a string",
            list: "a list", dict: "a dict"}.get(kind, kind.__name__)


def has_type(value, kind):
    if kind is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if kind is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, kind)


class Spec:
    """Base of the specs: checks every field against its domain after construction, then `check()`."""

    def __post_init__(self):
        for f in fields(self):
            check_field(f, getattr(self, f.name))
        self.check()

    def check(self):
        """Relations between this spec's constants (raise UserError)."""

    @classmethod
    def from_config(cls, config):
        missing = [f.metadata["constant"] for f in fields(cls) if f.metadata["constant"] not in config]
        if missing:
            raise UserError(f"the trainer defines no {', '.join(missing)} (needed by {cls.__name__})")
        return cls(**{f.name: config[f.metadata["constant"]] for f in fields(cls)})


def check_field(f, value):
    meta, name = f.metadata, f.metadata["constant"]
    if not has_type(value, f.type):
        raise UserError(f"{name}={value!r}: expected {type_name(f.type)}")
    if meta["choices"] is not None:
        bad = [v for v in (value if isinstance(value, list) else [value]) if v not in meta["choices"]]
        if bad:
            raise UserError(f"{name}={value!r}: expected {'each of ' if isinstance(value, list) else ''}"
                            f"{' | '.join(map(repr, meta['choices']))}")
    low, high, above = meta["low"], meta["high"], meta["above"]
    if (low is not None and value < low) or (high is not None and value > high) or (above is not None
                                                                                    and value <= above):
        bounds = [f"> {above}" if above is not None else None, f">= {low}" if low is not None else None,
                  f"<= {high}" if high is not None else None]
        raise UserError(f"{name}={value!r}: must be {' and '.join(b for b in bounds if b)}")


@dataclass(frozen=True)
class ModelSpec(Spec):
    name_or_path: str = constant("MODEL_NAME_OR_PATH")
    cache_dir: str = constant("MODEL_CACHE_DIR", resumable=True)
    trust_remote_code: bool = constant("TRUST_REMOTE_CODE")
    policy_device: str = constant("POLICY_DEVICE", resumable=True)
    rollout_device: str = constant("ROLLOUT_DEVICE", resumable=True)
    precision: str = constant("PRECISION", choices=PRECISIONS)
    min_pixels: int = constant("MIN_PIXELS", low=0)
    max_pixels: int = constant("MAX_PIXELS", low=0)
    cpu_threads: int = constant("CPU_THREADS", low=0, resumable=True)
    gradient_checkpointing: bool = constant("GRADIENT_CHECKPOINTING", resumable=True)
    offload_optimizer: bool = constant("OFFLOAD_OPTIMIZER", resumable=True)
    freeze_vision_tower: bool = constant("FREEZE_VISION_TOWER")
    seed: int = constant("SEED")

    def check(self):
        for name, device in (("POLICY_DEVICE", self.policy_device), ("ROLLOUT_DEVICE", self.rollout_device)):
            if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", device):
                raise UserError(f"{name}={device!r}: expected 'auto', 'cpu' or 'cuda:N'")
            if device.startswith("cuda") and not torch.cuda.is_available():
                raise UserError(f"{name}={device!r}: torch sees no GPU here; use 'cpu' or 'auto'")
        if self.offload_optimizer and int(os.environ.get("WORLD_SIZE", 1)) < 2:
            raise UserError("OFFLOAD_OPTIMIZER=True offloads FSDP2's shards: launch with torchrun and 2 or more ranks "
                            "(`torchrun --nproc_per_node=N ...`, docs/scaling_out.md)")
        check_model_path(self.name_or_path, self.trust_remote_code)


@dataclass(frozen=True)
class LoraSpec(Spec):
    """LoRA adapters (utils/lora.py, with PEFT): rank 0 trains every weight (full fine-tuning)."""

    rank: int = constant("LORA_RANK", low=0)
    alpha: float = constant("LORA_ALPHA", above=0)
    dropout: float = constant("LORA_DROPOUT", low=0, high=0.9)
    target_modules: str = constant("LORA_TARGET_MODULES")

    @property
    def enabled(self):
        return self.rank > 0

    def targets(self):
        """LORA_TARGET_MODULES as a list of names: "language", "vision" or a linear layer's name (e.g. "q_proj")."""
        return [t.strip() for t in self.target_modules.split(",") if t.strip()]

    def check(self):
        targets = self.targets()
        if not targets or not all(t.isidentifier() for t in targets):
            raise UserError(f"LORA_TARGET_MODULES={self.target_modules!r}: expected comma-separated names, at least "
                            f"one: 'language', 'vision' or a linear layer's (e.g. 'q_proj,v_proj')")


@dataclass(frozen=True)
class DataSpec(Spec):
    """What data/load_datasets reads (data/ takes it as a plain object: it imports nothing from utils/)."""

    dataset: str = constant("DATASET")
    eval_dataset: str = constant("EVAL_DATASET")
    train_split: str = constant("TRAIN_SPLIT")
    eval_split: str = constant("EVAL_SPLIT")
    question_kinds: list = constant("QUESTION_KINDS", choices=("colour", "shape", "count"))
    image_size: int = constant("IMAGE_SIZE", low=14)
    max_objects: int = constant("MAX_OBJECTS", low=1, high=4)
    shuffle_options: bool = constant("SHUFFLE_OPTIONS")
    train_size: int = constant("TRAIN_SIZE", low=1)
    image_key: str = constant("IMAGE_KEY")
    problem_key: str = constant("PROBLEM_KEY")
    answer_key: str = constant("ANSWER_KEY")
    system_prompt: str = constant("SYSTEM_PROMPT")
    max_prompt_tokens: int = constant("MAX_PROMPT_TOKENS", low=0)
    eval_samples: int = constant("EVAL_SAMPLES", low=1)

    def check(self):
        from data import check_source

        if not self.question_kinds:
            raise UserError("QUESTION_KINDS=[]: name at least one of 'colour', 'shape', 'count'")
        for source, name in ((self.dataset, "DATASET"), (self.eval_dataset, "EVAL_DATASET")):
            if source and source != "synthetic":
                check_source(source, name)


@dataclass(frozen=True)
class EvalSpec(Spec):
    """The held-out evaluation (utils/evaluate.py): how it decodes and what it also measures. It draws from its own
    random generator, so it never changes the training's numbers."""

    samples: int = constant("EVAL_SAMPLES", low=1)
    temperature: float = constant("EVAL_TEMPERATURE", low=0, resumable=True)
    top_p: float = constant("EVAL_TOP_P", above=0, high=1, resumable=True)
    samples_per_prompt: int = constant("EVAL_SAMPLES_PER_PROMPT", low=1, resumable=True)
    blank_image: bool = constant("EVAL_BLANK_IMAGE", resumable=True)

    def check(self):
        if self.temperature == 0 and self.samples_per_prompt > 1:
            raise UserError(f"EVAL_SAMPLES_PER_PROMPT={self.samples_per_prompt} with EVAL_TEMPERATURE=0: greedy "
                            f"decoding gives the same completion every time; set EVAL_TEMPERATURE > 0 (e.g. 0.6)")


@dataclass(frozen=True)
class RolloutSpec(Spec):
    """Sampling: the batch, the generation settings, dynamic sampling and the replay buffer."""

    train_batch_prompts: int = constant("TRAIN_BATCH_PROMPTS", low=1)
    group_size: int = constant("GROUP_SIZE", low=1)
    max_new_tokens: int = constant("MAX_NEW_TOKENS", low=1)
    temperature: float = constant("TEMPERATURE", above=0)
    top_p: float = constant("TOP_P", above=0, high=1)
    generation_batch_size: int = constant("GENERATION_BATCH_SIZE", low=1)
    compiled_decode: bool = constant("COMPILED_DECODE", resumable=True)
    dynamic_sampling: bool = constant("DYNAMIC_SAMPLING")
    dynamic_sampling_mode: str = constant("DYNAMIC_SAMPLING_MODE", choices=("refill", "topup"))
    max_gen_batches: int = constant("MAX_GEN_BATCHES", low=1)
    max_dynamic_samples: int = constant("MAX_DYNAMIC_SAMPLES", low=1)
    replay_buffer_size: int = constant("REPLAY_BUFFER_SIZE", low=0)
    replay_min_reward_std: float = constant("REPLAY_MIN_REWARD_STD", low=0)
    replay_max_success_rate: float = constant("REPLAY_MAX_SUCCESS_RATE", low=0, high=1)

    @property
    def sampling_mode(self):
        """utils.rollout.collect_groups' mode: "all" without dynamic sampling, else "refill" or "topup"."""
        return self.dynamic_sampling_mode if self.dynamic_sampling else "all"

    def check(self):
        if self.sampling_mode == "topup" and self.max_dynamic_samples <= self.group_size:
            raise UserError("MAX_DYNAMIC_SAMPLES must exceed GROUP_SIZE: top-up sampling adds completions to a group "
                            "of GROUP_SIZE until it holds MAX_DYNAMIC_SAMPLES")
        ranks = int(os.environ.get("WORLD_SIZE", 1))  # torchrun's processes
        if self.train_batch_prompts < ranks:
            raise UserError(f"TRAIN_BATCH_PROMPTS={self.train_batch_prompts} is the global batch, split over the "
                            f"{ranks} torchrun processes: it needs at least one prompt per process")


@dataclass(frozen=True)
class RewardSpec(Spec):
    """The reward weights, one W_<NAME> constant per reward of utils.rewards.REWARDS plus W_MDI (attention), and
    the shaping around them. `weights` is filled by `from_config`."""

    negative_accuracy: bool = constant("NEGATIVE_ACCURACY_REWARD")
    soft_overlong_punishment: bool = constant("SOFT_OVERLONG_PUNISHMENT")
    overlong_buffer: int = constant("OVERLONG_BUFFER", low=0)
    switch_step: int = constant("REWARD_SWITCH_STEP", low=0)
    weights_early: dict = constant("REWARD_WEIGHTS_EARLY")
    weights: dict = field(default=None, metadata={"constant": None})

    @classmethod
    def from_config(cls, config):
        from utils.rewards import reward_names

        missing = [f"W_{name.upper()}" for name in reward_names() if f"W_{name.upper()}" not in config]
        if missing:
            raise UserError(f"the trainer defines no {', '.join(missing)}: every reward has its weight constant")
        plain = [f for f in fields(cls) if f.metadata["constant"]]
        return cls(**{f.name: config[f.metadata["constant"]] for f in plain},
                   weights={name: config[f"W_{name.upper()}"] for name in reward_names()})

    def __post_init__(self):
        for f in fields(self):
            if f.metadata["constant"]:
                check_field(f, getattr(self, f.name))
        for name, weight in self.weights.items():
            if not has_type(weight, float):
                raise UserError(f"W_{name.upper()}={weight!r}: expected a number")
        unknown = set(self.weights_early) - set(self.weights)
        if unknown:
            raise UserError(f"REWARD_WEIGHTS_EARLY: unknown reward {', '.join(sorted(unknown))}; expected keys among "
                            f"{', '.join(self.weights)}")

    def at(self, step):
        """The weights of training step `step` (1-based): REWARD_WEIGHTS_EARLY over the W_* weights during the first
        REWARD_SWITCH_STEP steps, the W_* weights after."""
        return {**self.weights, **self.weights_early} if step <= self.switch_step else dict(self.weights)

    @property
    def uses_mdi(self):
        """Whether the MDI reward (attention) is ever on."""
        return bool(self.weights["mdi"] or (self.switch_step and self.weights_early.get("mdi")))


@dataclass(frozen=True)
class LossSpec(Spec):
    """The policy objective (utils.rl.policy_loss) and how advantages and the loss mask are formed."""

    policy_loss: str = constant("POLICY_LOSS", choices=tuple(POLICY_LOSSES))
    aggregation: str = constant("LOSS_AGGREGATION", choices=("token", "sample", "constant"))
    max_new_tokens: int = constant("MAX_NEW_TOKENS", low=1)  # LOSS_AGGREGATION="constant" divides by it
    clip_low: float = constant("CLIP_EPS_LOW", low=0, high=1)
    clip_high: float = constant("CLIP_EPS_HIGH", low=0)
    dual_clip: float = constant("DUAL_CLIP_C", low=0)
    gspo_clip_low: float = constant("GSPO_CLIP_EPS_LOW", low=0, high=1)
    gspo_clip_high: float = constant("GSPO_CLIP_EPS_HIGH", low=0)
    cispo_clip_low: float = constant("CISPO_CLIP_EPS_LOW", low=0, high=1)
    cispo_clip_high: float = constant("CISPO_CLIP_EPS_HIGH", low=0)
    sapo_tau_pos: float = constant("SAPO_TAU_POS", above=0)
    sapo_tau_neg: float = constant("SAPO_TAU_NEG", above=0)
    gmpo_clip_eps: float = constant("GMPO_CLIP_EPS", above=0)
    clip_cov_fraction: float = constant("CLIP_COV_FRACTION", low=0, high=1)
    clip_cov_low: float = constant("CLIP_COV_LOW")
    clip_cov_high: float = constant("CLIP_COV_HIGH")
    kl_cov_fraction: float = constant("KL_COV_FRACTION", low=0, high=1)
    kl_cov_coef: float = constant("KL_COV_COEF", low=0)
    top_entropy_quantile: float = constant("TOP_ENTROPY_QUANTILE", above=0, high=1)
    rollout_correction: str = constant("ROLLOUT_CORRECTION", choices=("", "tis", "mis"))
    rollout_correction_level: str = constant("ROLLOUT_CORRECTION_LEVEL", choices=("token", "sequence"))
    rollout_tis_cap: float = constant("ROLLOUT_TIS_CAP", above=0)
    rollout_mis_low: float = constant("ROLLOUT_MIS_LOW", low=0)
    rollout_mis_high: float = constant("ROLLOUT_MIS_HIGH", above=0)
    kl_beta: float = constant("KL_BETA", low=0)
    entropy_coef: float = constant("ENTROPY_COEF")
    scale_advantage_by_std: bool = constant("SCALE_ADVANTAGE_BY_STD")
    overlong_filtering: bool = constant("OVERLONG_FILTERING")

    def check(self):
        if self.clip_low >= 1:
            raise UserError(f"CLIP_EPS_LOW={self.clip_low}: must be below 1 (the ratio's lower clip is "
                            f"1 - CLIP_EPS_LOW)")
        if self.rollout_mis_low >= self.rollout_mis_high:
            raise UserError(f"ROLLOUT_MIS_LOW={self.rollout_mis_low} must be below ROLLOUT_MIS_HIGH="
                            f"{self.rollout_mis_high}")
        if self.clip_cov_low >= self.clip_cov_high:
            raise UserError(f"CLIP_COV_LOW={self.clip_cov_low} must be below CLIP_COV_HIGH={self.clip_cov_high}")
        if self.dual_clip and self.dual_clip <= 1:
            raise UserError(f"DUAL_CLIP_C={self.dual_clip}: the dual-clip bound must be above 1 (e.g. 3.0), "
                            f"or 0 for off")


@dataclass(frozen=True)
class AttentionSpec(Spec):
    metrics: bool = constant("ATTENTION_METRICS")
    exclude_sink: bool = constant("ATTENTION_EXCLUDE_SINK")
    vgr_layers: str = constant("VGR_LAYERS", choices=STAGES)
    use_token_weights: bool = constant("USE_TOKEN_WEIGHTS")
    token_weight_min: float = constant("TOKEN_WEIGHT_MIN", above=0, high=1)
    token_weight_max: float = constant("TOKEN_WEIGHT_MAX", low=1)
    token_weight_smoothing: float = constant("TOKEN_WEIGHT_SMOOTHING", low=0)
    token_weight_source: str = constant("TOKEN_WEIGHT_SOURCE", choices=("vgr", "visual_kl"))
    grounding_every: int = constant("GROUNDING_EVERY", low=0, resumable=True)

    @property
    def token_weight_settings(self):
        """(low, high, smoothing, source): utils.attention.token_weights' settings."""
        return self.token_weight_min, self.token_weight_max, self.token_weight_smoothing, self.token_weight_source

    def grounding_due(self, step):
        """Whether step `step` measures the visual dependency (utils/grounding.py): every GROUNDING_EVERY steps, and
        every step when it makes the token weights."""
        return (self.use_token_weights and self.token_weight_source == "visual_kl") or \
            bool(self.grounding_every and step % self.grounding_every == 0)


@dataclass(frozen=True)
class OptimSpec(Spec):
    total_steps: int = constant("TOTAL_STEPS", low=1, resumable=True)
    learning_rate: float = constant("LEARNING_RATE", low=0)
    lr_schedule: str = constant("LR_SCHEDULE", choices=("constant", "cosine"))
    lr_warmup_steps: int = constant("LR_WARMUP_STEPS", low=0)
    weight_decay: float = constant("WEIGHT_DECAY", low=0)
    epochs: int = constant("PPO_EPOCHS", low=1)
    mini_batches: int = constant("MINI_BATCHES", low=1)
    micro_batch_size: int = constant("MICRO_BATCH_SIZE", low=1, resumable=True)
    max_grad_norm: float = constant("MAX_GRAD_NORM", above=0)


@dataclass(frozen=True)
class RunSpec(Spec):
    """Evaluation, logging, checkpoints and resuming: what is recorded and where, never the run's numbers."""

    eval_every: int = constant("EVAL_EVERY", low=1, resumable=True)
    save_every: int = constant("SAVE_EVERY", low=0, resumable=True)
    keep_checkpoints: int = constant("KEEP_CHECKPOINTS", low=0, resumable=True)
    log_every: int = constant("LOG_EVERY", low=1, resumable=True)
    log_samples: int = constant("LOG_SAMPLES", low=0, resumable=True)
    plot_every: int = constant("PLOT_EVERY", low=0, resumable=True)
    compare_with: str = constant("COMPARE_WITH", resumable=True)
    runs_dir: str = constant("RUNS_DIR", resumable=True)
    report_to: str = constant("REPORT_TO", resumable=True)
    peak_tflops: float = constant("PEAK_TFLOPS", low=0, resumable=True)
    resume: str = constant("RESUME", resumable=True)
    resume_overrides: str = constant("RESUME_OVERRIDES", resumable=True)

    def check(self):
        from utils.trackers import tracker_names

        tracker_names(self.report_to)


@dataclass(frozen=True)
class CriticSpec(Spec):
    """PPO's critic and its advantages (ppo.py's "Critic" block)."""

    shared_backbone: bool = constant("CRITIC_SHARED_BACKBONE")
    vf_coef: float = constant("VF_COEF", low=0)
    learning_rate: float = constant("CRITIC_LEARNING_RATE", low=0)
    clip_range_value: float = constant("CLIP_RANGE_VALUE", low=0)
    gamma: float = constant("GAMMA", low=0, high=1)
    lam: float = constant("LAMBDA", low=0, high=1)
    kl_coef: float = constant("KL_COEF", low=0)
    warmup_steps: int = constant("CRITIC_WARMUP_STEPS", low=0)


@dataclass(frozen=True)
class Specs:
    """Every spec of a trainer; `critic` is None for the group-relative trainers (GRPO, DAPO)."""

    model: ModelSpec
    lora: LoraSpec
    data: DataSpec
    eval: EvalSpec
    rollout: RolloutSpec
    rewards: RewardSpec
    loss: LossSpec
    attention: AttentionSpec
    optim: OptimSpec
    run: RunSpec
    critic: CriticSpec | None = None


SPEC_CLASSES = {"model": ModelSpec, "lora": LoraSpec, "data": DataSpec, "eval": EvalSpec, "rollout": RolloutSpec,
                "rewards": RewardSpec, "loss": LossSpec, "attention": AttentionSpec, "optim": OptimSpec, "run": RunSpec}


def build_specs(config):
    """The Specs of a resolved config (a trainer's constants with their overrides); UserError for a value outside
    its domain. A config with the "Critic" block (ppo.py) gets a CriticSpec, and then one completion per prompt is
    enough (the critic is the baseline); the group-relative trainers need GROUP_SIZE >= 2."""
    specs = {name: cls.from_config(config) for name, cls in SPEC_CLASSES.items()}
    critic = CriticSpec.from_config(config) if "VF_COEF" in config else None
    rollout, rewards, attention = specs["rollout"], specs["rewards"], specs["attention"]
    if critic is None and rollout.group_size < 2:
        raise UserError(f"GROUP_SIZE={rollout.group_size}: must be at least 2 (group advantages need at least two "
                        f"completions)")
    group_only = [name for name, on in (("DYNAMIC_SAMPLING", rollout.dynamic_sampling),
                                        ("W_MDI", rewards.weights["mdi"]),
                                        ("REPLAY_BUFFER_SIZE", rollout.replay_buffer_size),
                                        ("REWARD_WEIGHTS_EARLY['mdi']", rewards.switch_step
                                         and rewards.weights_early.get("mdi"))) if on]
    if rollout.group_size < 2 and group_only:
        raise UserError(f"{', '.join(group_only)} compare the completions of a prompt: they need GROUP_SIZE >= 2")
    if specs["lora"].enabled and specs["model"].freeze_vision_tower and "vision" in specs["lora"].targets():
        raise UserError("FREEZE_VISION_TOWER=True with LORA_TARGET_MODULES naming 'vision': choose one (with LoRA "
                        "the vision tower trains only through adapters, and only when LORA_TARGET_MODULES names it)")
    if rewards.overlong_buffer > rollout.max_new_tokens:
        raise UserError("OVERLONG_BUFFER must not exceed MAX_NEW_TOKENS")
    if ((attention.use_token_weights and attention.token_weight_source == "vgr") or rewards.uses_mdi) \
            and not attention.metrics:
        raise UserError("USE_TOKEN_WEIGHTS with TOKEN_WEIGHT_SOURCE='vgr' and the MDI reward (W_MDI) need "
                        "ATTENTION_METRICS=True")
    return Specs(**specs, critic=critic)


def resumable_constants():
    """The constants a resumed run may change without changing its numbers (the fields marked resumable)."""
    classes = (*SPEC_CLASSES.values(), CriticSpec)
    return {f.metadata["constant"] for cls in classes for f in fields(cls) if f.metadata.get("resumable")}


def check_model_path(model, trust_remote_code=False):
    """UserError for a model path that looks local but does not exist (hub names are left to the hub), or a local
    model folder of a type the trainers do not support."""
    looks_local = model.startswith((".", "/", "~")) or model.count("/") != 1
    if model and model != "embedded-tiny-vlm" and looks_local and not os.path.exists(model):
        raise UserError(f"MODEL_NAME_OR_PATH={model!r}: no such folder (and not a hub name like "
                        f"'Qwen/Qwen2.5-VL-3B-Instruct')")
    if model and os.path.isdir(model):  # a local checkpoint: is it a model type the trainers support?
        from utils.model import model_class_for

        model_class_for(model, trust_remote_code)
