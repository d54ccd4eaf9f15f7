import os
import sys

import pytest

ROOT = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, ROOT)


@pytest.fixture(scope="session")
def tiny_vlm_path():
    """The warm-started embedded model: the shipped models/tiny-vlm/ (as `python dapo.py` uses it)."""
    import torch

    from utils.tiny_vlm import ensure_tiny_vlm

    torch.set_num_threads(2)
    return ensure_tiny_vlm(os.path.join(ROOT, ".cache"))


@pytest.fixture(scope="session")
def make_specs():
    """Specs (utils/specs.py) built from a trainer's own constants, with overrides: make_specs(KL_BETA=0.1), or
    make_specs("ppo", GROUP_SIZE=1). Tests build specs through this, never by spelling out every argument."""
    import importlib

    from utils.config import constants_of
    from utils.specs import build_specs

    def make(trainer="dapo", **overrides):
        constants = constants_of(vars(importlib.import_module(trainer)))
        unknown = set(overrides) - set(constants)
        assert not unknown, f"{trainer}.py has no constant {unknown}"
        return build_specs({**constants, **overrides})

    return make


@pytest.fixture(scope="session")
def specs(make_specs):
    """dapo.py's specs with its default constants."""
    return make_specs()
