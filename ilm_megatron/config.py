"""Typed configuration: dataclass sections validated by OmegaConf.

A run is described by one :class:`Config` with five sections (``model``, ``solver``, ``parallel``,
``train``, ``data``). YAML files are merged onto the dataclass defaults in the order given, then
dotted command-line overrides (``solver.f_max_iter=32``) are applied. Every error names the key,
the source (file or command line) and the expected type; semantic checks run in each section's
``__post_init__`` after the merge.

A loaded :class:`Config` is immutable (frozen dataclasses): nothing in a run changes it, so what
``config.yaml`` records is what was in force. Settings that change during a run (the curriculum's
solver phase, the learning rate) are computed from the config and the step and passed explicitly
to each step; derive a variant with :func:`with_overrides` or ``dataclasses.replace``.

The defaults are the built-in quick-start run: a tiny one-layer implicit Mamba2 trained on the S3
word problem on a CPU.
"""

from __future__ import annotations

import dataclasses
import os
import typing
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException, ValidationError

ARCHS = ("mamba2", "llama")


class ConfigError(ValueError):
    """A configuration problem; the message names the key, the source and what was expected."""


def _check(cond: bool, section: str, key: str, msg: str) -> None:
    if not cond:
        raise ConfigError(f"{section}.{key}: {msg}")


@dataclass(frozen=True)
class ModelConfig:
    """Model shape. Mamba2 fields are ignored for Llama and vice versa."""

    arch: str = "mamba2"  # "mamba2" | "llama"
    implicit: bool = True  # iterate the stack to a fixed point (False: one explicit pass)
    vocab_size: int = 6
    pad_vocab_multiple: int = 1  # pad the embedding table to a multiple of this (16 for the Pile)
    d_model: int = 64
    n_layers: int = 1
    norm_eps: float = 1e-5
    init_std: float = 0.02
    tie_embeddings: bool = True
    weight_norm: bool = False  # reparametrise every Linear/Conv1d of the implicit stack as g*v/|v|
    # layer implementation chosen through the spec: "local" (pure PyTorch) or "tp" (tensor-parallel
    # layers over Megatron's TP group); load_config switches "local" to "tp" when parallel.tp > 1
    backend: str = "local"
    # sequence parallelism in the simultaneous (training) forward under TP: set by load_config
    # from parallel.sequence_parallel; inert without tensor parallelism
    sequence_parallel: bool = False
    # Implicit models only: multiply the initial weights that read the iterate z (mixer input
    # projection, MLP fc1) by this factor. < 1 makes F contractive at initialisation so the solve
    # converges from the first step; 1.0 is the reference initialisation.
    iterate_init_scale: float = 1.0
    # Implicit models only: the solver's starting iterate z0, "zeros" (the paper) or "embedding"
    # (z0 = e, so the first evaluation of F is the explicit model: the rule for implicit models
    # initialised from a pretrained explicit one, docs/huggingface.md)
    iterate_init: str = "zeros"
    # Kernels: "auto" (our Triton kernels on CUDA, the PyTorch reference elsewhere), "reference",
    # "triton" (on CPU only under TRITON_INTERPRET=1) or "mamba_ssm" (its kernels, CUDA only).
    # Llama attention uses flash-attn on CUDA when installed under "auto", SDPA otherwise.
    kernel_backend: str = "auto"
    # Mamba2 mixer
    d_state: int = 16
    headdim: int = 16
    expand: int = 2
    ngroups: int = 1
    d_conv: int = 4
    chunk_size: int = 64
    dt_min: float = 0.001
    dt_max: float = 0.1
    dt_init_floor: float = 1e-4
    # Llama attention + SwiGLU MLP
    n_heads: int = 4
    ffn_hidden_size: int = 0  # 0: 4 * d_model
    rope_theta: float = 500000.0

    def __post_init__(self) -> None:
        s = "model"
        _check(self.arch in ARCHS, s, "arch", f"must be one of {ARCHS}, got {self.arch!r}")
        _check(
            self.backend in ("local", "tp"),
            s,
            "backend",
            f"unknown backend {self.backend!r} (expected 'local' or 'tp')",
        )
        kernels = ("auto", "reference", "triton", "mamba_ssm")
        _check(
            self.kernel_backend in kernels,
            s,
            "kernel_backend",
            f"must be one of {kernels}, got {self.kernel_backend!r}",
        )
        _check(self.iterate_init_scale > 0, s, "iterate_init_scale", "must be > 0")
        _check(
            self.iterate_init in ("zeros", "embedding"),
            s,
            "iterate_init",
            f"must be 'zeros' or 'embedding', got {self.iterate_init!r}",
        )
        # sizes (derived sizes divide by some of them: check before any division)
        shape = ("vocab_size", "d_model", "n_layers", "pad_vocab_multiple", "d_state", "headdim")
        for k in (*shape, "expand", "ngroups", "chunk_size", "n_heads"):
            _check(getattr(self, k) > 0, s, k, f"must be > 0, got {getattr(self, k)}")
        _check(self.ffn_hidden_size >= 0, s, "ffn_hidden_size", "must be >= 0 (0: 4 * d_model)")
        for k in ("norm_eps", "init_std", "dt_min", "dt_init_floor", "rope_theta"):
            _check(getattr(self, k) > 0, s, k, f"must be > 0, got {getattr(self, k)}")
        _check(
            self.dt_max >= self.dt_min,
            s,
            "dt_max",
            f"must be >= model.dt_min={self.dt_min}, got {self.dt_max}",
        )
        if self.arch == "mamba2":
            d_inner = self.expand * self.d_model
            _check(
                d_inner % self.headdim == 0,
                s,
                "headdim",
                f"expand*d_model={d_inner} is not divisible by headdim={self.headdim}",
            )
            nheads = d_inner // self.headdim
            _check(
                nheads % self.ngroups == 0,
                s,
                "ngroups",
                f"nheads={nheads} is not divisible by ngroups={self.ngroups}",
            )
            _check(self.d_conv >= 2, s, "d_conv", f"must be >= 2, got {self.d_conv}")
        else:
            _check(
                self.d_model % self.n_heads == 0,
                s,
                "n_heads",
                f"d_model={self.d_model} is not divisible by n_heads={self.n_heads}",
            )
            _check(
                (self.d_model // self.n_heads) % 2 == 0,
                s,
                "n_heads",
                f"head dim {self.d_model // self.n_heads} must be even for RoPE",
            )

    @property
    def padded_vocab_size(self) -> int:
        m = self.pad_vocab_multiple
        return (self.vocab_size + m - 1) // m * m

    @property
    def d_inner(self) -> int:
        return self.expand * self.d_model

    @property
    def nheads(self) -> int:
        """Number of SSM heads (Mamba2) or attention heads (Llama)."""
        return self.d_inner // self.headdim if self.arch == "mamba2" else self.n_heads

    @property
    def ffn_size(self) -> int:
        return self.ffn_hidden_size or 4 * self.d_model


@dataclass(frozen=True)
class SolverConfig:
    """Fixed-point solver of the implicit stack (DESIGN §2).

    Training solve: undamped ``z <- F(z)`` without autograd, per-sample relative residual, stop when
    the batch maximum is below ``f_tol`` or after ``f_max_iter`` evaluations; then
    ``phantom_steps`` damped steps ``z <- lam*F(z) + (1-lam)*z`` with autograd.
    """

    f_max_iter: int = 24
    f_tol: float = 0.05
    phantom_steps: int = 4
    phantom_damping: float = 0.8
    # "autograd": keep the activations of the k phantom evaluations (fastest backward);
    # "recompute": keep only the k iterates and re-evaluate F one step at a time in backward.
    phantom_impl: str = "autograd"
    # Evaluation: "train" reuses the training rule; "reference" is the damped loop of the
    # reference code (one norm over the whole batch, then one undamped call).
    eval_solver: str = "train"
    eval_max_iter_mult: float = 4.0  # eval cap = ceil(mult * f_max_iter)
    eval_tol: float = 0.0  # 0: same as f_tol
    eval_damping: float = 0.8  # damping of the "reference" eval loop
    seq_warm_start: bool = False  # sequential mode: start token t from token t-1's fixed point
    # The iteration of the no-grad solves (training and eval "train" rule; docs/solver.md):
    # "picard" (z <- F(z), the reference) or "anderson" (Anderson acceleration over the last
    # anderson_m pairs, regularised least squares, history restarted when the residual exceeds
    # anderson_restart times the sample's best).
    method: str = "picard"
    anderson_m: int = 5
    anderson_beta: float = 1.0
    anderson_lam: float = 1e-4
    anderson_restart: float = 2.0
    # divergence: a residual above divergence_factor x the sample's best (or not finite) sends
    # the sample back to its best iterate, then damped steps (fallback_damping); 0: off
    divergence_factor: float = 0.0
    fallback_damping: float = 0.5
    max_restarts: int = 2  # Anderson restarts of a sample before it falls back to damped steps
    # per-sample early exit: a sample stops at its first evaluation below the tolerance and
    # leaves the iterated batch (the pipeline ring masks it instead)
    early_exit: bool = False

    def __post_init__(self) -> None:
        s = "solver"
        _check(self.f_max_iter >= 0, s, "f_max_iter", f"must be >= 0, got {self.f_max_iter}")
        _check(self.f_tol > 0, s, "f_tol", f"must be > 0, got {self.f_tol}")
        _check(
            self.phantom_steps >= 1, s, "phantom_steps", f"must be >= 1, got {self.phantom_steps}"
        )
        _check(
            0 < self.phantom_damping <= 1,
            s,
            "phantom_damping",
            f"must be in (0, 1], got {self.phantom_damping}",
        )
        _check(
            self.phantom_impl in ("autograd", "recompute"),
            s,
            "phantom_impl",
            f"must be 'autograd' or 'recompute', got {self.phantom_impl!r}",
        )
        _check(
            self.eval_solver in ("train", "reference"),
            s,
            "eval_solver",
            f"must be 'train' or 'reference', got {self.eval_solver!r}",
        )
        _check(self.eval_max_iter_mult > 0, s, "eval_max_iter_mult", "must be > 0")
        _check(self.eval_tol >= 0, s, "eval_tol", f"must be >= 0, got {self.eval_tol}")
        _check(0 < self.eval_damping <= 1, s, "eval_damping", "must be in (0, 1]")
        _check(
            self.method in ("picard", "anderson"),
            s,
            "method",
            f"must be 'picard' or 'anderson', got {self.method!r}",
        )
        _check(self.anderson_m >= 1, s, "anderson_m", f"must be >= 1, got {self.anderson_m}")
        _check(0 < self.anderson_beta <= 1, s, "anderson_beta", "must be in (0, 1]")
        _check(self.anderson_lam >= 0, s, "anderson_lam", "must be >= 0")
        _check(self.anderson_restart > 1, s, "anderson_restart", "must be > 1")
        _check(
            self.divergence_factor == 0 or self.divergence_factor > 1,
            s,
            "divergence_factor",
            f"must be 0 (off) or > 1, got {self.divergence_factor}",
        )
        _check(0 < self.fallback_damping <= 1, s, "fallback_damping", "must be in (0, 1]")
        _check(self.max_restarts >= 0, s, "max_restarts", "must be >= 0")


@dataclass(frozen=True)
class ParallelConfig:
    tp: int = 1
    pp: int = 1
    microbatches: int = 1
    zero_stage: int = 0
    # gradient buckets (MiB of fp32) of the data-parallel reduction and of ZeRO's reduce/gather
    bucket_mb: float = 64.0
    # Megatron's sequence parallelism under TP: norms, residual stream and the fixed-point
    # iterate split along the sequence over the TP group (docs/parallelism.md)
    sequence_parallel: bool = False
    # pipeline ring (docs/pipeline.md): micro-batches admitted and not finished at once (their
    # activations are what each stage holds; 0: all of a ring call's micro-batches)
    in_flight: int = 0
    # ring calls per optimizer step: the step's micro-batches are split into this many calls
    # whose gradients accumulate (each call fills and drains the ring)
    ring_calls: int = 1
    # dtype of the iterates and gradients sent between stages: "fp32" or "bf16"
    p2p_dtype: str = "fp32"

    def __post_init__(self) -> None:
        s = "parallel"
        for k in ("tp", "pp", "microbatches", "ring_calls"):
            _check(getattr(self, k) >= 1, s, k, f"must be >= 1, got {getattr(self, k)}")
        _check(self.in_flight >= 0, s, "in_flight", f"must be >= 0, got {self.in_flight}")
        _check(
            self.microbatches % self.ring_calls == 0,
            s,
            "ring_calls",
            f"must divide parallel.microbatches={self.microbatches}, got {self.ring_calls}",
        )
        _check(
            self.p2p_dtype in ("fp32", "bf16"),
            s,
            "p2p_dtype",
            f"must be 'fp32' or 'bf16', got {self.p2p_dtype!r}",
        )
        _check(self.bucket_mb > 0, s, "bucket_mb", f"must be > 0, got {self.bucket_mb}")
        _check(
            self.zero_stage in (0, 1, 2),
            s,
            "zero_stage",
            f"must be 0, 1 or 2, got {self.zero_stage}",
        )


@dataclass(frozen=True)
class TrainConfig:
    max_steps: int = 300
    batch_size: int = 64  # sequences per global batch (all data-parallel ranks together)
    global_batch_tokens: int = 0  # if set: the global batch in tokens (batch_size derived)
    lr: float = 2e-3
    min_lr_ratio: float = 0.1
    lr_schedule: str = "cosine"  # "cosine" | "wsd" (warmup-stable-decay)
    decay_fraction: float = 0.2  # wsd: linear decay over this last fraction of the steps
    peak_tflops: float = 0.0  # accelerator peak for MFU; 0: look it up from the device name
    warmup_steps: int = 20
    weight_decay: float = 0.0
    beta1: float = 0.9
    beta2: float = 0.95
    clip_grad: float = 0.25
    log_interval: int = 25
    eval_interval: int = 0  # validate every N steps (0: only at the end)
    eval_batches: int = 4
    # sequences per validation forward (0: the per-rank training micro-batch, batch_size /
    # (data-parallel size x parallel.microbatches)); the solver's stop rule looks at the batch
    # maximum, so validation numbers depend on it: fix it to compare layouts
    eval_micro_batch: int = 0
    seed: int = 1234
    device: str = "auto"  # "auto" | "cpu" | "cuda"
    # compute precision of training steps: "auto" (bf16 on CUDA, fp32 on CPU), "fp32" or "bf16"
    # (bf16 autocast with fp32 weights and optimizer; the DeepSpeed engine: its bf16 mode)
    precision: str = "auto"
    threads: int = 0  # torch intra-op threads on CPU; 0 keeps torch's default
    # checkpoints (run_dir/checkpoints/step-NNNNNNNN, "latest" pointer written last)
    save_interval: int = 0  # save every N steps (0: only at the end and on SIGTERM/SIGINT)
    keep_last: int = 3
    resume: bool = True  # continue from the newest complete checkpoint in run_dir/checkpoints
    # weights to start from when the run does not resume (a folder or model.safetensors written
    # by ilm-train or ilm-import): fine-tuning; the optimizer and the step start afresh
    init_checkpoint: str = ""
    # start again in a run_dir that holds an earlier run: its checkpoints, metrics, TensorBoard
    # logs and exports move to run_dir/previous-<time>/ (without it such a start is refused)
    start_over: bool = False
    max_nan_steps: int = 10  # stop after this many non-finite losses in a row
    tensorboard: bool = True
    # solver curriculum by tokens: "none" or "bounded_then_free" (DESIGN §2)
    curriculum: str = "none"
    bounded_fraction: float = 0.8
    bounded_max_iter: int = 4
    bounded_phantom_steps: int = 1

    def __post_init__(self) -> None:
        s = "train"
        _check(
            self.curriculum in ("none", "bounded_then_free"),
            s,
            "curriculum",
            f"must be 'none' or 'bounded_then_free', got {self.curriculum!r}",
        )
        _check(0 <= self.bounded_fraction <= 1, s, "bounded_fraction", "must be in [0, 1]")
        _check(self.keep_last >= 1, s, "keep_last", f"must be >= 1, got {self.keep_last}")
        _check(
            self.lr_schedule in ("cosine", "wsd"),
            s,
            "lr_schedule",
            f"must be 'cosine' or 'wsd', got {self.lr_schedule!r}",
        )
        _check(0 < self.decay_fraction <= 1, s, "decay_fraction", "must be in (0, 1]")
        _check(self.max_nan_steps >= 1, s, "max_nan_steps", "must be >= 1")
        for k in ("max_steps", "batch_size", "log_interval", "eval_batches"):
            _check(getattr(self, k) > 0, s, k, f"must be > 0, got {getattr(self, k)}")
        _check(
            self.bounded_phantom_steps >= 1,
            s,
            "bounded_phantom_steps",
            f"must be >= 1, got {self.bounded_phantom_steps}",
        )
        # 0 means "off" or "default" for these (clip_grad=0: no clipping; save_interval=0: only at
        # the end; eval_interval=0: only at the end; threads=0: torch's default; ...)
        for k in (
            "clip_grad",
            "save_interval",
            "eval_interval",
            "eval_micro_batch",
            "warmup_steps",
            "weight_decay",
            "threads",
            "global_batch_tokens",
            "peak_tflops",
            "seed",
            "bounded_max_iter",
        ):
            _check(getattr(self, k) >= 0, s, k, f"must be >= 0, got {getattr(self, k)}")
        for k in ("beta1", "beta2"):
            _check(0 <= getattr(self, k) < 1, s, k, f"must be in [0, 1), got {getattr(self, k)}")
        _check(
            0 <= self.min_lr_ratio <= 1,
            s,
            "min_lr_ratio",
            f"must be in [0, 1], got {self.min_lr_ratio}",
        )
        _check(self.lr > 0, s, "lr", f"must be > 0, got {self.lr}")
        _check(self.device in ("auto", "cpu", "cuda"), s, "device", f"unknown {self.device!r}")
        _check(
            self.precision in ("auto", "fp32", "bf16"),
            s,
            "precision",
            f"must be 'auto', 'fp32' or 'bf16', got {self.precision!r}",
        )


@dataclass(frozen=True)
class DataConfig:
    # "word_problem" (synthetic, aligned targets) | "shards" (text) | "catbabi" (QA stream)
    task: str = "word_problem"
    group: str = "S3"  # word problem group
    seq_len: int = 16
    eval_seq_len: int = 64  # word problem: also evaluate at this length after training (0: off)
    easy_frac: float = 0.0  # fraction of identity tokens in the word problem
    # shards: a folder written by tools/preprocess_data.py (next-token targets)
    path: str = ""
    val_fraction: float = 0.0  # hold out the last fraction of samples for validation
    num_workers: int = 0  # DataLoader worker processes
    tokenizer_fingerprint: str = ""  # if set, must equal the manifest's tokenizer fingerprint
    catbabi_mode: str = "qa"  # catbabi: "qa" (answers only are targets) | "lm" (every token)
    # catbabi: carry each row's recurrent state (the model's caches) from one window to the next,
    # in training and validation; reset at a new epoch's stream (docs/training.md)
    carry_state: bool = False
    # carry_state with Llama: keep at most this many previous key/value positions (0: seq_len)
    carry_kv_window: int = 0

    def __post_init__(self) -> None:
        s = "data"
        _check(
            not self.carry_state or self.task == "catbabi",
            s,
            "carry_state",
            f"needs continuous rows (data.task=catbabi); data.task={self.task} rows are "
            "independent samples (shards are shuffled), so there is no state to carry",
        )
        _check(self.carry_kv_window >= 0, s, "carry_kv_window", "must be >= 0")
        _check(
            self.task in ("word_problem", "shards", "catbabi"),
            s,
            "task",
            f"must be 'word_problem', 'shards' or 'catbabi', got {self.task!r}",
        )
        _check(self.catbabi_mode in ("qa", "lm"), s, "catbabi_mode", "must be 'qa' or 'lm'")
        _check(self.seq_len > 0, s, "seq_len", f"must be > 0, got {self.seq_len}")
        _check(self.eval_seq_len >= 0, s, "eval_seq_len", f"must be >= 0, got {self.eval_seq_len}")
        _check(0 <= self.easy_frac < 1, s, "easy_frac", f"must be in [0, 1), got {self.easy_frac}")
        _check(0 <= self.val_fraction < 1, s, "val_fraction", "must be in [0, 1)")
        _check(self.num_workers >= 0, s, "num_workers", "must be >= 0")


@dataclass(frozen=True)
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    solver: SolverConfig = field(default_factory=SolverConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    data: DataConfig = field(default_factory=DataConfig)
    run_dir: str = ""  # "" : runs/<timestamp>


_SECTIONS = {f.name: f.type for f in dataclasses.fields(Config)}


def _expected_type(full_key: str) -> str:
    """Human-readable expected type of a dotted key, e.g. ``model.d_model`` -> ``int``."""
    cls: Any = Config
    hints: dict[str, Any] = {}
    for part in full_key.split("."):
        if not dataclasses.is_dataclass(cls):
            return "?"
        hints = typing.get_type_hints(cls)
        if part not in hints:
            return "?"
        cls = hints[part]
    return getattr(cls, "__name__", str(cls))


def _valid_keys(full_key: str) -> list[str]:
    cls: Any = Config
    for part in full_key.split(".")[:-1]:
        hints = typing.get_type_hints(cls)
        if part not in hints or not dataclasses.is_dataclass(hints[part]):
            break
        cls = hints[part]
    return [f.name for f in dataclasses.fields(cls)]


def _merge(base: DictConfig, other: Any, source: str) -> DictConfig:
    try:
        return typing.cast(DictConfig, OmegaConf.merge(base, other))
    except ConfigKeyError as e:
        key = e.full_key or str(e.key)
        raise ConfigError(
            f"{source}: unknown key '{key}' (valid keys here: {', '.join(_valid_keys(key))})"
        ) from None
    except ValidationError as e:
        key = e.full_key or str(e.key)
        raise ConfigError(
            f"{source}: key '{key}' expects {_expected_type(key)}, got {e.value!r} "
            f"({type(e.value).__name__})"
        ) from None
    except OmegaConfBaseException as e:
        raise ConfigError(f"{source}: {e}") from None


def load_config(
    paths: Sequence[str | Path] = (), overrides: Sequence[str] = (), base: Config | None = None
) -> Config:
    """Build a validated :class:`Config`.

    Args:
        paths: YAML files merged in order onto ``base`` (default: the built-in defaults).
        overrides: dotted ``key=value`` strings applied last (``solver.f_max_iter=32``).
        base: starting point instead of the dataclass defaults.

    Raises:
        ConfigError: missing or unreadable file, unknown key, wrong type, invalid value.
    """
    cfg = OmegaConf.structured(base if base is not None else Config())
    for p in paths:
        path = Path(p)
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        try:
            data = OmegaConf.load(path)
        except Exception as e:  # yaml syntax errors and the like
            raise ConfigError(f"{path}: cannot parse YAML: {e}") from None
        if not isinstance(data, DictConfig):
            raise ConfigError(f"{path}: top level must be a mapping of sections {list(_SECTIONS)}")
        cfg = _merge(cfg, data, str(path))
    for ov in overrides:
        if "=" not in ov:
            raise ConfigError(f"command line: override {ov!r} is not of the form key=value")
        try:
            dot = OmegaConf.from_dotlist([ov])
        except OmegaConfBaseException as e:
            raise ConfigError(f"command line: cannot parse override {ov!r}: {e}") from None
        cfg = _merge(cfg, dot, f"command line override {ov!r}")
    src = " + ".join([str(p) for p in paths] + (["command line"] if overrides else []))
    src = src or "defaults"
    try:
        obj = OmegaConf.to_object(cfg)
        assert isinstance(obj, Config)
        obj = _validate_cross(obj)
    except ConfigError as e:  # value checks of __post_init__: name where the values came from
        raise ConfigError(f"{src}: {e}") from None
    except OmegaConfBaseException as e:
        raise ConfigError(f"{src}: {e}") from None
    return obj


def _validate_cross(cfg: Config) -> Config:
    """Checks that involve several sections; returns ``cfg`` with the settings derived from
    several (a new object: configs are immutable)."""
    cfg = _validate_tensor_parallel(cfg)
    tokens = cfg.train.global_batch_tokens
    if tokens:
        _check(
            tokens % cfg.data.seq_len == 0,
            "train",
            "global_batch_tokens",
            f"{tokens} is not a multiple of data.seq_len={cfg.data.seq_len}",
        )
        # sequences per global batch
        cfg = replace(cfg, train=replace(cfg.train, batch_size=tokens // cfg.data.seq_len))
    check_layout(cfg, _launch_world_size())
    _check(
        not cfg.data.carry_state or cfg.parallel.pp == 1,
        "data",
        "carry_state",
        f"is not supported with pipeline parallelism (parallel.pp={cfg.parallel.pp}): the ring "
        "schedule solves each window from an empty state",
    )
    if cfg.data.task == "word_problem":
        from ilm_megatron.data.word_problem import group_order

        n = group_order(cfg.data.group)
        _check(
            cfg.model.vocab_size >= n,
            "model",
            "vocab_size",
            f"{cfg.model.vocab_size} is smaller than the {cfg.data.group} word problem's "
            f"{n} symbols",
        )
    return cfg


def _launch_world_size() -> int | None:
    """``WORLD_SIZE`` of a multi-process launch (torchrun, the deepspeed launcher), else None.

    A process without it, or with ``WORLD_SIZE=1``, may load a config for a layout it does not run
    itself (``tools/check_parallel.py`` spawns its own workers): the launch checks are left to
    :func:`ilm_megatron.train.distributed.check_parallel` at engine start.
    """
    text = os.environ.get("WORLD_SIZE", "").strip()
    if not text:
        return None
    try:
        world = int(text)
    except ValueError:
        raise ConfigError(f"WORLD_SIZE={text!r} (set by the launcher) is not an integer") from None
    if world < 1:
        raise ConfigError(f"WORLD_SIZE={world} (set by the launcher) must be >= 1")
    return world if world > 1 else None


def check_layout(cfg: Config, world_size: int | None = None) -> None:
    """Refuse a parallel layout that the engines cannot build, naming the keys and values.

    Runs at config load (before any process group exists), so a bad layout under ``torchrun``
    fails in seconds instead of after the model is built. Without ``world_size`` (the launcher's
    ``WORLD_SIZE``, unknown in a plain process) only what holds for every world size is checked:
    each pipeline stage needs a layer, sequence parallelism needs sequence lengths the TP size
    divides, and the global batch splits
    into ``parallel.microbatches`` equal micro-batches. With it: the world is a multiple of
    ``tp * pp`` and the batch splits over the ``world / (tp * pp)`` data-parallel ranks too.

    Raises:
        ConfigError: naming the keys and their values.
    """
    par, m, t = cfg.parallel, cfg.model, cfg.train
    mp = par.tp * par.pp
    layout = f"parallel.tp={par.tp} x parallel.pp={par.pp}"
    _check(
        par.pp <= m.n_layers,
        "parallel",
        "pp",
        f"{par.pp} pipeline stages need at least {par.pp} layers, model.n_layers={m.n_layers}",
    )
    _check(
        par.pp == 1 or m.iterate_init == "zeros",
        "model",
        "iterate_init",
        f"{m.iterate_init!r} with parallel.pp={par.pp}: the pipeline ring starts every solve "
        "from zeros; train with parallel.pp=1 (tensor and data parallelism work)",
    )
    _check(
        not par.sequence_parallel or cfg.data.seq_len % par.tp == 0,
        "data",
        "seq_len",
        f"{cfg.data.seq_len} is not a multiple of parallel.tp={par.tp}, which "
        "parallel.sequence_parallel=true splits it over",
    )
    _check(
        not par.sequence_parallel or cfg.data.eval_seq_len % par.tp == 0,
        "data",
        "eval_seq_len",
        f"{cfg.data.eval_seq_len} is not a multiple of parallel.tp={par.tp}, which "
        "parallel.sequence_parallel=true splits it over",
    )
    _check(
        t.batch_size % par.microbatches == 0,
        "train",
        "batch_size",
        f"{t.batch_size} is not divisible by parallel.microbatches={par.microbatches}",
    )
    if world_size is None:
        return
    if world_size % mp:
        raise ConfigError(
            f"{layout} needs a multiple of {mp} processes, got WORLD_SIZE={world_size}: launch "
            f"with torchrun --nproc-per-node {mp} (or launchers/torchrun.sh)"
        )
    dp = world_size // mp
    per_rank, rem = divmod(t.batch_size, dp)
    _check(
        rem == 0 and per_rank % par.microbatches == 0,
        "train",
        "batch_size",
        f"{t.batch_size} must split evenly over {dp} data-parallel rank(s) (WORLD_SIZE="
        f"{world_size} / ({layout})) x parallel.microbatches={par.microbatches}",
    )


def _validate_tensor_parallel(cfg: Config) -> Config:
    """``parallel.tp`` must divide every dimension the ``tp`` backend shards.

    With ``parallel.tp > 1`` the model backend becomes ``tp`` (a ``local`` model cannot be sharded):
    returns ``cfg`` with that backend.
    """
    tp, m = cfg.parallel.tp, cfg.model
    if tp == 1:
        return cfg
    if m.backend == "local":
        m = replace(m, backend="tp")
        cfg = replace(cfg, model=m)
    if cfg.parallel.sequence_parallel and not m.sequence_parallel:
        m = replace(m, sequence_parallel=True)
        cfg = replace(cfg, model=m)
    if m.arch == "mamba2":
        dims = {"nheads": m.d_inner // m.headdim, "ngroups": m.ngroups}
    else:
        dims = {"n_heads": m.n_heads, "ffn_size": m.ffn_size}
    # the vocabulary is split over TP too (embedding rows, LM head columns)
    dims["padded vocabulary"] = m.padded_vocab_size
    for name, n in dims.items():
        _check(
            n % tp == 0,
            "parallel",
            "tp",
            f"tensor parallel size {tp} does not divide model {name}={n}",
        )
    _check(not m.weight_norm, "parallel", "tp", "model.weight_norm is not supported with tp > 1")
    return cfg


def config_to_yaml(cfg: Config) -> str:
    """The resolved config as YAML (what a run directory records)."""
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))


def with_overrides(cfg: Config, overrides: Sequence[str]) -> Config:
    """A copy of ``cfg`` with dotted overrides applied and validated."""
    return load_config((), overrides, base=cfg)
