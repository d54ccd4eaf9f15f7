import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


@pytest.fixture(scope="session")
def tiny_vlm_path():
    """The warm-started embedded model, built once into the repo's .cache (as `python dapo.py` does)."""
    import torch

    from utils.tiny_vlm import ensure_tiny_vlm

    torch.set_num_threads(2)
    return ensure_tiny_vlm(os.path.join(ROOT, ".cache"))
