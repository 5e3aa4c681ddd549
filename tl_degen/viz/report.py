"""A report folder: ``index.html`` with the graph, spectra, ablation and edge-mass plots,
patching results and the degeneracy tables, plus each piece as its own file.

Everything is inlined (no network at view time). The folder is written to a temporary
sibling and renamed into place at the end, so an interrupted run leaves nothing half-written.
"""

from __future__ import annotations

import html
import json
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from tl_degen.errors import ArgumentError, TLDegenError
from tl_degen.viz.graph_page import graph_html
from tl_degen.viz.plots import Plot

__all__ = ["Report"]

_CSS = """
body{font-family:sans-serif;max-width:1400px;margin:20px auto;padding:0 16px;color:#222}
h1{font-size:22px} h2{font-size:18px;border-bottom:1px solid #ddd;padding-bottom:4px;
margin-top:32px} pre{background:#f6f6f6;padding:8px;overflow-x:auto;font-size:12px}
table{border-collapse:collapse;font-size:13px} td,th{border:1px solid #ddd;padding:3px 8px;
text-align:right} th{background:#f0f0f0} .plots{display:flex;flex-wrap:wrap;gap:12px}
nav a{margin-right:14px}
"""


@dataclass
class Report:
    """Collects sections, then :meth:`write` puts ``index.html`` and files in a folder.

    Sections appear in the order added. ``files`` are extra files (name → bytes or text).
    """

    title: str
    sections: list[tuple[str, str]] = field(default_factory=list)  # (heading, html)
    files: dict[str, bytes | str] = field(default_factory=dict)
    plots: dict[str, Plot] = field(default_factory=dict)
    data: dict = field(default_factory=dict)

    def add_html(self, heading: str, body: str) -> None:
        self.sections.append((heading, body))

    def add_text(self, heading: str, text: str) -> None:
        self.sections.append((heading, f"<pre>{html.escape(text)}</pre>"))

    def add_table(self, heading: str, header: list[str], rows: list[list], note: str = ""
                  ) -> None:
        head = "".join(f"<th>{html.escape(str(h))}</th>" for h in header)
        body = "".join("<tr>" + "".join(f"<td>{html.escape(_fmt(v))}</td>" for v in r) + "</tr>"
                       for r in rows)
        extra = f"<p>{html.escape(note)}</p>" if note else ""
        self.sections.append((heading, f"{extra}<table><tr>{head}</tr>{body}</table>"))

    def add_plots(self, heading: str, plots: dict[str, Plot]) -> None:
        """Inline SVGs in the page; each also saved as ``plots/<name>.html`` and ``.png``."""
        self.plots.update(plots)
        links = " ".join(f'<a href="plots/{n}.png">{n}.png</a>' for n in plots)
        svgs = "".join(p.to_svg() for p in plots.values())
        self.sections.append((heading, f'<div class="plots">{svgs}</div><p>{links}</p>'))

    def add_graph(self, heading: str, graph, **kwargs) -> None:
        """The graph inline, and as a standalone ``graph.html``."""
        self.files["graph.html"] = graph_html(graph, **kwargs)
        self.sections.append((heading, graph_html(graph, standalone=False, **kwargs)
                              + '<p><a href="graph.html">open the graph on its own page</a></p>'))

    def html(self) -> str:
        nav = " ".join(f'<a href="#s{i}">{html.escape(h)}</a>'
                       for i, (h, _) in enumerate(self.sections))
        parts = [f'<h2 id="s{i}">{html.escape(h)}</h2>{body}'
                 for i, (h, body) in enumerate(self.sections)]
        return (f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>"
                f"{html.escape(self.title)}</title><style>{_CSS}</style></head><body>"
                f"<h1>{html.escape(self.title)}</h1><nav>{nav}</nav>{''.join(parts)}"
                "</body></html>")

    @staticmethod
    def check_folder(folder: str | os.PathLike) -> Path:
        """``folder`` if a report may be written there: new, empty, or an earlier report
        (``index.html`` and ``report.json`` in it), which it replaces. Anything else is the
        user's and is refused (:class:`~tl_degen.errors.ArgumentError`), before any work."""
        if not isinstance(folder, (str, os.PathLike)) or not str(folder).strip():
            raise ArgumentError(f"the report folder must be a folder name, got {folder!r}")
        folder = Path(folder)
        if folder.exists() and not folder.is_dir():
            raise ArgumentError(f"{folder} is a file; give a folder for the report")
        if folder.is_dir() and any(folder.iterdir()) and not (
                (folder / "index.html").is_file() and (folder / "report.json").is_file()):
            raise ArgumentError(f"{folder} is not empty and is not an earlier tl-degen report; "
                                "give a new folder (the report replaces the folder's contents)")
        for parent in folder.parents:
            if parent.exists():
                if not parent.is_dir():
                    raise ArgumentError(f"cannot write {folder}: {parent} is a file")
                break
        return folder

    def write(self, folder: str | os.PathLike, *, overwrite: bool = True) -> Path:
        """Write the folder atomically (built beside it, then renamed into place). It
        replaces only an earlier report or an empty folder (:meth:`check_folder`); with
        ``overwrite=False`` not even those."""
        folder = self.check_folder(folder)
        if folder.exists() and not overwrite:
            raise TLDegenError(f"{folder} exists; choose another --out or remove it")
        folder.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
        tmp.chmod(0o755)  # mkdtemp makes it private; a report is meant to be read
        try:
            (tmp / "plots").mkdir()
            for name, plot in self.plots.items():
                plot.save(tmp / "plots" / f"{name}.html")
                plot.save(tmp / "plots" / f"{name}.png")
            for name, content in self.files.items():
                path = tmp / name
                path.parent.mkdir(parents=True, exist_ok=True)
                if isinstance(content, bytes):
                    path.write_bytes(content)
                else:
                    path.write_text(content, encoding="utf-8")
            (tmp / "report.json").write_text(json.dumps(self.data, indent=1, default=str),
                                             encoding="utf-8")
            (tmp / "index.html").write_text(self.html(), encoding="utf-8")
            if folder.exists():
                old = folder.with_name(f".{folder.name}.old")
                shutil.rmtree(old, ignore_errors=True)
                os.replace(folder, old)
                os.replace(tmp, folder)
                shutil.rmtree(old, ignore_errors=True)
            else:
                os.replace(tmp, folder)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return folder


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return "-" if v is None else str(v)
