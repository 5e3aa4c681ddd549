"""One rank of the data-parallel tests (tests/test_distributed.py launches it with torchrun).

    python -m torch.distributed.run --standalone --nproc_per_node 2 \
        tests/distributed_worker.py OUT_DIR

Each rank joins a gloo process group, runs every scenario below on its own (unequal) shard of
the data, and saves what it got to ``OUT_DIR/rank<r>.pt``: plain tensors, floats and the
messages of the errors it was meant to raise. The test compares the ranks with each other and
with one process that sees the concatenated shards (:func:`single_process`, which runs the same
scenarios through the same code, without a process group).
"""

from __future__ import annotations

import os
import sys
import traceback
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import tl_degen  # noqa: E402
from tests import models as M  # noqa: E402
from tl_degen.toy import modadd  # noqa: E402

SITES = ["resid_pre.0", "resid_mid.0:last", "resid_post.0:last", "logits:last"]
N_TRAIN, N_TEST, N_PATCH = 300, 200, 60
STOCH_SITES = ["resid_pre.1", "resid_mid.1", "resid_post.1:last", "logits:last"]
SPLITS = {"train": [130, 170], "test": [90, 110], "patch": [25, 35], "ln": [6, 7]}


def data() -> dict:
    """Everything the scenarios read, identical in every process."""
    train, test = modadd.train_test_split()
    clean, corrupted, _ = modadd.patching_pairs(N_PATCH)
    return {"train": modadd.tokens_for(train[:N_TRAIN]), "test": modadd.tokens_for(test[:N_TEST]),
            "labels": modadd.labels_for(test[:N_TEST]), "clean": clean, "corrupted": corrupted,
            "ln": M.random_tokens(13, 6, seed=5)}


def shard(t: torch.Tensor, split: str, rank: int | None) -> torch.Tensor:
    """Rank ``rank``'s rows of ``t`` (unequal sizes, :data:`SPLITS`), all rows for ``None``."""
    if rank is None:
        return t
    sizes = SPLITS[split]
    start = sum(sizes[:rank])
    return t[start:start + sizes[rank]]


def logit_diff(clean: torch.Tensor, corrupted: torch.Tensor):
    """Per-example logit difference of the right answer over the corrupted prompt's."""
    right = (clean[:, 0] + clean[:, 1]) % 113
    wrong = (corrupted[:, 0] + corrupted[:, 1]) % 113

    def metric(logits):
        last = logits[:, -1]
        idx = torch.arange(last.shape[0])
        return last[idx, right] - last[idx, wrong]

    return metric


def summarise_bases(bases) -> dict:
    return {s.name: {"C": b.C, "eigenvalues": b.eigenvalues, "mean": b.mean, "k": b.k,
                     "n_samples": b.n_samples} for s, b in bases.items()}


def scenarios(rank: int | None, out: Path) -> dict:
    """Run every scenario on ``rank``'s shard (``None``: one process, all the data)."""
    d = data()
    model = modadd.load_bridge(modadd.load_state_dict())
    res: dict = {}
    train = shard(d["train"], "train", rank)
    bases = tl_degen.fit_bases(model, train, SITES, batch_size=64, progress=False)
    res["fit"] = summarise_bases(bases)
    if rank is not None:
        bases.save(out / f"bases.rank{rank}.safetensors")
    graph = tl_degen.interaction_graph(model, train, bases, batch_size=64, progress=False)
    res["graph"] = {f"{a.name}->{b.name}": E for (a, b), E in graph.edges.items()}
    test, labels = shard(d["test"], "test", rank), shard(d["labels"], "test", rank)
    curve = tl_degen.ablation_curve(model, test, bases, "resid_post.0:last", "loss",
                                    labels=labels, n_kept=[40, 10, 3], batch_size=64,
                                    dtype=torch.float64, progress=False)
    res["curve"] = {"values": curve.values, "baseline": curve.baseline}
    pair = graph.pairs()[1]
    edges = tl_degen.edge_ablation(model, test, graph, "accuracy", labels=labels,
                                   pairs=[pair], tolerance=0.02, batch_size=64,
                                   dtype=torch.float64, progress=False)
    res["edges"] = {"results": edges.results, "required": edges.n_edges_required,
                    "baseline": edges.baseline}
    clean, corrupted = shard(d["clean"], "patch", rank), shard(d["corrupted"], "patch", rank)
    attr = tl_degen.attribution_patch(model, clean, corrupted, bases,
                                      ["resid_mid.0:last", "resid_post.0:last"],
                                      logit_diff(clean, corrupted), method="integrated",
                                      n_alpha=4, dtype=torch.float64, progress=False)
    res["attribution"] = {"attributions": attr.attributions, "neuron": attr.neuron,
                          "dropped": attr.dropped, "delta": attr.delta}
    report = tl_degen.degeneracy_report(model, train, SITES, bases=bases, batch_size=64,
                                        progress=False)
    res["report"] = {"text": str(report), "lib_sizes": report.lib_sizes}
    # an architecture with LayerNorm and GELU: the autograd path of the Jacobian
    ln_model = M.build("native_ln_gelu")
    ln_bases = tl_degen.fit_bases(ln_model, shard(d["ln"], "ln", rank),
                                  M.mid_sites("native_ln_gelu"), batch_size=4,
                                  closed_form=False, progress=False)
    res["ln_fit"] = summarise_bases(ln_bases)
    # stochastic estimates: each rank draws its own probes, the groups are summed
    ln_shard = shard(d["ln"], "ln", rank)
    # few probes per round, so every section is probed (more would make the sections into
    # :last sites exact), in rounds until within 10 %: the rounds are decided on every rank
    # from the summed groups
    approx = tl_degen.fit_bases(ln_model, ln_shard, STOCH_SITES, batch_size=4, n_probes=4,
                                probe_groups=4, target_error=0.1, progress=False)
    exact = tl_degen.fit_bases(ln_model, ln_shard, STOCH_SITES, batch_size=4, progress=False)
    res["ln_stochastic"] = {s.name: {"eigenvalues": b.eigenvalues, "exact": exact[s].eigenvalues,
                                     "error": b.jacobian_gram_error} for s, b in approx.items()}
    g_est = tl_degen.interaction_graph(ln_model, ln_shard, ln_bases, batch_size=4,
                                       n_probes=128, probe_groups=8, route="probes",
                                       progress=False)
    res["ln_graph_stochastic"] = {f"{a.name}->{b.name}": (E, g_est.errors[(a, b)])
                                  for (a, b), E in g_est.edges.items()}
    g_exact = tl_degen.interaction_graph(ln_model, ln_shard, ln_bases, batch_size=4,
                                         closed_form=False, progress=False)
    res["ln_graph"] = {f"{a.name}->{b.name}": E for (a, b), E in g_exact.edges.items()}
    # a checkpointed fit interrupted on one rank, then resumed
    ckpt = out / "fit.ckpt.safetensors"
    res["resumed"] = summarise_bases(resumed_fit(model, train, ckpt, rank))
    return res


class Interrupted(Exception):
    pass


def resumed_fit(model, train, ckpt: Path, rank: int | None):
    """A fit with a checkpoint after every batch, stopped by an error on rank 1 (or the one
    process) in its Jacobian stage, then started again with the same arguments."""
    from tl_degen import fitting

    original = fitting._FitRun.advance
    calls = {"n": 0}

    def failing(self, stage):
        original(self, stage)
        calls["n"] += 1
        if rank in (None, 1) and calls["n"] == 6:
            raise Interrupted("stopped on purpose")

    fitting._FitRun.advance = failing
    try:
        tl_degen.fit_bases(model, train, SITES, batch_size=64, checkpoint=ckpt,
                           checkpoint_every=1, progress=False)
        raise AssertionError("the interrupted fit did not stop")
    except (Interrupted, tl_degen.DistributedError):
        pass
    finally:
        fitting._FitRun.advance = original
    mine = fitting.FitCheckpoint.for_rank(ckpt, rank or 0, 1 if rank is None else 2)
    assert mine.exists(), f"no checkpoint at {mine}"
    bases = tl_degen.fit_bases(model, train, SITES, batch_size=64, checkpoint=ckpt,
                               checkpoint_every=1, progress=False)
    assert not mine.exists(), "a completed fit left its checkpoint behind"
    return bases


def bad_inputs(rank: int) -> dict:
    """Arguments that differ between ranks: every rank must raise the same error."""
    d = data()
    model = modadd.load_bridge(modadd.load_state_dict())
    train = shard(d["train"], "train", rank)
    cases = {
        "sites": lambda: tl_degen.fit_bases(model, train, SITES if rank == 0 else SITES[1:],
                                            progress=False),
        "method": lambda: tl_degen.fit_bases(model, train, SITES,
                                             method="lib" if rank == 0 else "pca",
                                             progress=False),
        "tokens": lambda: tl_degen.fit_bases(model, train if rank == 0 else train + 500,
                                             SITES, progress=False),
        "threshold": lambda: tl_degen.fit_bases(model, train, SITES, distributed=True,
                                                progress=False, threshold=-1.0),
    }
    other = modadd.load_bridge(modadd.load_state_dict())
    if rank == 1:
        with torch.no_grad():
            next(other.parameters()).add_(1e-6)
    cases["weights"] = lambda: tl_degen.fit_bases(other, train, SITES, progress=False)
    bases = tl_degen.fit_bases(model, train, SITES, progress=False)
    fewer = tl_degen.BasisSet([bases[s] for s in SITES[1:]], config=bases.config,
                              model_signature=bases.model_signature,
                              model_probe=bases.model_probe)
    cases["graph_bases"] = lambda: tl_degen.interaction_graph(
        model, train, bases if rank == 0 else fewer, progress=False)
    cases["effective"] = lambda: tl_degen.degeneracy_report(model, train, SITES, bases=bases,
                                                            effective=True, progress=False)
    messages = {}
    for name, call in cases.items():
        try:
            call()
            messages[name] = "no error"
        except tl_degen.TLDegenError as err:
            messages[name] = f"{type(err).__name__}: {err}"
    # distributed=False: each rank fits its shard alone
    alone = tl_degen.fit_bases(model, train, SITES, distributed=False, progress=False)
    messages["alone_n_samples"] = alone[SITES[0]].n_samples
    return messages


def main() -> int:
    import torch.distributed as dist

    out = Path(sys.argv[1])
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    try:
        res = scenarios(rank, out)
        res["bad"] = bad_inputs(rank)
        torch.save(res, out / f"rank{rank}.pt")
    except Exception:
        (out / f"rank{rank}.error").write_text(traceback.format_exc())
        raise
    finally:
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    raise SystemExit(main())
