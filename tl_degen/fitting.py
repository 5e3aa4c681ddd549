"""``fit_bases`` and ``site_activations``: model + tokens → statistics → bases.

Data flows one way (DESIGN.md §7): one forward pass per batch accumulates the mean and Gram
of every site; the bases are then built from the last site backwards, because each LIB basis
needs the next site's ``C`` (§4 step 6).
"""

from __future__ import annotations

import io
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager, redirect_stdout

import torch
from jaxtyping import Float, Int
from torch import Tensor
from tqdm.auto import tqdm

from tl_degen.adapters import Adapter, get_adapter
from tl_degen.basis import METHODS, Dropped, InteractionBasis, Threshold, lib_rotation, whiten
from tl_degen.basis_set import BasisSet, model_probe
from tl_degen.closed_form import recognise
from tl_degen.errors import DataError, TLDegenError
from tl_degen.memory import auto_batch_size
from tl_degen.sections import accumulate_jacobian_gram, integration_rule
from tl_degen.sites import Site, check_forward_order, parse_sites
from tl_degen.stats import GramAccumulator, MomentAccumulator
from tl_degen.stochastic import estimate_jacobian_gram

__all__ = ["fit_bases", "site_activations", "token_batches"]


def token_batches(
    tokens: Tensor | Iterable[Tensor], batch_size: int | None, adapter: Adapter
) -> list[Int[Tensor, "batch pos"]]:
    """Validate tokens and split them into batches on the model's device.

    ``batch_size=None`` takes as many sequences as fit the memory budget
    (:func:`tl_degen.memory.auto_batch_size`).

    ``tokens`` is a ``[batch, pos]`` integer tensor or an iterable of such tensors (all of the
    same length). Raises :class:`~tl_degen.errors.DataError` on anything else.
    """
    if batch_size is not None and (not isinstance(batch_size, int) or batch_size < 1):
        raise DataError(f"batch_size must be a positive integer or None (from the memory "
                        f"budget, tl_degen.memory), got {batch_size!r}")
    if not isinstance(tokens, Tensor) and hasattr(tokens, "__array__") or (
            isinstance(tokens, (list, tuple)) and tokens and isinstance(tokens[0], (list, tuple))
            and tokens[0] and isinstance(tokens[0][0], int)):
        try:  # a numpy array or a nested list of ids: one [batch, pos] tensor
            tokens = torch.as_tensor(tokens)
        except (TypeError, ValueError):
            raise DataError("tokens must be a [batch, pos] array of integer ids") from None
    if isinstance(tokens, Tensor):
        chunks = [tokens]
        if tokens.dim() == 2 and tokens.shape[0] == 0:
            chunks = []
    elif isinstance(tokens, Iterable) and not isinstance(tokens, (str, bytes)):
        chunks = []
        for t in tokens:
            t = torch.as_tensor(t)
            chunks.append(t)
    else:
        raise DataError(f"tokens must be a [batch, pos] tensor or an iterable of them, got "
                        f"{type(tokens).__name__}")
    if not chunks:
        raise DataError("no tokens: pass at least one sequence ([batch, pos] tensor)")
    if batch_size is None:
        width = max((t.shape[1] for t in chunks if t.dim() == 2), default=adapter.n_ctx)
        batch_size = auto_batch_size(adapter, min(max(width, 1), adapter.n_ctx))
    chunks = [piece for t in chunks for piece in (t.split(batch_size) if t.dim() == 2 else [t])]
    if not chunks:
        raise DataError("no tokens: pass at least one sequence ([batch, pos] tensor)")
    n_pos = None
    out = []
    for i, t in enumerate(chunks):
        if t.dim() != 2:
            raise DataError(f"token batch {i} has shape {tuple(t.shape)}; expected [batch, pos] "
                            "(add a batch dimension with tokens[None] for one sequence)")
        if t.dtype.is_floating_point or t.dtype == torch.bool or t.is_complex():
            raise DataError(f"tokens must be integer ids, got dtype {t.dtype}; "
                            "tokenize text first (model.to_tokens(...))")
        if t.shape[0] == 0 or t.shape[1] == 0:
            continue
        if n_pos is None:
            n_pos = t.shape[1]
        elif t.shape[1] != n_pos:
            raise DataError(f"token batches have different lengths ({n_pos} and {t.shape[1]}); "
                            "pad or truncate them to one length")
        lo, hi = int(t.min()), int(t.max())
        if lo < 0 or hi >= adapter.d_vocab:
            raise DataError(f"token ids must lie in [0, {adapter.d_vocab}); batch {i} has ids "
                            f"in [{lo}, {hi}]")
        out.append(t.to(device=adapter.device, dtype=torch.long))
    if not out:
        raise DataError("no tokens: every batch was empty")
    if n_pos > adapter.n_ctx:
        raise DataError(f"sequences of length {n_pos} exceed the model's context n_ctx="
                        f"{adapter.n_ctx}; truncate them")
    return out


@contextmanager
def prepared(model: torch.nn.Module, dtype: torch.dtype | None) -> Iterator[None]:
    """Eval mode, the requested dtype, no parameter grads and grad mode on (even inside
    ``torch.no_grad``/``inference_mode``); everything restored afterwards, including the
    dtype of every floating-point parameter and buffer, one by one, and ``model.cfg.dtype``
    (a HookedTransformer casts its embeddings to it)."""
    was_training = model.training
    params = [(p, p.requires_grad, p.dtype) for p in model.parameters()]
    buffers = [(m, name, b.dtype) for m in model.modules()
               for name, b in m._buffers.items() if b is not None and b.is_floating_point()]
    cast = dtype is not None and any(p.dtype != dtype for p, _, _ in params)
    cfg = getattr(model, "cfg", None)
    cfg_dtype = getattr(cfg, "dtype", None)  # HookedTransformer casts its inputs to cfg.dtype
    try:
        model.eval()
        if cast:
            with redirect_stdout(io.StringIO()):  # TransformerLens prints on every cast
                model.to(dtype)
        for p, _, _ in params:
            p.requires_grad_(False)
        with torch.inference_mode(False), torch.enable_grad():
            yield
    finally:
        if cast:
            with torch.no_grad():
                for p, _, dt in params:
                    if p.dtype != dt:
                        p.data = p.data.to(dt)
                for m, name, dt in buffers:
                    if m._buffers[name].dtype != dt:
                        m._buffers[name] = m._buffers[name].to(dt)
            if cfg_dtype is not None and getattr(cfg, "dtype", None) != cfg_dtype:
                cfg.dtype = cfg_dtype
        for p, flag, _ in params:
            p.requires_grad_(flag)
        model.train(was_training)


def _resolve_sites(adapter: Adapter, sites, n_pos: int) -> list[Site]:
    parsed = parse_sites(sites)
    check_forward_order(parsed)
    for s in parsed:
        adapter.check_site(s)
        s.resolve_positions(n_pos)
    return parsed


def site_activations(
    model, tokens: Int[Tensor, "batch pos"] | Iterable[Tensor], site: str | Site, *,
    batch_size: int | None = None,
) -> Float[Tensor, "batch n_pos d_site"]:
    """The site's vectors ``[batch, n_site_positions, d_site]`` (constant coordinate last)
    for ``tokens`` ``[batch, pos]``.

    For ``mlp_post.L`` the vector is ``[mlp.hook_post, bypass stream, 1]``; ``logits`` has no
    constant coordinate. Runs without gradients, in the model's own dtype.

    Examples:
        >>> acts = tl_degen.site_activations(model, tokens, "resid_post.0:last")
        >>> acts.shape  # [batch, 1, d_model + 1]
    """
    adapter = get_adapter(model)
    batches = token_batches(tokens, batch_size, adapter)
    (s,) = _resolve_sites(adapter, [site], batches[0].shape[1])
    with prepared(model, None), torch.no_grad():
        return torch.cat([adapter.read_sites(b, [s])[0] for b in batches])


def fit_bases(
    model,
    tokens: Int[Tensor, "batch pos"] | Iterable[Tensor],
    sites: Sequence[str | Site] | str,
    *,
    method: str = "lib",
    batch_size: int | None = None,
    center: bool = True,
    threshold: float | Threshold = 1e-13,
    integration: str = "gradient",
    n_alpha: int | None = None,
    dtype: torch.dtype | None = torch.float64,
    progress: bool = True,
    n_probes: int | None = None,
    probe_groups: int = 4,
    seed: int = 0,
    closed_form: bool = True,
) -> BasisSet:
    """Fit a basis per site: LIB, PCA or neuron (DESIGN.md §4).

    Args:
        model: a TransformerLens 4 ``TransformerBridge`` or a 3.x ``HookedTransformer``.
            It is put in eval mode and cast to ``dtype`` during the fit, then restored.
        tokens: ``[batch, pos]`` token ids, or an iterable of such batches (same length).
        sites: site names in forward order, e.g. ``["resid_pre.0", "resid_mid.0:last",
            "resid_post.0:last", "logits:last"]`` (see :mod:`tl_degen.sites`).
        method: ``"lib"`` (interaction basis), ``"pca"`` or ``"neuron"``.
        batch_size: sequences per forward pass (default: as many as fit the memory budget,
            :mod:`tl_degen.memory`).
        center: subtract the data mean (through the constant coordinate) before whitening.
        threshold: eigenvalue cutoff; a float is relative to the largest eigenvalue at each
            stage, ``Threshold.absolute(x)`` is absolute.
        integration: ``"gradient"`` (α = 1), ``"trapezoid"`` or ``"gauss-legendre"``.
        n_alpha: number of quadrature points for the integrated rules (default 5).
        dtype: dtype the model runs in during the fit (``None``: keep the model's).
            Accumulation and eigendecompositions are always float64.
        progress: show progress bars.
        n_probes: estimate the Jacobian Gram with this many random ±1 probes over output
            positions and directions (DESIGN.md §4 step 9) instead of one vector-Jacobian
            product per output direction; sections with a closed form stay exact. The
            relative standard error is stored as ``bases[site].jacobian_gram_error``.
        probe_groups: groups the probes are split into to estimate that error.
        seed: seed of the probes.
        closed_form: use the closed forms of :mod:`tl_degen.closed_form` where they apply
            (``False``: autograd everywhere; the results agree to rounding).

    Returns:
        A :class:`~tl_degen.basis_set.BasisSet` mapping each site to its
        :class:`~tl_degen.basis.InteractionBasis`.

    The LIB basis of the last site is taken with respect to the raw logits at that site's
    positions (``logits`` itself, when given as the last site, keeps the identity basis: the
    unrotated output coordinates).

    Examples:
        >>> bases = fit_bases(model, tokens, ["resid_pre.0", "resid_post.0:last", "logits:last"])
        >>> bases["resid_pre.0"].C.shape  # [d_model + 1, k]
    """
    if method not in METHODS:
        raise TLDegenError(f"unknown method {method!r}; use one of {', '.join(METHODS)}")
    threshold = Threshold.coerce(threshold)
    alphas, weights = integration_rule(integration, n_alpha)
    adapter = get_adapter(model)
    batches = token_batches(tokens, batch_size, adapter)
    n_pos = batches[0].shape[1]
    site_list = _resolve_sites(adapter, sites, n_pos)
    n_samples = sum(b.shape[0] for b in batches)
    with prepared(model, None):
        probe = model_probe(adapter)  # in the model's own dtype, as check_model will see it

    generator = torch.Generator().manual_seed(seed)
    with prepared(model, dtype):
        work_dtype = adapter.dtype
        # ---- pass 1: means and Grams of every site
        accs = [MomentAccumulator(adapter.site_dim(s) + int(s.has_constant), name=s.name,
                                  has_constant=s.has_constant, device=adapter.device)
                for s in site_list]
        with torch.no_grad():
            for b in tqdm(batches, desc="activation statistics", disable=not progress):
                for acc, x in zip(accs, adapter.read_sites(b, site_list)):
                    acc.update(x)

        bases: dict[Site, InteractionBasis] = {}
        next_C: Tensor | None = None  # None = raw outputs (identity)
        for idx in range(len(site_list) - 1, -1, -1):
            site, acc = site_list[idx], accs[idx]
            mean, gram = acc.mean, acc.gram(center)
            if site.kind == "logits" or method == "neuron":
                bases[site] = _identity_basis(site, method, mean, acc.gram(False),
                                              acc.gram(False) if method == "neuron" else gram,
                                              center, n_samples)
                next_C = None if site.kind == "logits" else bases[site].C
                continue
            constant_first = center and site.has_constant
            wh = whiten(mean, gram, center=center, has_constant=site.has_constant,
                        threshold=threshold)
            dropped = Dropped(activation=wh.n_dropped, activation_cutoff=wh.cutoff)
            if method == "pca":
                bases[site] = InteractionBasis(
                    site=site, method="pca", C=wh.W, C_pinv=wh.W_pinv, eigenvalues=wh.eigenvalues,
                    mean=mean, gram=gram, gram_eigenvalues=wh.all_eigenvalues, dropped=dropped,
                    center=center, n_samples=n_samples)
                continue
            out_site = (site_list[idx + 1] if idx + 1 < len(site_list)
                        else Site("logits", None, site.positions))
            jac = GramAccumulator(acc.d, name=site.name, device=adapter.device)
            out_C = None if next_C is None else next_C.to(work_dtype)
            estimate = None
            for b in tqdm(batches, desc=f"LIB {site.name} → {out_site.name}",
                          disable=not progress):
                with torch.no_grad():
                    (x,) = adapter.read_sites(b, [site])
                section = recognise(adapter, b, site, out_site, x) if closed_form else None
                if section is not None:
                    section.add_jacobian_gram(x, out_C, jac, alphas, weights)
                    continue
                if n_probes is None:
                    accumulate_jacobian_gram(adapter, b, site, out_site, x, out_C, jac,
                                             alphas=alphas, weights=weights, closed_form=False)
                    continue
                est = estimate_jacobian_gram(adapter, b, site, out_site, x, out_C,
                                             alphas=alphas, weights=weights, n_probes=n_probes,
                                             n_groups=probe_groups, generator=generator)
                estimate = est if estimate is None else estimate + est
                jac.add_count(x.shape[0] * x.shape[1])
            error = None if n_probes is None else 0.0
            if estimate is not None:
                jac.add_matrix(estimate.value)
                error = float(estimate.standard_error.norm()
                              / (jac.value * jac.count).norm().clamp_min(1e-300))
            C, C_pinv, lam, lam_all, n_drop, cut = lib_rotation(
                wh, jac.value, constant_first=constant_first, threshold=threshold)
            dropped.jacobian, dropped.jacobian_cutoff = n_drop, cut
            bases[site] = InteractionBasis(
                site=site, method="lib", C=C, C_pinv=C_pinv, eigenvalues=lam, mean=mean,
                gram=gram, gram_eigenvalues=wh.all_eigenvalues, dropped=dropped, center=center,
                n_samples=n_samples, lambda_all=lam_all, jacobian_gram_error=error)
            next_C = C

    config = {"method": method, "center": center, "threshold": str(threshold),
              "threshold_value": threshold.value, "threshold_mode": threshold.mode,
              "integration": integration, "n_alpha": len(alphas),
              "dtype": str(work_dtype).replace("torch.", ""), "n_samples": n_samples,
              "n_pos": n_pos, "backend": adapter.backend, "n_probes": n_probes,
              "probe_groups": probe_groups if n_probes else None, "seed": seed}
    return BasisSet([bases[s] for s in site_list], config=config,
                    model_signature=adapter.signature(), model_probe=probe)


def _identity_basis(site: Site, method: str, mean: Tensor, raw_gram: Tensor, gram: Tensor,
                    center: bool, n_samples: int) -> InteractionBasis:
    """Neuron basis (and the unrotated logits): ``C = I``, no centering, no truncation."""
    d = mean.shape[0]
    eye = torch.eye(d, dtype=torch.float64, device=mean.device)
    second = raw_gram.diagonal().clone()
    return InteractionBasis(site=site, method=method, C=eye, C_pinv=eye.clone(),
                            eigenvalues=second, mean=mean, gram=gram,
                            gram_eigenvalues=torch.linalg.eigvalsh(gram).abs().sort(
                                descending=True).values,
                            dropped=Dropped(), center=center and method != "neuron",
                            n_samples=n_samples)
