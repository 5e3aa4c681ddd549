"""The effective parameter count (paper §2): ``N_eff = 2λ`` of the behavioural loss.

The behavioural loss of parameters ``w`` near the trained ``w*`` is

    L_B(w) = (1/n) Σ_x D(f_w(x), f_w*(x)),

the mean divergence ``D`` of the model's outputs from the trained model's outputs on the data
(``"kl"``: KL(softmax f_w* ‖ softmax f_w) summed over the vocabulary; ``"mse"``: the squared
logit difference summed over the vocabulary), averaged over the chosen positions of every
sequence and over the ``n`` sequences (``n`` counts sequences, not positions: comparing more
positions averages the divergence, it does not scale ``nβ``).
``L_B(w*) = 0`` and ``L_B ≥ 0``. Its local learning coefficient λ is the exponent of the
volume ``V(ε) ~ ε^λ`` of ``{w near w* : L_B(w) < ε}``; a regular (non-degenerate) minimum of
``d`` parameters has ``λ = d/2``, so ``N_eff = 2λ`` counts the parameter directions the
function really uses on the data. Dead units, exact symmetries and flat directions add
parameters but not λ.

λ is estimated as devinterp does (Lau et al. 2023): sample the localised tempered posterior
``p(w) ∝ exp(−nβ·L_B(w) − γ/2·‖w − w*‖²)`` with SGLD (devinterp's ``SGMCMC.sgld``), and take
``λ̂ = nβ·(E_w[L_B(w)] − L_B(w*))``. The estimate is per chain; the reported value is the mean
over chains and its standard error the spread across chains over ``√chains``.
"""

from __future__ import annotations

import math
import numbers
import operator
import time
import warnings
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import torch
from jaxtyping import Float, Int
from torch import Tensor
from tqdm.auto import tqdm

from tl_degen.adapters import get_adapter
from tl_degen.errors import DataError, LongRunWarning, TLDegenError, UnknownKeyError
from tl_degen.fitting import token_batches
from tl_degen.io import Serialisable, as_tensor
from tl_degen.model_state import prepared

__all__ = ["effective_parameters", "EffectiveParameters", "LLCEstimate", "parameter_groups"]

DIVERGENCES = ("kl", "mse")


@dataclass
class LLCEstimate(Serialisable):
    """λ of the behavioural loss for one parameter group, with the sampler's diagnostics.

    Attributes:
        group: the group's name (``"model"``, ``"blocks.0"``, ``"blocks.0.mlp"``, ...).
        n_params: parameters in the group (all of them are sampled; the rest stay at ``w*``).
        llc: λ̂, the mean over chains of ``nβ·(mean draw loss − loss at w*)``.
        llc_se: standard error of λ̂ (standard deviation across chains / √chains).
        llc_per_chain: ``[chains]`` λ̂ of each chain.
        loss_trace: ``[chains, draws]`` behavioural loss at each draw (after burn-in).
        r_hat: split-R̂ of the loss traces (Gelman–Rubin); near 1 when the chains agree and
            have settled, above 1.1 when they have not. The traces are minibatch losses, whose
            noise makes R̂ less sensitive to slow drifts: look at ``loss_trace`` too.
        warnings: what the diagnostics found wrong, in words (empty when nothing did).

    ``to_dict()`` gives the constructor's arguments, the attributes above:
    ``{"group", "n_params", "llc", "llc_se", "llc_per_chain": [...], "loss_trace": tensor,
    "r_hat", "warnings": [...]}``; ``from_dict`` / ``save`` / ``load`` round-trip it
    (:class:`tl_degen.io.Serialisable`).
    """

    group: str
    n_params: int
    llc: float
    llc_se: float
    llc_per_chain: list[float]
    loss_trace: Float[Tensor, "chains draws"]
    r_hat: float
    warnings: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        """The constructor's arguments: plain Python and tensors (class docstring)."""
        return {"group": self.group, "n_params": self.n_params, "llc": self.llc,
                "llc_se": self.llc_se, "llc_per_chain": list(self.llc_per_chain),
                "loss_trace": self.loss_trace, "r_hat": self.r_hat,
                "warnings": list(self.warnings)}

    @classmethod
    def from_dict(cls, d: dict) -> LLCEstimate:
        """Rebuild from :meth:`to_dict` (the loss trace may also be nested lists)."""
        return cls(**{**d, "llc_per_chain": list(d["llc_per_chain"]),
                      "loss_trace": as_tensor(d["loss_trace"]),
                      "warnings": list(d.get("warnings", []))})

    @property
    def n_eff(self) -> float:
        """``N_eff = 2λ``: the number of parameters the function uses on the data."""
        return 2 * self.llc

    @property
    def n_eff_se(self) -> float:
        return 2 * self.llc_se

    def __repr__(self) -> str:
        return (
            f"LLCEstimate({self.group}: λ = {self.llc:.4g} ± {self.llc_se:.2g}, "
            f"N_eff = {self.n_eff:.4g} of {self.n_params} parameters, R̂ = {self.r_hat:.3f}"
            + (f", {len(self.warnings)} warning(s)" if self.warnings else "")
            + ")"
        )


@dataclass
class EffectiveParameters(Serialisable):
    """Effective parameter counts per group: ``report["blocks.0"].n_eff``, ``print(report)``.

    ``to_dict()`` gives the constructor's arguments, ``{"estimates": {group:
    LLCEstimate.to_dict()}, "config": {...}}``; ``from_dict`` / ``save`` / ``load`` round-trip
    it (:class:`tl_degen.io.Serialisable`). :meth:`as_dict` is a JSON summary (estimates as a
    list, with ``n_eff``; loss traces as lists).

    Examples:
        >>> neff = tl_degen.effective_parameters(model, tokens, params=["model", "blocks.0"])
        >>> neff["model"].n_eff, neff["model"].n_eff_se, neff["model"].n_params
        >>> print(neff)  # a table: group, parameters, λ, N_eff ± se, R̂
    """

    estimates: dict[str, LLCEstimate]
    config: dict = field(default_factory=dict)

    def __getitem__(self, group: str) -> LLCEstimate:
        if group not in self.estimates:
            raise UnknownKeyError(f"no group {group!r}; this report has {list(self.estimates)}")
        return self.estimates[group]

    def __iter__(self):
        return iter(self.estimates.values())

    def to_dict(self) -> dict:
        """The constructor's arguments: plain Python and tensors (class docstring)."""
        return {"estimates": {k: e.to_dict() for k, e in self.estimates.items()},
                "config": dict(self.config)}

    @classmethod
    def from_dict(cls, d: dict) -> EffectiveParameters:
        """Rebuild from :meth:`to_dict`."""
        return cls({k: LLCEstimate.from_dict(e) for k, e in d["estimates"].items()},
                   dict(d.get("config") or {}))

    def as_dict(self) -> dict:
        """Plain lists and numbers (JSON-serialisable), loss traces included."""
        return {
            "estimates": [
                {
                    "group": e.group,
                    "n_params": e.n_params,
                    "llc": e.llc,
                    "llc_se": e.llc_se,
                    "n_eff": e.n_eff,
                    "n_eff_se": e.n_eff_se,
                    "llc_per_chain": list(e.llc_per_chain),
                    "r_hat": e.r_hat,
                    "warnings": list(e.warnings),
                    "loss_trace": e.loss_trace.tolist(),
                }
                for e in self.estimates.values()
            ],
            "config": dict(self.config),
        }

    def table(self) -> str:
        w = max([len(g) for g in self.estimates] + [5])
        head = (
            f"{'group':<{w}}  {'parameters':>10}  {'λ':>9}  {'N_eff':>9}  {'± se':>7}  "
            f"{'N_eff/param':>11}  {'R̂':>5}"
        )
        rows = [head, "-" * len(head)]
        for e in self.estimates.values():
            rows.append(
                f"{e.group:<{w}}  {e.n_params:>10}  {e.llc:>9.4g}  {e.n_eff:>9.4g}  "
                f"{e.n_eff_se:>7.2g}  {e.n_eff / e.n_params:>11.4f}  {e.r_hat:>5.2f}"
                + ("  !" if e.warnings else "")
            )
        notes = [f"{e.group}: {w_}" for e in self.estimates.values() for w_ in e.warnings]
        return "\n".join(rows + ([""] + notes if notes else []))

    def __repr__(self) -> str:
        cfg = ", ".join(
            f"{k}={v}"
            for k, v in self.config.items()
            if k in ("divergence", "nbeta", "lr", "localization", "num_chains", "num_draws", "seed")
        )
        return f"EffectiveParameters({cfg})\n{self.table()}"


def parameter_groups(
    model, groups: str | Sequence[str] | Mapping[str, Sequence[str]] | None
) -> dict[str, list[torch.nn.Parameter]]:
    """Resolve group names to the model's parameters.

    A name is ``"model"`` (every parameter), a submodule path as TransformerLens users write it
    (``"blocks.0"``, ``"blocks.0.attn"``, ``"blocks.0.mlp"``, ``"embed"``, ``"unembed"``; the
    same on a ``TransformerBridge`` and a ``HookedTransformer``), or a prefix of parameter
    names. A mapping ``{label: [names...]}`` makes one group of several.

    Examples:
        >>> groups = tl_degen.parameter_groups(model, ["blocks.0.attn", "blocks.0.mlp"])
        >>> {g: sum(p.numel() for p in ps) for g, ps in groups.items()}
    """
    if groups is None:
        groups = "model"
    if isinstance(groups, str):
        groups = [groups]
    if not isinstance(groups, (Mapping, list, tuple)):
        raise TLDegenError(f"params must be 'model', a list of module names or a dict of "
                           f"group → names, got {type(groups).__name__}")
    if not isinstance(groups, Mapping):
        groups = {g: [g] for g in groups}
    named = dict(model.named_parameters())
    out: dict[str, list[torch.nn.Parameter]] = {}
    for label, names in groups.items():
        if isinstance(names, str):
            names = [names]
        if not isinstance(names, (list, tuple)):
            raise TLDegenError(f"parameter group {label!r} must name modules or parameters, "
                               f"got {names!r}")
        picked: dict[int, torch.nn.Parameter] = {}
        for name in names:
            if not isinstance(name, str):
                raise TLDegenError(f"parameter group names are strings, got {name!r}")
            if name == "model":
                found = list(model.parameters())
            else:
                try:
                    found = list(model.get_submodule(name).parameters())
                except AttributeError:
                    found = [p for n, p in named.items() if n == name or n.startswith(name + ".")]
            if not found:
                blocks = sorted(
                    {".".join(n.split(".")[:2]) for n in named if n.startswith("blocks.")}
                )
                raise TLDegenError(
                    f"no parameters in group {name!r}; use 'model', a submodule such as "
                    f"{', '.join(blocks[:2] + ['blocks.0.attn', 'blocks.0.mlp', 'unembed'])}, or "
                    "a prefix of model.named_parameters()"
                )
            for p in found:
                picked[id(p)] = p
        if not picked:
            raise TLDegenError(f"parameter group {label!r} is empty; name at least one submodule")
        out[str(label)] = list(picked.values())
    if not out:
        raise TLDegenError("no parameter groups given; use 'model' or a list of group names")
    return out


def _positions(positions, n_pos: int) -> list[int]:
    if positions is None or (isinstance(positions, str) and positions == "all"):
        return list(range(n_pos))
    if isinstance(positions, str):
        if positions == "last":
            return [n_pos - 1]
        raise TLDegenError("positions must be 'all', 'last' or a list of integers")
    try:
        raw = [operator.index(p) for p in positions]
    except TypeError:
        raise TLDegenError("positions must be 'all', 'last' or a list of integers") from None
    if not raw or any(not -n_pos <= p < n_pos for p in raw):
        raise TLDegenError(f"positions {raw} out of range for {n_pos} positions")
    pos = [p % n_pos for p in raw]
    if len(set(pos)) != len(pos):
        raise TLDegenError(f"positions {raw} name a position twice; list each once")
    return pos


def _is_real(value) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)


def _divergence(kind: str, logits: Tensor, ref: Tensor) -> Tensor:
    """Per-row divergence ``[rows]`` of ``logits`` from the reference outputs (float32+)."""
    logits = logits.float() if logits.dtype in (torch.float16, torch.bfloat16) else logits
    ref = ref.to(logits.dtype)
    if kind == "mse":
        return (logits - ref).square().sum(-1)
    ref_logp = ref.log_softmax(-1)
    return (ref_logp.exp() * (ref_logp - logits.log_softmax(-1))).sum(-1)


def _split_r_hat(trace: Tensor) -> float:
    """Split-R̂ (Gelman et al.) of ``[chains, draws]`` traces."""
    n = trace.shape[1] // 2
    if n < 2:
        return float("nan")
    halves = torch.cat([trace[:, :n], trace[:, n : 2 * n]]).double()
    w = halves.var(1).mean()
    b = n * halves.mean(1).var()
    if w <= 0:
        return float("nan") if b > 0 else 1.0
    var = (n - 1) / n * w + b / n
    return float((var / w).sqrt())


def effective_parameters(
    model,
    tokens: Int[Tensor, "batch pos"] | Iterable[Tensor],
    params: str | Sequence[str] | Mapping[str, Sequence[str]] | None = "model",
    *,
    divergence: str = "kl",
    positions: str | Sequence[int] = "all",
    nbeta: float | None = None,
    lr: float = 5e-5,
    localization: float = 100.0,
    num_chains: int = 4,
    num_draws: int = 200,
    num_burnin_steps: int = 400,
    batch_size: int = 64,
    seed: int = 0,
    progress: bool = True,
) -> EffectiveParameters:
    """Estimate λ and ``N_eff = 2λ`` of the behavioural loss (module docstring) per group.

    Args:
        model: a ``TransformerBridge`` or ``HookedTransformer``. Its weights are ``w*``; they
            are perturbed during sampling and restored exactly afterwards (with their
            ``requires_grad`` flags and ``.grad``). Float16/bfloat16 models are sampled in
            float32.
        tokens: ``[batch, pos]`` token ids (or an iterable of batches of one length): the data
            of the behavioural loss; ``n`` is the number of sequences.
        params: the parameter groups (:func:`parameter_groups`): ``"model"``, ``"blocks.0"``,
            ``"blocks.0.attn"``, ``"blocks.0.mlp"``, a list of such names, or a mapping
            ``{label: [names]}``. Each group is sampled on its own, the rest held at ``w*``.
        divergence: ``"kl"`` (output distributions) or ``"mse"`` (logits).
        positions: ``"all"``, ``"last"`` or a list of positions at which outputs are compared.
        nbeta: the inverse temperature ``nβ``; default ``n / log n`` with ``n`` the number of
            sequences (Watanabe's WBIC temperature; devinterp's ``default_nbeta`` uses the
            batch size instead).
        lr: SGLD step size ε. The default is calibrated on the shipped modular-addition model
            and the test architectures (docs: "Effective parameters"); lower it when the
            diagnostics warn of a diverging chain or of negative λ̂, raise it when R̂ > 1.1.
        localization: γ, the pull towards ``w*``.
        num_chains: independent chains (the standard error is their spread).
        num_draws: draws per chain after burn-in (one SGLD step per draw).
        num_burnin_steps: SGLD steps per chain before the first draw.
        batch_size: sequences per SGLD step (the gradient of ``L_B`` is estimated on them);
            ``None`` or ≥ n: full batch.
        seed: seed of the minibatches and the Langevin noise: on the CPU the same seed gives
            the same result bit for bit (on CUDA some backward kernels are not deterministic).
        progress: a progress bar with an ETA over all SGLD steps.

    Returns:
        :class:`EffectiveParameters`: one :class:`LLCEstimate` per group.

    Warns:
        UserWarning: when chains disagree or have not settled (R̂ > 1.1), when a chain
            diverges (non-finite loss), or when λ̂ < 0 (the step size is too large, or ``w*``
            is not a minimum of the behavioural loss).
        LongRunWarning: after the first SGLD step, when all the steps asked for are
            estimated to take longer than :data:`LONG_RUN_SECONDS`. Each step is a forward
            and backward pass of the whole model on ``batch_size`` sequences (a group's
            chain also runs the blocks upstream of it: a bridge cannot start mid-model), so
            on a CPU a language model takes hours at the defaults; a GPU, fewer steps or a
            smaller ``batch_size`` are the ways out.

    Examples:
        >>> neff = tl_degen.effective_parameters(model, tokens, ["model", "blocks.0.mlp"],
        ...                                      positions="last")
        >>> neff["model"].n_eff, neff["model"].n_eff_se
    """
    try:
        from devinterp.optim import SGMCMC
    except ImportError:  # pragma: no cover - the dependency is declared
        raise TLDegenError(
            "effective_parameters needs devinterp 2 (Python >= 3.11): pip install 'devinterp>=2,<3'"
        ) from None
    if divergence not in DIVERGENCES:
        raise TLDegenError(f"unknown divergence {divergence!r}; use one of {DIVERGENCES}")
    for name, value in (("num_chains", num_chains), ("num_draws", num_draws)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise TLDegenError(f"{name} must be a positive integer, got {value!r}")
    if num_chains < 2:
        warnings.warn("num_chains=1 gives no standard error (reported as NaN)", stacklevel=2)
    if (
        not isinstance(num_burnin_steps, int)
        or isinstance(num_burnin_steps, bool)
        or (num_burnin_steps < 0)
    ):
        raise TLDegenError("num_burnin_steps must be a non-negative integer")
    for name, value in (("lr", lr), ("localization", localization)):
        if not (_is_real(value) and value >= 0):
            raise TLDegenError(f"{name} must be a finite non-negative number, got {value!r}")
    if lr == 0:
        raise TLDegenError("lr must be positive")

    adapter = get_adapter(model)
    batches = token_batches(tokens, 1 << 30, adapter)
    if len({b.shape[1] for b in batches}) > 1:
        raise DataError("effective_parameters needs prompts of one length (its loss compares "
                        "fixed positions); pass a [batch, pos] tensor")
    data = torch.cat(batches)
    n = data.shape[0]
    if n < 2:
        raise DataError("the behavioural loss needs at least 2 sequences")
    pos = _positions(positions, data.shape[1])
    if nbeta is None:
        nbeta = n / math.log(n)
    if not (_is_real(nbeta) and nbeta > 0):
        raise TLDegenError(f"nbeta must be positive, got {nbeta!r}")
    from tl_degen import checks

    bs = n if batch_size is None else min(checks.integer("batch_size", batch_size, minimum=1), n)
    checks.integer("seed", seed, minimum=0, maximum=2**40)
    groups = parameter_groups(model, params)
    for label, group in groups.items():
        if any(p.device != data.device for p in group):
            raise TLDegenError(
                f"group {label!r} has parameters on several devices; effective_parameters "
                f"samples on the model's device ({data.device}) only"
            )
    # SGLD steps of ~lr·nβ·grad/2 round away in float16/bfloat16: sample in float32 then
    half = any(p.dtype in (torch.float16, torch.bfloat16) for p in model.parameters())

    total = len(groups) * num_chains * (num_burnin_steps + num_draws)
    bar = tqdm(total=total, desc="SGLD", disable=not progress, unit="step")
    estimates: dict[str, LLCEstimate] = {}
    with prepared(model, torch.float32 if half else None):
        with torch.no_grad():
            ref = torch.cat([model(b)[:, pos] for b in data.split(max(bs, 256))]).detach()
        if not torch.isfinite(ref).all():
            raise DataError("the model's outputs on these tokens contain NaN/Inf")

        def loss_on(idx: Tensor) -> Tensor:
            return _divergence(divergence, model(data[idx])[:, pos], ref[idx]).mean()

        def full_loss() -> float:
            with torch.no_grad():
                chunks = torch.arange(n, device=data.device).split(max(bs, 256))
                return sum(float(loss_on(c)) * len(c) for c in chunks) / n

        config = {
            "divergence": divergence,
            "positions": positions if isinstance(positions, str) else list(pos),
            "nbeta": nbeta,
            "lr": lr,
            "localization": localization,
            "num_chains": num_chains,
            "num_draws": num_draws,
            "num_burnin_steps": num_burnin_steps,
            "batch_size": bs,
            "n_samples": n,
            "seed": seed,
            "init_loss": full_loss(),  # 0 up to rounding; subtracted as devinterp does
        }
        step_shape = f"{bs} sequences × {data.shape[1]} tokens"
        run = dict(config, _announce=lambda sec: _announce_cost(sec, total, step_shape))
        try:
            for label, group in groups.items():
                bar.set_description(f"SGLD {label}")
                estimates[label] = _sample_group(group, label, loss_on, run, SGMCMC, bar)
        finally:
            bar.close()
    for e in estimates.values():
        for w in e.warnings:
            warnings.warn(f"effective_parameters[{e.group}]: {w}", stacklevel=2)
    return EffectiveParameters(estimates, config)


#: ``effective_parameters`` warns after its first step when the whole run is estimated to
#: take longer than this many seconds.
LONG_RUN_SECONDS = 600.0


def _announce_cost(seconds: float, total_steps: int, step_shape: str) -> None:
    estimate = seconds * total_steps
    if estimate > LONG_RUN_SECONDS:
        warnings.warn(
            f"effective_parameters: {total_steps} SGLD steps take about {estimate / 60:.0f} min "
            f"here ({seconds:.2f} s per step: a forward and backward pass on {step_shape}); "
            "lower num_chains, num_burnin_steps, num_draws or batch_size, or run on a GPU",
            LongRunWarning, stacklevel=4)


def _sample_group(group, label, loss_on, cfg: dict, SGMCMC, bar) -> LLCEstimate:
    """Run ``num_chains`` SGLD chains over ``group`` and reduce them to an :class:`LLCEstimate`."""
    n, bs, seed, nbeta = cfg["n_samples"], cfg["batch_size"], cfg["seed"], cfg["nbeta"]
    num_chains, num_draws, num_burnin = cfg["num_chains"], cfg["num_draws"], cfg["num_burnin_steps"]
    device = group[0].device
    saved = [p.detach().clone() for p in group]
    saved_grads = [p.grad for p in group]
    traces = torch.full((num_chains, num_draws), float("nan"), dtype=torch.float64)
    notes: list[str] = []
    try:
        for p in group:
            p.requires_grad_(True)
        for chain in range(num_chains):
            data_gen = torch.Generator().manual_seed(seed * 1_000_003 + 2 * chain)
            noise_gen = torch.Generator(device=device).manual_seed(seed * 1_000_003 + 2 * chain + 1)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                opt = SGMCMC.sgld(
                    group, lr=cfg["lr"], nbeta=nbeta, localization=cfg["localization"]
                )
            order = torch.randperm(n, generator=data_gen)
            cursor = 0
            started = time.perf_counter()
            for step in range(num_burnin + num_draws):
                if cursor + bs > n:
                    order, cursor = torch.randperm(n, generator=data_gen), 0
                idx = order[cursor : cursor + bs].to(device)
                cursor += bs
                opt.zero_grad(set_to_none=True)
                loss = loss_on(idx)
                if not torch.isfinite(loss):
                    notes.append(
                        f"chain {chain} diverged at step {step} (loss {float(loss.detach())}); "
                        "lower lr"
                    )
                    bar.update(num_burnin + num_draws - step)
                    break
                loss.backward()
                if cfg.get("_announce") is not None and step == 0:
                    cfg.pop("_announce")(time.perf_counter() - started)
                if step >= num_burnin:
                    traces[chain, step - num_burnin] = float(loss.detach())
                opt.step(noise_generator=noise_gen)
                bar.update(1)
            with torch.no_grad():  # back to w* before the next chain
                for p, w in zip(group, saved):
                    p.copy_(w)
    finally:
        with torch.no_grad():
            for p, w, g in zip(group, saved, saved_grads):
                p.copy_(w)
                p.requires_grad_(False)
                p.grad = g
    per_chain = nbeta * (traces.mean(1) - cfg["init_loss"])
    ok = torch.isfinite(per_chain)
    llc = float(per_chain[ok].mean()) if ok.any() else float("nan")
    se = float(per_chain[ok].std() / math.sqrt(int(ok.sum()))) if ok.sum() > 1 else float("nan")
    r_hat = _split_r_hat(traces[ok]) if ok.sum() > 1 else float("nan")
    if ok.any() and (per_chain[ok] < 0).any():
        notes.append(
            f"negative λ̂ in {int((per_chain[ok] < 0).sum())} chain(s): w* is not a "
            "minimum of the sampled loss or lr is too large"
        )
    if math.isfinite(r_hat) and r_hat > 1.1:
        notes.append(
            f"chains disagree or have not settled (R̂ = {r_hat:.2f} > 1.1): raise "
            "num_burnin_steps and num_draws"
        )
    return LLCEstimate(
        group=label,
        n_params=sum(p.numel() for p in group),
        llc=llc,
        llc_se=se,
        llc_per_chain=per_chain.tolist(),
        loss_trace=traces,
        r_hat=r_hat,
        warnings=notes,
    )
