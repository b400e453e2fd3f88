"""``ilm-eval jacobian``: the state Jacobian dh_t/dh_{t-1} of a Mamba2 layer at the fixed point.

The implicit-function-theorem Jacobian is checked against central finite differences that
re-solve the fixed point with the model's own sequential step (``ImplicitLM.step``), against
autograd through the unrolled solve, and, for an explicit Mamba2, against the diagonal
``exp(dt * A)`` computed by hand from the layer's parameters.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import tiny_config

from ilm_megatron.analysis.jacobian import (
    TokenTransition,
    head_block,
    offdiag_mass,
    rel_err,
    state_jacobian,
)
from ilm_megatron.errors import UserError
from ilm_megatron.models.cache import Mamba2Cache
from ilm_megatron.models.lm import build_model

IDS = torch.tensor([3, 1, 4, 1, 5])


def _model(implicit: bool = True, arch: str = "mamba2", seed: int = 0):
    cfg = tiny_config(arch, implicit)
    torch.manual_seed(seed)
    return build_model(cfg.model, cfg.solver).double().eval(), cfg


@pytest.fixture(scope="module")
def implicit_model(one_thread: None):
    return _model(True)[0]


@pytest.fixture(scope="module")
def explicit_model(one_thread: None):
    return _model(False)[0]


@pytest.fixture(scope="module")
def implicit_jac(implicit_model):
    """Whole-layer Jacobians of layer 1 at token 3 (the state has 8 x 8 x 8 = 512 entries)."""
    return state_jacobian(implicit_model, IDS, layer=1, position=3)


def test_ift_matches_finite_differences(implicit_model, implicit_jac) -> None:
    """Columns of the IFT Jacobian against central differences of h_t: perturb one entry of
    layer 1's cached state, re-solve token 3 with ImplicitLM.step at a tight tolerance."""
    model, (layer, t) = implicit_model, (1, 3)
    _, J_ift, _ = implicit_jac
    saved = model.solver_config
    model.solver_config = dataclasses.replace(saved, eval_tol=1e-14)
    try:
        caches = model.empty_caches(1)
        for s in range(t):
            model.step(IDS[s : s + 1], caches, max_iter=3000)

        def h_next(j: int, delta: float) -> torch.Tensor:
            cs = [Mamba2Cache(c.conv.clone(), c.ssm.clone()) for c in caches]
            cs[layer].ssm.view(-1)[j] += delta
            _, _, stats = model.step(IDS[t : t + 1], cs, max_iter=3000)
            assert float(stats.residual.max()) < 1e-13
            return cs[layer].ssm.reshape(-1)

        # the analysis's own transition reproduces the model's step at the unperturbed state
        tr = TokenTransition(model, IDS, layer, t)
        torch.testing.assert_close(
            tr.next_state(tr.variable, 1e-14, 3000), h_next(0, 0.0), rtol=0, atol=1e-12
        )
        eps = 1e-5
        gen = torch.Generator().manual_seed(0)
        for j in torch.randint(0, J_ift.shape[1], (5,), generator=gen).tolist():
            fd = (h_next(j, eps) - h_next(j, -eps)) / (2 * eps)
            col = J_ift[:, j]
            off = col.clone()
            off[j] = 0.0  # the implicit coupling: what an explicit layer would not have
            assert off.norm() > 1e-5 * col.norm()
            # measured: ~1e-9 of the off-diagonal part
            assert (fd - col).norm() < 1e-6 * off.norm(), j
    finally:
        model.solver_config = saved


def test_autograd_matches_ift(implicit_jac) -> None:
    J_a, J_b, info = implicit_jac
    assert J_a.shape == J_b.shape == (512, 512) and J_a.dtype == torch.float64
    assert info.implicit and info.converged and info.iterations > 10
    assert info.residual < 1e-12 and info.spectral_radius_dfdz < 1
    assert rel_err(J_a, J_b) < 1e-10  # measured ~1e-13


def test_implicit_jacobian_is_not_diagonal(implicit_jac) -> None:
    _, J_b, _ = implicit_jac
    assert offdiag_mass(J_b) > 1e-4  # measured ~2e-3 at init (iterate_init_scale 0.3)
    assert offdiag_mass(head_block(J_b, 0, (8, 8, 8))) > 1e-5


def test_head_scope_is_the_whole_layer_block(implicit_model, implicit_jac) -> None:
    J_a, J_b, info = state_jacobian(implicit_model, IDS, layer=1, position=3, head=5)
    assert J_b.shape == (64, 64) and info.head == 5
    assert torch.allclose(J_b, head_block(implicit_jac[1], 5, (8, 8, 8)), rtol=0, atol=1e-12)
    assert rel_err(J_a, J_b) < 1e-10


def _decay_by_hand(model, ids: torch.Tensor, layer: int, position: int) -> torch.Tensor:
    """exp(dt * A) per head of an explicit model's layer at ``position`` from its parameters
    (``position`` 0 or ``layer`` 0: the layer input needs no cache)."""
    assert layer == 0 or position == 0
    z = model.embedding(ids[position : position + 1]).double()
    for block in model.stack.layers[:layer]:  # empty caches at position 0
        z, _ = block.step(z, None, block.empty_cache(1, z.device, z.dtype))
    mixer = model.stack.layers[layer].mixer
    dt_raw = mixer.in_proj(model.stack.layers[layer].norm(z))[0, -mixer.nheads :]
    dt = F.softplus(dt_raw + mixer.dt_bias)
    return torch.exp(dt * -torch.exp(mixer.A_log))


@pytest.mark.parametrize("layer,position", [(0, 3), (1, 0)])
def test_explicit_jacobian_is_exp_dt_a(explicit_model, layer: int, position: int) -> None:
    J_a, J_b, info = state_jacobian(explicit_model, IDS, layer=layer, position=position)
    assert not info.implicit and info.iterations == 1
    with torch.no_grad():
        decay = _decay_by_hand(explicit_model, IDS, layer, position)
    expected = torch.diag(decay.repeat_interleave(8 * 8))
    assert 0 < float(decay.min()) and float(decay.max()) < 1
    torch.testing.assert_close(J_b, expected, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(J_a, expected, rtol=1e-12, atol=1e-14)
    assert offdiag_mass(J_b) == 0.0 and offdiag_mass(J_a) == 0.0


def test_refusals(implicit_model, one_thread: None) -> None:
    llama, _ = _model(True, arch="llama")
    with pytest.raises(UserError, match="Mamba2"):
        state_jacobian(llama, IDS, layer=0)
    with pytest.raises(UserError, match="--layer"):
        state_jacobian(implicit_model, IDS, layer=2)
    with pytest.raises(UserError, match="--head"):
        state_jacobian(implicit_model, IDS, layer=0, head=8)
    with pytest.raises(UserError, match="--position"):
        state_jacobian(implicit_model, IDS, layer=0, position=5)


# ------------------------------------------------------------------ ilm-eval jacobian


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory: pytest.TempPathFactory, one_thread: None) -> Path:
    """An untrained tiny implicit Mamba2 saved as a run folder's model.safetensors (its stored
    config names the S3 word problem)."""
    from ilm_megatron.train.checkpoint import save_model

    model, cfg = _model(True)
    path = tmp_path_factory.mktemp("jac") / "run" / "model.safetensors"
    save_model(model.float(), cfg, path)
    return path.parent


def _run_eval(args: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    from ilm_megatron.tasks.eval import main

    rc = main(args)
    out = capsys.readouterr()
    return rc, out.out, out.err


def test_cli_json_and_png(
    tiny_checkpoint: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import matplotlib.image

    out_dir = tmp_path / "out"
    rc, out, err = _run_eval(
        ["jacobian", "--checkpoint", str(tiny_checkpoint), "--layer", "1", "--head", "3",
         "--length", "6", "--seed", "1", "--out", str(out_dir), "--json"],
        capsys,
    )  # fmt: skip
    assert rc == 0, err
    res = json.loads(out)
    assert res == json.loads((out_dir / "jacobian.json").read_text())
    assert res["rel_err"] < 1e-10 and res["offdiag_mass"] > 0
    assert res["scope"] == "layer" and res["shape"] == [512, 512]  # 512 <= 4096 entries
    assert res["head_block"]["shape"] == [64, 64] and res["head"] == 3
    assert res["implicit"] and res["converged"] and res["iterations"] > 1
    assert res["layer"] == 1 and res["position"] == 5 and res["length"] == 6
    assert res["input"] == "word_problem:S3" and all(0 <= i < 6 for i in res["ids"])
    png = out_dir / "jacobian.png"
    assert res["outputs"]["png"] == [str(png)]
    image = matplotlib.image.imread(str(png))
    assert image.ndim == 3 and image.shape[1] > 2 * image.shape[0]  # four panels side by side

    rc, out, err = _run_eval(
        ["jacobian", "--checkpoint", str(tiny_checkpoint), "--ids", "3,1,4,1,5",
         "--position", "-2", "--scope", "head", "--head", "2", "--json"],
        capsys,
    )  # fmt: skip
    assert rc == 0, err
    res = json.loads(out)
    assert res["scope"] == "head" and res["shape"] == [64, 64] and res["layer_block"] is None
    assert res["ids"] == [3, 1, 4, 1, 5] and res["input"] == "ids" and res["position"] == 3
    assert res["rel_err"] < 1e-10 and res["offdiag_mass"] == res["head_block"]["offdiag_mass"]

    from ilm_megatron.analysis.jacobian import show

    show(res)
    out = capsys.readouterr().out
    assert "at token 3 of 5" in out and "head 2" in out and "offdiag_mass" in out


def test_cli_errors(tiny_checkpoint: Path, capsys: pytest.CaptureFixture[str]) -> None:
    ck = str(tiny_checkpoint)
    rc, _, err = _run_eval(["jacobian", "--checkpoint", ck, "--layer", "2"], capsys)
    assert rc == 2 and "--layer 2" in err and "0..1" in err
    rc, _, err = _run_eval(["jacobian", "--checkpoint", ck, "--layer", "x"], capsys)
    assert rc == 2 and "--layer" in err
    rc, _, err = _run_eval(["jacobian", "--checkpoint", ck, "--head", "8"], capsys)
    assert rc == 2 and "--head" in err
    rc, _, err = _run_eval(
        ["jacobian", "--checkpoint", ck, "--ids", "1,2", "--position", "2"], capsys
    )
    assert rc == 2 and "--position" in err
    rc, _, err = _run_eval(["jacobian", "--checkpoint", ck, "--ids", "1,64"], capsys)
    assert rc == 2 and "--ids" in err and "vocab_size" in err
    rc, _, err = _run_eval(["jacobian", "--checkpoint", ck + "/nope"], capsys)
    assert rc == 2 and "not found" in err
