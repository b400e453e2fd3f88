"""Explicit Mamba2 and Llama models checked against Hugging Face ``transformers`` as a reference.

A tiny model of ours is built from a :class:`ModelConfig`, every parameter is randomised (so that
unit norm gains, zero biases or a default ``D`` cannot hide a mapping mistake), and the weights
are copied into ``transformers.Mamba2ForCausalLM`` / ``LlamaForCausalLM``, built from config
objects only (no hub access). Both run in float64 on the CPU; the logits of our simultaneous
forward and of our sequential (RNN / KV-cache) path are compared with HF's full forward, and with
HF's own cached decoding for Mamba2.

Every comparison runs at two precisions (the ``precision`` fixture):

* ``"as_is"``: both codes unmodified. HF's reference code casts to float32 in several places
  whatever the model dtype (RMS norms, the gated norm, the SSD scan, RoPE tables, softmax, Mamba2's
  logits), and so does ours in two (``A = -exp(A_log.float())`` in the Mamba2 mixer, the float32
  SSM state of sequential mode), so agreement is limited to float32 rounding: ~1e-7 relative,
  checked at ``RTOL_AS_IS``.
* ``"fp64"``: every float32 cast (``Tensor.to(torch.float32)``, ``Tensor.float()``,
  ``softmax(dtype=torch.float32)``) is promoted to float64 during the forward passes of both
  models, and HF's RoPE frequencies are recomputed in float64. The two implementations then agree
  to ~1e-15, checked at ``RTOL_FP64``; this catches semantic differences far below float32
  rounding (an epsilon inside vs outside the square root, say).
"""

from __future__ import annotations

import contextlib

import pytest
import torch

transformers = pytest.importorskip("transformers")

from ilm_megatron.config import ModelConfig  # noqa: E402
from ilm_megatron.models.lm import ImplicitLM  # noqa: E402

F64 = torch.float64
RTOL_AS_IS = 2e-6  # relative to max |logit|; measured 1e-7 .. 4e-7
RTOL_FP64 = 1e-11  # measured < 1e-15
VOCAB = 29


# tiny float64 tensors: with OpenMP threads competing for busy cores a conv1d call took ~1 s
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(params=["as_is", "fp64"])
def precision(request) -> str:
    return request.param


def _fp64(dtype):
    return F64 if dtype is torch.float32 else dtype


@contextlib.contextmanager
def promoted_to_fp64(enabled: bool):
    """Within the block, requests for float32 (``.to``, ``.float()``, softmax's dtype) give float64.

    Only used in the ``"fp64"`` precision mode; the patches are undone on exit.
    """
    if not enabled:
        yield
        return
    orig_to, orig_float = torch.Tensor.to, torch.Tensor.float
    orig_softmax = torch.nn.functional.softmax

    def to(self, *args, **kwargs):
        args = tuple(_fp64(a) for a in args)
        if "dtype" in kwargs:
            kwargs["dtype"] = _fp64(kwargs["dtype"])
        return orig_to(self, *args, **kwargs)

    def to_float(self, *args, **kwargs):
        return orig_to(self, F64, *args, **kwargs)

    def softmax(x, dim=None, _stacklevel=3, dtype=None):
        return orig_softmax(x, dim=dim, dtype=_fp64(dtype))

    torch.Tensor.to, torch.Tensor.float = to, to_float
    torch.nn.functional.softmax = softmax
    try:
        yield
    finally:
        torch.Tensor.to, torch.Tensor.float = orig_to, orig_float
        torch.nn.functional.softmax = orig_softmax


def assert_logits_close(ours: torch.Tensor, ref: torch.Tensor, precision: str) -> None:
    """max |ours - ref| <= tol * max |ref| over (b, l, vocab) logits, compared in float64."""
    tol = RTOL_FP64 if precision == "fp64" else RTOL_AS_IS
    assert ours.shape == ref.shape, (ours.shape, ref.shape)
    assert ours.dtype == F64
    if precision == "fp64":
        assert ref.dtype == F64, "a float32 cast escaped the promotion"
    ours, ref = ours.to(F64), ref.to(F64)
    assert torch.isfinite(ours).all() and torch.isfinite(ref).all()
    scale = ref.abs().max().item()
    err = (ours - ref).abs().max().item()
    assert scale > 1e-1, f"degenerate logits, max |logit| = {scale:.3e}"
    assert err <= tol * scale, f"max abs err {err:.3e} > {tol:.1e} * scale {scale:.3e}"


@torch.no_grad()
def randomise_(model: torch.nn.Module, seed: int) -> None:
    """Overwrite every parameter with O(1)-scaled random values (deterministic)."""
    g = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        r = torch.randn(p.shape, generator=g, dtype=F64)
        if name.endswith("norm.weight"):  # RMS gains around 1
            p.copy_(1.0 + 0.2 * r)
        elif name.endswith("A_log"):  # A = -exp(A_log) in [-e, -1/e]
            p.copy_(r.clamp(-1, 1))
        elif name.endswith("dt_bias"):  # dt = softplus(. + dt_bias) of order 0.1 .. 1
            p.copy_(-1.0 + 0.5 * r)
        elif name == "embedding.weight":
            p.copy_(r)
        elif p.dim() >= 2:  # Linear / Conv1d weights: ~unit-variance outputs
            p.copy_(r / p[0].numel() ** 0.5)
        else:  # biases, D
            p.copy_(0.5 * r)


def make_ids(b: int, l: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, VOCAB, (b, l), generator=g)


@torch.no_grad()
def our_logits(model: ImplicitLM, ids: torch.Tensor, precision: str, sequential: bool = False):
    with promoted_to_fp64(precision == "fp64"):
        out = model.forward_sequential(ids) if sequential else model(ids)
    return out.logits


@torch.no_grad()
def hf_logits(hf, ids: torch.Tensor, precision: str) -> torch.Tensor:
    """HF's full forward (pure-PyTorch path, eval mode, no cache)."""
    with promoted_to_fp64(precision == "fp64"):
        return hf(ids, use_cache=False).logits


# --------------------------------------------------------------------------------------------
# Mamba2
# --------------------------------------------------------------------------------------------


def build_mamba2_pair(n_layers: int, ngroups: int, seed: int = 0):
    """Our explicit Mamba2 (float64, random weights) and HF's Mamba2ForCausalLM with its weights."""
    torch.manual_seed(seed)
    cfg = ModelConfig(
        arch="mamba2",
        implicit=False,
        vocab_size=VOCAB,
        d_model=16,
        n_layers=n_layers,
        d_state=8,
        headdim=8,  # d_inner 32: 4 heads
        ngroups=ngroups,
        expand=2,
        d_conv=4,
        chunk_size=4,
        norm_eps=1e-5,
    )
    ours = ImplicitLM(cfg).to(F64).eval()
    randomise_(ours, seed + 1)

    hf_cfg = transformers.Mamba2Config(
        vocab_size=cfg.padded_vocab_size,
        hidden_size=cfg.d_model,
        num_hidden_layers=cfg.n_layers,
        state_size=cfg.d_state,
        head_dim=cfg.headdim,
        num_heads=cfg.nheads,
        n_groups=cfg.ngroups,
        expand=cfg.expand,
        conv_kernel=cfg.d_conv,
        chunk_size=cfg.chunk_size,
        layer_norm_epsilon=cfg.norm_eps,
        use_bias=False,
        use_conv_bias=True,
        hidden_act="silu",
        residual_in_fp32=False,  # True would round the float64 residual stream to float32
        time_step_limit=(0.0, float("inf")),  # no dt clamping (ours has none)
        tie_word_embeddings=True,
        pad_token_id=None,
        bos_token_id=None,
        eos_token_id=None,
    )
    hf = transformers.Mamba2ForCausalLM(hf_cfg).to(F64).eval()

    with torch.no_grad():
        hb = hf.backbone
        hb.embeddings.weight.copy_(ours.embedding.weight)
        for ol, hl in zip(ours.stack.layers, hb.layers, strict=True):
            hl.norm.weight.copy_(ol.norm.weight)
            om, hm = ol.mixer, hl.mixer
            # Both pack in_proj as [gate z | xBC = (x, B, C) | dt]; A_log, D, dt_bias per head;
            # gated norm: rmsnorm over d_inner/ngroups channels of y * silu(z).
            hm.in_proj.weight.copy_(om.in_proj.weight)
            hm.conv1d.weight.copy_(om.conv1d.weight)
            hm.conv1d.bias.copy_(om.conv1d.bias)
            hm.dt_bias.copy_(om.dt_bias)
            hm.A_log.copy_(om.A_log)
            hm.D.copy_(om.D)
            hm.norm.weight.copy_(om.norm.weight)
            hm.out_proj.weight.copy_(om.out_proj.weight)
        hb.norm_f.weight.copy_(ours.stack.final_norm.weight)
    assert hf.lm_head.weight.data_ptr() == hb.embeddings.weight.data_ptr(), "head not tied"
    assert hb.layers[0].mixer.norm.group_size == cfg.d_inner // cfg.ngroups
    assert hb.layers[0].mixer.in_proj.out_features == ours.stack.layers[0].mixer.d_in_proj
    return ours, hf


@pytest.mark.parametrize("n_layers,ngroups", [(1, 1), (1, 2), (2, 1), (2, 2)])
def test_mamba2_explicit_matches_hf(n_layers: int, ngroups: int, precision: str) -> None:
    ours, hf = build_mamba2_pair(n_layers, ngroups, seed=10 * n_layers + ngroups)
    ids = make_ids(2, 11, seed=n_layers)  # 11: not a multiple of chunk_size = 4
    ref = hf_logits(hf, ids, precision)
    assert_logits_close(our_logits(ours, ids, precision), ref, precision)


@pytest.mark.parametrize("ngroups", [1, 2])
def test_mamba2_sequential_matches_hf(ngroups: int, precision: str) -> None:
    ours, hf = build_mamba2_pair(2, ngroups, seed=7 + ngroups)
    ids = make_ids(2, 9, seed=3)
    ref = hf_logits(hf, ids, precision)
    assert_logits_close(our_logits(ours, ids, precision, sequential=True), ref, precision)


def test_mamba2_hf_cached_decoding_matches_our_sequential(precision: str) -> None:
    """HF's own recurrent path (prefill 3 tokens, then one token at a time) vs our RNN mode."""
    ours, hf = build_mamba2_pair(2, 2, seed=5)
    ids = make_ids(2, 8, seed=4)
    with torch.no_grad(), promoted_to_fp64(precision == "fp64"):
        out = hf(ids[:, :3], use_cache=True)
        steps, cache = [out.logits], out.cache
        for t in range(3, ids.shape[1]):
            out = hf(ids[:, t : t + 1], cache=cache, use_cache=True)
            steps.append(out.logits)
            cache = out.cache
    ref = torch.cat(steps, dim=1)
    assert_logits_close(our_logits(ours, ids, precision, sequential=True), ref, precision)


# --------------------------------------------------------------------------------------------
# Llama
# --------------------------------------------------------------------------------------------


def build_llama_pair(precision: str, n_layers: int = 2, seed: int = 0):
    """Our explicit Llama (float64, random weights) and HF's LlamaForCausalLM with its weights."""
    torch.manual_seed(seed)
    cfg = ModelConfig(
        arch="llama",
        implicit=False,
        vocab_size=VOCAB,
        d_model=32,
        n_layers=n_layers,
        n_heads=4,
        ffn_hidden_size=48,
        rope_theta=100.0,  # small base: every RoPE frequency turns noticeably within 20 positions
        norm_eps=1e-5,
    )
    ours = ImplicitLM(cfg).to(F64).eval()
    randomise_(ours, seed + 1)

    d, ffn = cfg.d_model, cfg.ffn_size
    hf_cfg = transformers.LlamaConfig(
        vocab_size=cfg.padded_vocab_size,
        hidden_size=d,
        intermediate_size=ffn,
        num_hidden_layers=cfg.n_layers,
        num_attention_heads=cfg.n_heads,
        num_key_value_heads=cfg.n_heads,
        hidden_act="silu",
        max_position_embeddings=64,
        rms_norm_eps=cfg.norm_eps,
        rope_parameters={"rope_type": "default", "rope_theta": cfg.rope_theta},
        attention_bias=False,
        mlp_bias=False,
        tie_word_embeddings=True,
        pad_token_id=None,
        bos_token_id=None,
        eos_token_id=None,
        attn_implementation="eager",
    )
    hf = transformers.LlamaForCausalLM(hf_cfg).to(F64).eval()
    head_dim = d // cfg.n_heads
    rope = hf.model.rotary_emb
    assert rope.inv_freq.shape == (head_dim // 2,)
    if precision == "fp64":  # HF computes the frequencies in float32 at construction: redo
        theta = hf.config.rope_parameters["rope_theta"]  # (HF's theta, so a mismatch still shows)
        rope.inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=F64) / head_dim)

    with torch.no_grad():
        hm = hf.model
        hm.embed_tokens.weight.copy_(ours.embedding.weight)
        for ol, hl in zip(ours.stack.layers, hm.layers, strict=True):
            hl.input_layernorm.weight.copy_(ol.norm.weight)
            q, k, v = ol.mixer.qkv_proj.weight.split(d, dim=0)  # packed [q | k | v]
            hl.self_attn.q_proj.weight.copy_(q)
            hl.self_attn.k_proj.weight.copy_(k)
            hl.self_attn.v_proj.weight.copy_(v)
            hl.self_attn.o_proj.weight.copy_(ol.mixer.out_proj.weight)
            hl.post_attention_layernorm.weight.copy_(ol.mlp_norm.weight)
            gate, up = ol.mlp.fc1.weight.split(ffn, dim=0)  # packed [gate | up]
            hl.mlp.gate_proj.weight.copy_(gate)
            hl.mlp.up_proj.weight.copy_(up)
            hl.mlp.down_proj.weight.copy_(ol.mlp.fc2.weight)
        hm.norm.weight.copy_(ours.stack.final_norm.weight)
    assert hf.lm_head.weight.data_ptr() == hm.embed_tokens.weight.data_ptr(), "head not tied"
    return ours, hf


def test_llama_explicit_matches_hf(precision: str) -> None:
    ours, hf = build_llama_pair(precision, seed=1)
    ids = make_ids(2, 11, seed=5)
    assert_logits_close(our_logits(ours, ids, precision), hf_logits(hf, ids, precision), precision)


def test_llama_sequential_matches_hf(precision: str) -> None:
    ours, hf = build_llama_pair(precision, seed=2)
    ids = make_ids(2, 19, seed=6)  # > 16 positions: the KV cache grows once
    ref = hf_logits(hf, ids, precision)
    assert_logits_close(our_logits(ours, ids, precision, sequential=True), ref, precision)
