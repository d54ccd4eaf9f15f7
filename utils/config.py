"""Trainer constants as a config: collected from a trainer module, overridden by validated `--KEY=value` flags."""

import ast
import difflib
import json
import os
import re
import sys


class UserError(ValueError):
    """A mistake in what the user asked for (a constant, a path): reported as one line, no traceback."""


def constants_of(namespace):
    """The UPPER_CASE constants a trainer module assigns at top level (not those it imports), in order."""
    with open(namespace["__file__"]) as f:
        tree = ast.parse(f.read())
    names = [t.id for node in tree.body if isinstance(node, ast.Assign) for t in node.targets
             if isinstance(t, ast.Name) and t.id.isupper()]
    return {name: namespace[name] for name in names}


def parse_value(key, text, default):
    """`text` converted to the type of `default`; a clear error when it does not fit."""
    def fail(expected):
        raise UserError(f"--{key}={text}: expected {expected} (default is {default!r})")

    if isinstance(default, bool):
        lowered = text.strip().lower()
        if lowered in ("true", "1", "yes", "on"):
            return True
        if lowered in ("false", "0", "no", "off"):
            return False
        fail("a boolean (True/False)")
    if isinstance(default, int):
        try:
            return int(text)
        except ValueError:
            fail("an integer")
    if isinstance(default, float):
        try:
            return float(text)
        except ValueError:
            fail("a number")
    if isinstance(default, str):
        return text
    if default is None:  # an optional value: a literal if it parses as one, else the string
        try:
            return ast.literal_eval(text)
        except (ValueError, SyntaxError):
            return text
    try:
        value = ast.literal_eval(text)
    except (ValueError, SyntaxError):
        fail(f"a Python literal of type {type(default).__name__}")
    if isinstance(default, (list, tuple)) and isinstance(value, (list, tuple)):
        return type(default)(value)
    if not isinstance(value, type(default)):
        fail(f"a {type(default).__name__}")
    return value


def apply_overrides(config, argv):
    """A copy of `config` with `--KEY=value` arguments applied. Unknown keys and bad values raise ValueError."""
    config = dict(config)
    for arg in argv:
        if not arg.startswith("--") or "=" not in arg:
            raise UserError(f"argument {arg!r} is not of the form --KEY=value (e.g. --TOTAL_STEPS=10)")
        key, text = arg[2:].split("=", 1)
        if key not in config:
            close = difflib.get_close_matches(key.upper(), list(config), n=3, cutoff=0.6)
            hint = f"; did you mean {', '.join('--' + c for c in close)}?" if close else ""
            raise UserError(f"unknown constant --{key}{hint}")
        config[key] = parse_value(key, text, config[key])
    return config


def format_config(config):
    width = max(len(k) for k in config)
    shown = {k: repr(v) if isinstance(v, str) else json.dumps(v) for k, v in config.items()}
    return "\n".join(f"  {k:<{width}} = {v}" for k, v in shown.items())


CHOICES = {"LOSS_AGGREGATION": ("token", "sample"), "LR_SCHEDULE": ("constant", "cosine"),
           "VGR_LAYERS": ("early", "middle", "late", "all"), "DYNAMIC_SAMPLING_MODE": ("refill", "topup"),
           "PRECISION": ("auto", "bf16-mixed", "fp32")}
AT_LEAST = {"GROUP_SIZE": 1, "TRAIN_BATCH_PROMPTS": 1, "TOTAL_STEPS": 1, "MAX_GEN_BATCHES": 1, "PPO_EPOCHS": 1,
            "MINI_BATCHES": 1, "MICRO_BATCH_SIZE": 1, "MAX_NEW_TOKENS": 1, "EVAL_EVERY": 1, "EVAL_SAMPLES": 1,
            "REPLAY_BUFFER_SIZE": 0, "REWARD_SWITCH_STEP": 0, "CRITIC_WARMUP_STEPS": 0, "VF_COEF": 0.0,
            "CLIP_RANGE_VALUE": 0.0, "KL_COEF": 0.0, "MAX_PROMPT_TOKENS": 0,
            "MIN_PIXELS": 0, "MAX_PIXELS": 0}
REWARD_NAMES = ("accuracy", "format", "mdi")


def check_values(config, min_group_size=2):
    """Raise ValueError for values of the right type but outside what the trainers accept.

    min_group_size: 2 for the group-relative trainers (GRPO, DAPO), 1 for PPO (its critic is the baseline)."""
    for key, allowed in CHOICES.items():
        if key in config and config[key] not in allowed:
            raise ValueError(f"{key}={config[key]!r}: expected one of {', '.join(map(repr, allowed))}")
    for key, low in {**AT_LEAST, "GROUP_SIZE": min_group_size}.items():
        if key in config and config[key] < low:
            why = " (group advantages need at least two completions)" if key == "GROUP_SIZE" else ""
            raise ValueError(f"{key}={config[key]}: must be at least {low}{why}")
    early_mdi = config.get("REWARD_SWITCH_STEP") and config.get("REWARD_WEIGHTS_EARLY", {}).get("mdi")
    group_only = [k for k in ("DYNAMIC_SAMPLING", "W_MDI", "REPLAY_BUFFER_SIZE") if config.get(k)]
    group_only += ["REWARD_WEIGHTS_EARLY['mdi']"] if early_mdi else []
    if config.get("GROUP_SIZE", 2) < 2 and group_only:
        raise ValueError(f"{', '.join(group_only)} compare the completions of a prompt: they need GROUP_SIZE >= 2")
    if config.get("DYNAMIC_SAMPLING_MODE") == "topup" and config["MAX_DYNAMIC_SAMPLES"] <= config["GROUP_SIZE"]:
        raise ValueError("MAX_DYNAMIC_SAMPLES must exceed GROUP_SIZE: top-up sampling adds completions to a group "
                         "of GROUP_SIZE until it holds MAX_DYNAMIC_SAMPLES")
    if config.get("DUAL_CLIP_C") and config["DUAL_CLIP_C"] <= 1:
        raise ValueError(f"DUAL_CLIP_C={config['DUAL_CLIP_C']}: the dual-clip bound must be above 1 (e.g. 3.0), "
                         "or 0 for off")
    unknown = set(config.get("REWARD_WEIGHTS_EARLY", {})) - set(REWARD_NAMES)
    if unknown:
        raise ValueError(f"REWARD_WEIGHTS_EARLY: unknown reward {', '.join(sorted(unknown))}; expected keys among "
                         f"{', '.join(REWARD_NAMES)}")
    if not 0 <= config.get("REPLAY_MAX_SUCCESS_RATE", 1.0) <= 1:
        raise ValueError("REPLAY_MAX_SUCCESS_RATE is a fraction of correct completions: between 0 and 1")
    if config.get("OVERLONG_BUFFER", 0) > config.get("MAX_NEW_TOKENS", 1):
        raise ValueError("OVERLONG_BUFFER must not exceed MAX_NEW_TOKENS")
    needs_attention = config.get("USE_TOKEN_WEIGHTS") or config.get("W_MDI") or early_mdi
    if needs_attention and not config.get("ATTENTION_METRICS", True):
        raise ValueError("USE_TOKEN_WEIGHTS and the MDI reward (W_MDI) need ATTENTION_METRICS=True")
    if not 0 < config.get("TOKEN_WEIGHT_MIN", 0.2) <= 1 <= config.get("TOKEN_WEIGHT_MAX", 3.0):
        raise ValueError("token weight bounds must satisfy 0 < TOKEN_WEIGHT_MIN <= 1 <= TOKEN_WEIGHT_MAX")
    ranks = int(os.environ.get("WORLD_SIZE", 1))  # torchrun's processes
    if config.get("TRAIN_BATCH_PROMPTS", ranks) < ranks:
        raise ValueError(f"TRAIN_BATCH_PROMPTS={config['TRAIN_BATCH_PROMPTS']} is the global batch, split over the "
                         f"{ranks} torchrun processes: it needs at least one prompt per process")
    check_paths(config)
    if "REPORT_TO" in config:
        from utils.trackers import tracker_names

        tracker_names(config["REPORT_TO"])


def check_paths(config):
    """ValueError for a model or data path that looks local but does not exist (hub names are left to the hub), or
    a local model folder of a type the trainers do not support."""
    from data import check_source

    model = config.get("MODEL_NAME_OR_PATH", "")
    looks_local = model.startswith((".", "/", "~")) or model.count("/") != 1
    if model and model != "embedded-tiny-vlm" and looks_local and not os.path.exists(model):
        raise ValueError(f"MODEL_NAME_OR_PATH={model!r}: no such folder (and not a hub name like "
                         f"'Qwen/Qwen2.5-VL-3B-Instruct')")
    if model and os.path.isdir(model):  # a local checkpoint: is it a model type the trainers support?
        from utils.model import model_class_for

        model_class_for(model, config.get("TRUST_REMOTE_CODE", False))
    if config.get("DATASET", "synthetic") != "synthetic":
        check_source(config["DATASET"], "DATASET")
    if config.get("EVAL_DATASET") and config["EVAL_DATASET"] != "synthetic":
        check_source(config["EVAL_DATASET"], "EVAL_DATASET")


# ── Command line ──

BANNER = re.compile(r"^# ── (.+?) ─")


def help_text(path, config):
    """`--help` of a trainer script: its docstring's first line, then every constant with its default and
    comment, grouped under the file's `# ── Section ──` banners."""
    source = open(path).read()
    lines = source.splitlines()
    tree = ast.parse(source)
    script = os.path.basename(path)
    out = [f"usage: python {script} [--KEY=value ...]", "", (ast.get_docstring(tree) or "").splitlines()[0], "",
           f"Every constant at the top of {script} can be overridden with --KEY=value (defaults shown):"]
    assigned = {node.lineno: node for node in tree.body if isinstance(node, ast.Assign)
                and isinstance(node.targets[0], ast.Name) and node.targets[0].id in config}
    for lineno, line in enumerate(lines, 1):
        banner = BANNER.match(line)
        if banner:
            out += ["", banner.group(1) + ":"]
        elif lineno in assigned:
            node = assigned[lineno]
            name = node.targets[0].id
            end_line = lines[node.end_lineno - 1]
            comment = end_line.split("  # ", 1)[1].strip() if "  # " in end_line else ""
            out.append(f"  --{name}={config[name]!r}")
            if comment:
                out.append(f"      {comment}")
    return "\n".join(out)


def run_cli(main, argv=None):
    """Run a trainer's main(argv) from the command line: `-h`/`--help` prints every constant; a user error (a
    bad constant or value, a missing file or folder, an unsupported model) prints one line to stderr and exits
    with status 2. RL_TRACEBACK=1 shows the traceback instead. Under torchrun the process group is left at the
    end."""
    argv = sys.argv[1:] if argv is None else argv
    if any(arg in ("-h", "--help") for arg in argv):
        module = sys.modules[main.__module__]
        print(help_text(module.__file__, constants_of(vars(module))))
        sys.exit(0)
    from utils.distributed import close_distributed

    try:
        return main(argv)
    except (ValueError, OSError) as e:  # UserError is a ValueError; OSError: files, hub lookups
        if os.environ.get("RL_TRACEBACK"):
            raise
        message = " ".join(str(e).split()) or type(e).__name__
        print(f"error: {message}", file=sys.stderr)
        sys.exit(2)
    finally:
        close_distributed()
