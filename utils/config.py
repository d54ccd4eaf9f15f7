"""Trainer constants as a config: collected from a trainer module, overridden by validated `--KEY=value` flags;
the command line (`--help`, one-line errors). Their domains are checked by utils/specs.py."""

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
    with status 2; an interrupt the run could not turn into a checkpoint (Ctrl-C before the step loop, a second
    Ctrl-C in it) prints one line saying what was saved and exits with 130. RL_TRACEBACK=1 shows the traceback
    instead. A new run that fails before its step 0 is logged leaves no run folder (utils.runlog). Under torchrun
    the process group is left at the end."""
    argv = sys.argv[1:] if argv is None else argv
    if any(arg in ("-h", "--help") for arg in argv):
        module = sys.modules[main.__module__]
        print(help_text(module.__file__, constants_of(vars(module))))
        sys.exit(0)
    from utils.distributed import close_distributed

    try:
        return main(argv)
    except BaseException as e:
        if not isinstance(e, SystemExit):  # a new run that failed before its step 0 leaves no folder behind
            from utils.runlog import discard_unstarted_run

            discard_unstarted_run()
        if os.environ.get("RL_TRACEBACK") or not isinstance(e, (ValueError, OSError, KeyboardInterrupt)):
            raise
        if isinstance(e, KeyboardInterrupt):  # Ctrl-C before the step loop, or a second one in it (utils.checkpoint)
            print(f"interrupted: {str(e) or 'Ctrl-C before the first training step; nothing was saved'}",
                  file=sys.stderr)
            sys.exit(130)
        message = " ".join(str(e).split()) or type(e).__name__  # UserError is a ValueError; OSError: files, hub
        print(f"error: {message}", file=sys.stderr)
        sys.exit(2)
    finally:
        close_distributed()
