"""Recognition: the closed form of a section, built from the model's weights and checked
against the model (DESIGN.md §8).

A section has a closed form when its shape (the pair of site kinds and layers) and the
model's architecture (:class:`tl_degen.adapters.Architecture`) allow one:

* ``resid_pre.L → resid_mid.L``: :class:`~tl_degen.sections.attention.AttentionSection`
  (no normalisation, standard positions, one key/value head per query head) or
  :class:`~tl_degen.sections.attention.NormAttentionSection` (LayerNorm/RMSNorm, rotary
  positions, grouped-query heads; its formula);
* ``resid_mid.L → resid_post.L``: :class:`~tl_degen.sections.mlp.MLPSection` (no
  normalisation) or :class:`~tl_degen.sections.norm_mlp.NormMLPSection` (after ``ln2``,
  LayerNorm/RMSNorm, gated or not; sequential blocks);
* ``resid_mid.L → mlp_post.L``: :class:`~tl_degen.sections.mlp.MLPHiddenSection`;
* ``mlp_post.L → resid_post.L`` and ``resid_post.(last) → logits`` without a final norm:
  :class:`~tl_degen.sections.mlp.LinearSection`; with a final LayerNorm/RMSNorm:
  :class:`~tl_degen.sections.unembed.UnembedSection`.

The other MLP and linear sections need a model without normalisation. Before use, the
section's own forward pass — the one the pipeline runs — must reproduce the model's on the
first :data:`CHECK_ROWS` sequences of a batch, and one vector-Jacobian product must agree
with autograd through the model. The derivative is checked once per kind of section
(its class, site kinds and positions, prompt length and dtype;
:attr:`Adapter.checked_derivatives`): every layer's section of that kind runs the same
derivative code on weights its own forward check has already tested, so the other layers
skip the model pass of that check. Only :class:`~tl_degen.sections.plan.SectionPlan` calls
:func:`recognise`.
"""

from __future__ import annotations

import torch
from torch import Tensor

from tl_degen.adapters.base import Adapter
from tl_degen.sections.attention import (
    AttentionFormula,
    AttentionSection,
    AttentionWeights,
    Norm,
    NormAttentionSection,
    Rotary,
)
from tl_degen.sections.base import ModelSection, Section
from tl_degen.sections.mlp import ACTIVATIONS, LinearSection, MLPHiddenSection, MLPSection
from tl_degen.sections.norm_mlp import NormMLPSection, NormMLPWeights
from tl_degen.sections.unembed import UnembedSection, unembedding
from tl_degen.sites import Site

__all__ = ["CHECK_ROWS", "may_have_closed_form", "recognise", "final_norm", "block_output"]

#: Sequences of a batch on which a closed form is checked against the model.
CHECK_ROWS = 256


def block_output(in_site: Site, out_site: Site) -> Site:
    """``out_site`` as its own block's output: ``resid_pre.(L+1)`` after a site of block
    ``L`` is ``resid_post.L`` (the same vector), so ``resid_mid.L → resid_pre.(L+1)`` is the
    MLP section, as :func:`tl_degen.every_layer` cuts a model."""
    if (out_site.kind == "resid_pre" and in_site.layer is not None
            and in_site.kind in ("resid_mid", "mlp_post")
            and out_site.layer == in_site.layer + 1):
        return Site("resid_post", in_site.layer, out_site.positions)
    return out_site


def may_have_closed_form(adapter: Adapter, in_site: Site, out_site: Site) -> bool:
    """Whether the section's kind and the model's normalisation allow a closed form (its
    weights and positions are checked by :func:`recognise`). Reads no activations."""
    if in_site.kind == "logits" or in_site.layer is None:
        return False
    out_site = block_output(in_site, out_site)
    L = in_site.layer
    if (in_site.kind, out_site.kind) == ("resid_pre", "resid_mid") and out_site.layer == L:
        return True  # attention, with or without a LayerNorm/RMSNorm before it
    if out_site.kind == "logits":  # the unembedding, with or without a final norm
        return (in_site.kind == "resid_post" and L == adapter.n_layers - 1
                and adapter.arch.output_logits_soft_cap is None)
    if not adapter.arch.no_norm:  # the MLP after ln2, in sequential blocks
        return ((in_site.kind, out_site.kind) == ("resid_mid", "resid_post")
                and out_site.layer == L and not adapter.arch.parallel)
    return out_site.layer == L and (in_site.kind, out_site.kind) in (
        ("resid_mid", "resid_post"), ("resid_mid", "mlp_post"), ("mlp_post", "resid_post"))


def recognise(adapter: Adapter, tokens: Tensor, in_site: Site, out_site: Site,
              x: Tensor, y: Tensor | None = None) -> Section | None:
    """The closed form of the section, if it has one and its forward pass reproduces the
    model's and one vector-Jacobian product agrees with autograd on this batch (``x``: the
    input site's vectors on ``tokens``; ``y``: the output site's, read here when not given;
    the first :data:`CHECK_ROWS` sequences are checked)."""
    if not may_have_closed_form(adapter, in_site, out_site):
        return None
    tokens, x = tokens[:CHECK_ROWS], x[:CHECK_ROWS]
    section = _build(adapter, in_site, out_site, tokens.shape[1], x.dtype, x.device)
    if section is None:
        return None
    if y is None:
        with torch.no_grad():
            y = adapter.read_sites(tokens, [out_site])[0]
    y = y[:CHECK_ROWS]
    if isinstance(section, AttentionFormula):
        out, want = section.forward(x), y
    else:
        out, want = section.forward_rows(x), y[:, section.out_rows]
    tol = _tolerance(section, x.dtype)
    if not _close(out, want, tol):
        return None
    kind = _derivative_kind(section, x)
    if kind in adapter.checked_derivatives:
        return section
    if not _vjp_agrees(section, tokens, x, tol):
        return None
    adapter.checked_derivatives.add(kind)
    return section


def _derivative_kind(section: Section, x: Tensor) -> tuple:
    """What a section's derivative code depends on beyond the weights its forward pass
    uses: its class, site kinds and positions, prompt length and dtype (not its layer)."""
    out_site = block_output(section.in_site, section.out_site)
    return (type(section), section.in_site.kind, section.in_site.positions, out_site.kind,
            out_site.positions, section.n_pos, x.dtype, x.device.type)


def _build(adapter: Adapter, in_site: Site, out_site: Site, n_pos: int, dt: torch.dtype,
           device: torch.device) -> Section | None:
    """The section's closed form from the model's weights, unchecked; ``None`` where the
    architecture or the positions rule one out."""
    pair, L = (in_site.kind, block_output(in_site, out_site).kind), in_site.layer
    if pair == ("resid_pre", "resid_mid"):
        weights = _attention_weights(adapter, in_site, n_pos, dt)
        if weights is None:
            return None
        if adapter.arch.no_norm:
            return (AttentionSection(adapter, in_site, out_site, n_pos, weights)
                    if weights.plain else
                    NormAttentionSection(adapter, in_site, out_site, n_pos, weights, None))
        norm = _norm(adapter, _module(adapter.model, "blocks", L, "ln1"), dt)
        return None if norm is None else NormAttentionSection(adapter, in_site, out_site,
                                                              n_pos, weights, norm)
    in_pos, out_pos = in_site.resolve_positions(n_pos), out_site.resolve_positions(n_pos)
    if not any(p in in_pos for p in out_pos):
        return None
    if out_site.kind == "logits":
        B = unembedding(adapter, dt)  # [d+1, V]
        if B is None:
            return None
        if adapter.arch.no_norm:
            return LinearSection(adapter, in_site, out_site, n_pos, B.to(device, dt))
        norm = final_norm(adapter, dt)
        return None if norm is None else UnembedSection(adapter, in_site, out_site, n_pos,
                                                        norm, B.to(device, dt))
    if not adapter.arch.no_norm:  # ("resid_mid", "resid_post") after ln2
        norm = _norm(adapter, _module(adapter.model, "blocks", L, "ln2"), dt)
        weights = _norm_mlp_weights(adapter, L, dt)
        if norm is None or weights is None:
            return None
        return NormMLPSection(adapter, in_site, out_site, n_pos, norm, weights)
    mlp = _mlp_weights(adapter, L, dt)
    if mlp is None:
        return None
    act, w_in, w_out, b_out = mlp
    m, d = w_out.shape
    if pair == ("resid_mid", "resid_post"):
        j0 = torch.eye(d + 1, dtype=dt, device=device)
        j0[-1, :-1] = b_out
        return MLPSection(adapter, in_site, out_site, n_pos, act=act, w_in=w_in, j0=j0,
                          w_out_t=torch.cat([w_out, torch.zeros_like(w_out[:, :1])], 1))
    if pair == ("resid_mid", "mlp_post"):
        j0 = torch.zeros(d + 1, m + d + 1, dtype=dt, device=device)
        j0[:, m:] = torch.eye(d + 1, dtype=dt, device=device)
        w_out_t = torch.zeros(m, m + d + 1, dtype=dt, device=device)
        w_out_t[:, :m] = torch.eye(m, dtype=dt, device=device)
        return MLPHiddenSection(adapter, in_site, out_site, n_pos, act=act, w_in=w_in, j0=j0,
                                w_out_t=w_out_t)
    # ("mlp_post", "resid_post"): y = [h, x, c] ↦ [x + h W_out + c b_out, c]
    J = torch.zeros(m + d + 1, d + 1, dtype=dt, device=device)
    J[:m, :d] = w_out
    J[m:, :] = torch.eye(d + 1, dtype=dt, device=device)
    J[-1, :d] = b_out
    return LinearSection(adapter, in_site, out_site, n_pos, J)


def _tolerance(section: Section, dt: torch.dtype) -> float:
    """The relative tolerance of the checks. float64: 1e-7, except into the logits through a
    final norm, and through ``ln1``/``ln2`` into attention or the MLP (1e-6): Hugging Face's
    Llama-family RMSNorm, and TransformerLens's rotary attention bridge's softmax, compute in
    float32 even in a float64 model, so the model's own outputs carry float32 rounding
    (about 1e-7 of their scale); a wrong eps, weight, bias or rotation misses by far more."""
    if dt != torch.float64:
        return 1e-3
    return 1e-6 if isinstance(section, (UnembedSection, NormMLPSection, NormAttentionSection)
                              ) else 1e-7


def _close(a: Tensor, b: Tensor, tol: float) -> bool:
    return a.shape == b.shape and bool(
        (a - b).abs().max() <= tol * b.abs().max().clamp_min(1e-12))


def _vjp_agrees(section: Section, tokens: Tensor, x: Tensor, tol: float, n: int = 4) -> bool:
    """One random output direction ``u`` at every output position, pulled back on a few
    samples, the section against autograd through the model: the forward check alone
    cannot see a wrong derivative (e.g. another attention scale). The model's side is one
    backward pass of ``Σ_t u·y_t``; the section's, its own pullbacks summed over ``t``."""
    n = min(n, x.shape[0])
    u = torch.randn(section.d_out, 1, generator=torch.Generator().manual_seed(0),
                    dtype=torch.float64).to(x.device, x.dtype)
    mine = torch.zeros_like(x[:n])
    for pb in section.pullbacks(x[:n], u, [1.0], [1.0], tokens[:n]):
        mine[pb.samples][:, pb.in_rows] += pb.g[..., 0]
    model = ModelSection(section.adapter, section.in_site, section.out_site, section.n_pos)
    leaf = x[:n].detach().requires_grad_(True)
    with torch.enable_grad():
        (want,) = torch.autograd.grad((model.forward(leaf, tokens[:n]) @ u).sum(), leaf)
    return _close(mine, want, tol)


def _attention_weights(adapter: Adapter, in_site: Site, n_pos: int,
                       dt: torch.dtype) -> AttentionWeights | None:
    """Block ``L``'s attention as :class:`AttentionWeights` (absent biases as zeros;
    grouped-query key/value heads unrepeated; rotary tables from the model), else None."""
    arch = adapter.arch
    if (arch.parallel or not adapter.pattern_before_output
            or arch.positional_embedding not in ("standard", "rotary") or not arch.causal
            or arch.attn_scores_soft_cap is not None
            or in_site.resolve_positions(n_pos) != list(range(n_pos))):
        return None
    attn = adapter.model.blocks[in_site.layer].attn
    try:
        W = {k: getattr(attn, k) for k in ("W_Q", "W_K", "W_V", "W_O")}
        # a HookedTransformer with grouped-query heads keeps them unrepeated in _W_K/_W_V
        for n in "KV":
            unrepeated = getattr(attn, f"_W_{n}", None)
            W[f"W_{n}"] = W[f"W_{n}"] if unrepeated is None else unrepeated
        W = {k: w.detach().to(dt) for k, w in W.items()}
        for n in "QKV":
            b = getattr(attn, f"_b_{n}", None)
            b = getattr(attn, f"b_{n}", None) if b is None else b
            W[f"b_{n}"] = (torch.zeros_like(W[f"W_{n}"][:, 0]) if b is None
                           else b.detach().to(dt))
        b_O = getattr(attn, "b_O", None)
        W["b_O"] = torch.zeros_like(W["W_O"][0, 0]) if b_O is None else b_O.detach().to(dt)
    except (AttributeError, TypeError):
        return None
    H, d, e = W["W_Q"].shape
    if (W["W_K"].shape != W["W_V"].shape or W["W_K"].shape[1:] != (d, e)
            or H % W["W_K"].shape[0] or W["W_O"].shape != (H, e, d)):
        return None
    rotary = None
    if arch.rotary:
        rotary = _rotary(adapter, attn, n_pos, e, dt, W["W_Q"].device)
        if rotary is None:
            return None
    wq, wk, wv = (torch.cat([W[f"W_{n}"], W[f"b_{n}"][:, None]], 1) for n in "QKV")  # [H,d+1,e]
    return AttentionWeights(wq=wq, wk=wk, wv=wv, W_O=W["W_O"], b_O=W["b_O"],
                            scale=arch.attn_scale, rotary=rotary)


def _rotary(adapter: Adapter, attn, n_pos: int, e: int, dt: torch.dtype,
            dev: torch.device) -> Rotary | None:
    """The model's own rotary tables for positions ``0 … n_pos − 1``: a HookedTransformer's
    ``rotary_cos``/``rotary_sin`` buffers, or the Hugging Face rotary embedding a bridge
    wraps (called as the model calls it, so its rounding and scaling are the model's); else
    None. Which pairs rotate is checked with the section against the model."""
    cos = getattr(attn, "rotary_cos", None)
    sin = getattr(attn, "rotary_sin", None)
    adjacent = bool(getattr(adapter.model.cfg, "rotary_adjacent_pairs", False))
    if isinstance(cos, Tensor) and isinstance(sin, Tensor):
        if cos.shape[0] < n_pos:
            return None
        cos, sin = cos[:n_pos], sin[:n_pos]
    else:
        emb = getattr(getattr(adapter.model, "rotary_emb", None), "original_component", None)
        if emb is None:
            return None
        try:
            probe = torch.zeros(1, n_pos, e, dtype=dt, device=dev)
            with torch.no_grad():
                cos, sin = emb(probe, torch.arange(n_pos, device=dev)[None])
        except Exception:  # an embedding with another signature: no formula
            return None
        cos, sin = cos[0], sin[0]
        cfg = adapter.model.cfg
        if getattr(cfg, "rotary_interleaved_cos_sin", False):  # tables already per pair
            adjacent = True
        elif adjacent:  # the bridge repeats each frequency of the tables' first half
            r = cos.shape[-1] // 2
            cos, sin = (t[:, :r].repeat_interleave(2, -1) for t in (cos, sin))
    r = cos.shape[-1]
    if sin.shape != cos.shape or r > e or r % 2 or cos.dim() != 2:
        return None
    return Rotary(cos=cos.detach().to(dev, dt), sin=sin.detach().to(dev, dt),
                  adjacent=adjacent)


def _module(model, *path):
    """``model.blocks[L].ln1`` for ``path = ("blocks", L, "ln1")``, else None."""
    try:
        for p in path:
            model = model[p] if isinstance(p, int) else getattr(model, p)
    except (AttributeError, IndexError, TypeError):
        return None
    return model


def final_norm(adapter: Adapter, dt: torch.dtype) -> Norm | None:
    """The model's final normalisation (``ln_final``) in ``dt``, else None."""
    return _norm(adapter, getattr(adapter.model, "ln_final", None), dt)


def _norm(adapter: Adapter, ln, dt: torch.dtype) -> Norm | None:
    """A normalisation module (``ln1`` of a block, ``ln_final``) as LayerNorm or RMSNorm,
    with or without its weight and bias, else None."""
    kind = adapter.arch.normalization
    if ln is None or kind not in ("LN", "LNPre", "RMS", "RMSPre"):
        return None
    eps = getattr(ln, "eps", None)
    eps = adapter.arch.eps if eps is None else eps
    if not isinstance(eps, (int, float)):
        return None
    w = getattr(ln, "w", None) if not kind.endswith("Pre") else None
    b = getattr(ln, "b", None) if kind == "LN" else None
    return Norm(rms=kind.startswith("RMS"), eps=float(eps),
                w=None if w is None else w.detach().to(dt),
                b=None if b is None else b.detach().to(dt))


def _norm_mlp_weights(adapter: Adapter, L: int, dt: torch.dtype) -> NormMLPWeights | None:
    """The MLP of block ``L`` as :class:`~tl_degen.sections.norm_mlp.NormMLPWeights`
    (gated or not; absent biases as zeros), else None."""
    arch = adapter.arch
    act = ACTIVATIONS.get(arch.act_fn or "")
    if act is None or arch.parallel:
        return None
    mlp = _module(adapter.model, "blocks", L, "mlp")
    try:
        W_in, W_out = mlp.W_in.detach().to(dt), mlp.W_out.detach().to(dt)
        names = ("W_gate", "b_gate", "W_in", "b_in") if arch.gated_mlp else ("W_in", "b_in")
        cols = []
        for w_name, b_name in zip(names[::2], names[1::2]):
            W = getattr(mlp, w_name).detach().to(dt)
            b = getattr(mlp, b_name, None)
            b = torch.zeros_like(W[0]) if b is None else b.detach().to(dt)
            cols.append(torch.cat([W, b[None]]))  # [d + 1, m]
        b_out = getattr(mlp, "b_out", None)
        b_out = torch.zeros_like(W_out[0]) if b_out is None else b_out.detach().to(dt)
    except (AttributeError, TypeError):
        return None
    if any(c.shape != (W_in.shape[0] + 1, W_out.shape[0]) for c in cols):
        return None
    return NormMLPWeights(act=act, w=torch.cat(cols, 1), w_out=W_out, b_out=b_out,
                          gated=bool(arch.gated_mlp))


def _mlp_weights(adapter: Adapter, L: int, dt: torch.dtype):
    """``(act, [W_in; b_in], W_out, b_out)`` of an ungated, normalisation-free MLP, else
    None."""
    arch = adapter.arch
    act = ACTIVATIONS.get(arch.act_fn or "")
    if act is None or arch.gated_mlp or arch.parallel:
        return None
    try:
        mlp = adapter.model.blocks[L].mlp
        w_in = torch.cat([mlp.W_in, mlp.b_in[None]]).detach().to(dt)  # [d+1, m]
        return act, w_in, mlp.W_out.detach().to(dt), mlp.b_out.detach().to(dt)
    except (AttributeError, TypeError):
        return None
