"""Views: the interactive graph page, token views and Fourier labels, offline plots.

Everything renders with no network: HTML files have their JavaScript inlined.

Examples:
    >>> from tl_degen import viz
    >>> labels = viz.modadd_labels(model, bases)
    >>> viz.save_graph_page(graph.prune(mass=0.99), "graph.html", labels=labels)
    >>> viz.spectrum_plot({"LIB": lib, "PCA": pca}, "resid_mid.0:last").save("spectrum.png")
    >>> graph.to_circuit_tracer("ct_graphs", slug="modadd")  # for circuit-tracer's frontend
"""

from tl_degen.viz.circuit_tracer import circuit_tracer_json, save_circuit_tracer
from tl_degen.viz.graph_page import circuit_svg, graph_html, save_graph_page
from tl_degen.viz.plots import Plot, Series, ablation_plot, edge_mass_plot, spectrum_plot
from tl_degen.viz.tokens import (
    direction_values,
    fix_local_src,
    fourier_content,
    fourier_label,
    lm_labels,
    modadd_labels,
    output_effects,
    save_token_view,
    token_view_html,
)

__all__ = [
    "graph_html",
    "circuit_svg",
    "save_graph_page",
    "circuit_tracer_json",
    "save_circuit_tracer",
    "Plot",
    "Series",
    "spectrum_plot",
    "ablation_plot",
    "edge_mass_plot",
    "token_view_html",
    "save_token_view",
    "direction_values",
    "fix_local_src",
    "fourier_content",
    "fourier_label",
    "modadd_labels",
    "lm_labels",
    "output_effects",
]
