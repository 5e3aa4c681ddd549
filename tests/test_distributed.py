"""Data-parallel runs: 2 CPU processes on gloo against one process on the concatenated shards.

``tests/distributed_worker.py`` runs every scenario on each rank's (unequal) shard under
``torchrun``; this module runs the same scenarios in one process on all the data and compares.
Sums are added in a different order across ranks than within one process, so the comparison is
to float64 rounding (1e-12 relative), while the ranks agree with each other bit for bit (every
reduction adds the ranks' sums in rank order).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import tl_degen
from tests import distributed_worker as W
from tl_degen.distributed import Shards

ROOT = Path(__file__).resolve().parents[1]
LAUNCH_TIMEOUT = 600  # seconds; a launch takes ~15 s here


def torchrun(args: list[str], cwd: Path, timeout: int = LAUNCH_TIMEOUT) -> str:
    """Run ``torchrun --standalone --nproc_per_node 2 ARGS`` (one thread per process); fail
    the test with its output if it fails or outlives ``timeout``."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
           "2", *args]
    try:
        done = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True,
                              timeout=timeout)
    except subprocess.TimeoutExpired as err:
        pytest.fail(f"torchrun did not finish in {timeout} s: {str(err.stdout)[-3000:]}")
    out = done.stdout + done.stderr
    if done.returncode != 0:
        errors = "".join(p.read_text() for p in Path(cwd).glob("rank*.error"))
        pytest.fail(f"torchrun failed ({done.returncode}):\n{errors or out[-6000:]}")
    return out


@pytest.fixture(scope="module")
def ranks(tmp_path_factory) -> list[dict]:
    out = tmp_path_factory.mktemp("dist")
    torchrun([str(ROOT / "tests" / "distributed_worker.py"), str(out)], cwd=out)
    res = [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(2)]
    res[0]["bases_file"] = res[1]["bases_file"] = out / "bases.rank0.safetensors"
    return res


@pytest.fixture(scope="module")
def single(tmp_path_factory) -> dict:
    res = W.scenarios(None, tmp_path_factory.mktemp("single"))
    # the same fit batched differently in one process: how far float64 rounding of the sums'
    # order alone moves the result
    model = W.modadd.load_bridge(W.modadd.load_state_dict())
    res["rebatched"] = [W.summarise_bases(tl_degen.fit_bases(
        model, W.data()["train"], W.SITES, batch_size=bs, progress=False)) for bs in (50, 300)]
    return res


def walk(a, b, path=""):
    """Pairs of leaves of two nested results, with their paths."""
    if isinstance(a, dict):
        assert set(a) == set(b), path
        for k in a:
            yield from walk(a[k], b[k], f"{path}/{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b)):
            yield from walk(x, y, f"{path}/{i}")
    else:
        yield path, a, b


def test_every_rank_returns_the_same_result_bit_for_bit(ranks):
    for path, a, b in walk(ranks[0], ranks[1]):
        if path.startswith(("/bad/alone", "/bases_file")):
            continue
        same = torch.equal(a, b) if isinstance(a, torch.Tensor) else a == b
        assert same, path


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-300))


def basis_errors(ours: dict, ref: dict) -> tuple[float, float]:
    """Λ error relative to the largest Λ; C error up to column signs, on the columns whose Λ
    is isolated (relative gap ≥ 1e-3 to its neighbours: within a degenerate pair, such as a
    modadd Fourier frequency's cos/sin, any rotation is as good)."""
    lam = ref["eigenvalues"]
    gaps = (lam[:-1] - lam[1:]).abs() / lam.abs().max()
    gap = torch.full_like(lam, float("inf"))
    gap[:-1] = gaps
    gap[1:] = torch.minimum(gap[1:], gaps)
    iso = gap >= 1e-3
    signs = torch.sign((ours["C"] * ref["C"]).sum(0))
    return rel(ours["eigenvalues"], lam), rel((ours["C"] * signs)[:, iso], ref["C"][:, iso])


@pytest.mark.parametrize("key", ["fit", "ln_fit"])
def test_bases_equal_one_process_on_the_concatenated_shards(ranks, single, key):
    """The same ranks; Λ within 1e-12 of the largest and isolated columns of C within 1e-9
    at every site. The square-root statistics make the fit itself that reproducible: one
    process with another batch size (another order of the sums) stays as close."""
    for site, ours in ranks[0][key].items():
        ref = single[key][site]
        assert ours["k"] == ref["k"] and ours["n_samples"] == ref["n_samples"], site
        lam_err, c_err = basis_errors(ours, ref)
        assert lam_err <= 1e-12 and c_err <= 1e-9, (site, lam_err, c_err)
        if key == "fit":
            for alt in single["rebatched"]:
                lam_err, c_err = basis_errors(alt[site], ref)
                assert lam_err <= 1e-12 and c_err <= 1e-9, ("rebatched", site, lam_err, c_err)
        assert rel(ours["mean"], ref["mean"]) <= 1e-12, site


def test_edges_equal_one_process_with_the_same_bases(ranks):
    """The graph's reduction alone: one process, all the tokens, the bases the ranks fitted."""
    model = W.modadd.load_bridge(W.modadd.load_state_dict())
    bases = tl_degen.BasisSet.load(ranks[0]["bases_file"], model=model)
    graph = tl_degen.interaction_graph(model, W.data()["train"], bases, batch_size=64,
                                       progress=False)
    for (a, b), E in graph.edges.items():
        assert rel(ranks[0]["graph"][f"{a.name}->{b.name}"], E) <= 1e-12, (a, b)


def test_ablation_patching_and_report_equal_one_process(ranks, single):
    ours, ref = ranks[0], single
    for a, b in zip(ours["curve"]["values"], ref["curve"]["values"]):
        assert a == pytest.approx(b, rel=1e-10, abs=1e-15)
    assert ours["curve"]["baseline"] == pytest.approx(ref["curve"]["baseline"], rel=1e-12)
    assert ours["edges"]["required"] == ref["edges"]["required"]
    for pair, probed in ours["edges"]["results"].items():
        assert probed.keys() == ref["edges"]["results"][pair].keys()
        for n, v in probed.items():
            assert v == pytest.approx(ref["edges"]["results"][pair][n], abs=1e-12)
    for kind in ("attributions", "neuron"):
        for site, t in ours["attribution"][kind].items():
            assert rel(t, ref["attribution"][kind][site]) <= 1e-10, (kind, site)
    for kind in ("dropped", "delta"):
        for site, v in ours["attribution"][kind].items():
            # relative to the total effect: "dropped" is a small difference of large terms
            scale = abs(ref["attribution"]["delta"][site])
            assert abs(v - ref["attribution"][kind][site]) <= 1e-12 * scale, (kind, site)
    assert ours["report"] == ref["report"]


def test_stochastic_estimates_over_ranks_are_within_their_reported_error(ranks, single):
    """Each rank draws its own probes (so the estimate is not the single process's), and the
    summed probe groups still give an error estimate that covers the exact value."""
    for site in W.STOCH_SITES[:2]:
        est = ranks[0]["ln_stochastic"][site]
        exact = est["exact"][:4]
        assert rel(exact, single["ln_stochastic"][site]["exact"][:4]) <= 1e-12
        err = est["error"]
        if site == "resid_mid.1":  # the MLP after ln2: a closed form, never probed
            assert err == 0.0
        else:
            assert 0 < err <= 0.1
        assert float(((est["eigenvalues"][:4] - exact).abs() / exact).max()) < 5 * err + 1e-9
    for pair, (E_est, err) in ranks[0]["ln_graph_stochastic"].items():
        E = ranks[0]["ln_graph"][pair]
        assert float((E_est - E).norm() / E.norm()) <= 4 * err + 1e-12, pair
        assert rel(E, single["ln_graph"][pair]) <= 1e-12, pair


def test_a_resumed_fit_equals_an_uninterrupted_one(ranks, single):
    """Rank 1 stopped mid-fit (after a checkpoint), then both ranks ran again."""
    for res in (ranks[0], single):
        for site, ours in res["resumed"].items():
            ref = res["fit"][site]
            assert ours["k"] == ref["k"]
            for key in ("C", "eigenvalues", "mean"):
                assert rel(ours[key], ref[key]) <= 1e-12, (site, key)


@pytest.mark.parametrize("case, says", [
    ("sites", "disagree on sites"),
    ("method", "disagree on settings.method"),
    ("tokens", "rank 1: DataError: token ids must lie in"),
    ("threshold", "failed on 2 of 2 ranks"),
    ("weights", "disagree on weights"),
    ("graph_bases", "disagree on bases"),
    ("effective", "is not sharded"),
])
def test_ranks_that_disagree_raise_the_same_error_on_every_rank(ranks, case, says):
    messages = [r["bad"][case] for r in ranks]
    assert messages[0] == messages[1]
    assert messages[0].startswith("DistributedError: ") and says in messages[0], messages[0]


def test_distributed_false_fits_each_shard_alone(ranks):
    assert [r["bad"]["alone_n_samples"] for r in ranks] == W.SPLITS["train"]


def test_cli_under_torchrun_writes_one_file_equal_to_one_process(tmp_path):
    from tl_degen.cli import load_model

    tokens = W.data()["train"][:201]
    torch.save(tokens, tmp_path / "tokens.pt")
    sites = ",".join(W.SITES)
    out = torchrun(["-m", "tl_degen.cli", "fit", "--model", "modadd", "--tokens", "tokens.pt",
                    "--sites", sites, "--batch-size", "32", "--quiet", "--out", "b.safetensors"],
                   cwd=tmp_path)
    assert out.count("saved to b.safetensors") == 1  # rank 0 alone writes and prints
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b.safetensors", "tokens.pt"]
    model = load_model("modadd")
    ours = tl_degen.BasisSet.load(tmp_path / "b.safetensors", model=model)
    ref = tl_degen.fit_bases(model, tokens, W.SITES, batch_size=32, progress=False)
    assert ours.config["world_size"] == 2
    for site in W.SITES:
        assert ours[site].k == ref[site].k and ours[site].n_samples == 201
        assert rel(ours[site].eigenvalues, ref[site].eigenvalues) <= 1e-12, site


def test_without_a_process_group_nothing_is_sharded():
    shards = Shards()
    assert not shards.active and (shards.rank, shards.world) == (0, 1)
    t = torch.randn(3)
    assert shards.sum(t) is t or torch.equal(shards.sum(t), t)
    assert shards.sum_ints([4]) == [4] and shards.seed(7) == 7
    with pytest.raises(tl_degen.DistributedError, match="init_process_group"):
        Shards(True)
    with pytest.raises(tl_degen.TLDegenError, match="None, True or False"):
        Shards("yes")


def test_cli_graph_under_torchrun_equals_one_process(tmp_path):
    from tl_degen.cli import load_model

    tokens = W.data()["train"][:150]
    torch.save(tokens, tmp_path / "tokens.pt")
    out = torchrun(["-m", "tl_degen.cli", "graph", "--model", "modadd", "--tokens", "tokens.pt",
                    "--sites", ",".join(W.SITES[1:]), "--quiet", "--out", "g.safetensors"],
                   cwd=tmp_path)
    assert out.count("saved to g.safetensors") == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["g.html", "g.safetensors", "tokens.pt"]
    model = load_model("modadd")
    ours = tl_degen.InteractionGraph.load(tmp_path / "g.safetensors", model=model)
    bases = tl_degen.fit_bases(model, tokens, W.SITES[1:], progress=False)
    ref = tl_degen.interaction_graph(model, tokens, bases, progress=False)
    for pair, E in ref.edges.items():
        assert rel(ours.edges[pair], E) <= 1e-12, pair
