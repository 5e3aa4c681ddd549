"""``fit_bases`` and ``site_activations``: model + tokens → statistics → bases.

Data flows one way (DESIGN.md §7): one forward pass per batch accumulates the mean and Gram
of every site (:class:`~tl_degen.sections.reader.BatchReader`: the sites after the first through
the sections' formulas where all are closed forms, the activations kept for the Jacobian
passes while they fit); the bases are then built from the last site backwards, because each
LIB basis needs the next site's ``C`` (§4 step 6).
"""

from __future__ import annotations

import os
import sys
import warnings
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass

import torch
from jaxtyping import Float, Int
from torch import Tensor

from tl_degen import checks
from tl_degen.adapters import Adapter, get_adapter
from tl_degen.basis import (
    METHODS,
    Dropped,
    InteractionBasis,
    Threshold,
    lib_rotation,
    output_basis,
    whiten,
)
from tl_degen.basis_set import BasisSet, model_probe
from tl_degen.checkpoint import FitCheckpoint
from tl_degen.distributed import Shards, tokens_digest, weights_digest
from tl_degen.errors import AmbiguousRankWarning, DataError, ProbeErrorWarning, TLDegenError
from tl_degen.memory import auto_batch_size, check_fits, statistics_bytes
from tl_degen.model_state import prepared
from tl_degen.progress import RunBar, stage_bar
from tl_degen.sections.plan import SectionPlan
from tl_degen.sections.reader import BatchReader
from tl_degen.sections.rules import integration_rule
from tl_degen.sections.unembed import LogitFactor, logit_factor, statistics_dim
from tl_degen.sites import Site, check_forward_order, parse_sites
from tl_degen.stats import (
    EstimateAccumulator,
    GramAccumulator,
    MomentAccumulator,
    reusing_buffers,
)

__all__ = ["fit_bases", "site_activations", "token_batches", "check_positions"]


def token_batches(
    tokens: Tensor | Iterable[Tensor] | Mapping[str, Tensor], batch_size: int | None,
    adapter: Adapter, itemsize: int = 8,
) -> list[Int[Tensor, "batch pos"]]:
    """Validate tokens and split them into batches on the model's device.

    ``tokens`` is one of

    * a ``[batch, pos]`` integer tensor (or a numpy array, or a nested list of equal rows);
    * an iterable of such tensors (their lengths may differ);
    * a list of 1-D sequences of different lengths (prompts tokenized one by one);
    * a mapping with ``"input_ids"`` and ``"attention_mask"``, both ``[batch, pos]`` (what a
      Hugging Face tokenizer returns with ``padding=True``; either padding side): the padded
      positions are removed.

    Sequences of different lengths are grouped by length (in order of first appearance), so
    no batch holds padding: every statistic runs over real tokens only, and a site's ``:last``
    is each prompt's last real token. For a causal model this is exactly what the model
    computes on each prompt alone.

    ``batch_size=None`` takes as many sequences as fit the memory budget
    (:func:`tl_degen.memory.auto_batch_size`, passes in ``itemsize``-byte floats), and raises
    :class:`~tl_degen.errors.MemoryBudgetError` if not even one does. Raises
    :class:`~tl_degen.errors.DataError` on anything else.
    """
    if batch_size is not None and (not isinstance(batch_size, int) or isinstance(
            batch_size, bool) or batch_size < 1):
        raise DataError(f"batch_size must be a positive integer or None (from the memory "
                        f"budget, tl_degen.memory), got {batch_size!r}")
    chunks, order = _token_chunks(tokens)
    if not chunks:
        raise DataError("no tokens: pass at least one sequence ([batch, pos] tensor)")
    sizes = {}
    for t in chunks:
        if t.dim() == 2 and t.shape[1] not in sizes:
            width = min(max(t.shape[1], 1), adapter.n_ctx)
            if batch_size is None:
                check_fits(adapter, width, itemsize=itemsize)
            sizes[t.shape[1]] = batch_size or auto_batch_size(adapter, width, itemsize)
    chunks = [piece for t in chunks
              for piece in (t.split(sizes[t.shape[1]]) if t.dim() == 2 else [t])]
    if not chunks:
        raise DataError("no tokens: pass at least one sequence ([batch, pos] tensor)")
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
        lo, hi = int(t.min()), int(t.max())
        if lo < 0 or hi >= adapter.d_vocab:
            raise DataError(f"token ids must lie in [0, {adapter.d_vocab}); batch {i} has ids "
                            f"in [{lo}, {hi}]")
        if t.shape[1] > adapter.n_ctx:
            raise DataError(f"sequences of length {t.shape[1]} exceed the model's context "
                            f"n_ctx={adapter.n_ctx}; truncate them")
        out.append(t.to(device=adapter.device, dtype=torch.long))
    if not out:
        raise DataError("no tokens: every batch was empty")
    return Batches(out, order)


class Batches(list):
    """The batches :func:`token_batches` made, and ``order``: when prompts of different
    lengths were regrouped, ``order[r]`` is the index, in the caller's tokens, of row ``r`` of
    the concatenated batches (``None`` when rows are in the caller's order)."""

    def __init__(self, batches: list[Tensor], order: Tensor | None = None):
        super().__init__(batches)
        self.order = order

    def in_caller_order(self, rows: Tensor) -> Tensor:
        """``rows`` (one per sequence, in batch order) put back in the caller's order."""
        if self.order is None:
            return rows
        out = torch.empty_like(rows)
        out[self.order.to(rows.device)] = rows
        return out


def _token_chunks(tokens) -> tuple[list[Tensor], Tensor | None]:
    """``tokens`` (any form :func:`token_batches` takes) as a list of tensors, padding
    removed and sequences of different lengths grouped into ``[n, length]`` tensors, with
    the regrouping's row order (see :class:`Batches`)."""
    if isinstance(tokens, Mapping):
        return _unpad(tokens)
    if not isinstance(tokens, Tensor) and hasattr(tokens, "__array__") or (
            isinstance(tokens, (list, tuple)) and tokens and isinstance(tokens[0], (list, tuple))
            and tokens[0] and isinstance(tokens[0][0], int)):
        if len({len(row) for row in tokens}) > 1:  # prompts of different lengths
            return _by_length([torch.as_tensor(row) for row in tokens])
        try:  # a numpy array or a nested list of ids: one [batch, pos] tensor
            tokens = torch.as_tensor(tokens)
        except (TypeError, ValueError):
            raise DataError("tokens must be a [batch, pos] array of integer ids") from None
    if isinstance(tokens, Tensor):
        return ([] if tokens.dim() == 2 and tokens.shape[0] == 0 else [tokens]), None
    if isinstance(tokens, Iterable) and not isinstance(tokens, (str, bytes)):
        try:
            chunks = [torch.as_tensor(t) for t in tokens]
        except (TypeError, ValueError, RuntimeError):
            raise DataError("tokens must be integer ids: a [batch, pos] tensor, an iterable of "
                            "them or a list of sequences of ids (tokenize text first, "
                            "model.to_tokens(...))") from None
        if chunks and all(t.dim() == 1 for t in chunks):  # one sequence each
            return _by_length(chunks)
        return chunks, None
    raise DataError(f"tokens must be a [batch, pos] tensor, an iterable of them, a list of "
                    f"sequences or a mapping with input_ids and attention_mask; got "
                    f"{type(tokens).__name__}")


def _by_length(seqs: list[Tensor]) -> tuple[list[Tensor], Tensor | None]:
    groups: dict[int, list[int]] = {}
    for i, t in enumerate(seqs):
        groups.setdefault(t.shape[0], []).append(i)
    if any(n == 0 for n in groups):
        raise DataError("a prompt has no tokens; drop empty prompts")
    order = torch.tensor([i for g in groups.values() for i in g])
    chunks = [torch.stack([seqs[i] for i in g]) for g in groups.values()]
    return chunks, None if bool((order == torch.arange(len(order))).all()) else order


def _unpad(tokens: Mapping) -> tuple[list[Tensor], Tensor | None]:
    missing = {"input_ids", "attention_mask"} - set(tokens)
    if missing:
        raise DataError(f"a mapping of tokens needs 'input_ids' and 'attention_mask' (a "
                        f"tokenizer's padded output); it lacks {sorted(missing)}")
    ids = torch.as_tensor(tokens["input_ids"])
    mask = torch.as_tensor(tokens["attention_mask"])
    if ids.dim() != 2 or mask.shape != ids.shape:
        raise DataError(f"input_ids {tuple(ids.shape)} and attention_mask "
                        f"{tuple(mask.shape)} must both be [batch, pos]")
    if not ((mask == 0) | (mask == 1)).all():
        raise DataError("attention_mask must hold 0 (padding) and 1 (real tokens) only")
    mask = mask.bool()
    seqs = []
    for i, (row, m) in enumerate(zip(ids, mask)):
        real = m.nonzero().flatten()
        if len(real) and int(real[-1] - real[0]) + 1 != len(real):
            raise DataError(f"prompt {i} has padding between its tokens (attention_mask "
                            f"{m.int().tolist()}); pad on one side, left or right")
        seqs.append(row[m])
    return _by_length(seqs)


def _resolve_sites(adapter: Adapter, sites, batches: list[Tensor]) -> list[Site]:
    parsed = parse_sites(sites)
    check_forward_order(parsed)
    for s in parsed:
        adapter.check_site(s)
        check_positions(s, batches)
    return parsed


def check_positions(site: Site, batches: list[Tensor]) -> None:
    """Raise unless ``site``'s positions exist in every batch's sequence length."""
    for n in sorted({b.shape[1] for b in batches}):
        site.resolve_positions(n)


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
    (s,) = _resolve_sites(adapter, [site], batches)
    with prepared(model, None), torch.no_grad():
        parts = [adapter.read_sites(b, [s])[0] for b in batches]
    if len({p.shape[1] for p in parts}) > 1:
        raise DataError(f"prompts of different lengths have different numbers of positions "
                        f"at {s.name}; read a site at fixed positions (e.g. {s.kind}"
                        f"{'' if s.layer is None else f'.{s.layer}'}:last) or pass prompts of "
                        "one length")
    return batches.in_caller_order(torch.cat(parts))


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
    progress: bool | RunBar = True,
    n_probes: int | None = None,
    probe_groups: int = 4,
    target_error: float | None = None,
    max_probes: int | None = None,
    seed: int = 0,
    closed_form: bool = True,
    distributed: bool | None = None,
    checkpoint: str | os.PathLike | None = None,
    checkpoint_every: int = 10,
) -> BasisSet:
    """Fit a basis per site: LIB, PCA or neuron (DESIGN.md §4).

    Args:
        model: a TransformerLens 4 ``TransformerBridge`` or a 3.x ``HookedTransformer``.
            It is put in eval mode and cast to ``dtype`` during the fit, then restored.
        tokens: ``[batch, pos]`` token ids, an iterable of such batches, or prompts of
            different lengths: a list of 1-D sequences, or a tokenizer's padded output
            ``{"input_ids", "attention_mask"}`` (either padding side). Padding never enters a
            statistic and ``:last`` is each prompt's last real token (:func:`token_batches`).
        sites: site names in forward order, e.g. ``["resid_pre.0", "resid_mid.0:last",
            "resid_post.0:last", "logits:last"]`` (see :mod:`tl_degen.sites`).
        method: ``"lib"`` (interaction basis), ``"pca"`` or ``"neuron"``.
        batch_size: sequences per forward pass (default: as many as fit the memory budget,
            :mod:`tl_degen.memory`; when not even one sequence and the sites' statistics fit
            it, :class:`~tl_degen.errors.MemoryBudgetError` says so before any work).
        center: subtract the data mean (through the constant coordinate) before whitening.
        threshold: eigenvalue cutoff; a float is relative to the largest eigenvalue at each
            stage, ``Threshold.absolute(x)`` is absolute.
        integration: ``"gradient"`` (α = 1), ``"trapezoid"`` or ``"gauss-legendre"``.
        n_alpha: number of quadrature points for the integrated rules (default 5).
        dtype: dtype the model runs in during the fit (``None``: keep the model's).
            Accumulation and eigendecompositions are always float64.
        progress: show progress bars (one per stage); a :class:`~tl_degen.progress.RunBar`
            draws this fit as stages of one bar over a longer run.
        n_probes: estimate the Jacobian Gram with this many random ±1 probes over output
            positions and directions (DESIGN.md §4 step 9) instead of one vector-Jacobian
            product per output direction; sections with a closed form stay exact. The
            relative standard error is stored as ``bases[site].jacobian_gram_error``.
            A section whose exact Gram costs at most ``2·n_probes`` pullbacks (e.g. into a
            ``:last`` site with few directions) stays exact
            (:func:`tl_degen.sections.gram_route`).
        probe_groups: groups the probes are split into to estimate that error.
        target_error: with ``n_probes``, a relative standard error to reach: the batches are
            probed again, ``n_probes`` more per round, until every site's error is at most
            this, or ``max_probes`` are spent (then a :class:`~tl_degen.ProbeErrorWarning`
            says how many probes would meet it).
        max_probes: the most probes per batch ``target_error`` may spend (default
            ``16·n_probes``).
        seed: seed of the probes.
        closed_form: use the closed forms of :mod:`tl_degen.sections` where they apply
            (``False``: autograd everywhere; the results agree to rounding).
        distributed: inside an initialised ``torch.distributed`` process group each rank
            passes its own shard of ``tokens``; the statistics are summed over ranks and every
            rank returns the bases of all shards together (:mod:`tl_degen.distributed`).
            ``None`` shards whenever a group of several ranks is initialised, ``False`` never.
            Random probes (``n_probes``) are drawn independently on each rank.
        checkpoint: a file to keep the fit's accumulators in, written atomically every
            ``checkpoint_every`` batches and after each stage. If it exists, the fit resumes
            from it (a checkpoint of another model, other sites, settings or tokens is
            refused with :class:`~tl_degen.errors.CheckpointError`); it is deleted when the
            fit completes. Under ``torch.distributed`` each rank keeps ``<checkpoint>.rank<r>``.
        checkpoint_every: batches between checkpoint writes.

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
    shards = Shards(distributed)
    with shards.step("fit_bases (checking the arguments)"):
        fit = _FitArguments.check(
            model, tokens, sites, method=method, batch_size=batch_size, center=center,
            threshold=threshold, integration=integration, n_alpha=n_alpha, dtype=dtype,
            progress=progress, n_probes=n_probes, probe_groups=probe_groups,
            target_error=target_error, max_probes=max_probes, seed=seed,
            closed_form=closed_form)
        fingerprint = fit.fingerprint(model, weights=shards.active or checkpoint is not None)
        ckpt = saved = None
        if checkpoint is not None:
            ckpt = _open_checkpoint(checkpoint, checkpoint_every, fit, fingerprint, shards)
            saved = ckpt.load()
    shards.agree("fit_bases", fingerprint)
    (n_samples,) = shards.sum_ints([sum(b.shape[0] for b in fit.batches)])
    fit.check_samples(n_samples)
    with prepared(model, None):
        probe = model_probe(fit.adapter)  # in the model's own dtype, as check_model will see it

    run = _FitRun(fit.sites, fit.batches, ckpt, saved, shards.seed(seed))
    with prepared(model, dtype), reusing_buffers():
        work = _BasisFit(fit, run, shards, n_samples)
        accs = work.activation_statistics()  # pass 1: every site's mean and Gram
        bases: dict[Site, InteractionBasis] = {}
        next_C: Tensor | None = None  # None = raw outputs (identity)
        # from the last site backwards: each LIB basis needs the next site's C (§4 step 6)
        for idx in range(len(fit.sites) - 1, -1, -1):
            site = fit.sites[idx]
            bases[site] = work.basis(idx, accs[idx], next_C)
            next_C = output_basis(bases[site])
    run.finish()
    if shards.rank == 0:
        _warn_ambiguous([bases[s] for s in fit.sites], fit.threshold)
    return BasisSet([bases[s] for s in fit.sites], config=work.config(),
                    model_signature=fit.adapter.signature(), model_probe=probe)


def _warn(message: str, category: type[Warning]) -> None:
    """``warnings.warn`` at the line that called into this module (``fit_bases``'s caller),
    however deep in the fit the helper that warns."""
    frame, level = sys._getframe(1), 2
    while frame is not None and frame.f_globals.get("__name__") == __name__:
        frame, level = frame.f_back, level + 1
    warnings.warn(message, category, stacklevel=level)


@dataclass
class _FitArguments:
    """The arguments of one :func:`fit_bases` call, checked, and what follows from them."""

    adapter: Adapter
    batches: Batches
    sites: list[Site]
    method: str
    center: bool
    threshold: Threshold
    integration: str
    alphas: list[float]
    weights: list[float]
    dtype: torch.dtype | None
    progress: bool
    n_probes: int | None
    probe_groups: int
    target_error: float | None
    max_probes: int
    seed: int
    closed_form: bool
    logit_factor: LogitFactor | None = None  # a vocabulary-scale logits site's factor space

    @classmethod
    def check(cls, model, tokens, sites, *, method: str, batch_size: int | None, center: bool,
              threshold: float | Threshold, integration: str, n_alpha: int | None,
              dtype: torch.dtype | None, progress: bool, n_probes: int | None,
              probe_groups: int, target_error: float | None, max_probes: int | None,
              seed: int, closed_form: bool) -> _FitArguments:
        """Raise on a bad argument (:class:`~tl_degen.errors.TLDegenError` and subclasses),
        and, without a ``batch_size``, when not even one sequence fits the memory budget
        beside the statistics of every site."""
        if method not in METHODS:
            raise TLDegenError(f"unknown method {method!r}; use one of {', '.join(METHODS)}")
        threshold = Threshold.coerce(threshold)
        alphas, weights = integration_rule(integration, n_alpha)
        dtype = checks.floating_dtype("dtype", dtype, statistics=True)
        batch_size = checks.integer("batch_size", batch_size, minimum=1, none=True)
        n_probes = checks.integer("n_probes", n_probes, minimum=1, none=True)
        max_probes = checks.integer("max_probes", max_probes, minimum=1, none=True)
        probe_groups = checks.integer("probe_groups", probe_groups, minimum=1)
        seed = checks.integer("seed", seed, minimum=0, maximum=2**63 - 1)
        center = checks.boolean("center", center)
        closed_form = checks.boolean("closed_form", closed_form)
        target_error = checks.number("target_error", target_error, none=True)
        if target_error is not None and (n_probes is None or not 0 < target_error < 1):
            raise TLDegenError(f"target_error={target_error!r} needs n_probes (probes per "
                               "round) and must be a fraction in (0, 1), e.g. 0.05")
        max_probes = 16 * (n_probes or 0) if max_probes is None else max_probes
        if n_probes is not None and max_probes < n_probes:
            raise TLDegenError(f"max_probes={max_probes} is below n_probes={n_probes}")
        adapter = get_adapter(model)
        checks.model(adapter.model)
        itemsize = torch.finfo(dtype or adapter.dtype).bits // 8
        batches = token_batches(tokens, batch_size, adapter, itemsize)
        site_list = _resolve_sites(adapter, sites, batches)
        factor = logit_factor(adapter) if site_list[-1].kind == "logits" else None
        if batch_size is None:
            dims = [statistics_dim(adapter, s, factor) for s in site_list]
            check_fits(adapter, max(b.shape[1] for b in batches), itemsize=itemsize,
                       reserved=statistics_bytes(dims, probe_groups if n_probes else 0),
                       reserved_for=f"the statistics of {len(site_list)} sites (the largest "
                                    f"of dimension {max(dims)})")
        return cls(adapter, batches, site_list, method, center, threshold, integration, alphas,
                   weights, dtype, progress, n_probes, probe_groups, target_error, max_probes,
                   seed, closed_form, factor)

    def check_samples(self, n_samples: int) -> None:
        """Raise :class:`~tl_degen.errors.DataError` when a centred site has fewer than two
        samples (``n_samples`` sequences, on every rank, times the site's positions): its
        mean is its one sample and every centred statistic is zero."""
        for site in self.sites:
            n = n_samples * (self.n_pos if site.positions is None else len(site.positions))
            if self.center and n < 2:
                raise DataError(
                    f"tokens: {n_samples} sequence gives {site.name} {n} sample, which cannot "
                    "be centred (its mean is itself, every centred statistic is zero); fit on "
                    "at least 2 sequences, ideally hundreds, or pass center=False")

    @property
    def n_pos(self) -> int:
        """The longest sequence."""
        return max(b.shape[1] for b in self.batches)

    @property
    def n_groups(self) -> int:
        """Probe groups of the Jacobian Grams (0 without probes)."""
        return self.probe_groups if self.n_probes else 0

    def fingerprint(self, model, *, weights: bool) -> dict:
        """What every rank, and a checkpoint, must share with this call: sites, backend,
        settings and (with ``weights``) a digest of the model's weights."""
        settings = {"method": self.method, "center": self.center,
                    "threshold": str(self.threshold), "integration": self.integration,
                    "n_alpha": len(self.alphas), "dtype": str(self.dtype),
                    "n_probes": self.n_probes, "probe_groups": self.probe_groups,
                    "seed": self.seed, "closed_form": self.closed_form, "statistics": "qr",
                    "target_error": self.target_error, "max_probes": self.max_probes}
        out = {"sites": [s.name for s in self.sites], "backend": self.adapter.backend,
               "settings": settings}
        if weights:
            out["weights"] = weights_digest(model)
        return out


def _open_checkpoint(path: str | os.PathLike, every: int, fit: _FitArguments,
                     fingerprint: dict, shards: Shards) -> FitCheckpoint:
    """This rank's checkpoint file, fingerprinted with the call, the model, this rank's
    tokens and how they are batched."""
    return FitCheckpoint(
        FitCheckpoint.for_rank(path, shards.rank, shards.world),
        {**fingerprint, "n_pos": fit.n_pos, "model": fit.adapter.signature(),
         "rank": shards.rank, "world": shards.world, "tokens": tokens_digest(fit.batches),
         "n_batches": len(fit.batches)}, every)


class _BasisFit:
    """The work of one fit in the model's working dtype: the section after each site planned
    once (into the raw logits after the last; LIB only), the batches read through one
    :class:`~tl_degen.sections.reader.BatchReader`, and the bases built site by site."""

    def __init__(self, fit: _FitArguments, run: _FitRun, shards: Shards, n_samples: int):
        self.fit, self.run, self.shards, self.n_samples = fit, run, shards, n_samples
        self.dtype = fit.adapter.dtype
        sites = fit.sites
        self.plans = [SectionPlan(fit.adapter, site, sites[idx + 1] if idx + 1 < len(sites)
                                  else Site("logits", None, site.positions),
                                  alphas=fit.alphas, weights=fit.weights,
                                  closed_form=fit.closed_form, n_probes=fit.n_probes,
                                  n_groups=fit.probe_groups, generator=run.generator)
                      for idx, site in enumerate(sites)] if fit.method == "lib" else None
        self.reader = BatchReader(fit.adapter, fit.batches, sites, self.plans and self.plans[:-1],
                                  after=self.plans and self.plans[-1])
        self.probes_spent: dict[str, int] = {}  # probes per batch, by site (target_error)

    def activation_statistics(self) -> list[MomentAccumulator]:
        """Every site's mean and Gram (§4 steps 1-2): this rank's rows, then merged over
        ranks."""
        fit = self.fit
        accs = self.run.moment_accumulators(fit.adapter, fit.logit_factor)
        with self.shards.step("fit_bases (activation statistics)"), torch.no_grad():
            for i, _ in self.run.pending("moments", desc="activation statistics",
                                         progress=self.fit.progress):
                for acc, site, x in zip(accs, fit.sites, self.reader.all(i)):
                    if site.kind == "logits" and fit.logit_factor is not None:
                        x = fit.logit_factor.coordinates(x)  # [batch, pos, r]
                    acc.update(x)
                self.run.advance("moments")
        return [self.shards.merge_moments(a) for a in accs]

    def basis(self, idx: int, acc: MomentAccumulator, next_C: Tensor | None
              ) -> InteractionBasis:
        """Site ``idx``'s basis from its statistics ``acc`` and, for LIB, the next site's
        ``C`` (``None``: the raw outputs)."""
        fit, site = self.fit, self.fit.sites[idx]
        mean, gram = acc.mean, acc.gram(fit.center)
        if site.kind == "logits" and fit.logit_factor is not None:
            return _factor_basis(site, fit.method, fit.logit_factor, mean, acc.gram(False),
                                 gram, fit.center, self.n_samples)
        if site.kind == "logits" or fit.method == "neuron":
            return _identity_basis(site, fit.method, mean, acc.gram(False),
                                   acc.gram(False) if fit.method == "neuron" else gram,
                                   fit.center, self.n_samples)
        wh = whiten(mean, acc.factor(fit.center), center=fit.center,
                    has_constant=site.has_constant, threshold=fit.threshold,
                    invariant_cut=fit.method == "lib", eps=torch.finfo(self.dtype).eps)
        dropped = Dropped(activation=wh.n_dropped, activation_cutoff=wh.cutoff,
                          activation_gap=wh.gap)
        common = dict(site=site, mean=mean, gram=gram, gram_eigenvalues=wh.all_eigenvalues,
                      dropped=dropped, center=fit.center, n_samples=self.n_samples)
        if fit.method == "pca":
            return InteractionBasis(method="pca", C=wh.W, C_pinv=wh.W_pinv,
                                    eigenvalues=wh.eigenvalues, **common)
        jacobian, error = self.jacobian_gram(idx, acc.d, next_C)
        rot = lib_rotation(wh, *jacobian.parts(), constant_first=fit.center and site.has_constant,
                           threshold=fit.threshold)
        dropped.jacobian, dropped.jacobian_cutoff, dropped.jacobian_gap = (
            rot.n_dropped, rot.cutoff, rot.gap)
        return InteractionBasis(method="lib", C=rot.C, C_pinv=rot.C_pinv,
                                eigenvalues=rot.eigenvalues, lambda_all=rot.all_eigenvalues,
                                jacobian_gram_error=error, **common)

    def jacobian_gram(self, idx: int, d: int, next_C: Tensor | None
                      ) -> tuple[GramAccumulator, float | None]:
        """Site ``idx``'s Jacobian Gram ``M′`` over every rank's batches (§4 step 4), and the
        relative standard error of its probed part (§4 step 9; ``None`` without probes): one
        pass over the batches, more while the probes miss ``target_error``."""
        fit, site = self.fit, self.fit.sites[idx]
        out_C = None if next_C is None else next_C.to(self.dtype)
        local = self.run.jacobian_accumulator(idx, d, fit.adapter.device, fit.n_groups)
        rounds = 0
        while True:
            rounds += 1
            self._jacobian_pass(idx, local, out_C, rounds)
            total = local.merged(self.shards, rounds)
            error = None if fit.n_probes is None else total.relative_error()
            if self._probes_done(site, total, error, rounds):
                break
        if total.probed:
            self.probes_spent[site.name] = rounds * fit.n_probes
        return total.total(), error

    def _jacobian_pass(self, idx: int, jac: EstimateAccumulator, out_C: Tensor | None,
                       rounds: int) -> None:
        """One pass over this rank's batches into ``jac``: every batch in the first round;
        later rounds probe again the batches whose Gram is probed (the exact ones are in)."""
        site, plan = self.fit.sites[idx], self.plans[idx]
        last = idx + 1 == len(self.fit.sites)
        stage = f"jacobian:{idx}" + (f":round{rounds}" if rounds > 1 else "")
        desc = f"LIB {site.name} → {plan.out_site.name}" + (
            f" (probes, round {rounds})" if rounds > 1 else "")
        with self.shards.step(f"fit_bases (LIB {site.name})"):
            for i, b in self.run.pending(stage, desc=desc, progress=self.fit.progress):
                x = self.reader.read(i, idx)
                y = None if last else self.reader.kept(i, idx + 1)
                if rounds == 1 or plan.gram_is_probed(b, x, out_C, y):
                    est = plan.add_jacobian_gram(b, x, out_C, jac.exact, y)
                    if est is not None:
                        jac.add_estimate(est)
                        if rounds == 1:
                            jac.add_count(x.shape[0] * x.shape[1])
                self.run.advance(stage)

    def _probes_done(self, site: Site, total: EstimateAccumulator, error: float | None,
                     rounds: int) -> bool:
        """Whether the Jacobian Gram is final: exact, within ``target_error``, or out of
        probes (then a :class:`~tl_degen.errors.ProbeErrorWarning` says how many would do)."""
        target = self.fit.target_error
        if not total.probed or target is None or error <= target:
            return True
        spent = rounds * self.fit.n_probes
        if spent < self.fit.max_probes:
            return False
        if self.shards.rank == 0:
            need = spent * (error / target) ** 2
            _warn(f"{site.name}: the relative standard error of M′ is {error:.1%} after "
                  f"{spent} probes, above target_error={target:g}; about {need:.0f} probes "
                  f"would meet it, {need / spent:.1f}× this site's probing so far (raise "
                  f"max_probes to {int(need) + 1} to spend that)", ProbeErrorWarning)
        return True

    def config(self) -> dict:
        """The :attr:`~tl_degen.basis_set.BasisSet.config` of the fitted bases."""
        fit = self.fit
        config = {"method": fit.method, "center": fit.center, "threshold": str(fit.threshold),
                  "threshold_value": fit.threshold.value, "threshold_mode": fit.threshold.mode,
                  "integration": fit.integration, "n_alpha": len(fit.alphas),
                  "dtype": str(self.dtype).replace("torch.", ""), "n_samples": self.n_samples,
                  "n_pos": fit.n_pos, "backend": fit.adapter.backend, "n_probes": fit.n_probes,
                  "probe_groups": fit.probe_groups if fit.n_probes else None, "seed": fit.seed}
        if fit.target_error is not None:
            config["target_error"] = fit.target_error
            config["probes_per_batch"] = self.probes_spent
        if self.shards.active:
            config["world_size"] = self.shards.world
        return config


#: The (sites, threshold) pairs already warned about in this process: the warning is said once.
_AMBIGUOUS_WARNED: set[tuple] = set()


def _warn_ambiguous(bases: list[InteractionBasis], threshold: Threshold) -> None:
    """Warn, once per process and set of sites, in one line, when a site's cut falls where
    its spectrum has no gap (:attr:`~tl_degen.basis.Dropped.ambiguous`); ``bases`` in site
    order. The basis repr marks those sites too."""
    ambiguous = [b.site.name for b in bases if b.dropped.ambiguous]
    key = (tuple(ambiguous), str(threshold))
    if not ambiguous or key in _AMBIGUOUS_WARNED:
        return
    _AMBIGUOUS_WARNED.add(key)
    _warn(f"no spectral gap at the threshold={threshold} cut of {len(ambiguous)} site(s) "
          f"({', '.join(ambiguous[:3])}{', ...' if len(ambiguous) > 3 else ''}): their rank "
          "depends on the threshold; pick one in a gap of bases[site].lambda_all "
          "(marked 'rank ambiguous' in repr(bases))", AmbiguousRankWarning)


class _FitRun:
    """The local (this rank's) accumulators of a fit, the batches each stage has consumed,
    and the checkpoint they are written to (every ``checkpoint.every`` batches and at the end
    of each stage). Stages: ``"moments"`` (pass 1), then ``"jacobian:<site index>"``."""

    def __init__(self, sites: list[Site], batches: list[Tensor], ckpt: FitCheckpoint | None,
                 saved: tuple[dict, dict[str, Tensor]] | None, seed: int):
        self.sites, self.batches, self.ckpt = sites, batches, ckpt
        self.progress: dict[str, int] = {}
        self.saved: dict[str, Tensor] = {}
        if saved is not None:
            self.progress, self.saved = saved
        self.accumulators: dict = {}  # every accumulator of the run, by checkpoint prefix
        self.generator = torch.Generator().manual_seed(seed)
        if "generator" in self.saved:
            self.generator.set_state(self.saved["generator"])
        self.resumed = saved is not None

    def _restore(self, prefix: str, acc):
        """Keep ``acc`` in the checkpoint as ``<prefix>.<name>`` for each tensor of its
        ``state()``, loading the saved ones first."""
        saved = {k[len(prefix) + 1:]: t for k, t in self.saved.items()
                 if k.startswith(prefix + ".")}
        if saved:
            acc.load_state(saved)
        self.accumulators[prefix] = acc
        return acc

    def moment_accumulators(self, adapter, factor: LogitFactor | None = None
                            ) -> list[MomentAccumulator]:
        return [self._restore(f"moments.{i}", MomentAccumulator(
                    statistics_dim(adapter, s, factor), name=s.name,
                    has_constant=s.has_constant, device=adapter.device))
                for i, s in enumerate(self.sites)]

    def jacobian_accumulator(self, idx: int, d: int, device, n_groups: int
                             ) -> EstimateAccumulator:
        """Site ``idx``'s Jacobian Gram: exact rows and blocks, and ``n_groups`` probe sums."""
        return self._restore(f"jacobian.{idx}", EstimateAccumulator(
            GramAccumulator(d, name=self.sites[idx].name, device=device), n_groups))

    def pending(self, stage: str, *, desc: str, progress: bool | RunBar
                ) -> Iterator[tuple[int, Tensor]]:
        """``(index, batch)`` of the batches of ``stage`` not yet done (all of them without a
        checkpoint). A stage of more probes (``:round``) is work a :class:`RunBar` did not
        expect."""
        done = self.progress.setdefault(stage, 0)
        bar = stage_bar(progress, len(self.batches), desc, done, expected=":round" not in stage)
        try:
            for i in range(done, len(self.batches)):
                yield i, self.batches[i]
                bar.update()
        finally:
            bar.close()
        if self.ckpt is not None and self.progress[stage] == len(self.batches) and done < len(
                self.batches):
            self._write()

    def advance(self, stage: str) -> None:
        self.progress[stage] += 1
        if self.ckpt is not None and self.progress[stage] % self.ckpt.every == 0 and \
                self.progress[stage] < len(self.batches):
            self._write()

    def _write(self) -> None:
        tensors = {f"{prefix}.{name}": t for prefix, acc in self.accumulators.items()
                   for name, t in acc.state().items()}
        self.ckpt.save(dict(self.progress), {**tensors, "generator": self.generator.get_state()})

    def finish(self) -> None:
        """The fit is complete: its checkpoint has served and is removed."""
        if self.ckpt is not None:
            self.ckpt.remove()


def _factor_basis(site: Site, method: str, factor: LogitFactor, mean: Tensor, raw_gram: Tensor,
                  gram: Tensor, center: bool, n_samples: int) -> InteractionBasis:
    """The logits of a large vocabulary, unrotated: ``C = Q`` (``[V, r]``), ``C⁺ = Qᵀ``, the
    statistics (``mean`` and Grams, ``[r]`` and ``[r, r]``) of their factor-space
    coordinates ``y Q`` (:mod:`tl_degen.sections.unembed`). The basis' ``mean`` is the
    logits' own (``[V]``); its ``gram`` stays in coordinates (:class:`InteractionBasis`)."""
    Q = factor.Q.to(mean.device)
    return InteractionBasis(site=site, method=method, C=Q, C_pinv=Q.T,
                            eigenvalues=raw_gram.diagonal().clone(), mean=mean @ Q.T,
                            gram=gram, gram_eigenvalues=torch.linalg.eigvalsh(gram).abs().sort(
                                descending=True).values,
                            dropped=Dropped(), center=center and method != "neuron",
                            n_samples=n_samples)


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
