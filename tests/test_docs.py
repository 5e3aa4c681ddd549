"""The documentation: docstring examples render as code, and the strict docs build is clean.

Docstring example output such as ``x[:5]`` followed by ``[512, 513, ...]`` in prose is read by
Markdown as a reference link ``[text][id]``; mkdocs-autorefs then warns and the strict build
fails. Examples therefore live in Google-style ``Examples:`` sections, which mkdocstrings turns
into code blocks.
"""

import importlib
import inspect
import pkgutil
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import tl_degen

ROOT = Path(__file__).resolve().parents[1]
# ``[text][id]`` or ``[text] [id]``: a Markdown reference link, resolved by mkdocs-autorefs.
REFERENCE_LINK = re.compile(r"\][ \t\n]*\[")
SECTION = re.compile(r"^\s*([A-Z][A-Za-z ]*):\s*$")


def _docstrings():
    """(qualified name, docstring) of every module, class, function and method in tl_degen."""
    seen = set()
    yield "tl_degen", inspect.getdoc(tl_degen)
    for info in pkgutil.walk_packages(tl_degen.__path__, "tl_degen."):
        if info.name.endswith("__main__"):
            continue
        module = importlib.import_module(info.name)
        yield info.name, inspect.getdoc(module) or ""
        for name, obj in vars(module).items():
            if getattr(obj, "__module__", None) != info.name or id(obj) in seen:
                continue
            seen.add(id(obj))
            yield f"{info.name}.{name}", inspect.getdoc(obj) or ""
            if inspect.isclass(obj):
                for attr, member in vars(obj).items():
                    doc = (
                        inspect.getdoc(member)
                        if callable(member) or isinstance(member, property)
                        else None
                    )
                    if doc:
                        yield f"{info.name}.{name}.{attr}", doc


def _prose(doc: str) -> str:
    """The docstring without Examples sections, code blocks and inline code spans."""
    kept, section, in_fence = [], None, False
    for line in doc.splitlines():
        if line.strip().startswith("```"):
            in_fence = not in_fence
            continue
        header = SECTION.match(line)
        if header and not line.startswith(" "):
            section = header.group(1)
            continue
        # An indented block is code: 4 spaces at the top level, 8 inside a section.
        code_indent = 8 if section else 4
        if in_fence or section == "Examples" or line.startswith(" " * code_indent):
            continue
        kept.append(line)
    text = "\n".join(kept)
    return re.sub(r"``.*?``|`[^`]*`", "", text, flags=re.S)


DOCSTRINGS = list(_docstrings())


def test_docstrings_found():
    names = {name for name, _ in DOCSTRINGS}
    assert "tl_degen.reparam.add_dead_neurons" in names
    assert "tl_degen.graph.Modules" in names
    assert len(DOCSTRINGS) > 100


@pytest.mark.parametrize("name,doc", DOCSTRINGS, ids=[n for n, _ in DOCSTRINGS])
def test_examples_are_code_sections(name, doc):
    lines = doc.splitlines()
    assert not any(line.strip() == "Example:" for line in lines), (
        f"{name}: use a Google-style 'Examples:' section (rendered as code), not 'Example:' "
        "(rendered as prose)"
    )
    section = None
    for line in lines:
        match = SECTION.match(line)
        if match and not line.startswith(" "):
            section = match.group(1)
        if line.lstrip().startswith(">>>"):
            assert section == "Examples", f"{name}: doctest line outside 'Examples:': {line!r}"


@pytest.mark.parametrize("name,doc", DOCSTRINGS, ids=[n for n, _ in DOCSTRINGS])
def test_no_reference_links_in_prose(name, doc):
    match = REFERENCE_LINK.search(_prose(doc))
    assert match is None, (
        f"{name}: '...][...' in prose is a Markdown reference link; put it in ``code`` "
        "or an Examples section"
    )


def test_prose_check_catches_the_old_failures():
    old = (
        "Add dead neurons.\n\nExample:\n    >>> report.dead_neurons[-5:]\n"
        "    [512, 513, 514, 515, 516]\n"
    )
    assert REFERENCE_LINK.search(_prose(old))
    assert REFERENCE_LINK.search(_prose(old.replace("Example:", "Examples:"))) is None


@pytest.mark.skipif(
    importlib.util.find_spec("mkdocs") is None, reason="the docs extra is not installed"
)
def test_strict_docs_build_has_no_warnings(tmp_path):
    mkdocs = shutil.which("mkdocs", path=str(Path(sys.executable).parent)) or "mkdocs"
    run = subprocess.run(
        [mkdocs, "build", "--strict", "-d", str(tmp_path / "site")],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        env={**__import__("os").environ, "NO_MKDOCS_2_WARNING": "1"},
    )
    log = run.stdout + run.stderr
    assert run.returncode == 0, log
    assert "WARNING" not in log, log
    api = (tmp_path / "site" / "api" / "index.html").read_text()
    # The examples are highlighted code blocks, not paragraphs.
    block = api[api.index('id="tl_degen.reparam.add_dead_neurons"') :]
    block = block[: block.index('class="doc doc-object', 10)]
    assert 'class="highlight"' in block and "dead_neurons" in block
