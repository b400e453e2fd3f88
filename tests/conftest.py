"""Shared fixtures: tiny configs from configs/models and deterministic seeds."""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import pytest

# Triton decides at import time whether kernels run compiled or interpreted: on a machine without
# a GPU, every test runs our Triton kernels on CPU tensors in the interpreter.
if not os.environ.get("CUDA_VISIBLE_DEVICES") and not os.path.exists("/dev/nvidia0"):
    os.environ.setdefault("TRITON_INTERPRET", "1")
# On a GPU, float32 kernel matmuls default to TF32; the tests compare them at 1e-5 in exact fp32.
os.environ.setdefault("ILM_KERNELS_FP32_PRECISION", "ieee")

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs"

warnings.filterwarnings("ignore", module="megatron")


@pytest.fixture
def root() -> Path:
    return ROOT


@pytest.fixture(scope="module")
def one_thread():
    """Tiny tensors: one intra-op thread is fastest, and steadiest on busy cores."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def tiny_config(arch: str, implicit: bool = True, overrides: tuple[str, ...] = ()):
    """Load ``configs/models/{implicit|explicit}_{arch}_tiny.yaml`` with dotted overrides."""
    from ilm_megatron.config import load_config

    name = f"{'implicit' if implicit else 'explicit'}_{arch}_tiny.yaml"
    return load_config([CONFIGS / "models" / name], list(overrides))


def make_catbabi(out: Path, *args: str) -> Path:
    """Run ``tools/make_catbabi.py --output out *args`` in a subprocess (as a user would) and
    return ``out``; raises ``CalledProcessError`` if the tool fails."""
    import subprocess
    import sys

    subprocess.run(
        [sys.executable, str(ROOT / "tools" / "make_catbabi.py"), "--output", str(out), *args],
        check=True, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    return out
