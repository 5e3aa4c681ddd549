"""Benchmark: edge-ablation bisection on the reference model (DESIGN.md §5).

LIB and PCA graphs of the seed-0 reference model (3830 training pairs, float64 fit,
absolute threshold 1e-15), then ``edge_ablation`` with tolerance 0.001 on the 8939 held-out
pairs, bisecting over ``[0, d_out · d_in]`` as the reference implementation did. Prints the
edges each layer pair needs (the reference's: LIB 133 / 82 / 633, PCA 167 / 114 / 682), the
wall time and the peak memory.

With ``--baseline`` the LIB bisection is also run the way tl_degen 0.3 ran it, in the same
process: for every probe, one model run from the embedding per distinct mask row, nothing
kept between probes. The two must give the same metric at every probe; the ratio of their
times is printed.

    python benchmarks/bench_edge_ablation.py [--threads 2] [--baseline]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
from _machine import machine_line, peak_rss_mib

import tl_degen
from tl_degen.ablation import make_metric
from tl_degen.adapters import get_adapter
from tl_degen.fitting import prepared
from tl_degen.sites import Site
from tl_degen.toy import modadd

SITES = ["resid_pre.0", "resid_mid.0:last", "resid_post.0:last", "logits:last"]
REFERENCE = Path(__file__).resolve().parents[2] / "shared" / "reference" / "rib_modadd" / "seed0"
EXPECTED = {"lib": [133, 82, 633], "pca": [167, 114, 682]}


def baseline_metric(adapter, tokens, bases, in_site, out_site, mask, fn) -> float:
    """tl_degen 0.3: one run from the embedding per distinct mask row, then the rest."""
    b_in, b_out = bases[in_site], bases[out_site]
    groups, inverse = mask.unique(dim=0, return_inverse=True)
    (x,) = adapter.read_sites(tokens, [in_site])
    h = x.double() @ b_in.C
    out = torch.zeros(*h.shape[:-1][:1], 1, b_out.k, dtype=torch.float64)
    for g, in_mask in enumerate(groups):
        members = (inverse == g).nonzero()[:, 0]
        x_g = ((h * in_mask) @ b_in.C_pinv).to(x.dtype)
        x_g[..., -1] = 1.0
        y = adapter.run(tokens, read=out_site, write=(in_site, x_g)).double()
        out[..., members] = y @ b_out.C[:, members]
    x_out = (out @ b_out.C_pinv).to(x.dtype)
    if out_site.kind == "logits":
        logits = adapter.read_sites(tokens, [Site("logits")])[0].clone()
        logits[:, out_site.resolve_positions(tokens.shape[1])] = x_out
    else:
        x_out[..., -1] = 1.0
        logits = adapter.run(tokens, read=Site("logits"), write=(out_site, x_out))
    return float(fn(logits, slice(0, tokens.shape[0])).mean())


def baseline_bisection(model, tokens, labels, graph, upper) -> dict[str, dict[int, float]]:
    adapter = get_adapter(model)
    fn = make_metric("accuracy", labels)
    out = {}
    with prepared(model, None), torch.no_grad():
        baseline = float(fn(adapter.read_sites(tokens, [Site("logits")])[0],
                            slice(0, len(tokens))).mean())
        for in_site, out_site in graph.pairs():
            key = f"{in_site.name}->{out_site.name}"
            E = graph.edges[(in_site, out_site)]
            cols = torch.arange(1, E.shape[1])  # LIB: the constant node is column 0
            order = E[:, cols].flatten().argsort(descending=True)
            probed = {}

            def evaluate(k, E=E, cols=cols, order=order, in_site=in_site, out_site=out_site):
                k = min(k, order.numel())
                mask = torch.zeros(E.shape, dtype=torch.bool)
                idx = order[:k]
                mask[idx // len(cols), cols[idx % len(cols)]] = True
                mask[:, 0] = True
                return baseline_metric(adapter, tokens, graph.bases, in_site, out_site, mask,
                                       fn)

            lo, hi = 0, upper[key]
            probed[hi] = evaluate(hi)
            while hi - lo > 1:
                mid = (lo + hi + 1) // 2
                probed[mid] = evaluate(mid)
                lo, hi = (lo, mid) if abs(probed[mid] - baseline) <= 0.001 else (mid, hi)
            out[key] = probed
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--baseline", action="store_true",
                        help="also run the LIB bisection as tl_degen 0.3 did (about 7 min)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model = modadd.load_bridge(modadd.load_state_dict(REFERENCE / "model.safetensors"))
    train, test = modadd.train_test_split()
    tokens, test_tokens = modadd.tokens_for(train), modadd.tokens_for(test)
    labels = modadd.labels_for(test)
    print(machine_line())
    print(f"{args.threads} threads, {len(test)} held-out pairs, model in float32, "
          "tolerance 0.001")
    results = {}
    for method in ("lib", "pca"):
        t0 = time.perf_counter()
        bases = tl_degen.fit_bases(model, tokens, SITES, method=method, progress=False,
                                   threshold=tl_degen.Threshold.absolute(1e-15))
        graph = tl_degen.interaction_graph(model, tokens, bases, progress=False)
        t1 = time.perf_counter()
        upper = {f"{a.name}->{b.name}": bases[a].d_site * bases[b].d_site
                 for a, b in graph.pairs()}
        res = tl_degen.edge_ablation(model, test_tokens, graph, "accuracy", labels=labels,
                                     tolerance=0.001, upper=upper, progress=False)
        t2 = time.perf_counter()
        counts = list(res.n_edges_required.values())
        probes = sum(len(v) for v in res.results.values())
        print(f"{method.upper()}: edges required {counts} (reference {EXPECTED[method]}); "
              f"bisection {t2 - t1:.1f} s for {probes} probes ({(t2 - t1) / probes:.2f} s per "
              f"probe); fit + graph {t1 - t0:.1f} s; peak RSS {peak_rss_mib():.0f} MiB")
        results[method] = (graph, upper, res, t2 - t1)
    if args.baseline:
        graph, upper, res, ours = results["lib"]
        t0 = time.perf_counter()
        old = baseline_bisection(model, test_tokens, labels, graph, upper)
        took = time.perf_counter() - t0
        same = all(abs(old[k][n] - res.results[k][n]) == 0 for k in old for n in old[k])
        print(f"baseline (tl_degen 0.3, LIB): {took:.1f} s; same metric at every probe: {same}; "
              f"speed-up {took / ours:.1f}x")


if __name__ == "__main__":
    main()
