"""Reading, writing and differentiating a model at sites, with hooks only.

Conventions (DESIGN.md §3, §6):

* A site vector is ``[batch, n_site_positions, d_site + 1]``: the site's tensors at the
  chosen positions, concatenated, then the constant coordinate ``c`` (1 on the data).
* Writing a site replaces the forward state there with a tensor that may require grad;
  gradients then flow along every downstream path. ``resid_mid`` is written through the
  attention output (``x - resid_pre.detach()``), never through ``hook_resid_mid``, because on
  a ``TransformerBridge`` that hook only feeds the MLP branch. ``mlp_post`` is written as the
  MLP activation plus the bypass stream (added at ``hook_resid_post``).
* From the first write on, every bias added inside the section is multiplied by the ``c`` of
  the position where it is added: ``out + (c - 1) * bias``. The attention output bias enters
  position ``t`` as ``sum_h sum_s pattern_h[t, s] c_s b_O / n_heads`` (the reference's
  folding of ``b_O`` into the value path).
* Results are keyed by the hook names we asked for, never by ``hook.name``.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from jaxtyping import Float, Int
from torch import Tensor

from tl_degen.adapters.architecture import Architecture
from tl_degen.errors import BackendError, SiteError
from tl_degen.sites import Site

__all__ = ["Adapter", "SectionRun"]


class _StopForward(Exception):
    """Raised inside a hook once everything the caller asked for has been read."""


@dataclass
class SectionRun:
    """Mutable state shared by the hooks of one forward pass."""

    c: Tensor | None = None  # [batch, pos] constant coordinate per position (None: not written)
    active: bool = False  # biases are scaled from the first write on
    captured: dict[str, Tensor] = field(default_factory=dict)


class Adapter:
    """Wraps a TransformerLens model (``TransformerBridge`` or ``HookedTransformer``).

    Args:
        model: the user's model; it is never modified (hooks are removed after each call).
    """

    backend: str = "?"

    def __init__(self, model: torch.nn.Module):
        self.model = model
        self._hook_names = set(model.hook_dict.keys())
        #: the model's architecture facts, read from its config once (DESIGN.md §6)
        self.arch: Architecture = Architecture.from_model(model, hook_names=self._hook_names)
        self.pattern_before_output: bool = self._probe_pattern_order()
        self._warned_pattern = False
        #: kinds of closed-form section whose derivative has been checked against this
        #: model's autograd (:func:`tl_degen.sections.recognise.recognise`)
        self.checked_derivatives: set[tuple] = set()

    def _probe_pattern_order(self) -> bool:
        """Whether ``attn.hook_pattern`` fires before ``hook_attn_out`` (it does not on
        TransformerLens 3.x bridges, which fire it afterwards)."""
        names = ["blocks.0.attn.hook_pattern", "blocks.0.hook_attn_out"]
        if self.n_layers == 0 or not all(n in self._hook_names for n in names):
            return True
        order: list[str] = []
        hooks = [(n, lambda t, hook, n=n: order.append(n)) for n in names]
        tokens = torch.zeros(1, min(2, self.n_ctx), dtype=torch.long, device=self.device)
        with torch.no_grad(), self.model.hooks(fwd_hooks=hooks):
            self.model(tokens)
        return bool(order) and order[0] == names[0]

    # ------------------------------------------------------------------ model facts
    # (read from ``arch``; kept as attributes of the adapter for the code that uses them)
    @property
    def n_layers(self) -> int:
        return self.arch.n_layers

    @property
    def d_model(self) -> int:
        return self.arch.d_model

    @property
    def d_mlp(self) -> int | None:
        return self.arch.d_mlp

    @property
    def n_heads(self) -> int:
        return self.arch.n_heads

    @property
    def n_ctx(self) -> int:
        return self.arch.n_ctx

    @property
    def d_vocab(self) -> int:
        return self.arch.d_vocab

    @property
    def d_vocab_out(self) -> int:
        return self.arch.d_vocab_out

    @property
    def parallel(self) -> bool:
        return self.arch.parallel

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    def signature(self) -> dict:
        """Architecture facts stored with a basis to refuse a mismatched model."""
        return {
            "n_layers": self.n_layers, "d_model": self.d_model, "d_mlp": self.d_mlp,
            "n_heads": self.n_heads, "n_ctx": self.n_ctx, "d_vocab": self.d_vocab,
            "d_vocab_out": self.d_vocab_out, "parallel": self.parallel,
        }

    def check_site(self, site: Site) -> None:
        """Raise :class:`SiteError` if the site does not exist in this model."""
        if site.kind == "logits":
            return
        if site.layer >= self.n_layers:
            raise SiteError(f"site {site.name!r} asks for layer {site.layer} but the model has "
                            f"{self.n_layers} layer(s) (0..{self.n_layers - 1})")
        if site.kind == "resid_mid" and self.parallel:
            raise SiteError(
                f"site {site.name!r}: this model has parallel attention+MLP blocks (GPT-NeoX "
                "style), so there is no residual stream between attention and MLP. Use "
                f"'resid_pre.{site.layer}', 'mlp_post.{site.layer}' (MLP hidden cut, includes "
                f"the stream bypassing the MLP) or 'resid_post.{site.layer}'")
        if site.kind == "mlp_post" and self.d_mlp is None:
            raise SiteError(f"site {site.name!r}: the model is attention-only (no MLP)")

    def site_dim(self, site: Site) -> int:
        """Dimension of the site vector, without the constant coordinate."""
        if site.kind == "logits":
            return self.d_vocab_out
        if site.kind == "mlp_post":
            return self.d_mlp + self.d_model
        return self.d_model

    # ------------------------------------------------------------------ forward passes
    def run(
        self,
        tokens: Int[Tensor, "batch pos"],
        read: Site,
        write: tuple[Site, Float[Tensor, "batch n_in d_in"]] | None = None,
        resume: tuple[int, Float[Tensor, "batch pos d_model"]] | None = None,
    ) -> Float[Tensor, "batch n_out d_out"]:
        """Run the model, optionally writing one site, and read another.

        Args:
            tokens: ``[batch, pos]`` token ids.
            read: the site to read. Its vector includes the constant coordinate (for ``read``
                after ``write`` this is the written ``c`` at the same position, else 1).
            write: ``(site, x)`` with ``x`` of shape ``[batch, n_site_positions, d_site + 1]``
                (constant coordinate last). ``x`` may require grad; the forward then builds
                the graph of the section from ``site`` to ``read``.
            resume: ``(L, resid_pre)``: start the forward pass at block ``L`` from this
                residual stream (``start_at_layer``) instead of the embedding, so the blocks
                before ``L`` are not recomputed. ``write`` must lie in block ``L`` or later.

        Returns:
            ``[batch, n_read_positions, d_read (+1)]``.
        """
        n_batch, n_pos = tokens.shape
        run = SectionRun()
        out_pos = read.resolve_positions(n_pos)
        hooks: list[tuple[str, Callable]] = []
        cleanup: list[Callable[[], None]] = []
        try:
            if write is not None:  # validate before any hook is registered
                w_site, x = write
                in_pos = w_site.resolve_positions(n_pos)
                c = torch.ones(n_batch, n_pos, dtype=x.dtype, device=x.device)
                c = c.index_copy(1, torch.tensor(in_pos, device=x.device), x[..., -1])
                run.c = c
            hooks += self._bias_hooks(run, cleanup)
            if write is not None:
                hooks += self._write_hooks(w_site, x[..., :-1], in_pos, run)
            final_hook = self._read_hooks(read, run, hooks)
            sliced = read.kind == "logits" and self._unembed_only_at(out_pos, n_pos, run, hooks)
            logits = self._forward(tokens, hooks, final_hook, resume)
        finally:
            for fn in cleanup:
                fn()
        if read.kind == "logits":
            logits = self._unembed_bias_fix(logits, run)
            return logits if sliced else logits[:, out_pos]
        vec = self._assemble(read, run.captured)[:, out_pos]
        const = (run.c[:, out_pos] if run.c is not None
                 else torch.ones(vec.shape[:2], dtype=vec.dtype, device=vec.device))
        return torch.cat([vec, const.to(vec.dtype)[..., None]], dim=-1)

    def _unembed_only_at(self, pos: list[int], n_pos: int, run: SectionRun,
                         hooks: list) -> bool:
        """Unembed only the positions read (``logits:last`` of long prompts: the
        ``[d_model, d_vocab]`` product, forward and backward, at one position instead of
        every one) by cutting the unembedding's input at ``unembed.hook_in``, where the
        model has it. Returns whether it was cut."""
        if pos == list(range(n_pos)) or "unembed.hook_in" not in self._hook_names:
            return False
        idx = torch.tensor(pos)

        def take(tensor: Tensor, hook) -> Tensor:
            if run.c is not None:  # the unembedding's bias scale, at the kept positions
                run.c = run.c[:, idx.to(run.c.device)]
            return tensor[:, idx.to(tensor.device)]

        hooks.append(("unembed.hook_in", take))
        return True

    def read_sites(
        self, tokens: Int[Tensor, "batch pos"], sites: list[Site]
    ) -> list[Float[Tensor, "batch n_pos d"]]:
        """Read several sites in one forward pass (no writes, no grad needed).

        Each result is ``[batch, n_site_positions, d_site (+1)]``, constant coordinate last
        (none for ``logits``).
        """
        n_pos = tokens.shape[1]
        run = SectionRun()
        hooks: list = []
        final = None
        for site in sites:
            final = self._read_hooks(site, run, hooks)
        wants_logits = any(s.kind == "logits" for s in sites)
        logits = self._forward(tokens, hooks, None if wants_logits else final)
        out = []
        for site in sites:
            pos = site.resolve_positions(n_pos)
            if site.kind == "logits":
                out.append(logits[:, pos])
                continue
            vec = self._assemble(site, run.captured)[:, pos]
            out.append(torch.cat([vec, torch.ones_like(vec[..., :1])], dim=-1))
        return out

    def _forward(self, tokens: Tensor, hooks: list, final_hook: str | None,
                 resume: tuple[int, Tensor] | None = None) -> Tensor | None:
        def stopper(tensor: Tensor, hook) -> None:
            raise _StopForward

        fwd = list(hooks)
        if final_hook is not None:
            fwd.append((final_hook, stopper))
        with self.model.hooks(fwd_hooks=fwd):
            try:
                if resume is not None:
                    layer, resid = resume
                    with self._skipping(layer):
                        return self.model(resid, start_at_layer=layer)
                return self.model(tokens)
            except _StopForward:
                return None

    @contextmanager
    def _skipping(self, layer: int):
        """While a run resumes at block ``layer``: leave out the work of the blocks before
        it, where the backend would otherwise still run them (a ``HookedTransformer``
        starts at the block itself)."""
        yield

    def resume_state(self, tokens: Int[Tensor, "batch pos"], layer: int,
                     ) -> tuple[int, Float[Tensor, "batch pos d_model"]] | None:
        """``(layer, resid_pre)`` to pass as ``run(..., resume=...)`` for these tokens, or
        ``None`` when resuming would not save work (``layer == 0``) or this model does not
        reproduce its own logits when resumed (checked on the first sequences)."""
        if layer <= 0 or layer >= self.n_layers:
            return None
        (resid,) = self.read_sites(tokens, [Site("resid_pre", layer)])
        resid = resid[..., :-1]
        n = min(8, tokens.shape[0])
        try:
            resumed = self.run(tokens[:n], read=Site("logits"), resume=(layer, resid[:n]))
        except Exception:  # noqa: BLE001 - any failure means: run from the embedding
            return None
        (full,) = self.read_sites(tokens[:n], [Site("logits")])
        tol = 1e-10 if full.dtype == torch.float64 else 1e-4
        if resumed.shape != full.shape or not bool(
                (resumed - full).abs().max() <= tol * full.abs().max().clamp_min(1e-12)):
            return None
        return layer, resid

    # ------------------------------------------------------------------ reads
    def _read_hooks(self, site: Site, run: SectionRun, hooks: list) -> str | None:
        """Append capture hooks for ``site``; return the hook after which to stop."""
        if site.kind == "logits":
            return None
        L = site.layer

        def capture(key: str):
            def fn(tensor: Tensor, hook) -> None:
                run.captured[key] = tensor

            return fn

        if site.kind == "mlp_post":
            names = [f"blocks.{L}.mlp.hook_post", f"blocks.{L}.hook_mlp_out",
                     f"blocks.{L}.hook_resid_post"]
        else:
            names = [f"blocks.{L}.hook_{site.kind}"]
        for n in names:
            self._require_hook(n)
            hooks.append((n, capture(n)))
        return names[-1]

    def _assemble(self, site: Site, captured: dict[str, Tensor]) -> Tensor:
        L = site.layer
        if site.kind == "mlp_post":
            post = captured[f"blocks.{L}.mlp.hook_post"]
            bypass = captured[f"blocks.{L}.hook_resid_post"] - captured[f"blocks.{L}.hook_mlp_out"]
            return torch.cat([post, bypass], dim=-1)
        return captured[f"blocks.{L}.hook_{site.kind}"]

    # ------------------------------------------------------------------ writes
    def _write_hooks(self, site: Site, x: Tensor, pos: list[int], run: SectionRun) -> list:
        if site.kind == "logits":
            raise SiteError("'logits' is the network's output and cannot be written; "
                            "it can only be the last site")
        L = site.layer
        idx = torch.tensor(pos, device=x.device)

        def put(tensor: Tensor, values: Tensor) -> Tensor:
            return tensor.index_copy(1, idx.to(tensor.device),
                                     values.to(tensor.device, tensor.dtype))

        if site.kind in ("resid_pre", "resid_post"):
            def replace(tensor: Tensor, hook) -> Tensor:
                run.active = True
                return put(tensor, x)

            name = f"blocks.{L}.hook_{site.kind}"
            self._require_hook(name)
            return [(name, replace)]

        if site.kind == "resid_mid":
            pre_name, out_name = f"blocks.{L}.hook_resid_pre", f"blocks.{L}.hook_attn_out"
            self._require_hook(pre_name)
            self._require_hook(out_name)

            def keep_pre(tensor: Tensor, hook) -> None:
                run.captured["_write_resid_pre"] = tensor

            def via_attn_out(tensor: Tensor, hook) -> Tensor:
                run.active = True
                pre = run.captured.pop("_write_resid_pre").detach()
                return put(tensor, x - pre[:, pos].to(x.dtype))

            return [(pre_name, keep_pre), (out_name, via_attn_out)]

        # mlp_post: MLP activation, then the bypass stream at resid_post
        d_mlp = self.d_mlp
        post_name = f"blocks.{L}.mlp.hook_post"
        out_name, resid_name = f"blocks.{L}.hook_mlp_out", f"blocks.{L}.hook_resid_post"
        for n in (post_name, out_name, resid_name):
            self._require_hook(n)

        def write_post(tensor: Tensor, hook) -> Tensor:
            run.active = True
            return put(tensor, x[..., :d_mlp])

        def keep_mlp_out(tensor: Tensor, hook) -> None:
            run.captured["_write_mlp_out"] = tensor

        def write_bypass(tensor: Tensor, hook) -> Tensor:
            mlp_out = run.captured.pop("_write_mlp_out")
            return put(tensor, x[..., d_mlp:] + mlp_out[:, pos].to(x.dtype))

        return [(post_name, write_post), (out_name, keep_mlp_out), (resid_name, write_bypass)]

    def _require_hook(self, name: str) -> None:
        if name not in self._hook_names:
            raise BackendError(f"the model has no hook point {name!r}; tl_degen needs the "
                               "TransformerLens hook names (hook_resid_pre/mid/post, "
                               "hook_attn_out, hook_mlp_out, mlp.hook_post)")

    # ------------------------------------------------------------------ biases
    def _bias_hooks(self, run: SectionRun, cleanup: list) -> list:
        """Hook points (and module hooks registered here) that scale biases by ``c``."""
        raise NotImplementedError

    def _unembed_bias_fix(self, logits: Tensor, run: SectionRun) -> Tensor:
        return logits

    def _pattern_weights(self, run: SectionRun, layer: int) -> Tensor:
        """``sum_h sum_s pattern_h[t, s] c_s / n_heads`` as ``[batch, pos]``."""
        pattern = run.captured.get(f"_pattern.{layer}")
        if pattern is None and not self.pattern_before_output:
            if not self._warned_pattern:
                warnings.warn(
                    "this model fires attn.hook_pattern after the attention output "
                    "(TransformerLens 3.x bridge), so the attention output bias b_O is scaled "
                    "by the constant of the output position, not pattern-weighted as in the "
                    "reference (DESIGN.md §3). Only the constant direction of multi-position "
                    "sites is affected; use a HookedTransformer or TransformerLens 4 to match "
                    "the reference exactly", stacklevel=4)
                self._warned_pattern = True
            return run.c
        if pattern is None:
            raise BackendError(
                f"blocks.{layer}.attn.hook_pattern did not fire before the attention output, "
                "so the output bias cannot be assigned to source positions (DESIGN.md §3); "
                "this attention implementation is not supported")
        return torch.einsum("bhts,bs->bt", pattern.to(run.c.dtype), run.c) / pattern.shape[1]

    def _pattern_capture(self, run: SectionRun) -> list:
        out = []
        for L in range(self.n_layers):
            name = f"blocks.{L}.attn.hook_pattern"
            if name in self._hook_names:
                def fn(tensor: Tensor, hook, L=L) -> None:
                    if run.active:
                        run.captured[f"_pattern.{L}"] = tensor
                out.append((name, fn))
        return out

    # ------------------------------------------------------------------ misc
    @contextmanager
    def no_param_grad(self) -> Iterator[None]:
        """Temporarily stop parameters from requiring grad (restored afterwards)."""
        flags = [(p, p.requires_grad) for p in self.model.parameters()]
        try:
            for p, _ in flags:
                p.requires_grad_(False)
            yield
        finally:
            for p, f in flags:
                p.requires_grad_(f)

    def __repr__(self) -> str:
        return (f"{type(self).__name__}({type(self.model).__name__}, n_layers={self.n_layers}, "
                f"d_model={self.d_model}, parallel={self.parallel})")


def _scale(tensor: Tensor, c: Tensor, bias: Tensor) -> Tensor:
    """``tensor + (c - 1) * bias``, broadcasting ``c`` [batch, pos] over trailing bias dims."""
    factor = (c - 1).to(tensor.device, tensor.dtype).reshape(
        *c.shape, *([1] * (tensor.dim() - 2)))
    return tensor + factor * bias.to(tensor.device, tensor.dtype)
