"""Implicit (and explicit) language model around a spec-built stack (DESIGN §1-2).

```
e  = Embedding(ids)                        # (b, l, d)
u  = W_inj · RMSNorm_inj(e) + b_inj        # (b, l, injection_size), once per forward
z* = F(z*, u)  from z0 = 0                 # simultaneous solve, or token by token
logits = z* · Embedding^T                  # tied head
```
Explicit models run ``F`` once on ``e`` without injection. Training uses the no-grad solve plus
phantom steps; evaluation uses the solver chosen in ``SolverConfig.eval_solver``; sequential mode
and :meth:`ImplicitLM.generate` solve one token at a time with caches.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
from collections.abc import Collection
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from megatron.core.transformer.spec_utils import ModuleSpec, build_module
from torch import nn
from torch.nn.utils import parametrize

from ilm_megatron.config import ModelConfig, SolverConfig
from ilm_megatron.core.parallel_state import model_tp_size
from ilm_megatron.core.tensor_parallel import (
    ColumnParallelLinear,
    VocabParallelEmbedding,
    sequence_parallel_region,
    set_tp_layout,
    tp_sum,
    vocab_parallel_logits,
    vocab_parallel_logits_local,
)
from ilm_megatron.implicit.phantom import phantom_steps, phantom_steps_recompute
from ilm_megatron.implicit.sequential import solve_token
from ilm_megatron.implicit.solver import (
    Reduce,
    SolverStats,
    solve,
    solve_damped_reference,
    solve_options,
)
from ilm_megatron.models.init import unit
from ilm_megatron.models.layers import Linear, RMSNorm
from ilm_megatron.models.specs import get_stack_spec
from ilm_megatron.models.stack import upcast


@dataclass
class LMOutput:
    """logits: (b, l, padded_vocab); stats of the solve; caches when asked for (prefill,
    ``forward(return_caches=True)``)."""

    logits: torch.Tensor
    stats: SolverStats
    caches: list[Any] | None = None
    hidden: torch.Tensor | None = None  # (b, l, d) the (approximate) fixed point


class ImplicitLM(nn.Module):
    """Embedding, injection, the stack ``F`` (built from a ModuleSpec) and a tied LM head."""

    def __init__(
        self,
        config: ModelConfig,
        solver: SolverConfig | None = None,
        stack_spec: ModuleSpec | None = None,
    ) -> None:
        super().__init__()
        self.config = config
        self.solver_config = solver if solver is not None else SolverConfig()
        # weight norm: reuse each reparametrised weight within a solve (see cached_weights)
        self.cache_parametrizations = True
        spec = stack_spec if stack_spec is not None else get_stack_spec(config.arch, config.backend)
        # each unit from its own seed under a build plan (see ilm_megatron.models.init)
        with unit("embedding"):
            if config.backend == "tp":  # vocabulary rows split over the TP group
                self.embedding = VocabParallelEmbedding(
                    config.padded_vocab_size, config.d_model, config.init_std
                )
            else:
                self.embedding = nn.Embedding(config.padded_vocab_size, config.d_model)
                nn.init.normal_(self.embedding.weight, std=config.init_std)
        self.stack = build_module(spec, config)
        self.injection_norm: nn.Module | None = None
        self.injection: nn.Module | None = None
        if config.implicit:
            with unit("injection_norm"):
                self.injection_norm = RMSNorm(config.d_model, config=config)
            inj = getattr(spec.submodules, "injection", None) or Linear
            parts = self.stack.injection_parts
            with unit("injection"):
                self.injection = build_module(
                    inj,
                    config.d_model,
                    self.stack.injection_size,
                    config=config,
                    bias=True,
                    partition_sizes=parts,
                )
            set_tp_layout(self.injection.weight, 0, parts)
            set_tp_layout(self.injection.bias, 0, parts)
        head_cls = ColumnParallelLinear if config.backend == "tp" else Linear
        self.lm_head = None
        if not config.tie_embeddings:
            with unit("lm_head"):
                self.lm_head = head_cls(config.d_model, config.padded_vocab_size, config=config)
        if config.implicit and config.iterate_init_scale != 1.0:
            scale_iterate_weights(self, config.iterate_init_scale)
        if config.weight_norm:
            if model_tp_size(config) > 1:
                raise ValueError("model.weight_norm is not supported with tensor parallelism")
            apply_weight_norm(self)

    @property
    def implicit(self) -> bool:
        return self.config.implicit

    # ------------------------------------------------------------------ pieces
    def embed(self, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """ids: (b, l) -> (e (b, l, d) fp32, u (b, l, injection_size / tp) or None).

        Under TP ``e`` is replicated and ``u`` is this rank's share of every packed component.
        """
        e = upcast(self.embedding(ids))
        if self.injection is None:
            return e, None
        return e, self.injection(self.injection_norm(e))

    def head(self, z: torch.Tensor, gather: bool = True) -> torch.Tensor:
        """z: (..., d) -> logits (..., padded_vocab); under TP with ``gather=False`` this
        rank's columns (..., padded_vocab / tp)."""
        return lm_logits(z, self.embedding, self.lm_head, gather=gather)

    def stack_fn(self, u: torch.Tensor | None, caches: list[Any] | None = None):
        """``F(., u)`` as a one-argument callable for the solvers; every call reads ``caches``
        (the per-layer state before the window, see :meth:`forward`) without changing them."""
        return lambda z: self.stack(z, u, caches=caches)[0]

    def stack_fn_rows(self, u: torch.Tensor | None, caches: list[Any] | None = None):
        """``F`` of some samples: ``(z[idx], idx) -> F(z)[idx]`` (per-sample early exit)."""

        def f_rows(z: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
            rows = None if caches is None else [c.rows(idx) for c in caches]
            return self.stack(z, None if u is None else u[idx], caches=rows)[0]

        return f_rows

    def sharded_state_dict(
        self,
        prefix: str = "",
        sharded_offsets: tuple = (),
        metadata: dict | None = None,
        stage: nn.Module | None = None,
    ) -> dict[str, Any]:
        """Megatron ``ShardedStateDict`` for ``dist_checkpointing.save/load`` (any TP/PP size).

        Keys are the single-process state-dict names; packed tensors are split per component.
        Under PP pass this rank's ``stage``. See :mod:`ilm_megatron.parallel.dist_checkpoint`.
        """
        from ilm_megatron.parallel.dist_checkpoint import sharded_state_dict

        return sharded_state_dict(self, prefix, sharded_offsets, metadata, stage)

    def eval_max_iter(self) -> int:
        """The evaluation cap ``ceil(eval_max_iter_mult * f_max_iter)`` of ``solver_config``."""
        s = self.solver_config
        return int(math.ceil(s.eval_max_iter_mult * s.f_max_iter))

    def eval_tol(self) -> float:
        s = self.solver_config
        return s.eval_tol if s.eval_tol > 0 else s.f_tol

    # ------------------------------------------------------------------ simultaneous mode
    def forward(
        self,
        ids: torch.Tensor,
        max_iter: int | None = None,
        solver: SolverConfig | None = None,
        gather_logits: bool = True,
        caches: list[Any] | None = None,
        return_caches: bool = False,
    ) -> LMOutput:
        """Simultaneous mode over the whole sequence.

        Args:
            ids: (b, l) token ids.
            max_iter: override of the solver cap (training: ``f_max_iter``; eval: the eval cap).
            solver: the training solve's settings for this call (the curriculum phase's);
                default ``self.solver_config``. Evaluation always uses ``self.solver_config``.
            gather_logits: False under TP returns this rank's logits columns
                (b, l, padded_vocab / tp), for a vocab-parallel loss.
            caches: per-layer state before ``ids`` (the caches a previous window returned, or
                :meth:`prefill`'s; TP-local shards under TP), or None (an empty state). Every
                evaluation of ``F``, in the solve and in the phantom steps, reads them as
                constants: no gradient flows into them (truncated backprop across windows).
            return_caches: also return the per-layer state after the window (detached), from
                one more call of ``F`` at the solution, as :meth:`prefill` does.

        Returns:
            :class:`LMOutput` with logits (b, l, padded_vocab) and solver statistics (and
            ``caches`` when asked for). In training mode the logits come from the phantom steps
            and carry gradients.
        """
        if caches is not None:  # truncated backprop: the state before the window is a constant
            caches = [c.detach() for c in caches]
        sp = self.sequence_parallel and ids.shape[1] % model_tp_size(self.config) == 0
        with sequence_parallel_region(sp):
            return self._forward(ids, max_iter, solver, gather_logits, sp, caches, return_caches)

    def _forward(
        self,
        ids: torch.Tensor,
        max_iter: int | None,
        solver: SolverConfig | None,
        gather_logits: bool,
        sp: bool,
        caches: list[Any] | None = None,
        return_caches: bool = False,
    ) -> LMOutput:
        """:meth:`forward`; under sequence parallelism (``sp``) ``e``, ``z`` and the solver's
        residual are this rank's (b, l / tp, d) positions, the residual summed over TP."""
        e, u = self.embed(ids)
        if not self.implicit:  # one pass: its caches are the state after the window
            z, after = self.stack(e, caches=caches, return_cache=return_caches)
            after = None if after is None else [c.detach() for c in after]
            return LMOutput(self.head(z, gather_logits), _explicit_stats(ids), after, z)
        s = self.solver_config if solver is None else solver
        f = self.stack_fn(u, caches)
        f_rows = self.stack_fn_rows(u, caches)
        z0 = self.initial_iterate(e)
        reduce = tp_sum if sp else None
        if self.training and torch.is_grad_enabled():
            cap = s.f_max_iter if max_iter is None else max_iter
            with self.cached_weights():  # weight norm: each weight once for the whole solve
                z_star, stats = solve(f, z0, cap, s.f_tol, reduce, solve_options(s), f_rows)
            if s.phantom_impl == "recompute":
                inputs = [u, *(p for p in self.stack.parameters() if p.requires_grad)]
                z = phantom_steps_recompute(f, z_star, s.phantom_steps, s.phantom_damping, inputs)
            else:
                with self.cached_weights():  # ... and once (one saved copy) for the k steps
                    z = phantom_steps(f, z_star, s.phantom_steps, s.phantom_damping)
        else:
            with self.cached_weights():
                z, stats = self.solve_eval(f, z0, max_iter, reduce, f_rows)
            z_star = z
        after = self._caches_after(z_star, u, caches) if return_caches else None
        return LMOutput(self.head(z, gather_logits), stats, after, z)

    @torch.no_grad()
    def _caches_after(
        self, z_star: torch.Tensor, u: torch.Tensor | None, caches: list[Any] | None
    ) -> list[Any]:
        """The per-layer state after a window: one call of ``F`` at ``z_star`` (b, l, d) from
        ``caches`` (the state before it), detached: the next window reads it as a constant."""
        with self.cached_weights():
            _, after = self.stack(z_star.detach(), u, return_cache=True, caches=caches)
        return [c.detach() for c in after]

    @property
    def sequence_parallel(self) -> bool:
        """Whether the simultaneous forward runs sequence parallel (``model.sequence_parallel``
        under tensor parallelism; a sequence the TP size does not divide runs without)."""
        return self.config.sequence_parallel and model_tp_size(self.config) > 1

    def initial_iterate(self, e: torch.Tensor) -> torch.Tensor:
        """The solver's starting point z0 for embeddings e (..., d): zeros, or e itself
        (``model.iterate_init``)."""
        return e if self.config.iterate_init == "embedding" else torch.zeros_like(e)

    def cached_weights(self) -> contextlib.AbstractContextManager:
        """With ``model.weight_norm``: compute each reparametrised weight ``g * v / |v|`` once
        inside the block (``torch.nn.utils.parametrize.cached``) instead of at every solver
        iteration; under autograd the block saves one weight copy for backward, not one per
        phantom step. A no-op without weight norm or with ``cache_parametrizations = False``.
        """
        if self.config.weight_norm and self.cache_parametrizations:
            return parametrize.cached()
        return contextlib.nullcontext()

    def solve_eval(
        self,
        f,
        z0: torch.Tensor,
        max_iter: int | None = None,
        reduce: Reduce | None = None,
        f_rows=None,
    ) -> tuple[torch.Tensor, SolverStats]:
        """The evaluation solve chosen by ``solver.eval_solver`` (``reduce``, ``f_rows``: see
        :func:`~ilm_megatron.implicit.solver.solve`); the "train" rule iterates as
        ``solver.method`` / ``solver.early_exit`` say."""
        s = self.solver_config
        cap = self.eval_max_iter() if max_iter is None else max_iter
        if s.eval_solver == "reference":
            return solve_damped_reference(f, z0, cap, self.eval_tol(), s.eval_damping, reduce)
        return solve(f, z0, cap, self.eval_tol(), reduce, solve_options(s), f_rows)

    @torch.no_grad()
    def prefill(self, ids: torch.Tensor, max_iter: int | None = None) -> LMOutput:
        """Simultaneous solve of a prompt, then one call at the solution that returns the caches.

        The caches hold each layer's state after the last prompt token, ready for :meth:`step`.
        """
        e, u = self.embed(ids)
        if self.implicit:
            with self.cached_weights():
                z_star, stats = self.solve_eval(
                    self.stack_fn(u),
                    self.initial_iterate(e),
                    max_iter,
                    f_rows=self.stack_fn_rows(u),
                )
        else:
            z_star, stats = e, _explicit_stats(ids)
        z, caches = self.stack(z_star, u, return_cache=True)
        return LMOutput(self.head(z), stats, caches=caches, hidden=z)

    # ------------------------------------------------------------------ sequential mode
    def empty_caches(self, batch: int, device: torch.device | None = None) -> list[Any]:
        device = device or self.embedding.weight.device
        return self.stack.empty_caches(batch, device, self.embedding.weight.dtype)

    @torch.no_grad()
    def step(
        self,
        ids: torch.Tensor,
        caches: list[Any],
        z_init: torch.Tensor | None = None,
        max_iter: int | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, SolverStats]:
        """Sequential mode for one token: solve, then commit every layer's cache once.

        Args:
            ids: (b,) current token ids.
            caches: per-layer caches of the previous tokens (updated in place on return).
            z_init: (b, d) initial iterate (warm start); zeros if None.
            max_iter: inner cap; default the eval cap.

        Returns:
            ``(logits (b, padded_vocab), z_t (b, d), stats)``.
        """
        e, u = self.embed(ids[:, None])
        e = e[:, 0]
        u = None if u is None else u[:, 0]
        if self.implicit:
            z0 = self.initial_iterate(e) if z_init is None else z_init
            cap = self.eval_max_iter() if max_iter is None else max_iter
            with self.cached_weights():
                z, updates, stats = solve_token(
                    lambda z: self.stack.step(z, u, caches),
                    z0,
                    cap,
                    self.eval_tol(),
                    solve_options(self.solver_config),
                )
        else:
            z, updates = self.stack.step(e, None, caches)
            stats = _explicit_stats(ids[:, None])
        for cache, update in zip(caches, updates):
            cache.commit(update)
        return self.head(z), z, stats

    @torch.no_grad()
    def forward_sequential(
        self, ids: torch.Tensor, caches: list[Any] | None = None, max_iter: int | None = None
    ) -> LMOutput:
        """Run a whole sequence token by token (the RNN view of the model).

        Returns:
            :class:`LMOutput` with logits (b, l, padded_vocab), the final caches, and stats whose
            ``residual`` and ``sample_iters`` are (b, l) per token.
        """
        b, l = ids.shape
        caches = self.empty_caches(b, ids.device) if caches is None else caches
        logits, hidden, res, iters = [], [], [], []
        z_prev = None
        for t in range(l):
            warm = z_prev if self.solver_config.seq_warm_start else None
            lg, z_prev, st = self.step(ids[:, t], caches, warm, max_iter)
            logits.append(lg)
            hidden.append(z_prev)
            res.append(st.residual)
            iters.append(st.sample_iters)
        r, it = torch.stack(res, 1), torch.stack(iters, 1)
        stats = SolverStats(int(it.max()), r, it, self.eval_tol(), "sequential")
        if not self.implicit:
            stats = _explicit_stats(ids)
        return LMOutput(torch.stack(logits, 1), stats, caches, torch.stack(hidden, 1))

    @torch.no_grad()
    def generate(
        self,
        prompt: torch.Tensor,
        max_new_tokens: int,
        temperature: float = 0.0,
        top_k: int = 0,
        generator: torch.Generator | None = None,
        prefill: str = "simultaneous",
    ) -> torch.Tensor:
        """Autoregressive generation in sequential mode.

        Args:
            prompt: (b, l) prompt ids (l >= 1).
            max_new_tokens: tokens to append.
            temperature: 0 for greedy decoding, else softmax sampling at this temperature.
            top_k: keep only the ``top_k`` most likely tokens when sampling (0: all).
            generator: RNG for sampling.
            prefill: "simultaneous" (solve the prompt at once, hand the caches over) or
                "sequential" (feed the prompt token by token).

        Returns:
            (b, l + max_new_tokens) ids.
        """
        if prefill == "simultaneous":
            out = self.prefill(prompt)
        elif prefill == "sequential":
            out = self.forward_sequential(prompt)
        else:
            raise ValueError(f"prefill must be 'simultaneous' or 'sequential', got {prefill!r}")
        caches, logits = out.caches, out.logits[:, -1]
        tokens = [prompt]
        for i in range(max_new_tokens):
            nxt = self._sample(logits, temperature, top_k, generator)
            tokens.append(nxt[:, None])
            if i + 1 < max_new_tokens:
                logits, _, _ = self.step(nxt, caches)
        return torch.cat(tokens, dim=1)

    def _sample(
        self,
        logits: torch.Tensor,
        temperature: float,
        top_k: int,
        generator: torch.Generator | None,
    ) -> torch.Tensor:
        logits = logits[:, : self.config.vocab_size].float()
        if temperature <= 0:
            return logits.argmax(dim=-1)
        logits = logits / temperature
        if top_k > 0:
            kth = logits.topk(min(top_k, logits.shape[-1]), dim=-1).values[:, -1:]
            logits = logits.masked_fill(logits < kth, float("-inf"))
        probs = torch.softmax(logits, dim=-1)
        return torch.multinomial(probs, 1, generator=generator)[:, 0]


def lm_logits(
    z: torch.Tensor, embedding: nn.Module, lm_head: nn.Module | None, gather: bool = True
) -> torch.Tensor:
    """The LM head: z (..., d) -> logits (..., padded_vocab), the tied embedding when no head.

    Under TP the vocabulary is split (:class:`VocabParallelEmbedding`, a column-parallel head):
    each rank's logits slice is gathered, so every rank gets the whole logits, or with
    ``gather=False`` each rank returns its columns (..., padded_vocab / tp) for a vocab-parallel
    loss (training: no rank holds full-vocabulary logits).
    """
    weight = lm_head.weight if lm_head is not None else embedding.weight
    if getattr(embedding, "tp", 1) > 1 or getattr(lm_head, "tp", 1) > 1:
        if not gather:
            return vocab_parallel_logits_local(z, weight)
        return vocab_parallel_logits(z, weight)
    return F.linear(z, weight) if lm_head is None else lm_head(z)


def _explicit_stats(ids: torch.Tensor) -> SolverStats:
    """Stats of an explicit pass: one evaluation, nothing to converge."""
    shape = ids.shape[:1]
    zeros = torch.zeros(shape, device=ids.device)
    return SolverStats(
        1, zeros, torch.ones(shape, dtype=torch.long, device=ids.device), 1.0, "explicit"
    )


@torch.no_grad()
def scale_iterate_weights(model: ImplicitLM, scale: float) -> None:
    """Scale the initial weights that read the iterate (``in_proj``/``qkv_proj``, MLP ``fc1``)."""
    for layer in model.stack.layers:
        for name in ("in_proj", "qkv_proj"):
            proj = getattr(layer.mixer, name, None)
            if proj is not None:
                proj.weight.mul_(scale)
        if layer.mlp is not None:
            layer.mlp.fc1.weight.mul_(scale)


def apply_weight_norm(model: ImplicitLM) -> None:
    """Reparametrise every Linear/Conv1d of the implicit backbone as ``g * v / |v|`` (per row)."""
    from torch.nn.utils.parametrizations import weight_norm

    roots = [model.stack] + ([model.injection] if model.injection is not None else [])
    for root in roots:
        for mod in list(root.modules()):
            if isinstance(mod, nn.Linear | nn.Conv1d):
                weight_norm(mod, name="weight", dim=0)


def build_model(
    config: ModelConfig,
    solver: SolverConfig | None = None,
    *,
    keep: Collection[str] | None = None,
    device: torch.device | str | None = None,
) -> ImplicitLM:
    """Build the model registered for ``config.arch`` from its ModuleSpec, unit by unit.

    Each unit (:mod:`ilm_megatron.models.init`) is initialised from its own seed, derived from
    one draw of the global generator, so ``torch.manual_seed(s); build_model(cfg)`` gives the same
    weights at every TP size and for every subset of units.

    Args:
        config: the model; with ``backend="tp"`` this rank's tensor-parallel shard is built.
        solver: the solver settings the model carries.
        keep: the unit names to materialise (e.g. a pipeline stage's,
            :func:`~ilm_megatron.models.init.stage_units`); the others stay on ``meta`` and
            allocate nothing. None: every unit.
        device: where the kept units are placed (default: the CPU).

    Inside ``with torch.device("meta")`` the whole model is built on ``meta`` (shapes only).
    """
    from ilm_megatron.models.init import BuildPlan, ambient_meta, build_plan, draw_base_seed

    if ambient_meta():
        return ImplicitLM(config, solver)
    base = draw_base_seed()
    keep_set = None if keep is None else frozenset(keep)
    if keep_set is None and model_tp_size(config) == 1:  # every unit, at global shapes: direct
        with build_plan(BuildPlan(base)):
            model = ImplicitLM(config, solver)
        return model.to(device) if device is not None else model
    return _build_by_units(config, solver, base, keep_set, device)


def _build_by_units(
    config: ModelConfig,
    solver: SolverConfig | None,
    base: int,
    keep: frozenset[str] | None,
    device: torch.device | str | None,
) -> ImplicitLM:
    """Meta model, then each kept unit from a single-process twin with only that unit real,
    sharded for this TP rank and copied in on ``device`` (one unit at global size at a time)."""
    from ilm_megatron.core.parallel_state import tp_rank
    from ilm_megatron.models.init import BuildPlan, build_plan, to_empty, unit_names
    from ilm_megatron.parallel.checkpoint import shard_state_dict, tp_layout

    with torch.device("meta"):
        model = ImplicitLM(config, solver)
    names = unit_names(config.n_layers, config.implicit, model.lm_head is None)
    wanted = [n for n in names if keep is None or n in keep]
    unknown = sorted(set(keep or ()) - set(names))
    if unknown:
        raise ValueError(f"no such model unit(s): {unknown} (units: {names})")
    tp = model_tp_size(config)
    twin_cfg = dataclasses.replace(config, backend="local")
    target = torch.device(device) if device is not None else torch.device("cpu")
    for name in wanted:
        with build_plan(BuildPlan(base, frozenset([name]))):
            twin = ImplicitLM(twin_cfg, solver)
        src = twin.get_submodule(name)
        dst = model.get_submodule(name)
        full = src.state_dict()
        if len(full) != len(list(dst.parameters())) + len(list(dst.buffers())):
            raise RuntimeError(f"unit {name}: tensors outside its state dict cannot be rebuilt")
        layout = tp_layout(dst)
        to_empty(dst, target)  # keeps the TP layout marked on each parameter
        with torch.no_grad():
            dst.load_state_dict(shard_state_dict(full, layout, tp_rank() if tp > 1 else 0, tp))
        del twin, src, full
    return model
