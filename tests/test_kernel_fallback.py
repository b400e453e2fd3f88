"""Optional GPU packages: imported once, an installed-but-broken one falls back with a warning,
causal_conv1d only for input it accepts, and mamba-ssm's decoding kernels wired with the right
layout (checked against our reference step through stand-ins that follow their documented
contracts, since the packages need CUDA)."""

from __future__ import annotations

import sys
import warnings

import pytest
import torch

from ilm_kernels import backend
from ilm_kernels.conv1d import causal_conv1d_step
from ilm_kernels.ops import _conv1d_step_package, _ssd_step_package, conv1d_package_refuses
from ilm_kernels.ssd import ssd_step


def test_broken_package_warns_once_and_falls_back(tmp_path, monkeypatch) -> None:
    pkg = tmp_path / "ilm_broken_ext"
    pkg.mkdir()
    (pkg / "__init__.py").write_text(
        "raise OSError('libcudart.so.12: cannot open shared object file')\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(backend, "_OPTIONAL", {})
    with pytest.warns(RuntimeWarning, match="ilm_broken_ext.fn is installed but unusable.*OSError"):
        assert backend.optional_import("ilm_broken_ext", "fn") is None
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert backend.optional_import("ilm_broken_ext", "fn") is None  # cached: no retry
    assert "failed to import" in backend.optional_failure("ilm_broken_ext")
    assert backend.optional_import("ilm_not_installed_pkg") is None
    assert "not installed" in backend.optional_failure("ilm_not_installed_pkg")
    assert backend.optional_import("json", "dumps") is sys.modules["json"].dumps


def test_causal_conv1d_package_only_where_it_accepts_the_input() -> None:
    x = torch.zeros(1, 5, 16)
    assert "width 5" in conv1d_package_refuses(x, torch.zeros(16, 5))
    assert "12 channels" in conv1d_package_refuses(torch.zeros(1, 5, 12), torch.zeros(12, 4))
    assert "float64" in conv1d_package_refuses(x.double(), torch.zeros(16, 4))
    assert "CUDA" in conv1d_package_refuses(x, torch.zeros(16, 4))  # shape fine, CPU tensor


def _fake_selective_state_update(state, x, dt, A, B, C, D=None):
    """mamba-ssm's documented per-channel update, as a naive loop (in place on ``state``)."""
    b, h, p, n = state.shape
    g = B.shape[1]
    y = torch.empty_like(x)
    for bi in range(b):
        for hi in range(h):
            gi = hi // (h // g)
            for pi in range(p):
                decay = torch.exp(A[hi, pi] * dt[bi, hi, pi])
                state[bi, hi, pi] = (
                    state[bi, hi, pi] * decay + dt[bi, hi, pi] * B[bi, gi] * x[bi, hi, pi]
                )
                y[bi, hi, pi] = (state[bi, hi, pi] * C[bi, gi]).sum()
                if D is not None:
                    y[bi, hi, pi] += D[hi, pi] * x[bi, hi, pi]
    return y


@pytest.mark.parametrize("d_kind", [None, "h", "hp"])
def test_mamba_ssm_state_update_layout(d_kind) -> None:
    gen = torch.Generator().manual_seed(0)
    b, h, p, n, g = 2, 4, 3, 5, 2
    state = torch.randn(b, h, p, n, generator=gen, dtype=torch.float64)
    x = torch.randn(b, h, p, generator=gen, dtype=torch.float64)
    dt = torch.rand(b, h, generator=gen, dtype=torch.float64)
    A = -torch.rand(h, generator=gen, dtype=torch.float64)
    B = torch.randn(b, g, n, generator=gen, dtype=torch.float64)
    C = torch.randn(b, g, n, generator=gen, dtype=torch.float64)
    D = {None: None, "h": torch.randn(h, dtype=torch.float64), "hp": torch.randn(h, p).double()}
    D = D[d_kind]
    before = state.clone()
    y, new_state = _ssd_step_package(_fake_selective_state_update, state, x, dt, A, B, C, D)
    y_ref, state_ref = ssd_step(state, x, dt, A, B, C, D)
    torch.testing.assert_close(y, y_ref)
    torch.testing.assert_close(new_state, state_ref)
    assert torch.equal(state, before)  # ours never modifies the caller's state


def test_causal_conv1d_update_layout() -> None:
    def fake_update(x, conv_state, weight, bias=None, activation=None):
        """causal_conv1d_update: shift the (b, c, w-1) state in place, return (b, c)."""
        full = torch.cat([conv_state, x[:, :, None]], dim=-1)  # (b, c, w)
        conv_state.copy_(full[:, :, 1:])
        y = (full * weight).sum(-1) + (0 if bias is None else bias)
        return torch.nn.functional.silu(y) if activation == "silu" else y

    gen = torch.Generator().manual_seed(1)
    window = torch.randn(2, 8, 3, generator=gen)
    x = torch.randn(2, 8, generator=gen)
    weight, bias = torch.randn(8, 4, generator=gen), torch.randn(8, generator=gen)
    before = window.clone()
    y, new_window = _conv1d_step_package(fake_update, window, x, weight, bias, None)
    y_ref, window_ref = causal_conv1d_step(window, x, weight, bias)
    torch.testing.assert_close(y, y_ref)
    torch.testing.assert_close(new_window, window_ref)
    assert torch.equal(window, before)
