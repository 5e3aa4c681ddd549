"""tl_degen.cli: the ``tl-degen`` command: help, fit and graph on the shipped modadd model
(their outputs checked against DESIGN.md §4 identities and the model's unembedding), a
state dict and a Hugging Face folder, and the exit codes and one-line messages of bad
arguments."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import tl_degen
from tests import models as M
from tl_degen import cli
from tl_degen.toy import modadd

pytestmark = pytest.mark.filterwarnings("ignore::tl_degen.AmbiguousRankWarning")

ROOT = Path(__file__).resolve().parents[1]
SITES = "resid_post.0:last,logits:last"


def _run_cli(*argv: str, cwd: Path) -> subprocess.CompletedProcess:
    """``python -m tl_degen.cli ARGV`` in a fresh process, this checkout first on the path."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        [str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])]))
    return subprocess.run([sys.executable, "-m", "tl_degen.cli", *argv], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def modadd_data(tmp_path_factory):
    """150 training pairs of the shipped modadd model as a token file, the same model in
    float64 to read the sites with, and its unembedding with the bias as the constant's row
    (the section resid_post.0:last → logits is linear: its Jacobian for every sample)."""
    folder = tmp_path_factory.mktemp("cli_modadd")
    tokens = modadd.tokens_for(modadd.train_test_split()[0][:150])
    torch.save(tokens, folder / "tokens.pt")
    np.save(folder / "tokens.npy", tokens.numpy())
    sd = modadd.load_state_dict()
    unembed = torch.cat([sd["unembed.W_U"], sd["unembed.b_U"][None]]).double()
    return folder, tokens, modadd.load_bridge(dtype=torch.float64), unembed


def test_help_lists_every_command(tmp_path):
    done = _run_cli("--help", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("usage: tl-degen")
    assert "{demo,fit,graph,show,compare}" in done.stdout
    for line in ("tl-degen fit   --model M --tokens T --sites S",
                 "tl-degen graph --model M --tokens T --sites S",
                 "tl-degen show  graph.safetensors",
                 "tl-degen compare --model M --sites S"):
        assert line in done.stdout  # the module docstring is the description


def test_fit_help_lists_its_options(capsys):
    with pytest.raises(SystemExit) as exit_:
        cli.main(["fit", "--help"])
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    for option in ("--model", "--tokens", "--sites", "--method {lib,pca,neuron}", "--out",
                   "--checkpoint-every"):
        assert option in out


def test_fit_on_modadd_writes_bases_that_satisfy_the_identities(modadd_data, capsys):
    """LIB through the command: the saved bases give x̂ = x C second moment diag(Λ) on the
    token file's data and unit Jacobian norms through the unembedding (§4 step 6)."""
    folder, tokens, model64, unembed = modadd_data
    out = folder / "lib.safetensors"
    code = cli.main(["fit", "--model", "modadd", "--tokens", str(folder / "tokens.pt"),
                     "--sites", SITES, "--quiet", "--out", str(out)])
    assert code == 0
    stdout = capsys.readouterr().out
    assert f"saved to {out}" in stdout and "BasisSet(method='lib', n_samples=150" in stdout
    bases = tl_degen.BasisSet.load(out, model=modadd.load_bridge())
    assert [s.name for s in bases.sites] == SITES.split(",")
    b = bases["resid_post.0:last"]
    x = tl_degen.site_activations(model64, tokens, b.site)[:, 0]
    xh = b.to_coords(x)
    root = b.eigenvalues.sqrt()
    torch.testing.assert_close(xh.T @ xh / len(x) / root[:, None] / root[None],
                               torch.eye(b.k, dtype=torch.float64), rtol=0, atol=1e-8)
    J = b.C_pinv @ unembed @ unembed.T @ b.C_pinv.T
    torch.testing.assert_close(J.diag(), torch.ones(b.k, dtype=torch.float64), rtol=0,
                               atol=1e-8)


def test_fit_pca_from_npy_tokens_gives_the_covariance_spectrum(modadd_data, capsys):
    folder, tokens, model64, _ = modadd_data
    out = folder / "pca.safetensors"
    assert cli.main(["fit", "--model", "modadd", "--tokens", str(folder / "tokens.npy"),
                     "--sites", SITES, "--method", "pca", "--quiet", "--out", str(out)]) == 0
    b = tl_degen.BasisSet.load(out)["resid_post.0:last"]
    assert b.method == "pca" and b.n_samples == len(tokens)
    x = tl_degen.site_activations(model64, tokens, b.site)[:, 0, :-1]
    cov = np.cov(x.numpy().T, bias=True)
    expected = np.sort(np.linalg.eigvalsh(cov))[::-1][: b.k - 1]
    np.testing.assert_allclose(b.eigenvalues[1:].numpy(), expected, rtol=0,
                               atol=1e-9 * expected[0])
    capsys.readouterr()


def test_graph_on_modadd_has_the_edges_of_the_unembedding(modadd_data, capsys):
    """The last section is linear: F(h) = h C⁺ W̃, so §4 step 8 gives
    E[i, j] = (C⁺ W̃)[j, i]² · mean(h_j²) = (C⁺ W̃)[j, i]² Λ_j."""
    folder, _, _, unembed = modadd_data
    out = folder / "graph.safetensors"
    assert cli.main(["graph", "--model", "modadd", "--tokens", str(folder / "tokens.pt"),
                     "--sites", SITES, "--quiet", "--top", "3", "--out", str(out)]) == 0
    assert f"saved to {out}; page {folder / 'graph.html'}" in capsys.readouterr().out
    graph = tl_degen.InteractionGraph.load(out)
    b = graph.bases["resid_post.0:last"]
    E = graph.edges[(b.site, graph.bases["logits:last"].site)]
    expected = ((b.C_pinv @ unembed) ** 2 * b.eigenvalues[:, None]).T
    assert E.shape == (114, b.k)
    torch.testing.assert_close(E.double(), expected, rtol=1e-6,
                               atol=1e-9 * float(expected.max()))
    page = (folder / "graph.html").read_text()
    assert page.count('<circle class="node') >= 3


@pytest.mark.parametrize(
    "argv, message",
    [
        (["fit", "--model", "modadd", "--tokens", "{tmp}/tok.pt", "--sites", "logits",
          "--checkpoint-every", "0", "--out", "{tmp}/x.safetensors"], "must be at least 1"),
        (["fit", "--model", "modadd", "--tokens", "{tmp}/tok.pt", "--sites",
          "resid_side.0,logits", "--out", "{tmp}/x.safetensors"], "unknown site kind"),
        (["fit", "--model", "modadd", "--tokens", "{tmp}/flat.pt", "--sites", "logits",
          "--out", "{tmp}/x.safetensors"], "must hold one [batch, pos] integer tensor"),
        (["fit", "--model", "modadd", "--tokens", "{tmp}/empty.txt", "--sites", "logits",
          "--out", "{tmp}/x.safetensors"], "has no prompts"),
        (["fit", "--model", "{tmp}/weights.json", "--tokens", "{tmp}/tok.pt", "--sites",
          "logits", "--out", "{tmp}/x.safetensors"], "cannot read a model from"),
        (["graph", "--model", "modadd", "--tokens", "{tmp}/tok.pt", "--sites", "logits",
          "--dtype", "double64", "--out", "{tmp}/x.safetensors"], "cannot run the model here"),
    ],
)
def test_bad_arguments_exit_2_with_one_line(tmp_path, capsys, argv, message):
    torch.save(torch.zeros(4, 3, dtype=torch.long), tmp_path / "tok.pt")
    torch.save(torch.zeros(5, dtype=torch.long), tmp_path / "flat.pt")
    (tmp_path / "empty.txt").write_text("\n\n")
    (tmp_path / "weights.json").write_text("{}")
    code = cli.main([a.replace("{tmp}", str(tmp_path)) for a in argv])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.startswith("tl-degen: error: ") and err.count("\n") == 0, err
    assert message in err, err
    assert not (tmp_path / "x.safetensors").exists()


@pytest.mark.parametrize("argv, message", [
    ([], "the following arguments are required: command"),
    (["fit", "--model", "modadd", "--tokens", "t.pt", "--out", "x.safetensors"],
     "the following arguments are required: --sites"),
    (["fit", "--model", "modadd", "--tokens", "t.pt", "--sites", "logits", "--method", "svd",
      "--out", "x.safetensors"], "invalid choice: 'svd'"),
    (["show"], "the following arguments are required: file"),
])
def test_usage_errors_exit_2(capsys, argv, message):
    with pytest.raises(SystemExit) as exit_:
        cli.main(argv)
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and message in err
    assert err.startswith("tl-degen: error: ") and err.count("\n") == 1, err


def test_a_failing_command_exits_2_from_the_shell(tmp_path):
    done = _run_cli("fit", "--model", "modadd", "--tokens", "t.pt", "--sites", "logits",
                    "--checkpoint-every", "0", "--out", "x.safetensors", cwd=tmp_path)
    assert done.returncode == 2 and done.stdout == ""
    assert done.stderr == "tl-degen: error: --checkpoint-every must be at least 1, got 0\n"
    assert not (tmp_path / "x.safetensors").exists()


# files a careless or unlucky user gives: (name, content, flag it is given to, phrase)
GARBAGE = [
    ("tok.pt", b"not a pickle at all", "--tokens", "is not a readable torch.save file"),
    ("tok.npy", b"\x93NUMPY garbage", "--tokens", "is not a readable .npy array"),
    ("tok.safetensors", b"\x08\x00\x00\x00\x00\x00\x00\x00{garbage", "--tokens",
     "is not a readable .safetensors file"),
    ("prompts.txt", "caf\u00e9 au lait\n".encode("latin-1"), "--tokens",
     "is not UTF-8 text (byte 0xe9 at offset 3)"),
    ("float.npy", None, "--tokens", "holds float64 values; token ids are integers"),
    ("cfg.json", b"{'d_model': 16", "--config", "is not valid JSON"),
    ("cfg.json", b"[1, 2]", "--config", "holds a JSON list"),
    ("cfg.json", b'{"d_model": 16, "n_layers": 1, "n_ctx": 3, "d_head": 8, "d_vocab": 5, '
                 b'"act_fn": "relu", "colour": "red"}', "--config", "colour"),
]


@pytest.mark.parametrize("name, content, flag, message", GARBAGE,
                         ids=[f"{g[0]}:{g[3][:20]}" for g in GARBAGE])
def test_garbage_files_exit_2_from_the_shell_naming_the_file(tmp_path, name, content, flag,
                                                             message):
    """Every unreadable input file is a one-line error naming it, from a real process, and
    nothing is written."""
    path = tmp_path / name
    if content is None:
        np.save(path, np.zeros((4, 3)))
    else:
        path.write_bytes(content)
    torch.save(torch.zeros(4, 3, dtype=torch.long), tmp_path / "ok.pt")
    torch.save({"embed.W_E": torch.zeros(5, 16)}, tmp_path / "model.pt")
    model = ["--model", str(tmp_path / "model.pt"), "--config", str(path)] if flag == "--config" \
        else ["--model", "modadd"]
    tokens = str(path) if flag == "--tokens" else str(tmp_path / "ok.pt")
    done = _run_cli("fit", *model, "--tokens", tokens, "--sites", "logits", "--out",
                    str(tmp_path / "x.safetensors"), cwd=tmp_path)
    assert done.returncode == 2 and done.stderr.startswith("tl-degen: error: "), done.stderr
    assert done.stderr.count("\n") == 1 and message in done.stderr, done.stderr
    assert str(path) in done.stderr or flag == "--config" and name in done.stderr
    assert not (tmp_path / "x.safetensors").exists()


@pytest.mark.parametrize("budget", ["nan", "inf", "-2G", "lots"])
def test_a_bad_memory_budget_is_one_line(tmp_path, budget):
    torch.save(torch.zeros(4, 3, dtype=torch.long), tmp_path / "tok.pt")
    env = dict(os.environ, TL_DEGEN_MEMORY_BUDGET=budget, PYTHONPATH=str(ROOT))
    done = subprocess.run([sys.executable, "-m", "tl_degen.cli", "fit", "--model", "modadd",
                           "--tokens", "tok.pt", "--sites", "logits", "--out", "x.safetensors"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 2 and done.stderr.count("\n") == 1, done.stderr
    assert f"TL_DEGEN_MEMORY_BUDGET={budget!r}" in done.stderr, done.stderr


@pytest.mark.slow  # two models, each fitted and graphed
def test_cli_fit_graph_show_on_a_state_dict_and_a_hf_folder(tmp_path, capsys, tokenizer_dir):
    sd = modadd.load_state_dict()
    torch.save(sd, tmp_path / "model.pt")
    cfg = {
        "d_model": 128,
        "n_heads": 4,
        "d_head": 32,
        "d_mlp": 512,
        "n_layers": 1,
        "n_ctx": 3,
        "d_vocab": 114,
        "act_fn": "relu",
        "normalization_type": None,
    }
    if not M.HAS_HOOKED_TRANSFORMER:
        pytest.importorskip("transformer_lens.utilities.tl_checkpoint_conversion")
    (tmp_path / "cfg.json").write_text(__import__("json").dumps(cfg))
    torch.save(modadd.tokens_for(modadd.train_test_split()[0][:300]), tmp_path / "tok.pt")
    common = [
        "--model",
        str(tmp_path / "model.pt"),
        "--config",
        str(tmp_path / "cfg.json"),
        "--tokens",
        str(tmp_path / "tok.pt"),
        "--sites",
        "resid_mid.0:last,resid_post.0:last,logits:last",
        "--quiet",
    ]
    assert cli.main(["fit", *common, "--out", str(tmp_path / "b.safetensors")]) == 0
    bases = tl_degen.BasisSet.load(tmp_path / "b.safetensors")
    assert [s.name for s in bases.sites] == ["resid_mid.0:last", "resid_post.0:last", "logits:last"]
    assert cli.main(["graph", *common, "--out", str(tmp_path / "g.safetensors")]) == 0
    assert (tmp_path / "g.html").stat().st_size > 1000
    assert (
        cli.main(
            [
                "show",
                str(tmp_path / "g.safetensors"),
                "--no-open",
                "--out",
                str(tmp_path / "shown.html"),
            ]
        )
        == 0
    )
    assert '<circle class="node' in (tmp_path / "shown.html").read_text()
    # a local Hugging Face folder and a text file of prompts
    from transformers import GPT2Config, GPT2LMHeadModel

    hf_dir = tmp_path / "hf"
    torch.manual_seed(0)
    GPT2LMHeadModel(
        GPT2Config(
            vocab_size=M.VOCAB, n_positions=M.N_CTX, n_embd=16, n_layer=2, n_head=2, n_inner=24
        )
    ).save_pretrained(str(hf_dir))
    shutil.copytree(tokenizer_dir, hf_dir, dirs_exist_ok=True)
    (tmp_path / "prompts.txt").write_text(
        # prompts of 4 to 6 words: each keeps its own length (no cutting, no padding)
        "\n".join(" ".join(f"t{(i * 7 + j) % 10}" for j in range(4 + i % 3)) for i in range(20))
    )
    assert (
        cli.main(
            [
                "fit",
                "--model",
                str(hf_dir),
                "--tokens",
                str(tmp_path / "prompts.txt"),
                "--sites",
                "resid_pre.1,resid_post.1:last,logits:last",
                "--quiet",
                "--out",
                str(tmp_path / "hf.safetensors"),
            ]
        )
        == 0
    )
    assert (
        cli.main(
            [
                "graph",
                "--model",
                str(hf_dir),
                "--tokens",
                str(tmp_path / "prompts.txt"),
                "--sites",
                "resid_post.1:last,logits:last",
                "--quiet",
                "--top",
                "4",
                "--out",
                str(tmp_path / "hfg.safetensors"),
            ]
        )
        == 0
    )
    page = (tmp_path / "hfg.html").read_text()
    circuit = page[page.index('<div class="tld-circuit"') : page.index("<details")]
    # directions of the last site are named by the output tokens their write promotes (+)
    # and suppresses (−); the logits' nodes by their token
    token_labels = re.findall(r'<text class="clabel"[^>]*>#\d+ \+([^<]+)<', circuit)
    assert len(token_labels) == 4 and all("&#x27;t" in t and "−" in t for t in token_labels)
    capsys.readouterr()


# one row a case: the command line (split at spaces) and a phrase of its one-line error
@pytest.mark.parametrize("argv, message", [
    ("fit --model {tmp}/model.pt --tokens {tmp}/tok.pt --sites logits --out {tmp}/x.safetensors",
     "also give --config"),
    ("fit --model modadd --tokens {tmp}/nope.pt --sites logits --out {tmp}/x.safetensors",
     "no such tokens file"),
    ("fit --model modadd --tokens {tmp}/tok.csv --sites logits --out {tmp}/x.safetensors",
     "must be .pt, .safetensors, .npy or .txt"),
    ("fit --model modadd --tokens {tmp}/tok.pt --sites resid_post.0,resid_pre.0 "
     "--out {tmp}/x.safetensors",
     "out of forward order"),
    ("fit --model {tmp} --tokens {tmp}/tok.pt --sites logits --out {tmp}/x.safetensors",
     "has no config.json"),
    ("show {tmp}/missing.safetensors --no-open", "no such file"),
    ("fit --model modadd --tokens {tmp}/tok.pt --sites logits --dtype float13 "
     "--out {tmp}/x.safetensors",
     "cannot run the model here"),
    ("fit --model modadd --tokens {tmp}/tok.pt --sites logits --dtype int64 "
     "--out {tmp}/x.safetensors", "--dtype 'int64' cannot run the model here"),
    ("graph --model modadd --tokens {tmp}/tok.pt --sites resid_post.0:last,logits:last "
     "--out {tmp}/x.safetensors --html {tmp}/tok.pt/g.html", "tok.pt is a file"),
    ("fit --model modadd --tokens {tmp}/tok.pt --sites logits --out {tmp}", "is a folder"),
    ("demo --out {tmp} --quiet", "is not empty and is not an earlier tl-degen report"),
    ("demo --out {tmp}/tok.pt --quiet", "is a file"),
    ("demo --out {tmp}/r --threads -1 --quiet", "--threads must be at least 1"),
    ("compare --model modadd --sites mlp_post.0:last --out {tmp}/tok.pt/x.safetensors",
     "tok.pt is a file"),
    ("compare --model modadd --sites mlp_post.0:last --clean {tmp}/tok.pt "
     "--out {tmp}/x.safetensors", "give --clean, --corrupted and --answers together"),
    ("compare --model modadd --sites mlp_post.0:last --clean {tmp}/tok.pt --corrupted "
     "{tmp}/tok.pt --answers {tmp}/tok.pt --out {tmp}/x.safetensors", "--answers must be"),
    ("compare --model modadd --sites logits --pairs 20 --out {tmp}/x.safetensors",
     "logits are the output itself"),
    ("show {tmp}/tok.pt --out {tmp}/tok.pt --no-open", "would overwrite the graph file"),
    ("show {tmp}/g.html --no-open", "would overwrite the graph file"),
    ("show {tmp}/tok.pt --mass nan --out {tmp}/p.html --no-open", "--mass must be a fraction"),
    ("show {tmp}/tok.pt --mass 5 --out {tmp}/p.html --no-open", "--mass must be a fraction"),
    ("graph --model modadd --tokens {tmp}/tok.pt --sites resid_post.0:last,logits:last "
     "--top 0 --out {tmp}/x.safetensors", "--top must be at least 1"),
    ("graph --model modadd --tokens {tmp}/tok.pt --sites resid_post.0:last,logits:last "
     "--out {tmp}/x.safetensors --html {tmp}/x.safetensors", "--html and --out are the same"),
])
def test_cli_errors_are_one_line_with_the_fix(tmp_path, capsys, argv, message):
    torch.save(torch.zeros(4, 3, dtype=torch.long), tmp_path / "tok.pt")
    (tmp_path / "tok.csv").write_text("1,2,3")
    torch.save({"x": torch.zeros(1)}, tmp_path / "model.pt")
    (tmp_path / "g.html").write_text("a graph file with an unlucky name")
    code = cli.main([a.replace("{tmp}", str(tmp_path)) for a in argv.split()])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.count("\n") == 0 and message in err, err
    assert not (tmp_path / "x.safetensors").exists()


def test_cli_compare_on_modadd(tmp_path, capsys):
    """``tl-degen compare``: LIB, PCA and neuron bases fitted on the task's prompts, the table
    printed, the result saved and drawn."""
    out, png = tmp_path / "c.safetensors", tmp_path / "c.png"
    assert cli.main(["compare", "--model", "modadd", "--sites", "mlp_post.0:last", "--pairs",
                     "200", "--out", str(out), "--png", str(png), "--quiet",
                     "--no-ablation"]) == 0
    printed = capsys.readouterr().out
    cmp = tl_degen.BasisComparison.load(out)
    assert cmp.sites == ["mlp_post.0:last"] and cmp.bases == ["lib", "pca", "neuron"]
    assert cmp.config["n_pairs"] == 200 and "mlp_post.0:last  lib" in printed
    # the neuron basis is complete: its curve ends at the whole-site patch exactly
    assert float(cmp.curve("mlp_post.0:last", "neuron").fraction()[-1]) == pytest.approx(1.0)
    assert png.stat().st_size > 10_000


def test_demo_replaces_only_its_own_report_folder(tmp_path):
    """An empty folder or an earlier report may be replaced; a folder of the user's may not
    (checked before any work)."""
    cli._check_report_folder(tmp_path / "new")
    cli._check_report_folder(tmp_path)  # empty
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(cli.ArgumentError, match="not an earlier tl-degen report"):
        cli._check_report_folder(tmp_path)
    (tmp_path / "index.html").write_text("<html></html>")
    (tmp_path / "report.json").write_text("{}")
    cli._check_report_folder(tmp_path)  # an earlier report
