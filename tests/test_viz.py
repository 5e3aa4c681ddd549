"""Views: the graph page, the demo report and the token view rendered in headless Chromium
with the network disabled (DOM counts against the graph, hover details, non-blank
screenshots); plots and Fourier labels. The command line itself: tests/test_cli.py."""

from __future__ import annotations

import html
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

import tl_degen
from tests import models as M
from tl_degen import cli, viz
from tl_degen.sites import Site
from tl_degen.toy import modadd

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
needs_browser = pytest.mark.skipif(
    CHROMIUM is None,
    reason="Debian's chromium is not installed (apt-get install chromium; .ci/run does)",
)
FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--proxy-server=127.0.0.1:9",
    "--proxy-bypass-list=<-loopback>",
    "--hide-scrollbars",
    "--virtual-time-budget=4000",
]


def dump_dom(page: Path, fragment: str = "") -> str:
    out = subprocess.run(
        [CHROMIUM, *FLAGS, "--dump-dom", page.resolve().as_uri() + fragment],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    return out.stdout


def screenshot_is_not_blank(page: Path, tmp_path: Path, size: str = "1300,900") -> None:
    import matplotlib.image as mpimg

    shot = tmp_path / f"{page.stem}.png"
    subprocess.run(
        [
            CHROMIUM,
            *FLAGS,
            f"--window-size={size}",
            f"--screenshot={shot}",
            page.resolve().as_uri(),
        ],
        capture_output=True,
        timeout=120,
        check=True,
    )
    img = torch.from_numpy(mpimg.imread(str(shot)))[..., :3]
    colours = torch.unique((img * 255).round().reshape(-1, 3), dim=0)
    assert img.std() > 0.02 and len(colours) > 20, (float(img.std()), len(colours))


@pytest.fixture(scope="module")
def small_graph():
    model = modadd.load_bridge()
    tokens = modadd.tokens_for(modadd.train_test_split()[0][:600])
    sites = ["resid_pre.0", "resid_mid.0:last", "resid_post.0:last", "logits:last"]
    bases = tl_degen.fit_bases(model, tokens, sites, progress=False)
    graph = tl_degen.interaction_graph(model, tokens, bases, progress=False)
    return model, bases, graph


@needs_browser
def test_graph_page_renders_offline_with_every_node_and_edge(small_graph, tmp_path):
    model, bases, graph = small_graph
    pruned = graph.prune(top_k=3)
    labels = {graph.node_name(s, 1): f"label of {s.name}" for s in graph.sites}
    page = viz.save_graph_page(  # a folder that does not exist yet is created
        pruned, tmp_path / "new" / "graph.html", labels=labels, modules=pruned.modules()
    )
    assert page.stat().st_size < 5 * 2**20
    assert not re.search(
        r'(src|href)="https?:|url\(https?:|import\s.*https?:', page.read_text()
    )  # nothing fetched (the SVG namespace is a name)
    dom = dump_dom(page)
    n_nodes = sum(bases[s].k for s in graph.sites)
    n_edges = sum(pruned.n_edges().values())
    assert len(re.findall(r'<circle class="node', dom)) == n_nodes
    assert len(re.findall(r'<line class="edge', dom)) == n_edges
    # the script ran (it fills the counter) and every node carries its hover details
    assert f"{n_edges} of {n_edges} edges shown" in dom
    assert len(re.findall(r"<title>[^<]*Λ=", dom)) == n_nodes
    # hovering a node (opened through a #node= link) shows its details and strongest edges
    node = graph.node_name(graph.sites[1], 1)
    tip = re.search(
        r'<div class="tip"[^>]*>(.*?)</div>', dump_dom(page, "#node=" + node), re.S
    ).group(1)
    text = html.unescape(tip)
    assert "resid_mid.0:last / direction 1" in text and "Λ =" in text
    assert "label of resid_mid.0:last" in text and "strongest in:" in text
    screenshot_is_not_blank(page, tmp_path)


def top_by_lambda(graph, n: int) -> dict:
    """Site → its ``n`` directions of largest |Λ|, the constant node left out."""
    return {
        s: [
            int(j)
            for j in graph.bases[s].eigenvalues.abs().argsort(descending=True)
            if j != graph.constant_node(s)
        ][:n]
        for s in graph.sites
    }


@needs_browser
def test_graph_page_opens_on_a_readable_circuit_without_scripts(small_graph, tmp_path):
    """The top directions per site, labelled, and the edges among them, in the page's own
    markup (no script builds or reveals them: headless Chromium cannot screenshot with
    scripts off, so the markup is checked); the whole graph sits in a closed <details> one
    click away."""
    _, bases, graph = small_graph
    pruned = graph.prune(mass=0.99)
    labels = {
        graph.node_name(s, j): f"L{s.name}/{j}" for s in graph.sites for j in range(bases[s].k)
    }
    attr = torch.zeros(bases["resid_mid.0:last"].k)
    attr[[5, 2, 9]] = torch.tensor([-3.0, 2.0, 1.0])  # ranks by |importance|: 5, 2, 9
    page = viz.save_graph_page(
        pruned,
        tmp_path / "g.html",
        labels=labels,
        top_nodes=3,
        importance={"resid_mid.0:last": attr},
    )
    source, dom = page.read_text(), dump_dom(page)
    chosen = top_by_lambda(graph, 3)
    chosen[Site.parse("resid_mid.0:last")] = [5, 2, 9]
    drawn = re.findall(r'<circle class="cnode"[^>]*data-id="([^"]+)"', dom)
    assert drawn == re.findall(r'<circle class="cnode"[^>]*data-id="([^"]+)"', source)
    assert drawn == [graph.node_name(s, j) for s in graph.sites for j in chosen[s]]
    for nid in drawn:  # labels are visible text, not only hover titles
        assert re.search(
            rf'<text class="clabel"[^>]*>#\d+ {re.escape(html.escape(labels[nid]))}<', dom
        ), nid
    expected = sum(
        int((pruned.edges[(a, b)][chosen[b]][:, chosen[a]] > 0).sum()) for a, b in pruned.pairs()
    )
    assert len(re.findall(r'<line class="cedge"', dom)) == expected > 0
    assert re.search(r'<details class="tld-all">', dom)  # closed
    assert len(re.findall(r'<circle class="node"', dom)) == sum(bases[s].k for s in graph.sites)
    opened = dump_dom(page, "#node=" + graph.node_name(graph.sites[1], 1))
    assert re.search(r'<details class="tld-all" open', opened)
    circuit = source[source.index('<div class="tld-circuit"') : source.index("<details")]
    assert "hidden" not in re.sub(r"<(style|script)>.*?</\1>", "", circuit, flags=re.S)
    screenshot_is_not_blank(page, tmp_path)
    with pytest.raises(tl_degen.TLDegenError, match="one value per direction"):
        viz.graph_html(pruned, importance={"resid_mid.0:last": torch.zeros(3)})


def test_lm_labels_name_output_tokens_and_the_context_where_a_direction_peaks(tokenizer_dir):
    """Each direction's label: the output tokens its write promotes and suppresses most (the
    first and last of its :func:`viz.output_effects` row) and the context at the position
    where its coordinate is highest; the constant direction is "constant"; logits nodes are
    their tokens; the labels are drawn on the page."""
    model = M.build("gpt2", tokenizer_dir)
    tokens = M.random_tokens(12, 6, seed=3)
    sites = ["resid_mid.1", "resid_post.1:last", "logits:last"]
    bases = tl_degen.fit_bases(model, tokens, sites, progress=False)
    labels = viz.lm_labels(model, tokens, bases, top_k=2, context=2)
    assert set(labels) == {f"{s}/{j}" for s in sites for j in range(bases[s].k)}
    assert labels["resid_mid.1/0"] == "constant"  # the constant direction of a centered basis
    assert labels["logits:last/7"] == repr(model.tokenizer.decode([7]))
    site = "resid_post.1:last"
    effect = viz.output_effects(model, bases)[site][1]
    up, down = (model.tokenizer.decode([int(i)]) for i in (effect.argmax(), effect.argmin()))
    assert labels[f"{site}/1"].startswith(f"+{up!r} ") and f"−{down!r} " in labels[f"{site}/1"]
    vals = viz.direction_values(model, tokens, bases[site], [1])[:, 0, 0]  # last position
    row = tokens[int(vals.argmax())]
    before = "".join(model.tokenizer.decode([int(t)]) for t in row[-3:-1])
    peak = model.tokenizer.decode([int(row[-1])])
    assert labels[f"{site}/1"].endswith(f"· {before!r} [{peak!r}]")
    html_text = viz.graph_html(
        tl_degen.interaction_graph(model, tokens, bases, progress=False), labels=labels, top_nodes=3
    )
    assert html.escape(labels[f"{site}/1"]) in html_text
    with pytest.raises(tl_degen.TLDegenError, match="top_k"):
        viz.lm_labels(model, tokens, bases, top_k=True)


def test_output_effects_are_the_logit_change_of_a_unit_write_without_a_norm():
    """On a model without normalisation the direct path is the whole path from
    ``mlp_post.1`` and ``resid_post.1`` on: moving coordinate ``j`` by one (writing
    ``x + C⁺_j``, the constant kept at 1) changes the logits by exactly row ``j``."""
    from tl_degen.adapters import get_adapter
    from tl_degen.model_state import prepared
    from tl_degen.sites import Site

    model = M.build("native_relu")
    tokens = M.random_tokens(24, 5)
    sites = ["mlp_post.1:last", "resid_post.1:last", "logits:last"]
    bases = tl_degen.fit_bases(model, tokens, sites, progress=False)
    effects = viz.output_effects(model, bases)
    adapter = get_adapter(model)
    with prepared(model, torch.float64), torch.no_grad():
        for name in sites[:2]:
            site, b = Site.parse(name), bases[name]
            (x,) = adapter.read_sites(tokens[:2], [site])
            base = adapter.run(tokens[:2], read=Site("logits"), write=(site, x))[:, -1]
            for j in (1, b.k - 1):
                moved = x.clone()
                moved[..., :-1] += b.C_pinv[j, :-1].to(x)
                logits = adapter.run(tokens[:2], read=Site("logits"), write=(site, moved))
                change = logits[:, -1] - base
                torch.testing.assert_close(change, effects[name][j].expand_as(change),
                                           rtol=1e-9, atol=1e-9 * float(change.abs().max()))


def test_circuit_view_defaults_to_top_8_by_lambda_with_widths_growing_with_strength(small_graph):
    _, bases, graph = small_graph
    pruned = graph.prune(mass=0.99)
    text = viz.graph_html(pruned)  # defaults: top_nodes=8, ranked by Λ
    circuit = text[text.index('<div class="tld-circuit"') : text.index("<details")]
    top = top_by_lambda(graph, 8)
    drawn = re.findall(r'<circle class="cnode"[^>]*data-id="([^"]+)"', circuit)
    assert drawn == [graph.node_name(s, j) for s in graph.sites for j in top[s]]
    assert len(drawn) == 8 * len(graph.sites) < sum(bases[s].k for s in graph.sites)
    edges = re.findall(
        r'<line class="cedge"[^>]*stroke-width="([\d.]+)" stroke-opacity="([\d.]+)" '
        r'data-s="([^"]+)" data-t="([^"]+)"',
        circuit,
    )
    assert edges
    for a, b in pruned.pairs():  # within a layer pair, width and opacity grow with strength
        E = pruned.edges[(a, b)]
        rows = sorted(
            (float(E[int(t.split("/")[-1]), int(s_.split("/")[-1])]), float(w), float(o))
            for w, o, s_, t in edges
            if s_.startswith(a.name + "/") and t.startswith(b.name + "/")
        )
        assert rows and rows[-1][1] == 6.0  # the strongest edge of the pair: the widest
        assert all(r[1] <= q[1] and r[2] <= q[2] for r, q in zip(rows, rows[1:]))


def test_graph_page_draws_at_most_max_edges(small_graph):
    _, _, graph = small_graph
    text = viz.graph_html(graph, max_edges=300)
    drawn = len(re.findall(r'<line class="edge', text))
    assert 0 < drawn <= 300 and "prune the graph or raise max_edges" in text
    assert '<div class="tld-graph"' in graph._repr_html_()
    with pytest.raises(tl_degen.TLDegenError, match="max_edges"):
        viz.graph_html(graph, max_edges=0)


@pytest.fixture(scope="module")
def demo_report(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo") / "report"
    assert cli.main(["demo", "--out", str(out), "--quiet"]) == 0
    return out


@needs_browser
def test_demo_report_renders_offline(demo_report, tmp_path):
    index = demo_report / "index.html"
    graph = tl_degen.InteractionGraph.load(demo_report / "graph.safetensors").prune(mass=0.99)
    dom = dump_dom(index)
    assert len(re.findall(r'<circle class="node', dom)) == sum(
        graph.bases[s].k for s in graph.sites
    )
    assert len(re.findall(r'<line class="edge', dom)) == sum(graph.n_edges().values())
    # 4 spectra, 2 ablation, 1 mass, 2 patching curves
    assert len(re.findall(r'<svg[^>]*class="tld-plot"', dom)) == 9
    for heading in ("Patching: which basis explains the task", "Degeneracy", "Modules",
                    "Spectra", "Token view"):
        assert heading in dom
    assert "resid_mid.0:last  neuron" in dom  # the comparison's table
    for name in ("spectrum_resid_mid_0", "ablation_mlp_post_0", "edge_mass",
                 "patching_mlp_post_0"):
        assert (demo_report / "plots" / f"{name}.png").stat().st_size > 10_000
    assert (demo_report / "graph.html").stat().st_size < 5 * 2**20
    screenshot_is_not_blank(index, tmp_path)


@needs_browser
def test_token_view_renders_offline(demo_report, tmp_path):
    page = demo_report / "tokens.html"
    raw = page.read_text()
    assert "/>" not in re.sub(r"<script.*?</script>", "", raw, flags=re.S).replace("<br/>", "")
    dom = dump_dom(page)
    # both circuitsvis views rendered (React fills their containers), with our tokens
    containers = re.findall(r'<div id="circuits-vis-[^"]*"[^>]*>(.*?)</div>\s*<script', dom, re.S)
    assert len(containers) == 2 and all(len(c) > 200 for c in containers)
    assert dom.count(">=<") >= 5  # the '=' token of the shown sequences
    assert "resid_pre.0/1: " in dom  # directions named with their labels
    screenshot_is_not_blank(page, tmp_path, "900,700")


def test_fix_local_src_closes_self_closing_divs():
    src = '<div id="a" style="margin: 15px 0;"/>\n<script>var x = "<b/>";</script>'
    fixed = viz.fix_local_src(src)
    assert fixed.startswith('<div id="a" style="margin: 15px 0;"></div>')
    assert '"<b/>"' in fixed


def test_fourier_content_finds_planted_frequencies():
    p = 113
    a = torch.arange(p, dtype=torch.float64)[:, None]
    b = torch.arange(p, dtype=torch.float64)[None, :]
    cases = {
        "a+b: k=14 (100%)": torch.cos(2 * torch.pi * 14 * (a + b) / p),
        "a: k=5 (100%)": torch.sin(2 * torch.pi * 5 * a / p).expand(p, p),
        "b: k=40 (100%)": torch.cos(2 * torch.pi * 40 * b / p + 0.3).expand(p, p),
        "(k_a,k_b)=(3,7) (100%)": torch.cos(2 * torch.pi * (3 * a + 7 * b) / p),
    }
    grids = torch.stack(list(cases.values()))
    power, tops = viz.fourier_content(grids)
    assert torch.allclose(power.sum((-1, -2)), torch.ones(4, dtype=torch.float64))
    assert [viz.fourier_label(t) for t in tops] == list(cases)
    assert viz.fourier_label(viz.fourier_content(torch.ones(p, p))[1]) == "constant"


def test_plots_save_html_and_png(small_graph, tmp_path):
    model, bases, graph = small_graph
    pca = tl_degen.fit_bases(
        model,
        modadd.tokens_for(modadd.train_test_split()[0][:600]),
        ["resid_mid.0:last", "logits:last"],
        method="pca",
        progress=False,
    )
    plot = viz.spectrum_plot({"LIB": bases, "PCA": pca}, "resid_mid.0:last")
    names = [s.name for s in plot.series]
    assert any(n.startswith("LIB kept") for n in names)
    assert any("dropped" in n for n in names)  # dropped directions are marked (hollow)
    for suffix in (".html", ".png", ".svg"):
        path = plot.save(tmp_path / f"spectrum{suffix}")
        assert path.stat().st_size > 1000
    assert not list(tmp_path.glob("*.tmp*"))
    mass = viz.edge_mass_plot({"LIB": graph})
    assert all(0 < y <= 1 + 1e-12 for s in mass.series for y in s.y)
    with pytest.raises(tl_degen.TLDegenError, match=r"\.html, \.svg or \.png"):
        plot.save(tmp_path / "x.pdf")


def tick_labels(plot, axis: str) -> list[str]:
    """The tick labels matplotlib draws on ``axis`` inside the plotted range."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    fig = plot.figure()
    FigureCanvasAgg(fig).draw()
    ax = fig.axes[0]
    lo, hi = sorted(ax.get_ylim() if axis == "y" else ax.get_xlim())
    ticks = ax.yaxis if axis == "y" else ax.xaxis
    return [
        t.get_text() for t, v in zip(ticks.get_ticklabels(), ticks.get_ticklocs()) if lo <= v <= hi
    ]


def test_plots_have_decade_and_round_ticks_and_hover_titles():
    spectrum = viz.Plot(
        "Spectrum",
        "direction",
        "Λ",
        logy=True,
        series=[viz.Series("LIB", list(range(1, 6)), [3.2e5, 4.1e3, 2.0e0, 5e-3, 1e-6])],
    )
    labels = tick_labels(spectrum, "y")
    assert len(labels) >= 3
    assert all(re.fullmatch(r"\$\\mathdefault\{10\^\{[−-]?\d+\}\}\$", t) for t in labels), labels
    curve = viz.Plot(
        "Ablation",
        "kept",
        "accuracy",
        series=[viz.Series("LIB", [0, 10, 20, 113], [0.2364, 0.5042, 0.7719, 0.99])],
    )
    labels = tick_labels(curve, "y")
    assert len(labels) >= 3
    for t in labels:  # round numbers: at most two significant digits
        value = float(t.replace("−", "-"))
        assert value == float(f"{value:.2g}"), labels
    svg = spectrum.to_svg()
    assert svg.startswith('<svg class="tld-plot"') and "<script" not in svg
    titles = re.findall(r"<title>(.*?)</title>", svg)
    assert titles == [
        f"LIB: x={x}, y={y:.6g}" for x, y in zip(range(1, 6), [3.2e5, 4.1e3, 2.0e0, 5e-3, 1e-6])
    ]
    with pytest.raises(tl_degen.TLDegenError, match="no data"):
        viz.Plot("empty", "x", "y", logy=True, series=[viz.Series("a", [1], [0.0])]).to_svg()


def test_the_circuit_opens_on_the_metric_given_an_attribution_result(small_graph):
    """``importance=attribution_patch(...)``: the same page as its per-direction sums given
    as a dict; each site's directions ranked by |attribution|; an edge into an attributed
    site drawn by its share of its target's |attribution| (the target's edges, normalised,
    times it)."""
    import re

    model, bases, graph = small_graph
    clean, corrupted, ld = modadd.patching_pairs(60, seed=2)
    sites = ["resid_mid.0:last", "resid_post.0:last"]
    attr = tl_degen.attribution_patch(model, clean, corrupted, bases, sites, ld, progress=False)
    per = {s: attr.per_direction(s) for s in sites}
    page = viz.circuit_svg(graph, importance=attr, top_nodes=4, uid="u")
    assert page == viz.circuit_svg(graph, importance=per, top_nodes=4, uid="u")
    for s in sites:
        ids = re.findall(rf'data-id="{re.escape(s)}/(\d+)"', page)
        ranked = [j for j in attr.top(s, 6) if j != graph.constant_node(s)][:4]
        assert [int(j) for j in ids] == ranked, s
    a, b = graph.sites[1], graph.sites[2]
    E = graph.edges[(a, b)].double()
    i, j = ranked[0], [int(x) for x in re.findall(rf'data-id="{re.escape(a.name)}/(\d+)"',
                                                   page)][0]
    title = re.search(rf"{re.escape(a.name)}/{j} → {re.escape(b.name)}/{i}: ([0-9.e+-]+) of "
                      "its target's importance", page)
    want = float(E[i, j] / E[i].sum() * per[b.name][i].abs())
    assert title and float(title.group(1)) == pytest.approx(want, rel=1e-3)
    with pytest.raises(tl_degen.TLDegenError, match="attribution_patch"):
        viz.circuit_svg(graph, importance=[1, 2])
