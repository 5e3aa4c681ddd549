"""What a direction responds to: token views for text models, Fourier content for modadd.

Token views use circuitsvis (``colored_tokens_multi`` and ``topk_samples``) through
``.local_src``, which inlines its JavaScript so the page renders with no network. circuitsvis
writes its container as a self-closing ``<div .../>``, which HTML parses as an *open* tag: a
second view on the same page then nests inside the first and breaks. :func:`fix_local_src`
rewrites it as ``<div ...></div>`` (DESIGN.md §6).
"""

from __future__ import annotations

import html
import os
import re
from collections.abc import Sequence
from pathlib import Path

import torch
from jaxtyping import Float, Int
from torch import Tensor

from tl_degen import checks
from tl_degen.adapters import get_adapter
from tl_degen.basis import InteractionBasis
from tl_degen.errors import DataError, TLDegenError
from tl_degen.fitting import site_activations, token_batches
from tl_degen.io import write_text_atomic

__all__ = ["fix_local_src", "direction_values", "token_view_html", "save_token_view",
           "fourier_content", "top_frequencies",
           "fourier_label", "modadd_labels", "lm_labels", "output_effects"]

_SELF_CLOSING_DIV = re.compile(r"<div([^<>]*?)\s*/>")


def fix_local_src(src: str) -> str:
    """``<div .../>`` → ``<div ...></div>`` so several circuitsvis views share a page.

    Examples:
        >>> viz.fix_local_src('<div id="a"/><div id="b"/>')
        '<div id="a"></div><div id="b"></div>'
    """
    return _SELF_CLOSING_DIV.sub(r"<div\1></div>", src)


def direction_values(model, tokens: Int[Tensor, "batch pos"], basis: InteractionBasis,
                     directions: Sequence[int], *, batch_size: int | None = None,
                     ) -> Float[Tensor, "batch n_pos n_dirs"]:
    """Coordinates ``x̂[:, :, directions]`` of the data at the basis' site and positions:
    ``[batch, n_site_positions, len(directions)]`` for ``tokens`` ``[batch, pos]``.

    Examples:
        >>> vals = viz.direction_values(model, tokens, bases["resid_mid.0:last"], [1, 2])
        >>> vals.shape  # [batch, 1, 2]
    """
    directions = checks.integers("directions", directions, minimum=0, maximum=basis.k - 1)
    acts = site_activations(model, tokens, basis.site, batch_size=batch_size)
    return basis.to_coords(acts)[..., list(directions)]


def _token_strings(model, tokens: Tensor) -> list[list[str]]:
    tok = getattr(model, "tokenizer", None)
    if tok is None:
        return [[f"<{int(t)}>" for t in row] for row in tokens]
    return [[tok.decode([int(t)]) for t in row] for row in tokens]


def token_view_html(model, tokens: Int[Tensor, "batch pos"], basis: InteractionBasis,
                    directions: Sequence[int], *, n_examples: int = 5,
                    title: str | None = None,
                    token_strings: list[list[str]] | None = None,
                    labels: dict[str, str] | None = None) -> str:
    """Which tokens and positions activate each direction, as self-contained HTML.

    Two circuitsvis views: ``topk_samples`` (for every direction, the ``n_examples``
    sequences whose largest |coordinate| is biggest, tokens coloured by the coordinate) and
    ``colored_tokens_multi`` on the first sequence (every direction as a selectable layer).
    The site must cover every position (e.g. ``resid_post.0``, not ``:last``) so that each
    token has a value.

    Args:
        tokens: ``[batch, pos]`` prompts (decoded with ``model.tokenizer`` when present).
        basis: an :class:`InteractionBasis` of an all-positions site.
        directions: basis columns to show.
        token_strings: ``[batch][pos]`` display strings (default: decoded with the model's
            tokenizer, or ``<id>``).
        labels: node id (``"site/j"``) → label (:func:`lm_labels`, :func:`modadd_labels`),
            shown after each direction's name.

    Examples:
        >>> page = viz.token_view_html(model, tokens[:200], bases["resid_pre.0"], [1, 2, 3],
        ...                            n_examples=8, title="modadd: resid_pre.0")
        >>> viz.save_token_view(page, "tokens.html")
    """
    from circuitsvis.tokens import colored_tokens_multi
    from circuitsvis.topk_samples import topk_samples

    if not isinstance(tokens, Tensor) or tokens.dim() != 2:
        raise DataError("tokens must be one [batch, pos] tensor of token ids")
    checks.integer("n_examples", n_examples, minimum=1)
    n_pos = tokens.shape[1]
    if basis.site.resolve_positions(n_pos) != list(range(n_pos)):
        raise TLDegenError(f"token views need a site at every position; {basis.site.name!r} "
                           f"covers only some. Fit bases at {basis.site.kind}.{basis.site.layer}")
    if not directions:
        raise TLDegenError("give at least one direction")
    vals = direction_values(model, tokens, basis, directions).float()  # [b, pos, n]
    strs = token_strings if token_strings is not None else _token_strings(model, tokens)
    if len(strs) != tokens.shape[0] or any(len(r) != n_pos for r in strs):
        raise DataError("token_strings must be [batch][pos] like tokens")
    k = min(n_examples, tokens.shape[0])
    samples_tok, samples_act = [], []
    for n in range(len(directions)):
        top = vals[..., n].abs().amax(1).argsort(descending=True)[:k].tolist()
        samples_tok.append([strs[b] for b in top])
        samples_act.append([vals[b, :, n].tolist() for b in top])
    labels = labels or {}
    names = [f"{basis.site.name}/{d}" for d in directions]
    names = [f"{n}: {labels[n]}" if labels.get(n) else n for n in names]
    view1 = topk_samples(tokens=[samples_tok], activations=[samples_act],
                         zeroth_dimension_name="Site", first_dimension_name="Direction",
                         zeroth_dimension_labels=[basis.site.name],
                         first_dimension_labels=names)
    view2 = colored_tokens_multi(strs[0], vals[0], names)
    head = html.escape(title or f"Token view: {basis.site.name} ({basis.method})")
    return (f"<div class='tld-tokens'><h3>{head}</h3>"
            f"<h4>Top sequences per direction</h4>{fix_local_src(view1.local_src)}"
            f"<h4>First sequence, every direction</h4>{fix_local_src(view2.local_src)}</div>")


def save_token_view(text: str, path: str | os.PathLike) -> Path:
    """Write the HTML of :func:`token_view_html` (``text``) to ``path`` as a complete page
    (a ``<!DOCTYPE html>`` document with ``text`` as its body), atomically: it is written to
    a temporary file next to ``path`` and renamed, so an error leaves no half-written page.
    Returns the path.

    Examples:
        >>> page = viz.token_view_html(model, tokens[:200], bases["resid_pre.0"], [1, 2, 3])
        >>> viz.save_token_view(page, "tokens.html")
    """
    return write_text_atomic(path, "<!DOCTYPE html><html><head><meta charset='utf-8'></head>"
                             f"<body>{text}</body></html>", "token view")


# ---------------------------------------------------------------------------- Fourier
def fourier_content(grid: Float[Tensor, "*n p p"], top_k: int = 5,
                    ) -> tuple[Float[Tensor, "*n p p"], list]:
    """Power of the 2D DFT of functions on the ``(a, b)`` grid (mean removed), normalised to
    sum 1 per function, and for each function its strongest frequency pairs
    ``[((k_a, k_b), fraction), ...]`` with ``(k_a, k_b)`` and ``(p−k_a, p−k_b)`` folded
    together (a real signal's spectrum is symmetric). Leading dimensions are batched (a
    ``[p, p]`` grid gives one list, ``[n, p, p]`` a list of ``n`` lists).

    Examples:
        >>> a = torch.arange(113.0)
        >>> grid = torch.cos(2 * torch.pi * 5 * (a[:, None] + a[None, :]) / 113)  # [p, p]
        >>> power, top = viz.fourier_content(grid)  # power: [p, p]
        >>> top[0]  # ((5, 5), 1.0): all the power at k_a = k_b = 5, a function of a + b
    """
    if not isinstance(grid, Tensor):
        raise DataError(f"grid must be a [..., p, p] tensor, got {type(grid).__name__}")
    checks.integer("top_k", top_k, minimum=1)
    if grid.dim() < 2 or grid.shape[-1] != grid.shape[-2]:
        raise DataError(f"expected [..., p, p] grids over (a, b), got {tuple(grid.shape)}")
    single = grid.dim() == 2
    g = grid.double().reshape(-1, *grid.shape[-2:])
    g = g - g.mean((-1, -2), keepdim=True)
    power = torch.fft.fft2(g).abs() ** 2
    total = power.sum((-1, -2), keepdim=True)
    power = torch.where(total > 0, power / total.clamp_min(1e-300), power)
    tops = top_frequencies(power, top_k)
    return power.reshape(grid.shape), (tops[0] if single else tops)


def top_frequencies(power: Float[Tensor, "n p p"], top_k: int = 5) -> list[list]:
    """The strongest folded frequency pairs of each (normalised) power spectrum; an all-zero
    spectrum gives an empty list."""
    p = power.shape[-1]
    neg = (-torch.arange(p, device=power.device)) % p
    ka = torch.arange(p, device=power.device)[:, None].expand(p, p)
    kb = torch.arange(p, device=power.device)[None, :].expand(p, p)
    nka, nkb = neg[:, None].expand(p, p), neg[None, :].expand(p, p)
    canonical = (ka < nka) | ((ka == nka) & (kb <= nkb))
    self_paired = (ka == nka) & (kb == nkb)
    folded = torch.where(self_paired, power, power + power[:, neg][:, :, neg]) * canonical
    flat = folded.reshape(folded.shape[0], -1)
    vals, idx = flat.topk(min(top_k, flat.shape[1]), dim=1)
    out = []
    for n in range(flat.shape[0]):
        if float(flat[n].sum()) <= 0:
            out.append([])
            continue
        out.append([((int(i) // p, int(i) % p), float(v)) for v, i in zip(vals[n], idx[n])])
    return out


def fourier_label(top: list) -> str:
    """A short label from :func:`fourier_content`'s top list: ``"a+b: k=14 (83%)"``,
    ``"a: k=5"``, ``"b: k=5"``, ``"(k_a,k_b)=(3,7)"``, or ``"constant"``.

    Examples:
        >>> viz.fourier_label([((5, 5), 0.83), ((5, 0), 0.1)])
        'a+b: k=5 (83%)'
        >>> viz.fourier_label([])
        'constant'
    """
    if not top:
        return "constant"
    (ka, kb), frac = top[0]
    if kb == 0:
        kind = f"a: k={ka}"
    elif ka == 0:
        kind = f"b: k={kb}"
    elif ka == kb:
        kind = f"a+b: k={ka}"
    else:
        kind = f"(k_a,k_b)=({ka},{kb})"
    return f"{kind} ({frac:.0%})"


def modadd_labels(model, bases, p: int = 113) -> dict[str, str]:
    """Fourier labels for every node of every site of ``bases`` over the full ``(a, b)``
    grid (node id ``"site/j"`` → label). For multi-position sites the power of each
    position's coordinate is added up. Directions whose coordinate does not vary are
    labelled ``"constant"``.

    Examples:
        >>> labels = viz.modadd_labels(model, bases)
        >>> labels["resid_mid.0:last/1"]  # e.g. 'a+b: k=14 (83%)'
        >>> viz.save_graph_page(graph, "graph.html", labels=labels)
    """
    from tl_degen.basis_set import BasisSet
    from tl_degen.toy.modadd import all_pairs, tokens_for

    checks.instance("bases", bases, BasisSet, "fit_bases")
    p = checks.integer("p", p, minimum=2)
    if get_adapter(model).d_vocab != p + 1:
        raise DataError(f"p={p} does not fit this model: its vocabulary of "
                        f"{get_adapter(model).d_vocab} is p + 1 tokens for p = "
                        f"{get_adapter(model).d_vocab - 1}")
    tokens = tokens_for(all_pairs(p), p)
    out: dict[str, str] = {}
    for site in bases.sites:
        if site.kind == "logits":
            continue
        b = bases[site]
        coords = b.to_coords(site_activations(model, tokens, site, batch_size=4096))
        grids = coords.permute(2, 1, 0).reshape(b.k, coords.shape[1], p, p)  # [k, pos, p, p]
        centred = grids - grids.mean((-1, -2), keepdim=True)
        power = (torch.fft.fft2(centred).abs() ** 2).sum(1)  # [k, p, p], positions added
        power = power / power.sum((-1, -2), keepdim=True).clamp_min(1e-300)
        varies = centred.abs().amax((-3, -2, -1)) > 1e-9 * coords.abs().max().clamp_min(1e-300)
        tops = top_frequencies(power)
        for j in range(b.k):
            label = fourier_label(tops[j]) if bool(varies[j]) else "constant"
            out[f"{site.name}/{j}"] = label
    return out


def output_effects(model, bases) -> dict[str, Float[Tensor, "k vocab"]]:
    """How each direction's write moves the logits, to first order along the direct path:
    site name → ``[k, V]`` (float64), row ``j`` the change of every logit per unit of
    coordinate ``j``. The direction's activation-space vector (its row of ``C⁺``; at an
    ``mlp_post`` site the neurons' part is written through ``W_out``) is read by the
    unembedding through the final LayerNorm/RMSNorm with its scale frozen (centred, times the
    norm's weight, divided by one common scale): the layers in between are skipped, as in
    direct logit attribution, so a direction that acts through later layers is described
    only by its direct effect. Only the order of tokens within a row is meaningful (the
    frozen scale is left at 1). Logits sites: their own basis vectors (one token each, or
    the factor space's ``Q`` columns). Sites without a direct path readable here (an
    ``mlp_post`` of a model whose ``W_out`` cannot be read) are left out."""
    from tl_degen.basis_set import BasisSet
    from tl_degen.sections.recognise import final_norm
    from tl_degen.sections.unembed import unembedding

    checks.instance("bases", bases, BasisSet, "fit_bases")
    adapter = get_adapter(model)
    B = unembedding(adapter)  # [d + 1, V]
    if B is None:
        return {}
    d = B.shape[0] - 1
    norm = final_norm(adapter, torch.float64)
    out: dict[str, Tensor] = {}
    for site in bases.sites:
        b = bases[site]
        Cp = b.C_pinv.double()
        if site.kind == "logits":
            out[site.name] = Cp.to(B.device)
            continue
        if site.kind == "mlp_post":
            try:
                W_out = adapter.model.blocks[site.layer].mlp.W_out.detach().double()  # [m, d]
            except (AttributeError, TypeError):
                continue
            m = W_out.shape[0]
            v = Cp[:, :m].to(W_out.device) @ W_out + Cp[:, m:m + d].to(W_out.device)
        else:
            v = Cp[:, :d]
        v = v.to(B.device)
        if norm is not None and not norm.rms:
            v = v - v.mean(-1, keepdim=True)
        if norm is not None and norm.w is not None:
            v = v * norm.w.to(B.device)
        out[site.name] = v @ B[:d]
    return out


def lm_labels(model, tokens: Int[Tensor, "batch pos"] | list, bases, *, top_k: int = 3,
              context: int = 3, batch_size: int | None = None) -> dict[str, str]:
    """Labels for language-model directions (node id ``"site/j"`` → text) saying what a
    direction does to the output and where it is active::

        "+' Mary' ' Anna' −' the' ' a' · 'went to the' [' store']"

    * ``+`` / ``−``: the ``top_k`` output tokens its write promotes and suppresses most
      (:func:`output_effects`: the direct path through the frozen final norm and the
      unembedding; later layers skipped);
    * ``·``: the context where its coordinate rises furthest above its mean over ``tokens``:
      the token there in brackets after up to ``context`` tokens before it.

    Directions whose coordinate does not vary (the constant direction) are labelled
    ``"constant"``; logits are labelled by their token (one node per token) or, in the
    factor space of a large vocabulary, by the tokens at the two ends of their basis vector.
    ``tokens`` may be prompts of different lengths (as :func:`tl_degen.fit_bases` takes them).
    Modular addition keeps its Fourier labels (:func:`modadd_labels`).

    Examples:
        >>> labels = viz.lm_labels(model, tokens, bases)
        >>> viz.save_graph_page(graph, "graph.html", labels=labels)  # drawn beside nodes
    """
    if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1:
        raise TLDegenError(f"top_k must be a positive integer, got {top_k!r}")
    if isinstance(context, bool) or not isinstance(context, int) or context < 0:
        raise TLDegenError(f"context must be a non-negative integer, got {context!r}")
    batches = token_batches(tokens, batch_size, get_adapter(model))
    strings = [_token_strings(model, t) for t in batches]
    effects = output_effects(model, bases)

    def vocab(ids: list[int]) -> str:
        return " ".join(repr(_decode(model, i)) for i in ids)

    out: dict[str, str] = {}
    for site in bases.sites:
        b = bases[site]
        effect = effects.get(site.name)
        if site.kind == "logits":
            for j in range(b.k):
                if b.k == b.d_site:  # one node per token
                    out[f"{site.name}/{j}"] = repr(_decode(model, j))
                else:
                    row = effect[j]
                    out[f"{site.name}/{j}"] = (
                        f"+{vocab(row.topk(top_k).indices.tolist())} "
                        f"−{vocab((-row).topk(top_k).indices.tolist())}")
            continue
        parts, where = [], []  # every (sequence, position) read, and where it was
        for bi, t in enumerate(batches):
            positions = site.resolve_positions(t.shape[1])
            coords = b.to_coords(site_activations(model, t, site, batch_size=batch_size))
            parts.append(coords.reshape(-1, b.k))
            where += [(bi, r, p) for r in range(t.shape[0]) for p in positions]
        flat = torch.cat(parts).double()
        flat = flat - flat.mean(0, keepdim=True)
        scale = flat.abs().amax().clamp_min(1e-300)
        top = flat.argmax(0).tolist()
        for j in range(b.k):
            if float(flat[:, j].abs().max()) <= 1e-9 * float(scale):
                out[f"{site.name}/{j}"] = "constant"
                continue
            text = []
            if effect is not None:
                row = effect[j]
                text.append(f"+{vocab(row.topk(top_k).indices.tolist())} "
                            f"−{vocab((-row).topk(top_k).indices.tolist())}")
            bi, r, p = where[top[j]]
            row_strings = strings[bi][r]
            before = "".join(row_strings[max(0, p - context):p])
            text.append(f"· {before!r} [{row_strings[p]!r}]" if before else
                        f"· [{row_strings[p]!r}]")
            out[f"{site.name}/{j}"] = " ".join(text)
    return out


def _decode(model, token: int) -> str:
    tok = getattr(model, "tokenizer", None)
    return f"<{token}>" if tok is None else tok.decode([token])
