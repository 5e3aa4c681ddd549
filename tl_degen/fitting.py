"""``fit_bases`` and ``site_activations``: model + tokens → statistics → bases.

Data flows one way (DESIGN.md §7): one forward pass per batch accumulates the mean and Gram
of every site (:class:`~tl_degen.sections.reader.BatchReader`: the sites after the first through
the sections' formulas where all are closed forms, the activations kept for the Jacobian
passes while they fit); the bases are then built from the last site backwards, because each
LIB basis needs the next site's ``C`` (§4 step 6).
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Iterable, Iterator, Mapping, Sequence

import torch
from jaxtyping import Float, Int
from torch import Tensor
from tqdm.auto import tqdm

from tl_degen.adapters import Adapter, get_adapter
from tl_degen.basis import (
    AMBIGUOUS_GAP,
    METHODS,
    Dropped,
    InteractionBasis,
    Threshold,
    lib_rotation,
    whiten,
)
from tl_degen.basis_set import BasisSet, model_probe
from tl_degen.checkpoint import FitCheckpoint
from tl_degen.distributed import Shards, tokens_digest, weights_digest
from tl_degen.errors import AmbiguousRankWarning, DataError, ProbeErrorWarning, TLDegenError
from tl_degen.memory import auto_batch_size, check_fits, statistics_bytes
from tl_degen.model_state import prepared
from tl_degen.sections.plan import SectionPlan
from tl_degen.sections.reader import BatchReader
from tl_degen.sections.rules import integration_rule
from tl_degen.sites import Site, check_forward_order, parse_sites
from tl_degen.stats import EstimateAccumulator, GramAccumulator, MomentAccumulator

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
    if batch_size is not None and (not isinstance(batch_size, int) or batch_size < 1):
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
        chunks = [torch.as_tensor(t) for t in tokens]
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
    progress: bool = True,
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
        progress: show progress bars.
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
        if method not in METHODS:
            raise TLDegenError(f"unknown method {method!r}; use one of {', '.join(METHODS)}")
        threshold = Threshold.coerce(threshold)
        alphas, weights = integration_rule(integration, n_alpha)
        if target_error is not None and (n_probes is None or not 0 < target_error < 1):
            raise TLDegenError(f"target_error={target_error!r} needs n_probes (probes per "
                               "round) and must be a fraction in (0, 1), e.g. 0.05")
        max_probes = 16 * (n_probes or 0) if max_probes is None else int(max_probes)
        if n_probes is not None and max_probes < n_probes:
            raise TLDegenError(f"max_probes={max_probes} is below n_probes={n_probes}")
        adapter = get_adapter(model)
        itemsize = torch.finfo(dtype or adapter.dtype).bits // 8
        batches = token_batches(tokens, batch_size, adapter, itemsize)
        n_pos = max(b.shape[1] for b in batches)
        site_list = _resolve_sites(adapter, sites, batches)
        if batch_size is None:
            dims = [adapter.site_dim(s) + int(s.has_constant) for s in site_list]
            check_fits(adapter, n_pos, itemsize=itemsize, reserved=statistics_bytes(
                dims, probe_groups if n_probes else 0), reserved_for=(
                f"the statistics of {len(site_list)} sites (the largest of dimension "
                f"{max(dims)})"))
        settings = {"method": method, "center": center, "threshold": str(threshold),
                    "integration": integration, "n_alpha": len(alphas),
                    "dtype": str(dtype), "n_probes": n_probes, "probe_groups": probe_groups,
                    "seed": seed, "closed_form": closed_form, "statistics": "qr",
                    "target_error": target_error, "max_probes": max_probes}
        fingerprint = {"sites": [s.name for s in site_list], "backend": adapter.backend,
                       "settings": settings}
        if shards.active or checkpoint is not None:
            fingerprint["weights"] = weights_digest(model)
        ckpt = None
        if checkpoint is not None:
            ckpt = FitCheckpoint(
                FitCheckpoint.for_rank(checkpoint, shards.rank, shards.world),
                {**fingerprint, "n_pos": n_pos, "model": adapter.signature(),
                 "rank": shards.rank,
                 "world": shards.world, "tokens": tokens_digest(batches),
                 "n_batches": len(batches)}, checkpoint_every)
            saved = ckpt.load()
    shards.agree("fit_bases", fingerprint)
    n_local = sum(b.shape[0] for b in batches)
    (n_samples,) = shards.sum_ints([n_local])
    with prepared(model, None):
        probe = model_probe(adapter)  # in the model's own dtype, as check_model will see it

    run = _FitRun(site_list, batches, ckpt, saved if ckpt is not None else None,
                  shards.seed(seed))
    with prepared(model, dtype):
        work_dtype = adapter.dtype
        # the section after each site (into the raw logits after the last), planned once
        plans = [SectionPlan(adapter, site, site_list[idx + 1] if idx + 1 < len(site_list)
                             else Site("logits", None, site.positions),
                             alphas=alphas, weights=weights, closed_form=closed_form,
                             n_probes=n_probes, n_groups=probe_groups, generator=run.generator)
                 for idx, site in enumerate(site_list)] if method == "lib" else None
        reader = BatchReader(adapter, batches, site_list, plans and plans[:-1],
                             after=plans and plans[-1])
        # ---- pass 1: means and Grams of every site (local rows, then merged over ranks)
        accs = run.moment_accumulators(adapter)
        with shards.step("fit_bases (activation statistics)"), torch.no_grad():
            for i, _ in run.pending("moments", desc="activation statistics",
                                    progress=progress):
                for acc, x in zip(accs, reader.all(i)):
                    acc.update(x)
                run.advance("moments")
        accs = [shards.merge_moments(a) for a in accs]

        bases: dict[Site, InteractionBasis] = {}
        probes_spent: dict[str, int] = {}  # probes per batch, by site (target_error)
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
            wh = whiten(mean, acc.factor(center), center=center, has_constant=site.has_constant,
                        threshold=threshold, invariant_cut=method == "lib",
                        eps=torch.finfo(work_dtype).eps)
            dropped = Dropped(activation=wh.n_dropped, activation_cutoff=wh.cutoff,
                              activation_gap=wh.gap)
            if method == "pca":
                bases[site] = InteractionBasis(
                    site=site, method="pca", C=wh.W, C_pinv=wh.W_pinv, eigenvalues=wh.eigenvalues,
                    mean=mean, gram=gram, gram_eigenvalues=wh.all_eigenvalues, dropped=dropped,
                    center=center, n_samples=n_samples)
                continue
            plan = plans[idx]
            out_site = plan.out_site
            out_C = None if next_C is None else next_C.to(work_dtype)
            jac = run.jacobian_accumulator(idx, acc.d, adapter.device,
                                           probe_groups if n_probes else 0)
            rounds = 0
            while True:  # one pass over the batches; more while the probes miss target_error
                rounds += 1
                stage = f"jacobian:{idx}" + (f":round{rounds}" if rounds > 1 else "")
                with shards.step(f"fit_bases (LIB {site.name})"):
                    desc = f"LIB {site.name} → {out_site.name}" + (
                        f" (probes, round {rounds})" if rounds > 1 else "")
                    for i, b in run.pending(stage, desc=desc, progress=progress):
                        x = reader.read(i, idx)
                        y = reader.kept(i, idx + 1) if idx + 1 < len(site_list) else None
                        # later rounds probe again; exact batches are in after the first
                        if rounds == 1 or plan.gram_is_probed(b, x, out_C, y):
                            est = plan.add_jacobian_gram(b, x, out_C, jac.exact, y)
                            if est is not None:
                                jac.add_estimate(est)
                                if rounds == 1:
                                    jac.add_count(x.shape[0] * x.shape[1])
                        run.advance(stage)
                total = jac.merged(shards, rounds)
                probed = total.probed
                error = None if n_probes is None else total.relative_error()
                if not probed or target_error is None or error <= target_error:
                    break
                if rounds * n_probes >= max_probes:
                    if shards.rank == 0:
                        need = rounds * n_probes * (error / target_error) ** 2
                        warnings.warn(
                            f"{site.name}: the relative standard error of M′ is {error:.1%} "
                            f"after {rounds * n_probes} probes, above target_error="
                            f"{target_error:g}; about {need:.0f} probes would meet it, "
                            f"{need / (rounds * n_probes):.1f}× this site's probing so far "
                            f"(raise max_probes to {int(need) + 1} to spend that)",
                            ProbeErrorWarning, stacklevel=2)
                    break
            if probed:
                probes_spent[site.name] = rounds * n_probes
            rot = lib_rotation(wh, *total.total().parts(), constant_first=constant_first,
                               threshold=threshold)
            dropped.jacobian, dropped.jacobian_cutoff, dropped.jacobian_gap = (
                rot.n_dropped, rot.cutoff, rot.gap)
            bases[site] = InteractionBasis(
                site=site, method="lib", C=rot.C, C_pinv=rot.C_pinv, eigenvalues=rot.eigenvalues,
                mean=mean, gram=gram, gram_eigenvalues=wh.all_eigenvalues, dropped=dropped,
                center=center, n_samples=n_samples, lambda_all=rot.all_eigenvalues,
                jacobian_gram_error=error)
            next_C = rot.C
    run.finish()
    ambiguous = [f"{s.name} ({bases[s].dropped.gap:.2g}×)" for s in site_list
                 if bases[s].dropped.ambiguous]
    if ambiguous and shards.rank == 0:
        warnings.warn(
            f"no spectral gap at the cut of {', '.join(ambiguous)}: the eigenvalues on the two "
            f"sides of the threshold ({threshold}) lie within a factor {AMBIGUOUS_GAP:g} of "
            "each other, so the number of kept directions there depends on the threshold, not "
            "only on the model and the data, and so do the Λ of the sites before it "
            "(bases[site].dropped.gap). A threshold in a gap of bases[site].lambda_all makes "
            "the rank a property of the model and the data", AmbiguousRankWarning, stacklevel=2)

    config = {"method": method, "center": center, "threshold": str(threshold),
              "threshold_value": threshold.value, "threshold_mode": threshold.mode,
              "integration": integration, "n_alpha": len(alphas),
              "dtype": str(work_dtype).replace("torch.", ""), "n_samples": n_samples,
              "n_pos": n_pos, "backend": adapter.backend, "n_probes": n_probes,
              "probe_groups": probe_groups if n_probes else None, "seed": seed}
    if target_error is not None:
        config["target_error"] = target_error
        config["probes_per_batch"] = probes_spent
    if shards.active:
        config["world_size"] = shards.world
    return BasisSet([bases[s] for s in site_list], config=config,
                    model_signature=adapter.signature(), model_probe=probe)


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

    def moment_accumulators(self, adapter) -> list[MomentAccumulator]:
        return [self._restore(f"moments.{i}", MomentAccumulator(
                    adapter.site_dim(s) + int(s.has_constant), name=s.name,
                    has_constant=s.has_constant, device=adapter.device))
                for i, s in enumerate(self.sites)]

    def jacobian_accumulator(self, idx: int, d: int, device, n_groups: int
                             ) -> EstimateAccumulator:
        """Site ``idx``'s Jacobian Gram: exact rows and blocks, and ``n_groups`` probe sums."""
        return self._restore(f"jacobian.{idx}", EstimateAccumulator(
            GramAccumulator(d, name=self.sites[idx].name, device=device), n_groups))

    def pending(self, stage: str, *, desc: str, progress: bool) -> Iterator[tuple[int, Tensor]]:
        """``(index, batch)`` of the batches of ``stage`` not yet done (all of them without a
        checkpoint)."""
        done = self.progress.setdefault(stage, 0)
        bar = tqdm(total=len(self.batches), initial=done, desc=desc, disable=not progress)
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
