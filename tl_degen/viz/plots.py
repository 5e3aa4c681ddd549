"""Plots that work offline: Λ spectra, ablation curves, edge-mass curves.

Each function returns a :class:`Plot`, which renders as self-contained SVG inside HTML
(hover a point for its values; no JavaScript library, no network) and as PNG through
matplotlib::

    plot = spectrum_plot({"LIB": lib_bases, "PCA": pca_bases}, "resid_mid.0:last")
    plot.save("spectrum.html"); plot.save("spectrum.png"); plot   # in a notebook
"""

from __future__ import annotations

import html
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from tl_degen.errors import TLDegenError

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


@dataclass
class Plot:
    """A small line/scatter plot; ``to_html()``, ``save(path.html|.png)``, ``_repr_html_``.

    Examples:
        >>> plot = viz.Plot("Eigenvalues", "direction", "Λ", logy=True)
        >>> plot.series.append(viz.Series("LIB", [1, 2, 3], [9.0, 4.0, 1.0]))
        >>> plot.save("spectrum.html")
        >>> plot.save("spectrum.png")  # through matplotlib
    """

    title: str
    xlabel: str
    ylabel: str
    series: list[Series] = field(default_factory=list)
    logx: bool = False
    logy: bool = False
    width: int = 640
    height: int = 380

    # ------------------------------------------------------------------ SVG
    def _ranges(self):
        xs = [x for s in self.series for x in s.x if not self.logx or x > 0]
        ys = [y for s in self.series for y in s.y if not self.logy or y > 0]
        if not xs or not ys:
            raise TLDegenError(f"plot {self.title!r} has no data to draw")
        f = (lambda v: math.log10(v)) if self.logx else float
        g = (lambda v: math.log10(v)) if self.logy else float
        x0, x1 = min(map(f, xs)), max(map(f, xs))
        y0, y1 = min(map(g, ys)), max(map(g, ys))
        if x1 == x0:
            x1 += 1
        if y1 == y0:
            y1 += 1
        pad = 0.04 * (y1 - y0)
        return f, g, x0, x1, y0 - pad, y1 + pad

    def to_svg(self) -> str:
        f, g, x0, x1, y0, y1 = self._ranges()
        W, H, L, R, T, B = self.width, self.height, 70, 150, 30, 45
        pw, ph = W - L - R, H - T - B

        def px(v):
            return L + (f(v) - x0) / (x1 - x0) * pw

        def py(v):
            return T + ph - (g(v) - y0) / (y1 - y0) * ph

        out = [f'<svg xmlns="http://www.w3.org/2000/svg" class="tld-plot" width="{W}" '
               f'height="{H}" viewBox="0 0 {W} {H}" font-family="sans-serif" font-size="11">',
               f'<rect x="0" y="0" width="{W}" height="{H}" fill="white"/>',
               f'<text x="{L + pw / 2}" y="18" text-anchor="middle" font-size="13" '
               f'font-weight="bold">{html.escape(self.title)}</text>',
               f'<rect x="{L}" y="{T}" width="{pw}" height="{ph}" fill="none" stroke="#999"/>']
        for i in range(5):  # ticks
            xv, yv = x0 + (x1 - x0) * i / 4, y0 + (y1 - y0) * i / 4
            xl = f"1e{xv:.1f}" if self.logx else f"{xv:.4g}"
            yl = f"1e{yv:.1f}" if self.logy else f"{yv:.4g}"
            X, Y = L + pw * i / 4, T + ph - ph * i / 4
            out.append(f'<text x="{X:.1f}" y="{T + ph + 15}" text-anchor="middle">{xl}</text>')
            out.append(f'<text x="{L - 5}" y="{Y + 4:.1f}" text-anchor="end">{yl}</text>')
            out.append(f'<line x1="{L}" x2="{L + pw}" y1="{Y:.1f}" y2="{Y:.1f}" '
                       'stroke="#eee"/>')
        out.append(f'<text x="{L + pw / 2}" y="{H - 8}" text-anchor="middle">'
                   f'{html.escape(self.xlabel)}</text>')
        out.append(f'<text transform="translate(14 {T + ph / 2}) rotate(-90)" '
                   f'text-anchor="middle">{html.escape(self.ylabel)}</text>')
        for n, s in enumerate(self.series):
            color = s.color or PALETTE[n % len(PALETTE)]
            pts = [(x, y) for x, y in zip(s.x, s.y)
                   if (not self.logx or x > 0) and (not self.logy or y > 0)]
            if not s.points and len(pts) > 1:
                d = " ".join(f"{px(x):.1f},{py(y):.1f}" for x, y in pts)
                out.append(f'<polyline class="series" fill="none" stroke="{color}" '
                           f'stroke-width="1.5" points="{d}"/>')
            step = max(1, len(pts) // 400)
            for x, y in pts[::step]:
                fill = "white" if s.hollow else color
                out.append(f'<circle class="point" cx="{px(x):.1f}" cy="{py(y):.1f}" r="2.5" '
                           f'fill="{fill}" stroke="{color}"><title>{html.escape(s.name)}: '
                           f'x={x:.6g}, y={y:.6g}</title></circle>')
            ly = T + 12 + 16 * n
            out.append(f'<rect x="{L + pw + 10}" y="{ly - 8}" width="10" height="10" '
                       f'fill="{"white" if s.hollow else color}" stroke="{color}"/>')
            out.append(f'<text x="{L + pw + 25}" y="{ly + 1}">{html.escape(s.name)}</text>')
        out.append("</svg>")
        return "\n".join(out)

    def to_html(self) -> str:
        """A complete, self-contained HTML page holding the SVG."""
        return (f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>"
                f"{html.escape(self.title)}</title></head><body>{self.to_svg()}</body></html>")

    def _repr_html_(self) -> str:
        return self.to_svg()

    # ------------------------------------------------------------------ PNG
    def to_png(self, path: str | os.PathLike, dpi: int = 110) -> Path:
        import matplotlib

        matplotlib.use("Agg", force=False)
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(self.width / 100, self.height / 100), dpi=dpi)
        for n, s in enumerate(self.series):
            color = s.color or PALETTE[n % len(PALETTE)]
            style = dict(marker="o", markersize=3, color=color, label=s.name,
                         markerfacecolor="white" if s.hollow else color)
            if s.points:
                style["linestyle"] = "none"
            ax.plot(s.x, s.y, **style)
        ax.set(title=self.title, xlabel=self.xlabel, ylabel=self.ylabel)
        if self.logx:
            ax.set_xscale("log")
        if self.logy:
            ax.set_yscale("log")
        ax.legend(fontsize=8)
        fig.tight_layout()
        path = Path(path)
        tmp = path.with_name(path.name + ".tmp.png")
        fig.savefig(tmp)
        plt.close(fig)
        os.replace(tmp, path)
        return path

    def save(self, path: str | os.PathLike) -> Path:
        """Write ``.html`` (self-contained) or ``.png``, atomically."""
        path = Path(path)
        if path.suffix == ".png":
            return self.to_png(path)
        if path.suffix not in (".html", ".htm", ".svg"):
            raise TLDegenError(f"save a plot as .html, .svg or .png, not {path.suffix!r}")
        text = self.to_svg() if path.suffix == ".svg" else self.to_html()
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, path)
        return path


def spectrum_plot(bases: dict, site: str) -> Plot:
    """Λ (LIB) or Gram eigenvalues (PCA, neuron) at ``site`` for each labelled
    :class:`~tl_degen.basis_set.BasisSet`, kept directions filled, dropped ones hollow.

    Examples:
        >>> pca = tl_degen.fit_bases(model, tokens, bases.sites, method="pca")
        >>> plot = viz.spectrum_plot({"LIB": bases, "PCA": pca}, "resid_mid.0:last")
        >>> plot.save("spectrum.png")
    """
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
    if not curves:
        raise TLDegenError("give at least one ablation curve")
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
