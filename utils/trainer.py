"""What every trainer does around its algorithm, one call each: `start_run` (constants → checked specs, the
resume point, the run folder, seeds), `load_models` (policy, generation copy, reference), `Run.begin` (resume, or
the step-0 evaluation), `Run.steps` (the step loop, stopped after a checkpoint on SIGTERM / Ctrl-C) and
`Run.end_step` (log, evaluate, samples, plots, checkpoint). The algorithm itself — sample, score, advantages,
update — stays in the trainer files."""

import os
import sys
import time
from dataclasses import dataclass

import torch
from tqdm import tqdm

from utils import flops
from utils.layout import AdaptersOff
from utils.checkpoint import (PreemptionGuard, checkpoint_step, find_resume_checkpoint, load_checkpoint,
                              resumed_config, run_dir_of, save_checkpoint)
from utils.config import apply_overrides, format_config
from utils.distributed import init_distributed, shard_model
from utils.evaluate import evaluate
from utils.logprobs import Passes
from utils.model import (EMBEDDED_MODEL, load_processor, load_reference_model, load_trainable_model,
                         make_rollout_model, resolve_devices, suppressed_token_ids)
from utils.precision import inference_dtype, resolve_precision
from utils.runlog import SHOWN_METRICS, comparison_run, mark_started, open_run_log, perf_metrics
from utils.specs import build_specs
from utils.trackers import make_tracker


@dataclass
class Models:
    """The models of a run. policy: fp32 master weights (FSDP2-sharded under torchrun); rollout: the model that
    generates (the policy itself, or a bf16 / per-rank copy); reference: the frozen starting model, or None;
    path: the starting model's folder or hub name; passes: how the trainers' forward passes run (temperature,
    precision, and the image token id that records attention — None when attention metrics are off); old_policy: the
    model whose log-probs are π_old — the model that generates, or with ROLLOUT_CORRECTION the policy itself (the
    learner: the gap to the sampler is then corrected by importance weights, utils.rl.rollout_weights)."""

    policy: torch.nn.Module
    rollout: torch.nn.Module
    reference: torch.nn.Module | None
    processor: object
    precision: str
    path: str
    policy_device: torch.device
    suppress_ids: list
    passes: Passes
    old_policy: torch.nn.Module

    @property
    def pad_id(self):
        return self.processor.tokenizer.pad_token_id

    @property
    def image_token_id(self):
        return self.passes.image_token_id


class StepTimer:
    """Wall time and model FLOPs (utils/flops.py) of a step and of its parts: lap(name) ends the part that began at
    the previous lap."""

    def __init__(self):
        self.start = self.last = time.time()
        self.parts, self.flops = {}, {}
        flops.take()  # what ran between steps (evaluation) is not the step's

    def lap(self, name):
        now = time.time()
        self.parts[name] = now - self.last
        self.flops[name] = flops.take()
        self.last = now


class Run:
    """One training run as a trainer drives it. `specs` are the checked constants; `finished` is True when RESUME
    named a run that already reached TOTAL_STEPS (then nothing else is set up)."""

    def __init__(self, algo, config, specs, resume=None, start=0, finished=False):
        self.algo, self.config, self.specs = algo, config, specs
        self.resume, self.start, self.finished = resume, start, finished
        self.dir = run_dir_of(resume) if resume else None
        self.stopped = False

    def open(self, script):
        """Join torchrun's process group (docs/scaling_out.md), open the run folder and the trackers, seed."""
        self.world = init_distributed(cpu_collectives=self.specs.model.offload_optimizer)  # torchrun: this rank
        self.log = open_run_log(self.specs.run.runs_dir, self.algo, self.config, script,
                                (self.dir, self.start) if self.resume else None)
        self.dir, self.print, self.warn = self.log.dir, self.log.print, self.log.warn
        self.tracker = make_tracker(self.specs.run.report_to, self.dir, self.config)
        self.print(f"run folder: {self.dir}\nconfig:\n{format_config(self.config)}")
        torch.manual_seed(self.specs.model.seed + self.world.rank)  # each rank samples its own completions
        if self.specs.model.cpu_threads:
            torch.set_num_threads(self.specs.model.cpu_threads)

    def begin(self, models, optimizer, prompts, eval_data, replay=None, critic=None):
        """Hold what checkpoints save; then resume (optimizer, data position, replay buffer, critic, RNGs: the run
        goes on as if never stopped) or evaluate the starting model (step 0). SIGTERM / Ctrl-C from here on:
        checkpoint after the current step, then exit."""
        self.models, self.optimizer, self.prompts, self.replay, self.critic = models, optimizer, prompts, replay, critic
        self.eval_data = eval_data
        self.peak_flops = flops.peak_flops(models.policy_device, models.precision, self.specs.run.peak_tflops,
                                     self.specs.model.cache_dir)  # FLOP/s, for perf/mfu_*; None: unknown
        if self.resume:
            load_checkpoint(self.resume, models.policy, optimizer, prompts, replay, critic)
            self.print(f"resumed from {self.resume}: step {self.start} of {self.specs.optim.total_steps}")
        else:
            metrics = self.evaluate()
            self.print("step    0 | " + "  ".join(f"{k}={v:.3f}" for k, v in metrics.items()))
            self.log.log_metrics({"step": 0, **metrics, **self.log.progress()})
            self.tracker.log(metrics, 0)
        mark_started()  # a failure from here on leaves the folder: it is a run
        self.stop = PreemptionGuard(self.warn)

    def evaluate(self):
        """Held-out accuracy (greedy, or k samples per question), every reward rate and the blank-image accuracy of
        the generating model (utils/evaluate.py)."""
        m = self.models
        s = self.specs
        return evaluate(m.rollout, m.processor, self.eval_data, s.eval, s.rollout.max_new_tokens,
                        s.rollout.generation_batch_size, m.suppress_ids, s.model.seed, s.rollout.compiled_decode)

    def steps(self):
        """The training steps left (1-based), with a progress bar; ends early once a signal stopped the run."""
        total = self.specs.optim.total_steps
        for step in tqdm(range(self.start + 1, total + 1), initial=self.start, total=total, desc=self.algo,
                         dynamic_ncols=True, disable=not self.world.is_main):
            yield step
            if self.stopped:
                return

    def end_step(self, metrics, timer, everything, logged=None):
        """The end of a step: timings, evaluation (every EVAL_EVERY steps and at the end), metrics.jsonl, the
        trackers and the terminal; the markdown logs of `batch` (every LOG_EVERY steps); plots; a checkpoint (every
        SAVE_EVERY steps, at the end, or when a signal asked to stop — then the run stops).

        everything: every completion sampled this step (its tokens count in perf/tokens_per_s); logged: what the
        markdown logs show (RunLog.log_samples): (batch, advantages, attention, vgr, token weights, visual dependency
        or None) of the update, or None for a step without one (then every completion sampled, with zero advantages)."""
        s, step = self.specs, metrics["step"]
        batch, advantages, attention, vgr, weights, visual = logged or (everything, torch.zeros(len(everything)), None,
                                                                        None, None, None)
        last = step == s.optim.total_steps
        perf, counts = perf_metrics(timer, everything.completion_mask.sum().item(), len(everything), self.peak_flops)
        metrics.update({**perf, **self.log.progress(*counts)})
        if step % s.run.eval_every == 0 or last:
            metrics.update(self.evaluate())
        self.log.log_metrics(metrics)
        self.tracker.log(metrics, step)
        self.log.print_metrics(metrics, SHOWN_METRICS)
        if step % s.run.log_every == 0 or last:
            self.log.log_samples(step, batch, advantages, self.models.processor.tokenizer, s.run.log_samples,
                                 attention, vgr, weights, visual)
        if (s.run.plot_every and step % s.run.plot_every == 0) or last:
            compare = comparison_run(s.run.runs_dir, self.algo, s.run.compare_with)
            self.print(f"plots: {', '.join(self.log.plot(compare))}")
        stopped = self.stop.requested() and not last
        if (s.run.save_every and step % s.run.save_every == 0) or last or stopped:
            saved = save_checkpoint(self.dir, step, self.models.policy, self.models.processor, self.config,
                                    self.optimizer, self.prompts, self.replay, self.critic,
                                    keep=s.run.keep_checkpoints)
            self.print(f"checkpoint: {saved}")
            self.stop.saved = saved if stopped else None
        if stopped:
            self.print(f"stopped by {self.stop.signal_name} after step {step}; continue with --RESUME={self.dir}")
            self.stopped = True
        if step % s.run.log_every == 0 or step % s.run.eval_every == 0:
            trim_heap()  # after the logs, evaluations, plots and checkpoints: their transient buffers are freed

    def finish(self):
        """Close the trackers; returns the run folder."""
        self.tracker.close()
        if not self.stopped:
            self.print(f"done: {self.dir}")
        return self.dir


def trim_heap():
    """Hand the heap memory freed since the last call back to the operating system (glibc's malloc_trim; nothing on
    other C libraries). glibc keeps freed pages for reuse, and the varying sizes of a run's transient buffers
    (prompts and completions of every length, evaluations, plots, checkpoints) leave them scattered: ~20 MiB of the
    tiny model's resident memory is such pages (benchmarks/soak.py). It takes 10-60 ms, so Run.end_step calls it
    every LOG_EVERY and EVAL_EVERY steps, not every step."""
    if _LIBC is not None:
        _LIBC.malloc_trim(0)


def _glibc():
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return libc if hasattr(libc, "malloc_trim") else None
    except OSError:
        return None


_LIBC = _glibc()


def start_run(script, constants, argv=None):
    """A Run of the trainer file `script` from its constants and `--KEY=value` arguments (sys.argv by default):
    the resume point RESUME names (its saved config, plus the constants allowed to change), the specs checked
    before anything heavy is loaded, then the run folder, the trackers and the seeds."""
    argv = sys.argv[1:] if argv is None else argv
    algo = os.path.splitext(os.path.basename(script))[0]
    config = apply_overrides(constants, argv)
    resume = find_resume_checkpoint(config["RESUME"], config["RUNS_DIR"], algo)  # None: a new run
    start = checkpoint_step(resume) if resume else 0  # the step the run continues after
    if resume:
        config = resumed_config(resume, config, argv)  # the run's saved config + the constants allowed to change
    specs = build_specs(config)
    if start >= specs.optim.total_steps:
        print(f"{resume}: the run is finished (TOTAL_STEPS={specs.optim.total_steps}); nothing to train")
        return Run(algo, config, specs, resume, start, finished=True)
    run = Run(algo, config, specs, resume, start)
    run.open(script)
    return run


def load_models(specs, run, reference):
    """The Models of a run: processor, the trainable policy (from the checkpoint when resuming), the model that
    generates, and with `reference` the frozen starting model for KL terms. The embedded tiny VLM is built on
    first use."""
    m = specs.model
    policy_device, rollout_device = resolve_devices(m.policy_device, m.rollout_device)
    precision = resolve_precision(m.precision, policy_device)  # fp32 master weights; bf16 compute if mixed
    path = m.name_or_path
    if path == EMBEDDED_MODEL:
        from utils.tiny_vlm import ensure_tiny_vlm

        path = ensure_tiny_vlm(m.cache_dir, run.print)
    processor = load_processor(path, m.trust_remote_code, m.min_pixels, m.max_pixels)
    policy = load_trainable_model(path, policy_device, m, specs.lora, precision, run.resume)  # LoRA: + adapters
    rollout = make_rollout_model(policy, rollout_device, inference_dtype(precision))  # bf16 / merged copy, or itself
    policy = shard_model(policy, precision, m.offload_optimizer)  # torchrun: FSDP2 shards; one process: as it is
    lora, ref = specs.lora.enabled, None
    if reference:  # the starting model; with LoRA the policy without its adapters (no copy)
        ref = AdaptersOff(policy) if lora else load_reference_model(path, rollout_device, inference_dtype(precision),
                                                                   m.trust_remote_code)
    image_token_id = policy.config.image_token_id if specs.attention.metrics else None
    generator = "the policy" if rollout is policy else \
        f"a {'merged ' if lora else ''}{inference_dtype(precision)} copy on {rollout_device}"
    described = "none" if ref is None else "the policy without its adapters" if lora else "yes"
    adapters = f", {sum(p.numel() for p in trainable(policy)) / 1e6:.3f}M of them in LoRA adapters" if lora else ""
    run.print(f"policy on {policy_device} in {precision}, generation by {generator}, reference: {described}, "
              f"{sum(p.numel() for p in policy.parameters()) / 1e6:.2f}M parameters{adapters}")
    passes = Passes(specs.rollout.temperature, precision, image_token_id)
    return Models(policy, rollout, ref, processor, precision, path, policy_device,
                  suppressed_token_ids(processor.tokenizer), passes,
                  old_policy=policy if specs.loss.rollout_correction else rollout)


def trainable(module):
    """The parameters of `module` that train."""
    return [p for p in module.parameters() if p.requires_grad]
