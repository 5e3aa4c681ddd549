"""``BasisSet``: the bases of several sites, with save/load and model checks.

File format (version 1): one ``.safetensors`` file. Tensors are named ``<site>/<field>``
(``C``, ``C_pinv``, ``eigenvalues``, ``mean``, ``gram``, ``gram_eigenvalues`` and, for LIB,
``lambda_all``), float64 as fitted (a tensor of another dtype keeps its dtype). The header
metadata key ``tl_degen`` holds JSON: format name and version, the fit configuration, the
model's architecture signature and a probe (its logits on a fixed input), and per site the
method, centering, sample count and what was dropped. Files are written to a temporary
name and renamed, so a failed save leaves nothing.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator, Mapping
from dataclasses import asdict
from pathlib import Path

import torch
from torch import Tensor

from tl_degen import checks
from tl_degen.basis import METHODS, Dropped, InteractionBasis, output_basis
from tl_degen.errors import BasisMismatchError, DataError, TLDegenError, UnknownKeyError
from tl_degen.io import check_stored, read_safetensors, save_safetensors_atomic
from tl_degen.model_state import prepared
from tl_degen.sites import Site

__all__ = ["BasisSet", "model_probe", "FORMAT_NAME", "FORMAT_VERSION"]

FORMAT_NAME = "tl_degen.basis_set"
FORMAT_VERSION = 1
_FIELDS = ("C", "C_pinv", "eigenvalues", "mean", "gram", "gram_eigenvalues")


def model_probe(adapter) -> list[list[float]]:
    """The model's logits on a fixed token sequence (first 8 positions, first 16 logits).

    Stored with a basis so that :meth:`BasisSet.check_model` can refuse a model with other
    weights, whichever backend (bridge or HookedTransformer) holds them.
    """
    n = min(adapter.n_ctx, 8)
    tokens = ((torch.arange(n) * 7 + 3) % adapter.d_vocab)[None].to(adapter.device)
    with prepared(adapter.model, None), torch.no_grad():
        (logits,) = adapter.read_sites(tokens, [Site("logits")])
    return logits[0, :, :16].double().cpu().tolist()


class BasisSet(Mapping):
    """Bases of several sites, in forward order; ``bases["resid_pre.0"]`` or by :class:`Site`.

    Attributes:
        config: the settings of the fit (method, centering, threshold, integration, ...).
        model_signature: architecture facts of the model it was fitted on.
        model_probe: the model's logits on a fixed input (see :func:`model_probe`).

    ``to_dict()`` gives the constructor's arguments, ``{"bases": [InteractionBasis.to_dict()
    per site, in order], "config": {...}, "model_signature": {...}, "model_probe": [[...]] or
    None}``, and ``from_dict(d)`` rebuilds the set; :meth:`save` / :meth:`load` write the file
    format of the module docstring.

    Examples:
        >>> bases["resid_mid.0:last"].C.shape  # [d_site, k]
        >>> bases.save("modadd_bases.safetensors")
        >>> same = tl_degen.BasisSet.load("modadd_bases.safetensors", model=model)
        >>> print(same)  # one line per site: d_site, kept, top eigenvalues, dropped
    """

    def __init__(self, bases: list[InteractionBasis], *, config: dict | None = None,
                 model_signature: dict | None = None, model_probe: list | None = None):
        self._bases = {b.site: b for b in bases}
        self.config = dict(config or {})
        self.model_signature = dict(model_signature or {})
        self.model_probe = model_probe

    # ---------------------------------------------------------------- mapping
    def _key(self, site: str | Site) -> Site:
        s = Site.parse(site)
        if s in self._bases:
            return s
        raise UnknownKeyError(f"no basis for site {s.name!r}; this set has "
                       f"{[k.name for k in self._bases]}")

    def __getitem__(self, site: str | Site) -> InteractionBasis:
        return self._bases[self._key(site)]

    def __iter__(self) -> Iterator[Site]:
        return iter(self._bases)

    def __len__(self) -> int:
        return len(self._bases)

    @property
    def sites(self) -> list[Site]:
        return list(self._bases)

    @property
    def method(self) -> str | None:
        return self.config.get("method")

    # ---------------------------------------------------------------- display
    def summary(self) -> str:
        """One line per site: dimension, kept directions, top eigenvalues, what was dropped."""
        lines = [f"BasisSet(method={self.method!r}, n_samples={self.config.get('n_samples')}, "
                 f"threshold={self.config.get('threshold')}, "
                 f"integration={self.config.get('integration')})"]
        w = max(len(s.name) for s in self._bases) if self._bases else 0
        for s, b in self._bases.items():
            const_first = b.center and b.has_constant and b.method != "neuron"
            rest = b.eigenvalues[1:] if const_first else b.eigenvalues
            top = ", ".join(f"{v:.4e}" for v in rest.sort(descending=True).values[:3].tolist())
            const = f"const={b.eigenvalues[0]:.4e} " if const_first else ""
            err = ("" if not b.jacobian_gram_error else
                   f"  (stochastic M′, rel. error {b.jacobian_gram_error:.1e})")
            lines.append(f"  {s.name:<{w}}  d={b.d_site:<5d} kept={b.k:<5d} {const}top=[{top}]  "
                         f"dropped: {b.dropped.activation} type-1, {b.dropped.jacobian} type-2"
                         f"{err}" + ("  [rank ambiguous]" if b.dropped.ambiguous else ""))
        ambiguous = [s.name for s, b in self._bases.items() if b.dropped.ambiguous]
        if ambiguous:
            lines.append(f"  rank ambiguous at {len(ambiguous)} site(s): no spectral gap at the "
                         "threshold (a factor < 10 between kept and dropped Λ); "
                         "bases[site].dropped.gap, lambda_all")
        return "\n".join(lines)

    def __repr__(self) -> str:
        return self.summary()

    # ---------------------------------------------------------------- model checks
    def check_model(self, model) -> None:
        """Raise :class:`BasisMismatchError` unless ``model`` is the one these bases fit."""
        from tl_degen.adapters import get_adapter

        adapter = get_adapter(model)
        sig = adapter.signature()
        diff = {k: (v, sig.get(k)) for k, v in self.model_signature.items() if sig.get(k) != v}
        if diff:
            raise BasisMismatchError(
                "these bases were fitted on a different architecture: " + ", ".join(
                    f"{k}={a} (bases) vs {b} (model)" for k, (a, b) in diff.items())
                + "; fit new bases with fit_bases(model, ...)")
        for s, b in self._bases.items():
            d = adapter.site_dim(s) + int(s.has_constant)
            if b.d_site != d:
                raise BasisMismatchError(f"the basis of {s.name!r} has {b.d_site} coordinates but "
                                         f"that site of this model has {d}")
        checks.model(adapter.model)
        if self.model_probe is not None:
            probe = torch.tensor(model_probe(adapter), dtype=torch.float64)
            ref = torch.tensor(self.model_probe, dtype=torch.float64)
            scale = ref.abs().max().clamp_min(1e-6)
            rtol = max(1e-3, 50 * torch.finfo(adapter.dtype).eps)  # bf16: 0.4, fp32: 1e-3
            if probe.shape != ref.shape or not bool((probe - ref).abs().max() <= rtol * scale):
                raise BasisMismatchError(
                    "these bases were fitted on a model with different weights (its logits "
                    "on a fixed probe input differ); fit new bases with fit_bases(model, ...)")

    # ---------------------------------------------------------------- save / load
    def to_dict(self) -> dict:
        """The constructor's arguments: plain Python and tensors (class docstring)."""
        return {"bases": [b.to_dict() for b in self._bases.values()],
                "config": dict(self.config), "model_signature": dict(self.model_signature),
                "model_probe": self.model_probe}

    @classmethod
    def from_dict(cls, d: dict) -> BasisSet:
        """Rebuild from :meth:`to_dict`."""
        checks.fields("BasisSet.from_dict", d, ("bases",))
        return cls([InteractionBasis.from_dict(b) for b in d["bases"]], config=d.get("config"),
                   model_signature=d.get("model_signature"), model_probe=d.get("model_probe"))

    def _tensors_and_meta(self) -> tuple[dict[str, Tensor], dict]:
        tensors: dict[str, Tensor] = {}
        sites_meta = []
        for s, b in self._bases.items():
            for f in _FIELDS:
                tensors[f"{s.name}/{f}"] = getattr(b, f).detach().cpu().contiguous()
            if b.lambda_all is not None:
                tensors[f"{s.name}/lambda_all"] = b.lambda_all.detach().cpu().contiguous()
            sites_meta.append({"site": s.name, "method": b.method, "center": b.center,
                               "n_samples": b.n_samples, "dropped": asdict(b.dropped),
                               "jacobian_gram_error": b.jacobian_gram_error})
        meta = {"format": FORMAT_NAME, "version": FORMAT_VERSION, "config": self.config,
                "model_signature": self.model_signature, "model_probe": self.model_probe,
                "sites": sites_meta}
        return tensors, meta

    def save(self, path: str | os.PathLike) -> Path:
        """Write to ``path`` (``.safetensors``), atomically. Returns the path."""
        tensors, meta = self._tensors_and_meta()
        return save_safetensors_atomic(path, tensors, {"tl_degen": json.dumps(meta)})

    @classmethod
    def load(cls, path: str | os.PathLike, model=None, *, device: str | torch.device = "cpu"
             ) -> BasisSet:
        """Read a file written by :meth:`save`; with ``model``, also :meth:`check_model`."""
        path = Path(path)
        if not path.exists():
            raise DataError(f"no basis file at {path}")
        header, tensors = read_safetensors(path, device)
        try:
            meta = json.loads(header["tl_degen"])
            assert isinstance(meta, dict) and meta["format"] == FORMAT_NAME
        except (KeyError, ValueError, AssertionError):
            raise DataError(f"{path} is not a tl_degen basis file (no tl_degen metadata)") from None
        version = meta.get("version")
        if not isinstance(version, int) or isinstance(version, bool) or version < 1:
            raise DataError(f"{path} has format version {version!r}; tl_degen writes an integer "
                            "from 1: the header was edited or written by other code")
        if version > FORMAT_VERSION:
            raise DataError(f"{path} has format version {version}; this tl_degen reads "
                            f"up to {FORMAT_VERSION}: upgrade tl_degen")
        bases = []
        try:
            for sm in meta["sites"]:
                name = sm["site"]
                stored = {k: check_stored(path, k, t) for k, t in tensors.items()
                          if k.startswith(name + "/")}
                b = InteractionBasis(
                    site=Site.parse(name), method=sm["method"],
                    **{f: stored[f"{name}/{f}"] for f in _FIELDS},
                    dropped=Dropped(**sm["dropped"]), center=sm["center"],
                    n_samples=sm["n_samples"], lambda_all=stored.get(f"{name}/lambda_all"),
                    jacobian_gram_error=sm.get("jacobian_gram_error"))
                if b.method not in METHODS or not isinstance(b.center, bool) or not isinstance(
                        b.n_samples, int) or b.n_samples < 1 or b.C.dim() != 2:
                    raise DataError(f"{path}: the basis of {name} has method {b.method!r}, "
                                    f"center {b.center!r}, n_samples {b.n_samples!r} and C of "
                                    f"shape {tuple(b.C.shape)}: not what tl_degen writes")
                d, k = b.C.shape
                g = k if output_basis(b) is not None and b.site.kind == "logits" else d
                shapes = {"C_pinv": (k, d), "eigenvalues": (k,), "mean": (d,), "gram": (g, g)}
                for f, shape in shapes.items():
                    if tuple(getattr(b, f).shape) != shape:
                        raise DataError(f"{path}: {name}/{f} has shape "
                                        f"{tuple(getattr(b, f).shape)}, expected {shape}")
                bases.append(b)
            out = cls(bases, config=meta["config"], model_signature=meta["model_signature"],
                      model_probe=meta["model_probe"])
        except (KeyError, TypeError, ValueError, AttributeError, IndexError) as err:
            if isinstance(err, TLDegenError):
                raise
            raise DataError(f"{path} is an incomplete or damaged tl_degen basis file "
                            f"({type(err).__name__}: {err}); save it again with BasisSet.save"
                            ) from None
        if model is not None:
            out.check_model(model)
        return out
