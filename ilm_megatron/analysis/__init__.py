"""The paper's analyses as ``ilm-eval`` subcommands that run on a user's own checkpoints.

Each module named in :data:`ANALYSES` defines ``HELP`` (one line), ``add_arguments(parser)``,
``run(args) -> dict`` (JSON-able; raises :class:`~ilm_megatron.errors.UserError` for bad input)
and ``show(result)`` (the human-readable print). Heavy imports (torch, matplotlib) happen inside
``run`` so ``ilm-eval --help`` stays fast. Outputs (JSON, PNG, TensorBoard images) are written
through :func:`ilm_megatron.analysis.report.write_report`.
"""

from __future__ import annotations

#: ``ilm-eval`` subcommand -> module implementing it
ANALYSES: dict[str, str] = {
    "ppl-by-position": "ilm_megatron.analysis.ppl_by_position",
    "duality": "ilm_megatron.analysis.duality",
    "jacobian": "ilm_megatron.analysis.jacobian",
    "adaptive-compute": "ilm_megatron.analysis.adaptive_compute",
}
