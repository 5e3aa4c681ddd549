"""Export to circuit-tracer's graph format: the JSON validates against circuit-tracer 0.5's own
pydantic models, and circuit-tracer's bundled frontend, served by its own local server, draws
the exported nodes and the links of the pinned circuit in headless Chromium with the network
off.

circuit-tracer is used without its dependencies (they would pull another torch): the wheel is
installed with ``pip install --no-deps circuit-tracer==0.5.0`` (.ci/run) or, when it is not
installed, downloaded the same way into a cache and imported from the wheel file. Its
``index.html`` loads five libraries from CDNs; they are the npm packages below, fetched once
into the cache from the npm registry (checked against the registry's sha512) and served
locally by rewriting those five ``<script src>`` (nothing else of the frontend is changed).
"""

from __future__ import annotations

import base64
import hashlib
import html
import importlib
import io
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tarfile
import urllib.parse
import urllib.request
import zipfile
from pathlib import Path

import pytest

import tl_degen
from tl_degen import viz
from tl_degen.toy import modadd

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
needs_browser = pytest.mark.skipif(
    CHROMIUM is None,
    reason="Debian's chromium is not installed (apt-get install chromium; .ci/run does)",
)
CT_VERSION = "0.5.0"
CACHE = Path(os.environ.get("TL_DEGEN_TEST_CACHE", Path.home() / ".cache" / "tl_degen-tests"))
_CDN = "https://transformer-circuits.pub/2025/attribution-graphs/static_js/lib/"
#: npm package → (version, sha512 of its tarball in the registry).
NPM = {
    "d3": (
        "7.9.2",
        "ZKb/mONPVKzaO5UlcWcwN8bS4ezvQaYu+bsou+XgNABdGC800kwH651ADTbbTxMPHW13UlvbQafdmJQDk1w7Mg==",
    ),
    "d3-jetpack": (
        "2.3.0",
        "P6cgpLIKudalA5sohATXeZ78fHWcmXbAyPXYNIvxi8lc6qjRaNMggx1O/tcdIBTyTM26pTMpHPJI0N1FhPIzTg==",
    ),
    "d3-collection": (
        "1.0.7",
        "ii0/r5f4sjKNTfh84Di+DpztYwqKhEyUlKoPrzUFfeSkWxjW49xU2QzO9qrPrNkpdI0XJkfzvmTu8V2Zylln6A==",
    ),
    "dagre": (
        "0.8.5",
        "/aTqmnRta7x7MCCpExk7HQL2O4owCT2h8NT//9I1OQ9vt29Pa0BzSAkR5lwFUcQ7491yVi/3CXU9jQ5o0Mn2Sw==",
    ),
    "pako": (
        "2.1.0",
        "w+eufiZ1WuJYgPXbV/PO3NCMEc3xqylkKHzp8bxp1uW4qaSNQUkwmLLEc3kKsfz8lpV1F8Ht3U1Cm+9Srog2ug==",
    ),
}
#: A module of d3-jetpack (its UMD file replaces window.d3 when loaded as a browser script,
#: and its d3v7+jetpack.js bundle patches a second copy of d3-selection, not the one d3.select
#: returns), run as CommonJS against the page's d3 7 and merged into it, as the frontend's
#: jetpack script does; d3-collection gives it d3.nest for nestBy, and conventions() gains
#: the c.drawAxis(svg) of the frontend's (newer, unpublished) jetpack.
JETPACK = """(function () {{
  var collection = {{exports: {{}}}};
  (function (module, exports) {{ {collection} }})(collection, collection.exports);
  var jetpack = {{exports: {{}}}};
  (function (module, exports, require) {{ {jetpack} }})(jetpack, jetpack.exports,
    function (name) {{ return name === "d3-collection" ? collection.exports : window.d3; }});
  Object.assign(window.d3, jetpack.exports);
  var conventions = d3.conventions;  // the frontend's jetpack also gives c.drawAxis(svg)
  d3.conventions = function (c) {{
    c = conventions(c);
    c.drawAxis = function (svg) {{
      return d3.drawAxis(Object.assign({{}}, c, {{svg: svg || c.svg}}));
    }};
    return c;
  }};
}})();"""


def cdn_replacements() -> dict[str, str | None]:
    """CDN script of circuit-tracer's index.html → the local script's text (None: left out:
    the hot-reload client of its authors' dev server, and npy.js, which only reads .npy
    feature files)."""
    jetpack = npm_file("d3-jetpack", "package/build/d3-jetpack.cjs").decode()
    collection = npm_file("d3-collection", "package/dist/d3-collection.min.js").decode()
    return {
        _CDN + "hotserver-client-ws.js": None,
        _CDN + "npy_v0.js": None,
        _CDN + "d3.js": npm_file("d3", "package/dist/d3.min.js").decode(),
        _CDN + "jetpack_2024-07-20.js": JETPACK.format(jetpack=jetpack, collection=collection),
        "https://unpkg.com/dagre@0.8.5/dist/dagre.min.js": npm_file(
            "dagre", "package/dist/dagre.min.js"
        ).decode(),
        "https://unpkg.com/pako@2.1.0/dist/pako.min.js": npm_file(
            "pako", "package/dist/pako.min.js"
        ).decode(),
    }


def circuit_tracer_wheel() -> Path | None:
    """circuit-tracer's wheel on ``sys.path`` when the package is not installed."""
    wheel = CACHE / f"circuit_tracer-{CT_VERSION}-py3-none-any.whl"
    if str(wheel) in sys.path:
        return wheel
    if importlib.util.find_spec("circuit_tracer") is not None:
        return None
    CACHE.mkdir(parents=True, exist_ok=True)
    if not wheel.exists():
        subprocess.run(
            [
                sys.executable,
                "-m",
                "pip",
                "download",
                "--quiet",
                "--no-deps",
                f"circuit-tracer=={CT_VERSION}",
                "-d",
                str(CACHE),
            ],
            check=True,
            timeout=300,
        )
    sys.path.insert(0, str(wheel))
    return wheel


def npm_file(name: str, member: str) -> bytes:
    """One file of an npm package's tarball (``NPM``), fetched once from the registry."""
    version, sha512 = NPM[name]
    tgz = CACHE / f"{name}-{version}.tgz"
    if not tgz.exists():
        CACHE.mkdir(parents=True, exist_ok=True)
        url = f"https://registry.npmjs.org/{name}/-/{name}-{version}.tgz"
        with urllib.request.urlopen(url, timeout=120) as r:
            data = r.read()
        if base64.b64encode(hashlib.sha512(data).digest()).decode() != sha512:
            raise AssertionError(f"{url} does not match the registry's sha512")
        tgz.write_bytes(data)
    with tarfile.open(fileobj=io.BytesIO(tgz.read_bytes())) as tar:
        return tar.extractfile(member).read()


def build_frontend(out: Path) -> Path:
    """circuit-tracer's frontend folder at ``out``, its CDN scripts pointing to local copies."""
    wheel = circuit_tracer_wheel()
    if wheel is None:
        spec = importlib.util.find_spec("circuit_tracer")
        shutil.copytree(Path(spec.submodule_search_locations[0]) / "frontend" / "assets", out)
    else:
        prefix = "circuit_tracer/frontend/assets/"
        with zipfile.ZipFile(wheel) as z:
            for m in z.namelist():
                if m.startswith(prefix) and not m.endswith("/"):
                    (out / m[len(prefix) :]).parent.mkdir(parents=True, exist_ok=True)
                    (out / m[len(prefix) :]).write_bytes(z.read(m))
    index = out / "index.html"
    text = index.read_text(encoding="utf-8")
    local = cdn_replacements()
    assert set(re.findall(r"src='(https?://[^']+)'", text)) == set(local)  # nothing else
    (out / "lib").mkdir()
    for n, (url, script) in enumerate(local.items()):
        tag = f"<script src='{url}'></script>"
        if script is None:
            text = text.replace(tag, "")
        else:
            (out / "lib" / f"{n}.js").write_text(script, encoding="utf-8")
            text = text.replace(tag, f"<script src='./lib/{n}.js'></script>")
    index.write_text(text, encoding="utf-8")
    return out


@pytest.fixture(scope="module")
def frontend(tmp_path_factory):
    return build_frontend(tmp_path_factory.mktemp("ct") / "assets")


@pytest.fixture(scope="module")
def modadd_graph():
    model = modadd.load_bridge()
    tokens = modadd.tokens_for(modadd.train_test_split()[0][:600])
    sites = ["resid_pre.0", "resid_mid.0:last", "resid_post.0:last", "logits:last"]
    bases = tl_degen.fit_bases(model, tokens, sites, progress=False)
    graph = tl_degen.interaction_graph(model, tokens, bases, progress=False).prune(mass=0.99)
    return model, bases, graph


def test_export_validates_against_circuit_tracer_models(modadd_graph, tmp_path):
    model, bases, graph = modadd_graph
    circuit_tracer_wheel()
    from circuit_tracer.frontend.graph_models import Model

    labels = {
        graph.node_name(s, j): f"L{s.name}/{j}" for s in graph.sites[:-1] for j in range(bases[s].k)
    }
    modules = graph.modules()
    path = graph.to_circuit_tracer(
        tmp_path,
        slug="modadd",
        labels=labels,
        modules=modules,
        top_nodes=3,
        prompt_tokens=["a", "b", "="],
    )
    data = json.loads(path.read_text())
    Model.model_validate(data)  # circuit-tracer's own schema (pydantic)
    listed = json.loads((tmp_path / "graph-metadata.json").read_text())["graphs"]
    assert [g["slug"] for g in listed] == ["modadd"]
    viz.save_circuit_tracer(graph, tmp_path, slug="other", top_nodes=1)
    listed = json.loads((tmp_path / "graph-metadata.json").read_text())["graphs"]
    assert [g["slug"] for g in listed] == ["modadd", "other"]  # merged, not replaced
    nodes = {n["node_id"]: n for n in data["nodes"]}
    assert len(nodes) == len(data["nodes"]) == sum(bases[s].k for s in graph.sites)
    assert all(tuple(n) == viz.circuit_tracer.CIRCUIT_TRACER_NODE_FIELDS for n in data["nodes"])
    # sites → layers: the first is the input row, the logits the logit row
    layers = [
        sorted(
            {
                n["layer"]
                for n in data["nodes"]
                if n["clerp"].endswith(f"[{s.name}/0]") or n["clerp"].endswith(f"[{s.name}/1]")
            }
        )
        for s in graph.sites[:-1]
    ]
    assert layers == [["E"], ["0"], ["1"]]
    logits = [n for n in data["nodes"] if n["feature_type"] == "logit"]
    assert len(logits) == bases["logits:last"].k and {n["layer"] for n in logits} == {"2"}
    assert logits[7]["feature"] == 7 and logits[7]["clerp"].startswith('Output "7" (p=')
    node = nodes["0_5_2"]  # resid_mid.0:last direction 5, at the last position
    assert node["clerp"] == f"{labels['resid_mid.0:last/5']} [resid_mid.0:last/5]"
    assert node["activation"] == pytest.approx(float(bases["resid_mid.0:last"].eigenvalues[5]))
    assert node["feature"] == (1 + 5) * (1 + 5 + 1) // 2 + 5  # Cantor pairing (site 1, 5)
    # every nonzero edge is a link, source → target, weight = edge strength
    assert len(data["links"]) == sum(graph.n_edges().values())
    E = graph.edge("resid_mid.0:last", "resid_post.0:last")
    link = next(
        lk for lk in data["links"] if lk["source"] == "0_5_2" and lk["target"].startswith("1_")
    )
    assert link["weight"] == pytest.approx(float(E[int(link["target"].split("_")[1]), 5]))
    # the pinned circuit: top 3 directions per site by Λ (constant node left out)
    top = [
        int(j)
        for j in bases["resid_mid.0:last"].eigenvalues.abs().argsort(descending=True)
        if j != graph.constant_node("resid_mid.0:last")
    ][:3]
    assert data["qParams"]["pinnedIds"][3:6] == [f"0_{j}_2" for j in top]
    # influence: cumulative share of the site's Λ, increasing down the ranking
    assert [nodes[f"0_{j}_2"]["influence"] for j in top] == sorted(
        nodes[f"0_{j}_2"]["influence"] for j in top
    )
    # Leiden modules → supernodes over the pinned nodes (a partition, ≥ 2 members each)
    pinned = set(data["qParams"]["pinnedIds"])
    members = [m for group in data["qParams"]["supernodes"] for m in group[1:]]
    assert len(members) == len(set(members)) and set(members) <= pinned
    ids = dict(
        zip(nodes, [graph.node_name(s, j) for s in graph.sites for j in range(bases[s].k)])
    )  # node_id → "site/j"
    for group in data["qParams"]["supernodes"]:
        assert len(group) >= 3 and len({modules.membership[ids[m]] for m in group[1:]}) == 1
    with pytest.raises(tl_degen.TLDegenError, match="slug"):
        viz.circuit_tracer_json(graph, slug="a/b")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@needs_browser
def test_circuit_tracer_frontend_draws_the_exported_graph(modadd_graph, frontend, tmp_path):
    """circuit-tracer's frontend, served by its own local server, draws every exported node in
    its link graph (SVG ``text.node``) and, in its subgraph panel, the pinned circuit with the
    Leiden modules as supernodes: one box per module or lone pinned node, one SVG
    ``path.link-path`` per pair of boxes joined by an edge. Only 127.0.0.1 is reachable."""
    from circuit_tracer.frontend.local_server import serve

    model, bases, graph = modadd_graph
    labels = viz.modadd_labels(model, bases)
    modules = graph.modules()
    path = graph.to_circuit_tracer(
        tmp_path / "data",
        slug="modadd",
        labels=labels,
        modules=modules,
        top_nodes=6,
        prompt_tokens=["a", "b", "="],
    )
    data = json.loads(path.read_text())
    supernodes = data["qParams"]["supernodes"]
    assert supernodes
    box = {n: n for n in data["qParams"]["pinnedIds"]}
    for group in supernodes:
        box.update({m: group[0] for m in group[1:]})
    expected_links = {
        (box[lk["source"]], box[lk["target"]])
        for lk in data["links"]
        if lk["source"] in box and lk["target"] in box and box[lk["source"]] != box[lk["target"]]
    }
    port = free_port()
    server = serve(data_dir=str(tmp_path / "data"), frontend_dir=str(frontend), port=port)
    try:
        # the frontend reads supernodes from the URL (as its shared links carry them)
        url = f"http://127.0.0.1:{port}/index.html?slug=modadd&supernodes=" + urllib.parse.quote(
            json.dumps(supernodes)
        )
        flags = [
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-background-networking",
            "--proxy-server=127.0.0.1:9",
            "--hide-scrollbars",
            "--window-size=1400,1000",
            "--virtual-time-budget=20000",
        ]
        out = subprocess.run(
            [CHROMIUM, *flags, "--dump-dom", url], capture_output=True, text=True, timeout=180
        )
        assert out.returncode == 0, out.stderr[-2000:]
        dom = out.stdout
        requested = "\n".join(server.get_logs())
    finally:
        server.stop()
    assert 'GET /graph_data/modadd.json HTTP/1.1" 200' in requested
    assert len(re.findall(r'<text class="node[ "]', dom)) == len(data["nodes"])
    boxes = len(set(box.values()))
    assert len(re.findall(r'<div class="supernode-container', dom)) == boxes
    assert len(re.findall(r'<path class="link-path', dom)) == len(expected_links) > 0
    for group in supernodes:  # the modules' labels are drawn
        assert f"<span>{html.escape(group[0])}</span>" in dom
