"""Regenerate the screenshots in docs/img (needs Debian's chromium):

    python docs/make_images.py
"""

from __future__ import annotations

import shutil
import subprocess
import tempfile
from pathlib import Path

import tl_degen
from tl_degen import viz
from tl_degen.toy import modadd

IMG = Path(__file__).resolve().parent / "img"
SITES = ["resid_pre.0", "resid_mid.0:last", "resid_post.0:last", "logits:last"]


def main() -> None:
    model = modadd.load_bridge(modadd.load_state_dict())
    tokens = modadd.tokens_for(modadd.train_test_split()[0])
    lib = tl_degen.fit_bases(model, tokens, SITES, progress=False)
    pca = tl_degen.fit_bases(model, tokens, SITES, method="pca", progress=False)
    graph = tl_degen.interaction_graph(model, tokens, lib, progress=False).prune(mass=0.99)
    IMG.mkdir(exist_ok=True)
    viz.spectrum_plot({"LIB": lib, "PCA": pca}, "resid_mid.0:last").save(IMG / "spectrum.png")
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    with tempfile.TemporaryDirectory() as tmp:
        page = viz.save_graph_page(graph, Path(tmp) / "graph.html",
                                   labels=viz.modadd_labels(model, lib), top_nodes=8,
                                   title="modadd: LIB circuit, top 8 directions per site")
        subprocess.run([chromium, "--headless", "--no-sandbox", "--disable-gpu",
                        "--disable-background-networking", "--hide-scrollbars",
                        "--window-size=1100,520", f"--screenshot={IMG / 'circuit.png'}",
                        page.as_uri()], check=True, capture_output=True, timeout=120)
    print(f"wrote {IMG / 'spectrum.png'} and {IMG / 'circuit.png'}")


if __name__ == "__main__":
    main()
