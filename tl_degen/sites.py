"""Sites: the cuts of the network where tl_degen reads the forward state.

A site is written ``KIND.LAYER[:POSITIONS]`` (``logits`` has no layer):

========================  ===============================================================
``resid_pre.L``           residual stream entering block L (``blocks.L.hook_resid_pre``)
``resid_mid.L``           residual stream between attention and MLP (``hook_resid_mid``);
                          does not exist in parallel attention+MLP blocks (GPT-NeoX)
``mlp_post.L``            the MLP hidden cut: ``blocks.L.mlp.hook_post`` concatenated with
                          the residual stream that bypasses the MLP
``resid_post.L``          residual stream leaving block L (``hook_resid_post``)
``logits``                the model's output logits
========================  ===============================================================

Positions: ``:all`` (default), ``:last``, ``:3``, ``:0,2`` (negative indices count from the
end, as in Python). Every site vector carries a trailing constant coordinate equal to 1
(DESIGN.md §3), except ``logits``.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass

from tl_degen.errors import SiteError

__all__ = ["Site", "SITE_KINDS", "parse_sites", "check_forward_order", "every_layer"]

#: Site kinds in forward order within a block.
SITE_KINDS: tuple[str, ...] = ("resid_pre", "resid_mid", "mlp_post", "resid_post", "logits")
_KIND_RANK = {k: i for i, k in enumerate(SITE_KINDS)}
_PATTERN = re.compile(r"^(?P<kind>[a-z_]+)(?:\.(?P<layer>\d+))?(?::(?P<pos>[^:]+))?$")


@dataclass(frozen=True)
class Site:
    """A cut of the network at chosen token positions.

    Attributes:
        kind: one of :data:`SITE_KINDS`.
        layer: block index (``None`` for ``logits``).
        positions: ``None`` for all positions, else a tuple of position indices (negative
            indices count from the end; ``:last`` is ``(-1,)``).

    Examples:
        >>> site = tl_degen.Site.parse("resid_mid.0:last")
        >>> site.kind, site.layer, site.positions, site.resolve_positions(3)
        ('resid_mid', 0, (-1,), [2])
    """

    kind: str
    layer: int | None = None
    positions: tuple[int, ...] | None = None

    def __post_init__(self) -> None:
        if self.layer is not None:
            if isinstance(self.layer, bool) or not isinstance(self.layer, int):
                raise SiteError(f"layer must be an int, got {self.layer!r}")
        if self.positions is not None:
            try:
                pos = tuple(self.positions)
                if any(isinstance(p, bool) or int(p) != p for p in pos):
                    raise ValueError
            except (TypeError, ValueError):
                raise SiteError(f"positions must be integers, got {self.positions!r}") from None
            object.__setattr__(self, "positions", tuple(int(p) for p in pos))
        if self.kind not in _KIND_RANK:
            raise SiteError(f"unknown site kind {self.kind!r}; use one of {', '.join(SITE_KINDS)}")
        if self.kind == "logits" and self.layer is not None:
            raise SiteError("'logits' takes no layer: write 'logits' or 'logits:last'")
        if self.kind != "logits" and (self.layer is None or self.layer < 0):
            raise SiteError(f"site kind {self.kind!r} needs a layer, e.g. '{self.kind}.0'")
        if self.positions is not None:
            if len(self.positions) == 0:
                raise SiteError("empty position list; omit it (or write ':all') for all positions")
            if len(set(self.positions)) != len(self.positions):
                raise SiteError(f"repeated positions in {self.positions}; list each once")

    @classmethod
    def parse(cls, spec: str | Site) -> Site:
        """Parse ``'resid_mid.0:last'`` style names (a :class:`Site` is returned as is)."""
        if isinstance(spec, Site):
            return spec
        if not isinstance(spec, str):
            raise SiteError(f"a site is a string like 'resid_pre.0', got {type(spec).__name__}")
        m = _PATTERN.match(spec.strip())
        if m is None:
            raise SiteError(f"cannot parse site {spec!r}; write e.g. 'resid_pre.0', "
                            "'resid_mid.2:last', 'mlp_post.1:0,2' or 'logits'")
        kind, layer, pos = m["kind"], m["layer"], m["pos"]
        if kind not in _KIND_RANK:
            raise SiteError(f"unknown site kind {kind!r} in {spec!r}; use one of "
                            f"{', '.join(SITE_KINDS)}")
        return cls(kind, None if layer is None else int(layer), _parse_positions(pos, spec))

    @property
    def name(self) -> str:
        """Canonical name, e.g. ``resid_mid.0:last``; ``:all`` is left out."""
        base = self.kind if self.layer is None else f"{self.kind}.{self.layer}"
        if self.positions is None:
            return base
        if self.positions == (-1,):
            return f"{base}:last"
        return f"{base}:{','.join(str(p) for p in self.positions)}"

    @property
    def has_constant(self) -> bool:
        """Whether the site vector carries the constant coordinate (all sites but logits)."""
        return self.kind != "logits"

    @property
    def order_key(self) -> tuple[float, int]:
        """Sort key in forward order (layer, then kind within the block)."""
        if self.kind == "logits":
            return (float("inf"), _KIND_RANK["logits"])
        return (float(self.layer), _KIND_RANK[self.kind])

    def resolve_positions(self, n_pos: int) -> list[int]:
        """Non-negative position indices for sequences of length ``n_pos``."""
        if self.positions is None:
            return list(range(n_pos))
        out = []
        for p in self.positions:
            q = p + n_pos if p < 0 else p
            if not 0 <= q < n_pos:
                raise SiteError(f"position {p} of site {self.name!r} is out of range for "
                                f"sequences of length {n_pos}; use positions in "
                                f"[{-n_pos}, {n_pos - 1}] or ':last'")
            out.append(q)
        if len(set(out)) != len(out):
            raise SiteError(f"positions {self.positions} of site {self.name!r} name the same "
                            f"token twice for length {n_pos}")
        return out

    def __str__(self) -> str:
        return self.name

    def __repr__(self) -> str:
        return f"Site({self.name!r})"


def _parse_positions(pos: str | None, spec: str) -> tuple[int, ...] | None:
    if pos is None or pos == "all":
        return None
    if pos == "last":
        return (-1,)
    try:
        return tuple(int(x) for x in pos.split(","))
    except ValueError:
        raise SiteError(f"cannot parse positions {pos!r} in {spec!r}; use ':all', ':last', "
                        "':3' or ':0,2'") from None


def parse_sites(sites) -> list[Site]:
    """Parse one site or a sequence of sites (strings or :class:`Site`)."""
    if isinstance(sites, (str, Site)):
        sites = [sites]
    if not isinstance(sites, Iterable) or isinstance(sites, bytes):
        raise SiteError(f"sites must be a list of site names such as ['resid_pre.0', "
                        f"'logits'], got {type(sites).__name__}")
    out = [Site.parse(s) for s in sites]
    if not out:
        raise SiteError("no sites given; pass e.g. ['resid_pre.0', 'resid_post.0', 'logits']")
    return out


def check_forward_order(sites: list[Site]) -> None:
    """Raise :class:`SiteError` unless the sites are distinct and in forward order."""
    for a, b in zip(sites, sites[1:]):
        if a.order_key == b.order_key:
            raise SiteError(f"site {a.kind}{'' if a.layer is None else '.' + str(a.layer)} "
                            "appears twice; give each cut once")
        if a.order_key > b.order_key:
            raise SiteError(f"sites are out of forward order: {a.name!r} comes after "
                            f"{b.name!r} in the network; sort them, e.g. "
                            f"{[s.name for s in sorted(sites, key=lambda s: s.order_key)]}")


def every_layer(model, kinds=("resid_pre", "resid_mid"), *, layers=None,
                end: str | None = "logits:last") -> list[str]:
    """The cuts of a whole model, in forward order: each kind of ``kinds`` at every position
    of every layer of ``layers`` (default: all), then ``end``.

    ``end``: ``"logits:last"`` (default) or ``"logits"`` adds the last layer's
    ``resid_post`` at the same positions and then the logits (at any vocabulary size, kept in
    their factor space: :mod:`tl_degen.sections.unembed`), so that the sections into the
    output are the MLP after its norm and the final norm with the unembedding, which have
    closed forms; ``"resid_post:last"`` (or ``"resid_post"``) stops at the last layer's
    ``resid_post``; ``None`` stops at the last layer's ``kinds``.

    Examples:
        >>> tl_degen.every_layer(gpt2)  # 12 layers
        ['resid_pre.0', 'resid_mid.0', ..., 'resid_mid.11', 'resid_post.11:last', 'logits:last']
        >>> bases = tl_degen.fit_bases(gpt2, tokens, tl_degen.every_layer(gpt2), n_probes=32)
    """
    from tl_degen.adapters import get_adapter

    adapter = get_adapter(model)
    n = adapter.n_layers
    if isinstance(kinds, str):
        kinds = (kinds,)
    if not isinstance(kinds, (list, tuple)):
        raise SiteError(f"kinds={kinds!r}: give a tuple of block site kinds, e.g. "
                        "('resid_pre', 'resid_mid')")
    kinds = tuple(kinds)
    block_kinds = [k for k in SITE_KINDS if k != "logits"]
    unknown = [k for k in kinds if k not in block_kinds]
    if unknown or not kinds or len(set(kinds)) != len(kinds):
        raise SiteError(f"kinds={kinds!r}: give distinct block site kinds, some of "
                        f"{', '.join(block_kinds)}")
    if "resid_mid" in kinds and adapter.arch.parallel:
        raise SiteError("this model's blocks run attention and MLP in parallel (no resid_mid); "
                        "use kinds=('resid_pre',) or ('resid_pre', 'mlp_post')")
    if layers is not None and not isinstance(layers, (list, tuple, range)):
        raise SiteError(f"layers={layers!r}: give a list of block indices, e.g. [0, 5, 11]")
    layers = list(range(n)) if layers is None else list(layers)
    if not layers or any(not isinstance(L, int) or isinstance(L, bool) or not 0 <= L < n
                         for L in layers) or sorted(set(layers)) != layers:
        raise SiteError(f"layers={layers!r}: give increasing block indices in [0, {n})")
    sites = [f"{k}.{L}" for L in layers for k in sorted(kinds, key=_KIND_RANK.__getitem__)]
    if end is None:
        return sites
    if not isinstance(end, str):
        raise SiteError(f"end={end!r}: use 'logits:last', 'logits', 'resid_post:last', "
                        "'resid_post' or None")
    kind, _, pos = end.partition(":")
    pos = f":{pos}" if pos else ""
    if kind not in ("logits", "resid_post") or pos not in ("", ":last"):
        raise SiteError(f"end={end!r}: use 'logits:last', 'logits', 'resid_post:last', "
                        "'resid_post' or None")
    if f"resid_post.{layers[-1]}" not in sites:  # else it is already the cut before
        sites.append(f"resid_post.{layers[-1]}{pos}")
    return sites + (["logits" + pos] if kind == "logits" else [])
