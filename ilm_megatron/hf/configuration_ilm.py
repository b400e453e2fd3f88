"""Configuration of an exported ilm-megatron model (``model_type = "ilm"``).

This file is copied next to the weights by ``ilm-export`` and loaded by
``AutoConfig.from_pretrained(dir, trust_remote_code=True)``; it needs only ``transformers``.
The solver settings travel here and can be overridden at load, e.g.
``AutoModelForCausalLM.from_pretrained(dir, trust_remote_code=True, f_tol=1e-4)``.
"""

from __future__ import annotations

from transformers import PretrainedConfig

SOLVER_KEYS = (
    "f_max_iter",
    "f_tol",
    "phantom_steps",
    "phantom_damping",
    "eval_solver",
    "eval_max_iter_mult",
    "eval_tol",
    "eval_damping",
    "seq_warm_start",
)


class IlmConfig(PretrainedConfig):
    """Shape, solver and kernel settings of an implicit (or explicit) Mamba2 / Llama model.

    Model fields mirror ilm-megatron's ``ModelConfig`` (``vocab_size`` is the tokenizer's, not
    the padded embedding table's); solver fields mirror its ``SolverConfig``.
    ``kernel_backend``: "auto" uses ``ilm_kernels`` (Triton / mamba-ssm on CUDA) when it is
    installed and plain PyTorch otherwise; "torch" always uses the PyTorch code in
    ``modeling_ilm.py``.
    """

    model_type = "ilm"
    attribute_map = {"hidden_size": "d_model", "num_hidden_layers": "n_layers"}

    def __init__(
        self,
        arch: str = "mamba2",
        implicit: bool = True,
        vocab_size: int = 256,
        d_model: int = 64,
        n_layers: int = 1,
        norm_eps: float = 1e-5,
        tie_word_embeddings: bool = True,
        iterate_init: str = "zeros",
        d_state: int = 16,
        headdim: int = 16,
        expand: int = 2,
        ngroups: int = 1,
        d_conv: int = 4,
        chunk_size: int = 64,
        n_heads: int = 4,
        ffn_hidden_size: int = 256,
        rope_theta: float = 500000.0,
        max_position_embeddings: int = 2048,
        f_max_iter: int = 24,
        f_tol: float = 0.05,
        phantom_steps: int = 4,
        phantom_damping: float = 0.8,
        eval_solver: str = "train",
        eval_max_iter_mult: float = 4.0,
        eval_tol: float = 0.0,
        eval_damping: float = 0.8,
        seq_warm_start: bool = False,
        kernel_backend: str = "auto",
        use_cache: bool = False,
        **kwargs,
    ) -> None:
        if arch not in ("mamba2", "llama"):
            raise ValueError(f"arch must be 'mamba2' or 'llama', got {arch!r}")
        if eval_solver not in ("train", "reference"):
            raise ValueError(f"eval_solver must be 'train' or 'reference', got {eval_solver!r}")
        if kernel_backend not in ("auto", "torch"):
            raise ValueError(f"kernel_backend must be 'auto' or 'torch', got {kernel_backend!r}")
        if iterate_init not in ("zeros", "embedding"):
            raise ValueError(f"iterate_init must be 'zeros' or 'embedding', got {iterate_init!r}")
        self.arch = arch
        self.implicit = implicit
        self.vocab_size = vocab_size
        self.d_model = d_model
        self.n_layers = n_layers
        self.norm_eps = norm_eps
        self.iterate_init = iterate_init
        self.d_state = d_state
        self.headdim = headdim
        self.expand = expand
        self.ngroups = ngroups
        self.d_conv = d_conv
        self.chunk_size = chunk_size
        self.n_heads = n_heads
        self.ffn_hidden_size = ffn_hidden_size
        self.rope_theta = rope_theta
        self.max_position_embeddings = max_position_embeddings
        self.f_max_iter = f_max_iter
        self.f_tol = f_tol
        self.phantom_steps = phantom_steps
        self.phantom_damping = phantom_damping
        self.eval_solver = eval_solver
        self.eval_max_iter_mult = eval_max_iter_mult
        self.eval_tol = eval_tol
        self.eval_damping = eval_damping
        self.seq_warm_start = seq_warm_start
        self.kernel_backend = kernel_backend
        self.use_cache = use_cache
        super().__init__(tie_word_embeddings=tie_word_embeddings, **kwargs)
