"""Plots that work offline: Λ spectra, ablation curves, edge-mass curves.

Each function returns a :class:`Plot`, drawn once by matplotlib (its axes, decade ticks on log
axes, round ticks on linear ones) and written as SVG, inside HTML, or as PNG. The SVG is
self-contained (text kept as text, no JavaScript, no network) and every point carries a
``<title>``, so hovering it in a browser shows its values::

    plot = spectrum_plot({"LIB": lib_bases, "PCA": pca_bases}, "resid_mid.0:last")
    plot.save("spectrum.html"); plot.save("spectrum.png"); plot   # in a notebook
"""

from __future__ import annotations

import html
import io
import math
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from tl_degen.errors import TLDegenError
from tl_degen.io import output_path, write_text_atomic

__all__ = ["Plot", "Series", "spectrum_plot", "ablation_plot", "edge_mass_plot"]

PALETTE = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b", "#e377c2",
           "#17becf", "#7f7f7f", "#bcbd22"]


@dataclass
class Series:
    """One line: ``x``, ``y``, a name, and whether to draw markers only (``points``).

    Examples:
        >>> dropped = viz.Series("dropped", [4, 5], [1e-16, 1e-18], points=True, hollow=True)
        >>> viz.Plot("Spectrum", "direction", "Λ", series=[dropped], logy=True).save("s.svg")
    """

    name: str
    x: list[float]
    y: list[float]
    points: bool = False
    color: str | None = None
    hollow: bool = False  # e.g. dropped directions
    lower: list[float] | None = None  # a band (e.g. a confidence interval) around y
    upper: list[float] | None = None

    def __post_init__(self) -> None:
        if (self.lower is None) != (self.upper is None):
            raise TLDegenError(f"series {self.name!r}: give both lower and upper, or neither")
        for name, v in (("y", self.y), ("lower", self.lower), ("upper", self.upper)):
            if v is not None and len(v) != len(self.x):
                raise TLDegenError(f"series {self.name!r}: {name} has {len(v)} values for "
                                   f"{len(self.x)} x values")


@dataclass
class Plot:
    """A small line/scatter plot drawn by matplotlib; ``figure()``, ``to_svg()``,
    ``to_html()``, ``save(path.html|.svg|.png)``, ``_repr_html_``.

    Examples:
        >>> plot = viz.Plot("Eigenvalues", "direction", "Λ", logy=True)
        >>> plot.series.append(viz.Series("LIB", [1, 2, 3], [9.0, 4.0, 1.0]))
        >>> plot.save("spectrum.html")
        >>> plot.save("spectrum.png")
        >>> ax = plot.figure().axes[0]  # a matplotlib Figure, to restyle or add to
    """

    title: str
    xlabel: str
    ylabel: str
    series: list[Series] = field(default_factory=list)
    logx: bool = False
    logy: bool = False
    width: int = 640
    height: int = 380

    def _points(self, s: Series) -> list[tuple[float, float]]:
        """The series' finite points that the axes can show (positive on a log axis)."""
        return [(float(x), float(y)) for x, y in zip(s.x, s.y)
                if math.isfinite(x) and math.isfinite(y)
                and (not self.logx or x > 0) and (not self.logy or y > 0)]

    def figure(self):
        """The plot as a :class:`matplotlib.figure.Figure` (no pyplot state involved)."""
        from matplotlib.figure import Figure

        fig = Figure(figsize=(self.width / 100, self.height / 100), dpi=100)
        self.draw(fig.add_subplot())
        fig.tight_layout()
        return fig

    def draw(self, ax) -> None:
        """Draw the plot into a matplotlib ``Axes`` (e.g. one panel of a larger figure)."""
        if not any(self._points(s) for s in self.series):
            raise TLDegenError(f"plot {self.title!r} has no data to draw")
        for n, s in enumerate(self.series):
            pts = self._points(s)
            if not pts:
                continue
            color = s.color or PALETTE[n % len(PALETTE)]
            if s.lower is not None and s.upper is not None:
                band = [(float(x), float(lo), float(hi)) for x, lo, hi in
                        zip(s.x, s.lower, s.upper)
                        if math.isfinite(x) and math.isfinite(lo) and math.isfinite(hi)
                        and (not self.logx or x > 0) and (not self.logy or lo > 0)]
                if band:
                    ax.fill_between([b[0] for b in band], [b[1] for b in band],
                                    [b[2] for b in band], color=color, alpha=0.18,
                                    linewidth=0)
            (line,) = ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o",
                              markersize=3, color=color, label=s.name,
                              markerfacecolor="white" if s.hollow else color,
                              linestyle="none" if s.points else "-", linewidth=1.5)
            line.set_gid(f"tld-series-{n}")
        ax.set(title=self.title, xlabel=self.xlabel, ylabel=self.ylabel)
        if self.logx:
            ax.set_xscale("log")
        if self.logy:
            ax.set_yscale("log")
        ax.grid(True, color="#eee", linewidth=0.8)
        ax.set_axisbelow(True)
        ax.legend(fontsize=8, loc="center left", bbox_to_anchor=(1.01, 0.5), frameon=False)

    # ------------------------------------------------------------------ SVG
    def to_svg(self) -> str:
        """The figure as an inline ``<svg class="tld-plot">`` element; each point's marker
        holds a ``<title>`` (series name, x, y) that a browser shows on hover."""
        import matplotlib

        buf = io.StringIO()
        with matplotlib.rc_context({"svg.fonttype": "none", "svg.hashsalt": "tl_degen"}):
            self.figure().savefig(buf, format="svg")
        text = buf.getvalue()
        text = text[text.index("<svg"):]  # drop the XML declaration and DOCTYPE
        text = text.replace("<svg ", '<svg class="tld-plot" ', 1)
        for n, s in enumerate(self.series):
            text = _add_titles(text, f"tld-series-{n}", s.name, self._points(s))
        return text

    def to_html(self) -> str:
        """A complete, self-contained HTML page holding the SVG."""
        return (f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>"
                f"{html.escape(self.title)}</title></head><body>{self.to_svg()}</body></html>")

    def _repr_html_(self) -> str:
        return self.to_svg()

    # ------------------------------------------------------------------ PNG
    def to_png(self, path: str | os.PathLike, dpi: int = 110) -> Path:
        path = output_path(path, "plot")
        tmp = path.with_name(path.name + ".tmp.png")
        self.figure().savefig(tmp, dpi=dpi)
        os.replace(tmp, path)
        return path

    def save(self, path: str | os.PathLike) -> Path:
        """Write ``.html`` (self-contained), ``.svg`` or ``.png``, atomically."""
        path = Path(path)
        if path.suffix == ".png":
            return self.to_png(path)
        if path.suffix not in (".html", ".htm", ".svg"):
            raise TLDegenError(f"save a plot as .html, .svg or .png, not {path.suffix!r}")
        text = self.to_svg() if path.suffix == ".svg" else self.to_html()
        return write_text_atomic(path, text, "plot")


_USE = re.compile(r"<use ([^>]*?)/>")


def _add_titles(svg: str, gid: str, name: str, points: list[tuple[float, float]]) -> str:
    """Give the marker ``<use>`` elements of the series drawn with ``gid`` a ``<title>``
    each, in drawing order (matplotlib draws one marker per point, in order)."""
    start = svg.find(f'<g id="{gid}">')
    if start < 0:
        return svg
    end = svg.find("</g>\n   </g>", start)  # the series group closes after its markers
    end = len(svg) if end < 0 else end
    block = svg[start:end]
    uses = list(_USE.finditer(block))
    if len(uses) != len(points):  # not the structure we know: leave the SVG as drawn
        return svg
    label = html.escape(name)
    out, last = [], 0
    for m, (x, y) in zip(uses, points):
        out.append(block[last:m.start()])
        out.append(f"<use {m.group(1)}><title>{label}: x={x:.6g}, y={y:.6g}</title></use>")
        last = m.end()
    out.append(block[last:])
    return svg[:start] + "".join(out) + svg[end:]


def spectrum_plot(bases: dict, site: str) -> Plot:
    """Λ (LIB) or Gram eigenvalues (PCA, neuron) at ``site`` for each labelled
    :class:`~tl_degen.basis_set.BasisSet`, kept directions filled, dropped ones hollow.

    Examples:
        >>> pca = tl_degen.fit_bases(model, tokens, bases.sites, method="pca")
        >>> plot = viz.spectrum_plot({"LIB": bases, "PCA": pca}, "resid_mid.0:last")
        >>> plot.save("spectrum.png")
    """
    from tl_degen.basis_set import BasisSet

    if not isinstance(bases, dict) or not bases or not all(
            isinstance(b, BasisSet) for b in bases.values()):
        raise TLDegenError("bases must be a dict of label → BasisSet, e.g. {'LIB': bases}")
    plot = Plot(f"Spectrum at {site}", "direction (descending)", "eigenvalue", logy=True)
    for n, (label, bset) in enumerate(bases.items()):
        b = bset[site]
        color = PALETTE[n % len(PALETTE)]
        if b.method == "lib" and b.lambda_all is not None:
            full = b.lambda_all.double()
        elif b.method == "neuron":
            full = b.eigenvalues.double()
        else:
            full = b.gram_eigenvalues.double()
        full = full.abs().sort(descending=True).values
        kept = b.eigenvalues.double().abs().sort(descending=True).values
        xs = list(range(1, len(kept) + 1))
        plot.series.append(Series(f"{label} kept ({b.k})", xs, kept.tolist(), color=color))
        extra = full[len(kept):]
        if len(extra):
            plot.series.append(Series(f"{label} dropped ({len(extra)})",
                                      list(range(len(kept) + 1, len(full) + 1)),
                                      extra.clamp_min(1e-300).tolist(), points=True,
                                      color=color, hollow=True))
    return plot


def ablation_plot(curves: Sequence, title: str | None = None) -> Plot:
    """Node-ablation curves (:class:`~tl_degen.ablation.AblationCurve`), one line each.

    Examples:
        >>> labels = modadd.labels_for(modadd.train_test_split()[0])
        >>> curves = [tl_degen.ablation_curve(model, tokens, b, "resid_mid.0:last", "accuracy",
        ...                                   labels=labels) for b in (bases, pca_bases)]
        >>> viz.ablation_plot(curves, title="Keeping the top n directions").save("ablation.png")
    """
    from tl_degen.ablation import AblationCurve

    if not curves or not all(isinstance(c, AblationCurve) for c in curves):
        raise TLDegenError("give a list of AblationCurves (from ablation_curve)")
    site = curves[0].site.name
    plot = Plot(title or f"Ablation at {site}", "directions kept", "metric")
    for c in curves:
        pts = sorted(zip(c.n_kept, c.values))
        plot.series.append(Series(f"{c.method} ({c.site.name})", [p[0] for p in pts],
                                  [p[1] for p in pts]))
    return plot


def edge_mass_plot(graphs: dict, title: str = "Edge mass") -> Plot:
    """Fraction of each layer pair's edge mass held by its ``n`` strongest edges, one line per
    layer pair of each labelled :class:`~tl_degen.graph.InteractionGraph`.

    Examples:
        >>> pca_graph = tl_degen.interaction_graph(model, tokens, pca_bases)
        >>> viz.edge_mass_plot({"LIB": graph, "PCA": pca_graph}).save("edge_mass.html")
    """
    from tl_degen.graph import InteractionGraph

    if not isinstance(graphs, dict) or not graphs or not all(
            isinstance(g, InteractionGraph) for g in graphs.values()):
        raise TLDegenError("graphs must be a dict of label → InteractionGraph")
    plot = Plot(title, "edges kept (strongest first)", "fraction of edge mass", logx=True)
    for label, graph in graphs.items():
        for a, b in graph.pairs():
            E = graph.edges[(a, b)].flatten().double()
            vals = E.sort(descending=True).values
            total = float(vals.sum())
            if total <= 0:
                continue
            frac = (vals.cumsum(0) / total)
            n = len(frac)
            idx = sorted(set(torch.logspace(0, math.log10(n), 60).long().clamp(1, n).tolist()))
            plot.series.append(Series(f"{label} {a.name}→{b.name}", [float(i) for i in idx],
                                      [float(frac[i - 1]) for i in idx]))
    return plot
