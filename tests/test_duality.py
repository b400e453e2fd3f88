"""Simultaneous vs sequential mode: the same fixed point, computed two ways."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from conftest import tiny_config

from ilm_megatron.models.lm import build_model

pytestmark = pytest.mark.usefixtures("one_thread")

ARCHS = ["mamba2", "llama"]


def _model(
    arch: str,
    tol: float = 1e-7,
    max_iter: int = 400,
    dtype=torch.float32,
    overrides: tuple[str, ...] = (),
):
    """Tiny eval-mode model whose eval solve runs to ``tol`` (cap ``max_iter``)."""
    solver = (f"solver.eval_tol={tol}", f"solver.f_max_iter={max_iter}")
    cfg = tiny_config(arch, overrides=(*solver, "solver.eval_max_iter_mult=1.0", *overrides))
    torch.manual_seed(0)
    model = build_model(cfg.model, cfg.solver).to(dtype).eval()
    return model, cfg


def _with_solver(model, **changes) -> None:
    """Give ``model`` a copy of its solver settings with ``changes`` (the config is immutable)."""
    model.solver_config = dataclasses.replace(model.solver_config, **changes)


@pytest.mark.parametrize("arch", ARCHS)
def test_converges_on_random_input(arch):
    """At the configured tolerance and cap, every sample converges from z0 = 0."""
    cfg = tiny_config(arch)
    torch.manual_seed(1)
    model = build_model(cfg.model, cfg.solver).eval()
    ids = torch.randint(0, cfg.model.vocab_size, (4, 24))
    out = model(ids, max_iter=cfg.solver.f_max_iter)
    assert out.stats.iters <= cfg.solver.f_max_iter
    assert out.stats.converged.all(), out.stats.summary()
    # the returned iterate really is a fixed point to within tol: check it independently
    _, u = model.embed(ids)
    with torch.no_grad():
        fz, _ = model.stack(out.hidden, u)
    rel = (fz - out.hidden).flatten(1).norm(dim=1) / fz.flatten(1).norm(dim=1)
    assert (rel < cfg.solver.f_tol * 1.5).all(), rel


@pytest.mark.parametrize("arch", ARCHS)
def test_sequential_equals_simultaneous(arch):
    model, cfg = _model(arch)
    torch.manual_seed(2)
    ids = torch.randint(0, cfg.model.vocab_size, (2, 13))
    sim = model(ids)
    seq = model.forward_sequential(ids)
    assert sim.stats.converged.all() and seq.stats.converged.all()
    assert seq.logits.shape == sim.logits.shape
    diff = (sim.logits - seq.logits).abs().max().item()
    assert diff < 1e-4, diff
    assert torch.equal(sim.logits.argmax(-1), seq.logits.argmax(-1))


@pytest.mark.parametrize("arch", ARCHS)
def test_sequential_is_causal_rnn(arch):
    """Position t of sequential mode depends on tokens <= t only (changing the future is inert)."""
    model, cfg = _model(arch)
    torch.manual_seed(3)
    ids = torch.randint(0, cfg.model.vocab_size, (1, 9))
    other = ids.clone()
    other[:, 6:] = (other[:, 6:] + 1) % cfg.model.vocab_size
    a = model.forward_sequential(ids).logits
    b = model.forward_sequential(other).logits
    assert torch.equal(a[:, :6], b[:, :6])
    assert not torch.allclose(a[:, 6:], b[:, 6:])


@pytest.mark.parametrize("arch", ARCHS)
def test_prefill_handover_equals_decoding_from_scratch(arch):
    model, cfg = _model(arch)
    torch.manual_seed(4)
    ids = torch.randint(0, cfg.model.vocab_size, (2, 14))
    scratch = model.forward_sequential(ids)
    pre = model.prefill(ids[:, :8])
    rest = model.forward_sequential(ids[:, 8:], caches=pre.caches)
    assert (pre.logits - scratch.logits[:, :8]).abs().max() < 1e-4
    assert (rest.logits - scratch.logits[:, 8:]).abs().max() < 1e-4
    # caches after the whole sequence agree too
    for a, b in zip(rest.caches, scratch.caches):
        if arch == "mamba2":
            assert torch.allclose(a.ssm, b.ssm, atol=1e-4)
            assert torch.allclose(a.conv, b.conv, atol=1e-4)
        else:
            ka, va = a.view()
            kb, vb = b.view()
            assert torch.allclose(ka, kb, atol=1e-4) and torch.allclose(va, vb, atol=1e-4)


# Sequences over several chunks of the SSD scan, solved to 1e-11 in float64: what is left between
# the two modes is the solver's, ~1e-10 in logits; 1e-8 leaves room for that and for nothing else
# (a state lost or doubled at a chunk boundary moves the logits by ~1e-2).
TIGHT_TOL, TIGHT_DIFF = 1e-11, 1e-8
# (arch, chunk_size, length): 4 chunks + 1 token, exactly 5 chunks, 2 chunks + 5 tokens
LONG = [("mamba2", 8, 33), ("mamba2", 8, 40), ("mamba2", 16, 37), ("llama", None, 37)]


def _long_model(arch: str, chunk: int | None):
    overrides = () if chunk is None else (f"model.chunk_size={chunk}",)
    return _model(arch, tol=TIGHT_TOL, dtype=torch.float64, overrides=overrides)


@pytest.mark.parametrize("arch,chunk,length", LONG)
def test_sequential_equals_simultaneous_across_chunks(arch, chunk, length):
    """Token-by-token decoding against the chunked scan of the whole sequence."""
    model, cfg = _long_model(arch, chunk)
    assert chunk is None or length > 2 * model.config.chunk_size  # crosses two boundaries or more
    torch.manual_seed(2)
    ids = torch.randint(0, cfg.model.vocab_size, (2, length))
    sim = model(ids)
    seq = model.forward_sequential(ids)
    assert sim.stats.converged.all() and seq.stats.converged.all()
    diff = (sim.logits - seq.logits).abs().max().item()
    assert diff < TIGHT_DIFF, diff


# (arch, chunk_size, prefix length) of a 26-token sequence (chunks of 8: three boundaries): a
# prefix shorter than the conv window, one that ends on a chunk boundary, one inside its third
# chunk
PREFIXES = [("mamba2", 8, 2), ("mamba2", 8, 16), ("mamba2", 8, 21), ("llama", None, 21)]


@pytest.mark.parametrize("arch,chunk,prefix", PREFIXES)
def test_prefix_state_then_sequential_equals_simultaneous(arch, chunk, prefix):
    """Prefill a prefix (simultaneous), carry its caches (conv window and SSM state, or KV) into
    sequential steps over the rest: logits and final caches equal the whole sequence solved at
    once."""
    model, cfg = _long_model(arch, chunk)
    torch.manual_seed(4)
    ids = torch.randint(0, cfg.model.vocab_size, (2, 26))
    sim = model(ids)
    whole = model.prefill(ids)  # simultaneous solve of everything, caches after the last token
    pre = model.prefill(ids[:, :prefix])
    rest = model.forward_sequential(ids[:, prefix:], caches=pre.caches)
    assert sim.stats.converged.all() and pre.stats.converged.all() and rest.stats.converged.all()
    diffs = {
        "prefix": (pre.logits - sim.logits[:, :prefix]).abs().max().item(),
        "rest": (rest.logits - sim.logits[:, prefix:]).abs().max().item(),
        "prefill": (whole.logits - sim.logits).abs().max().item(),
    }
    for layer, (a, b) in enumerate(zip(rest.caches, whole.caches)):
        if arch == "mamba2":
            pairs = {"ssm": (a.ssm, b.ssm), "conv": (a.conv, b.conv)}
        else:
            (ka, va), (kb, vb) = a.view(), b.view()
            pairs = {"k": (ka, kb), "v": (va, vb)}
        for name, (x, y) in pairs.items():
            assert x.shape == y.shape, (layer, name, x.shape, y.shape)
            diffs[f"{layer}.{name}"] = (x - y).abs().max().item()
    assert max(diffs.values()) < TIGHT_DIFF, diffs


@pytest.mark.parametrize("arch", ARCHS)
def test_cache_written_once_per_token(arch):
    """The inner iterations never touch the cache: only the final call's update is committed."""
    model, cfg = _model(arch, tol=1e-6)
    ids = torch.randint(0, cfg.model.vocab_size, (1, 5))
    caches = model.empty_caches(1)
    commits = []
    for c in caches:
        orig = c.commit

        def counting(update, orig=orig):
            commits.append(1)
            orig(update)

        c.commit = counting
    for t in range(ids.shape[1]):
        _, _, stats = model.step(ids[:, t], caches)
        assert stats.iters > 1  # many inner evaluations ...
    assert len(commits) == ids.shape[1] * len(caches)  # ... one commit per token and layer


@pytest.mark.parametrize("arch", ARCHS)
def test_generate_greedy_matches_argmax_and_prefill_modes_agree(arch):
    model, cfg = _model(arch, tol=1e-6)
    torch.manual_seed(5)
    prompt = torch.randint(0, cfg.model.vocab_size, (2, 6))
    a = model.generate(prompt, 5, prefill="simultaneous")
    b = model.generate(prompt, 5, prefill="sequential")
    assert a.shape == (2, 11) and torch.equal(a[:, :6], prompt)
    assert torch.equal(a, b)
    # greedy continuation is the argmax of a full sequential pass over the generated text
    logits = model.forward_sequential(a[:, :-1]).logits[..., : cfg.model.vocab_size]
    assert torch.equal(logits.argmax(-1)[:, 5:], a[:, 6:])


def test_generate_sampling_is_seeded_and_respects_top_k():
    model, cfg = _model("mamba2", tol=1e-5)
    prompt = torch.randint(0, cfg.model.vocab_size, (3, 4))
    g1, g2 = torch.Generator().manual_seed(7), torch.Generator().manual_seed(7)
    a = model.generate(prompt, 6, temperature=1.0, top_k=3, generator=g1)
    b = model.generate(prompt, 6, temperature=1.0, top_k=3, generator=g2)
    assert torch.equal(a, b)
    assert (a < cfg.model.vocab_size).all()
    # top_k=1 sampling is greedy
    c = model.generate(prompt, 6, temperature=1.0, top_k=1, generator=g1)
    assert torch.equal(c, model.generate(prompt, 6))


def test_warm_start_keeps_the_answer():
    model, cfg = _model("mamba2", tol=1e-6)
    torch.manual_seed(6)
    ids = torch.randint(0, cfg.model.vocab_size, (2, 16))
    cold = model.forward_sequential(ids)
    _with_solver(model, seq_warm_start=True)
    warm = model.forward_sequential(ids)
    assert (cold.logits - warm.logits).abs().max() < 1e-4
    # on a repeated token consecutive fixed points are close: warm starts then save iterations
    rep = torch.full((1, 16), 3)
    _with_solver(model, seq_warm_start=False)
    cold_it = model.forward_sequential(rep).stats.sample_iters[:, 4:].float().mean()
    _with_solver(model, seq_warm_start=True)
    warm_it = model.forward_sequential(rep).stats.sample_iters[:, 4:].float().mean()
    assert warm_it < cold_it, (warm_it, cold_it)


@pytest.mark.parametrize("arch", ARCHS)
def test_explicit_sequential_equals_parallel(arch):
    cfg = tiny_config(arch, implicit=False)
    torch.manual_seed(8)
    model = build_model(cfg.model, cfg.solver).eval()
    ids = torch.randint(0, cfg.model.vocab_size, (2, 11))
    assert (model(ids).logits - model.forward_sequential(ids).logits).abs().max() < 1e-5


def test_reference_eval_solver_reaches_same_fixed_point():
    model, cfg = _model("llama", tol=1e-7)
    ids = torch.randint(0, cfg.model.vocab_size, (2, 10))
    a = model(ids)
    _with_solver(model, eval_solver="reference")
    b = model(ids)
    assert b.stats.solver == "reference"
    assert (a.logits - b.logits).abs().max() < 1e-4
