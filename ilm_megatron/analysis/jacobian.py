"""``ilm-eval jacobian``: the state Jacobian ``dh_t/dh_{t-1}`` of one Mamba2 layer, two ways.

In sequential mode token ``t`` solves ``z = F_t(z; h_{t-1})``, where ``F_t`` is one evaluation of
the layer stack (:meth:`~ilm_megatron.models.stack.Stack.step`) reading the caches of the tokens
before ``t``. Take layer ``l``'s SSM state ``h_{t-1}`` (batch 1, ``(nheads, headdim, d_state)``)
as the variable and hold every convolution window and every other layer's state fixed. The
layer's new state is ``h_t = S(z*, h_{t-1})``, the state update of the layer's ``step`` at the
fixed point ``z*``. By the implicit function theorem::

    dh_t/dh_{t-1} = dS/dh + dS/dz (I - dF_t/dz)^{-1} dF_t/dh        (partials at (z*, h_{t-1}))

:func:`state_jacobian` computes it

* by autograd through the whole unrolled fixed-point iteration (``"autograd"``), and
* from the partial Jacobians of single evaluations at ``z*``, solving the linear system
  (``"ift"``).

For an explicit Mamba2 the layer input does not depend on its own state, so the Jacobian is
``dS/dh``: diagonal, each head's entries ``exp(dt * A)``. The derivation is in
``docs/analysis.md``. Everything runs in the model's dtype: use ``model.double()``.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import math
import time
from collections.abc import Iterator, Sequence
from typing import Any

from ilm_megatron.analysis.common import (
    Checkpoint,
    add_checkpoint_argument,
    add_output_arguments,
    load_checkpoint,
    resolve,
    resolve_device,
    show_outputs,
    subplots,
    word_problem_group,
    word_problems,
)
from ilm_megatron.argtypes import comma_list, positive_float, positive_int
from ilm_megatron.errors import UserError

NAME = "jacobian"
HELP = (
    "state Jacobian dh_t/dh_(t-1) of a Mamba2 layer at the fixed point (autograd through the "
    "solve vs the implicit function theorem)"
)
#: the JSON reports whole-layer numbers when the layer's state has at most this many entries
WHOLE_LAYER_MAX = 4096
#: spectral radii are computed for matrices up to this side (eigvals is cubic)
EIG_MAX = 1024


# --------------------------------------------------------------------------- command line


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The options of ``ilm-eval jacobian``."""
    add_checkpoint_argument(p)
    p.add_argument("--layer", type=int, default=0, help="layer whose state is the variable (0..)")
    p.add_argument(
        "--head", type=int, default=0, help="head whose (headdim*d_state)^2 block is drawn (0)"
    )
    p.add_argument(
        "--position",
        type=int,
        default=None,
        help="token t whose transition h_(t-1) -> h_t is measured (0-based, negative counts from "
        "the end; default: the last)",
    )
    p.add_argument(
        "--ids",
        type=comma_list(int, lambda v: v >= 0, "non-negative token ids"),
        default=None,
        help="input token ids, e.g. 3,1,4,1,5",
    )
    p.add_argument(
        "--length",
        type=positive_int,
        default=16,
        help="length of the random input when --ids is not given (16)",
    )
    p.add_argument("--seed", type=int, default=0, help="seed of the random input (0)")
    p.add_argument(
        "--group",
        default=None,
        help="word problem of the random input (default: data.group of the checkpoint's run; "
        "uniform ids below vocab_size when the run has none)",
    )
    p.add_argument(
        "--scope",
        choices=("auto", "layer", "head"),
        default="auto",
        help=f"Jacobian over the whole layer's state or the --head block only (auto: the layer "
        f"when its state has at most {WHOLE_LAYER_MAX} entries); the cost grows with the square "
        "of the entries in scope",
    )
    p.add_argument(
        "--tol",
        type=positive_float,
        default=1e-12,
        help="fixed-point tolerance, relative residual (1e-12)",
    )
    p.add_argument(
        "--max-iter", type=positive_int, default=1000, help="fixed-point iteration cap (1000)"
    )
    p.add_argument(
        "--chunk",
        type=positive_int,
        default=256,
        help="Jacobian rows per batched backward pass (256)",
    )
    add_output_arguments(p, NAME)


# --------------------------------------------------------------------------- library


@dataclasses.dataclass
class JacobianInfo:
    """What :func:`state_jacobian` did besides the two matrices.

    Attributes:
        implicit: whether the model is implicit (explicit: one evaluation, no fixed point).
        layer, head, position: the measured transition (head None: the whole layer).
        state_shape: ``(nheads, headdim, d_state)`` of the layer.
        shape: the Jacobians' shape ``(N, N)``, ``N`` the number of state entries in scope.
        iterations: fixed-point iterations of the autograd solve (1 for an explicit model).
        residual: relative residual ``|F(z*) - z*| / |F(z*)|`` at the returned ``z*``.
        converged: residual below ``tol``.
        tol, max_iter: the solve's settings.
        prefix_residual_max: largest residual of the prefix tokens' sequential solves.
        spectral_radius_dfdz: largest ``|eigenvalue|`` of ``dF_t/dz`` at ``z*`` (below 1: the
            iteration is locally contractive); None for explicit models or large ``d_model``.
        seconds_autograd, seconds_ift: wall time of each computation.
    """

    implicit: bool
    layer: int
    head: int | None
    position: int
    state_shape: tuple[int, int, int]
    shape: tuple[int, int]
    iterations: int
    residual: float
    converged: bool
    tol: float
    max_iter: int
    prefix_residual_max: float
    spectral_radius_dfdz: float | None
    seconds_autograd: float
    seconds_ift: float


def check_mamba2(model: Any) -> None:
    """Raise :class:`UserError` unless every layer of ``model`` has a Mamba2 mixer."""
    from ilm_megatron.models.mamba2 import Mamba2Mixer

    arch = model.config.arch
    if arch != "mamba2" or not all(isinstance(b.mixer, Mamba2Mixer) for b in model.stack.layers):
        raise UserError(
            f"the state Jacobian needs a Mamba2 model (an SSM state per layer); this checkpoint "
            f"is a model.arch={arch!r} model"
        )


def check_indices(
    model: Any, n_ids: int, layer: int, head: int | None, position: int | None
) -> int:
    """Validate layer, head and position against ``model`` and a sequence of ``n_ids`` tokens.

    Returns:
        The position as a non-negative index (``None``: the last token).

    Raises:
        UserError: naming the offending flag (``--layer``, ``--head``, ``--position``).
    """
    n_layers = len(model.stack.layers)
    if not 0 <= layer < n_layers:
        raise UserError(
            f"--layer {layer} is out of range: the model has {n_layers} layer(s), 0..{n_layers - 1}"
        )
    nheads = model.stack.layers[layer].mixer.nheads_local
    if head is not None and not 0 <= head < nheads:
        raise UserError(f"--head {head} is out of range: layer {layer} has heads 0..{nheads - 1}")
    if n_ids < 1:
        raise UserError("the input has no tokens (--ids / --length)")
    if position is None:
        return n_ids - 1
    if not -n_ids <= position < n_ids:
        raise UserError(
            f"--position {position} is out of range for {n_ids} token(s): 0..{n_ids - 1} "
            f"(or -{n_ids}..-1 from the end)"
        )
    return position % n_ids


@contextlib.contextmanager
def _reference_kernels(model: Any) -> Iterator[None]:
    """Run every kernel through its PyTorch reference (float64, autograd, batched backward)."""
    saved = [(m, m.kernel_backend) for m in model.modules() if hasattr(m, "kernel_backend")]
    try:
        for m, _ in saved:
            m.kernel_backend = "reference"
        yield
    finally:
        for m, backend in saved:
            m.kernel_backend = backend


@contextlib.contextmanager
def _eval_solver(model: Any, tol: float) -> Iterator[None]:
    """The model in eval mode with its sequential solve at tolerance ``tol``."""
    solver, training = model.solver_config, model.training
    model.solver_config = dataclasses.replace(solver, eval_tol=tol)
    model.eval()
    try:
        yield
    finally:
        model.solver_config = solver
        model.train(training)


def prefix_caches(model: Any, ids: Any, position: int, max_iter: int) -> tuple[list[Any], float]:
    """The per-layer caches after running ``ids[:position]`` token by token (batch 1).

    Uses :meth:`ImplicitLM.step` (the model's own sequential solve, at its current eval
    tolerance). Returns ``(caches, largest relative residual of the prefix tokens)``.
    """
    caches = model.empty_caches(1, ids.device)
    res = 0.0
    for s in range(position):
        _, _, stats = model.step(ids[s : s + 1], caches, max_iter=max_iter)
        if model.implicit:
            res = max(res, float(stats.residual.max()))
    return caches, res


class TokenTransition:
    """The transition of token ``position`` as a function of layer ``layer``'s state.

    Holds the caches of the tokens before ``position`` (run sequentially with
    :meth:`ImplicitLM.step` at the model's eval tolerance; :func:`state_jacobian` sets it to its
    ``tol``) and the token's embedding and injection. :meth:`evaluate` is one call of
    ``Stack.step`` with the layer's state replaced by the argument: ``(F_t(z; h), S(z, h))``.

    Args:
        model: an :class:`~ilm_megatron.models.lm.ImplicitLM` with Mamba2 layers.
        ids: (l,) token ids.
        layer: the layer whose SSM state is the variable.
        position: the token (0-based, < l).
        head: restrict the variable and the output to this head's ``(headdim, d_state)`` block
            (the other heads' states stay fixed); None: the whole ``(nheads, headdim, d_state)``.
        prefix_max_iter: inner cap of the prefix tokens' solves.
    """

    def __init__(
        self,
        model: Any,
        ids: Any,
        layer: int,
        position: int,
        head: int | None = None,
        prefix_max_iter: int = 1000,
    ) -> None:
        import torch

        self.model = model
        self.layer = layer
        self.head = head
        self.implicit = bool(model.implicit)
        with torch.no_grad():
            self.caches, self.prefix_residual = prefix_caches(model, ids, position, prefix_max_iter)
            e, u = model.embed(ids[position : position + 1][None])
        self.e = e[:, 0]
        self.u = None if u is None else u[:, 0]
        self.h_prev = self.caches[layer].ssm  # (1, nheads, headdim, d_state)

    @property
    def variable(self) -> Any:
        """The state in scope, ``h_{t-1}`` (the whole layer's or one head's block), a copy."""
        h = self.h_prev[0]
        return (h if self.head is None else h[self.head]).detach().clone()

    def full_state(self, h_var: Any) -> Any:
        """(1, nheads, headdim, d_state): ``h_prev`` with the scope replaced by ``h_var``."""
        if self.head is None:
            return h_var.reshape(self.h_prev.shape)
        h = self.h_prev.detach().clone()
        h[0, self.head] = h_var
        return h

    def start(self) -> Any:
        """The solver's first iterate (``model.initial_iterate``)."""
        return self.model.initial_iterate(self.e)

    def evaluate(self, z: Any, h_var: Any) -> tuple[Any, Any]:
        """``(F_t(z; h) (1, d), S(z, h) flattened over the scope (N,))``.

        An explicit model ignores ``z``: its stack reads the embedding once.
        """
        from ilm_megatron.models.cache import Mamba2Cache

        caches = list(self.caches)
        caches[self.layer] = Mamba2Cache(caches[self.layer].conv, self.full_state(h_var))
        if self.implicit:
            out, updates = self.model.stack.step(z, self.u, caches)
        else:
            out, updates = self.model.stack.step(self.e, None, caches)
        s = updates[self.layer].ssm[0]
        s = s if self.head is None else s[self.head]
        return out, s.reshape(-1)

    def solve(self, h_var: Any, tol: float, max_iter: int) -> tuple[Any, int, float]:
        """Iterate ``z <- F_t(z; h)`` from :meth:`start` until the relative residual is below
        ``tol`` (or ``max_iter`` evaluations), under the ambient grad mode (with autograd, the
        returned ``z`` carries the whole unrolled iteration).

        Returns:
            ``(z*, iterations, residual of z*)``; explicit models: ``(embedding, 1, 0.0)``.
        """
        import torch

        from ilm_megatron.implicit.solver import relative_residual

        if not self.implicit:
            return self.e, 1, 0.0
        z = self.start()
        iters = 0
        while iters < max_iter:
            fz, _ = self.evaluate(z, h_var)
            iters += 1
            res = float(relative_residual(fz.detach(), z.detach()).max())
            z = fz
            if res < tol:
                break
        with torch.no_grad():
            fz, _ = self.evaluate(z.detach(), h_var.detach())
            res = float(relative_residual(fz, z.detach()).max())
        return z, iters, res

    def next_state(self, h_var: Any, tol: float, max_iter: int) -> Any:
        """``h_t`` over the scope (N,) for the state ``h_var``: solve, then ``S(z*, h_var)``."""
        import torch

        with torch.no_grad():
            z, _, _ = self.solve(h_var, tol, max_iter)
            return self.evaluate(z, h_var)[1]


def jacobian_rows(out: Any, inputs: Sequence[Any], chunk: int = 256) -> list[Any]:
    """The Jacobians ``d out / d input`` (``(out.numel(), input.numel())`` each) by reverse mode.

    Rows come ``chunk`` at a time from one batched backward pass over the graph of ``out``
    (``torch.autograd.grad(..., is_grads_batched=True)``); where an operation has no batching
    rule, one backward pass per row. Inputs ``out`` does not depend on get zero matrices.
    """
    import torch

    n = out.numel()
    flat = out.reshape(-1)
    parts: list[list[Any]] = [[] for _ in inputs]

    def grads(seeds: Any, batched: bool) -> tuple[Any, ...]:
        g = torch.autograd.grad(
            flat,
            list(inputs),
            seeds,
            retain_graph=True,
            allow_unused=True,
            is_grads_batched=batched,
        )
        m = seeds.shape[0] if batched else 1
        return tuple(
            torch.zeros(m, x.numel(), dtype=x.dtype, device=x.device)
            if gi is None
            else gi.reshape(m, -1)
            for gi, x in zip(g, inputs)
        )

    batched = True
    for start in range(0, n, max(1, chunk)):
        m = min(max(1, chunk), n - start)
        seeds = torch.zeros(m, n, dtype=flat.dtype, device=flat.device)
        seeds[torch.arange(m), start + torch.arange(m)] = 1
        block = None
        if batched:
            try:
                block = grads(seeds, True)
            except RuntimeError:  # an op without a vmap rule: row by row from here on
                batched = False
        if block is None:
            rows = [grads(seeds[i], False) for i in range(m)]
            block = tuple(torch.cat(r) for r in zip(*rows))
        for i, b in enumerate(block):
            parts[i].append(b)
    return [torch.cat(p) for p in parts]


def offdiag_mass(J: Any) -> float:
    """``|J - diag(J)|_F / |J|_F`` (0 for a zero matrix)."""
    import torch

    total = float(torch.linalg.matrix_norm(J))
    if total == 0.0:
        return 0.0
    off = J - torch.diag_embed(torch.diagonal(J))
    return float(torch.linalg.matrix_norm(off)) / total


def rel_err(J_a: Any, J_b: Any) -> float:
    """``|J_a - J_b|_F / |J_b|_F``."""
    import torch

    ref = float(torch.linalg.matrix_norm(J_b))
    diff = float(torch.linalg.matrix_norm(J_a - J_b))
    return diff / ref if ref > 0 else diff


def spectral_radius(M: Any) -> float | None:
    """Largest ``|eigenvalue|`` of a square matrix (None above :data:`EIG_MAX`)."""
    import torch

    if M.shape[0] > EIG_MAX:
        return None
    return float(torch.linalg.eigvals(M).abs().max())


def state_jacobian(
    model: Any,
    ids: Any,
    layer: int,
    position: int | None = None,
    head: int | None = None,
    *,
    tol: float = 1e-12,
    max_iter: int = 1000,
    chunk: int = 256,
) -> tuple[Any, Any, JacobianInfo]:
    """``dh_t/dh_{t-1}`` of layer ``layer`` at token ``position``: by autograd and by the IFT.

    Args:
        model: an :class:`~ilm_megatron.models.lm.ImplicitLM` with Mamba2 layers (implicit or
            explicit), in the dtype to work in (``model.double()``).
        ids: (l,) or (1, l) token ids.
        layer: 0-based layer index.
        position: 0-based token index (negative: from the end); None: the last token.
        head: one head's ``(headdim*d_state)^2`` block; None: the whole layer.
        tol: relative-residual tolerance of every fixed-point solve (prefix tokens included).
        max_iter: cap on the iterations of each solve.
        chunk: Jacobian rows per batched backward pass.

    Returns:
        ``(J_autograd, J_ift, info)``: two ``(N, N)`` matrices over the flattened state in scope
        (``(nheads, headdim, d_state)`` or ``(headdim, d_state)``, C order; row: ``h_t`` entry,
        column: ``h_{t-1}`` entry) and a :class:`JacobianInfo`.

    Raises:
        UserError: not a Mamba2 model, or a layer/head/position out of range.
    """
    import torch

    check_mamba2(model)
    ids = torch.as_tensor(ids).reshape(-1)
    pos = check_indices(model, ids.numel(), layer, head, position)
    device = next(model.parameters()).device
    ids = ids.to(device)
    mixer = model.stack.layers[layer].mixer
    state_shape = (mixer.nheads_local, mixer.headdim, mixer.d_state)
    with _reference_kernels(model), _eval_solver(model, tol), model.cached_weights():
        tr = TokenTransition(model, ids, layer, pos, head, max_iter)

        # (a) autograd through the unrolled iteration from the start iterate
        t0 = time.perf_counter()
        with torch.enable_grad():
            h_a = tr.variable.requires_grad_(True)
            z, iters, residual = tr.solve(h_a, tol, max_iter)
            _, s = tr.evaluate(z, h_a)
            (J_a,) = jacobian_rows(s, [h_a], chunk)
        del z, s
        t1 = time.perf_counter()

        # (b) implicit function theorem from single evaluations at z*
        with torch.no_grad():
            z_star, _, _ = tr.solve(tr.variable, tol, max_iter)
        with torch.enable_grad():
            h_b = tr.variable.requires_grad_(True)
            zs = z_star.detach().clone().requires_grad_(True)
            fz, s = tr.evaluate(zs, h_b)
            dS_dz, dS_dh = jacobian_rows(s, [zs, h_b], chunk)
            rho = None
            if tr.implicit:
                dF_dz, dF_dh = jacobian_rows(fz, [zs, h_b], chunk)
                eye = torch.eye(dF_dz.shape[0], dtype=dF_dz.dtype, device=dF_dz.device)
                J_b = dS_dh + dS_dz @ torch.linalg.solve(eye - dF_dz, dF_dh)
                rho = spectral_radius(dF_dz)
            else:  # F_t does not read z: the layer input is independent of its own state
                J_b = dS_dh
        t2 = time.perf_counter()
    n = J_b.shape[0]
    info = JacobianInfo(
        implicit=tr.implicit,
        layer=layer,
        head=head,
        position=pos,
        state_shape=state_shape,
        shape=(n, n),
        iterations=iters,
        residual=residual,
        converged=residual < tol,
        tol=tol,
        max_iter=max_iter,
        prefix_residual_max=tr.prefix_residual,
        spectral_radius_dfdz=rho,
        seconds_autograd=t1 - t0,
        seconds_ift=t2 - t1,
    )
    return J_a.detach(), J_b.detach(), info


def head_block(J: Any, head: int, state_shape: Sequence[int]) -> Any:
    """The ``(headdim*d_state)^2`` block of head ``head`` in a whole-layer Jacobian."""
    p = state_shape[1] * state_shape[2]
    return J[head * p : (head + 1) * p, head * p : (head + 1) * p]


def block_metrics(J_a: Any, J_b: Any) -> dict[str, Any]:
    """rel_err, offdiag_mass and a few norms of a Jacobian pair."""
    import torch

    diag = torch.diagonal(J_b)
    return {
        "rel_err": rel_err(J_a, J_b),
        "offdiag_mass": offdiag_mass(J_b),
        "shape": list(J_b.shape),
        "frobenius_norm": float(torch.linalg.matrix_norm(J_b)),
        "diag_min": float(diag.min()),
        "diag_max": float(diag.max()),
        "spectral_radius": spectral_radius(J_b),
    }


# --------------------------------------------------------------------------- figure


def plot_jacobians(J_a: Any, J_b: Any, title: str = "") -> Any:
    """Heatmaps side by side: ``J_a`` (autograd), ``J_b`` (IFT), their difference, and ``J_b``
    without its diagonal (the implicit coupling; zero for an explicit layer).

    The first two share one symmetric colour scale; the others have their own. Returns the
    matplotlib figure (``write_report`` closes it).
    """
    import numpy as np

    a, b = J_a.cpu().numpy(), J_b.cpu().numpy()
    off = b.copy()
    np.fill_diagonal(off, 0.0)
    panels = (
        (a, "autograd through the solve", None),
        (b, "implicit function theorem (IFT)", None),
        (a - b, f"autograd - IFT (rel. err. {rel_err(J_a, J_b):.1e})", "own"),
        (off, f"IFT off the diagonal (mass {offdiag_mass(J_b):.1e})", "own"),
    )
    shared = float(max(np.abs(a).max(), np.abs(b).max()))
    fig, axes = subplots(1, 4, figsize=(21, 5))
    for ax, (m, name, scale) in zip(axes, panels):
        lim = float(np.abs(m).max()) if scale == "own" else shared
        lim = lim if lim > 0 else 1.0
        im = ax.imshow(m, cmap="RdBu_r", vmin=-lim, vmax=lim, interpolation="nearest")
        ax.set_title(name, fontsize=10)
        ax.set_xlabel("entry of h[t-1]")
        ax.set_ylabel("entry of h[t]")
        fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
    if title:
        fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    return fig


# --------------------------------------------------------------------------- ilm-eval


def _input_ids(args: argparse.Namespace, model: Any, ckpt: Checkpoint) -> tuple[Any, str]:
    """The token ids (l,) (from ``--ids`` or drawn) and where they came from."""
    import torch

    vocab = model.config.vocab_size
    if args.ids is not None:
        bad = [i for i in args.ids if i >= vocab]
        if bad:
            raise UserError(f"--ids {bad} are not below the model's vocab_size {vocab}")
        return torch.tensor(args.ids, dtype=torch.long), "ids"
    group, _ = word_problem_group(
        ckpt, vocab, args.group, hint="pass --group or --ids", required=False
    )
    if group is None:
        gen = torch.Generator().manual_seed(args.seed)
        return torch.randint(0, vocab, (args.length,), generator=gen), "uniform"
    x, _ = word_problems(group, 1, args.length, args.seed)
    return x[0], f"word_problem:{group}"


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Both Jacobians of the chosen transition; write the report when ``--out`` is set."""
    from ilm_megatron.analysis.report import write_report

    ckpt = resolve(args.checkpoint)
    device = resolve_device(args.device)
    model = load_checkpoint(ckpt, args.device)
    check_mamba2(model)
    ids, source = _input_ids(args, model, ckpt)
    pos = check_indices(model, ids.numel(), args.layer, args.head, args.position)
    model = model.double()  # the two computations agree to float64 rounding, not float32's

    mixer = model.stack.layers[args.layer].mixer
    state_shape = (mixer.nheads_local, mixer.headdim, mixer.d_state)
    whole = args.scope == "layer" or (
        args.scope == "auto" and math.prod(state_shape) <= WHOLE_LAYER_MAX
    )
    J_a, J_b, info = state_jacobian(
        model,
        ids,
        args.layer,
        pos,
        None if whole else args.head,
        tol=args.tol,
        max_iter=args.max_iter,
        chunk=args.chunk,
    )
    if whole:
        layer_m = block_metrics(J_a, J_b)
        H_a = head_block(J_a, args.head, state_shape)
        H_b = head_block(J_b, args.head, state_shape)
    else:
        layer_m = None
        H_a, H_b = J_a, J_b
    head_m = block_metrics(H_a, H_b)
    top = layer_m if whole else head_m
    cfg = model.config
    kind = "implicit" if info.implicit else "explicit"
    result: dict[str, Any] = {
        "analysis": NAME,
        "checkpoint": str(ckpt.path),
        "model": {
            "arch": cfg.arch,
            "implicit": info.implicit,
            "n_layers": cfg.n_layers,
            "d_model": cfg.d_model,
        },
        "implicit": info.implicit,
        "rel_err": top["rel_err"],
        "offdiag_mass": top["offdiag_mass"],
        "scope": "layer" if whole else "head",
        "shape": top["shape"],
        "layer": args.layer,
        "head": args.head,
        "position": pos,
        "length": int(ids.numel()),
        "ids": [int(i) for i in ids],
        "input": source,
        "state_shape": list(state_shape),
        "iterations": info.iterations,
        "residual": info.residual,
        "converged": info.converged,
        "tol": info.tol,
        "max_iter": info.max_iter,
        "prefix_residual_max": info.prefix_residual_max,
        "spectral_radius_dfdz": info.spectral_radius_dfdz,
        "layer_block": layer_m,
        "head_block": head_m,
        "seconds": {"autograd": info.seconds_autograd, "ift": info.seconds_ift},
        "dtype": "float64",
        "device": str(device),
    }
    figures = {}
    if args.out is not None:
        title = (
            f"{kind} Mamba2: dh_t/dh_(t-1), layer {args.layer}, head {args.head}, token {pos} "
            f"({info.iterations} iterations)"
        )
        figures["jacobian"] = plot_jacobians(H_a, H_b, title)
    return write_report(args.out, NAME, result, figures)


def show(result: dict[str, Any]) -> None:
    """A few lines and a table: whole layer and head block."""
    kind = "implicit" if result["implicit"] else "explicit"
    h, p, n = result["state_shape"]
    print(
        f"{kind} {result['model']['arch']}: state Jacobian dh_t/dh_(t-1) of layer "
        f"{result['layer']} at token {result['position']} of {result['length']} "
        f"(state {h}x{p}x{n}; input {result['input']})"
    )
    conv = "converged" if result["converged"] else "NOT converged"
    print(
        f"  fixed point: {result['iterations']} iteration(s), residual {result['residual']:.1e} "
        f"({conv} at tol {result['tol']:.0e})"
    )
    if result["spectral_radius_dfdz"] is not None:
        print(f"  spectral radius of dF/dz at z*: {result['spectral_radius_dfdz']:.4f}")
    rows: list[tuple[str, dict[str, Any]]] = []
    if result["layer_block"] is not None:
        rows.append(("whole layer", result["layer_block"]))
    rows.append((f"head {result['head']}", result["head_block"]))
    print(f"  {'scope':<12} {'shape':>11}  {'rel_err':>9}  {'offdiag_mass':>12}  "
          f"{'spectral_radius':>15}")  # fmt: skip
    for name, m in rows:
        rho = m["spectral_radius"]
        rho_s = f"{rho:15.4f}" if rho is not None else f"{'-':>15}"
        shape = "x".join(str(s) for s in m["shape"])
        print(f"  {name:<12} {shape:>11}  {m['rel_err']:9.2e}  {m['offdiag_mass']:12.4f}  {rho_s}")
    show_outputs(result)


__all__: Sequence[str] = (
    "HELP",
    "JacobianInfo",
    "TokenTransition",
    "add_arguments",
    "jacobian_rows",
    "offdiag_mass",
    "plot_jacobians",
    "rel_err",
    "run",
    "show",
    "state_jacobian",
)
