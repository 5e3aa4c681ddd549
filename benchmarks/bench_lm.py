"""Benchmark: LIB bases and graph on a GPT-2-small- or Pythia-70m-shaped language model
(issue 16).

The tutorial-3 setting: a 12-layer GPT-2-small-shaped ``TransformerBridge`` (d_model 768,
vocab 50257, random weights: they cost the same to analyse as trained ones), ``--prompts``
prompts × ``--tokens`` tokens, sites ``resid_pre.1, resid_mid.1, resid_post.1:last,
resid_post.2:last``, ``n_probes`` random probes, the model in ``--dtype`` (accumulation is
float64 whatever it is). ``--model pythia``: a Pythia-70m-shaped GPT-NeoX bridge (parallel
attention and MLP, rotary), sites ``resid_pre.1, mlp_post.1:last, resid_post.1:last,
resid_post.2:last`` (a parallel block has no ``resid_mid``). ``--model smollm2``: the trained
SmolLM2-135M-Instruct (:mod:`tl_degen.trained`) on ``--prompts`` indirect-object prompt pairs
(:func:`tl_degen.tasks.ioi`, 15 tokens), sites ``resid_pre.8, resid_mid.8, resid_post.8:last,
resid_post.9:last``, and ``attribution_patch`` at the first site, ``patch_directions`` of its
top 16 directions and ``degeneracy_report`` with the bases given. ``--sites`` replaces them, e.g.
``--sites resid_pre.11,resid_mid.11,resid_post.11:last,logits:last``: the last block and the
logits at vocabulary scale (kept in their ``d_model + 1``-dimensional factor space). Prints,
per stage, wall time and peak RSS, and in the same run the time of one plain forward +
backward pass of the model over the same tokens (the baseline the fit is measured against)
and the machine's matmul rates.

``--whole``: every layer (:func:`tl_degen.every_layer`: every ``resid_pre.L`` and
``resid_mid.L``, the last ``resid_post.L:last`` and ``logits:last``; ``--no-logits`` stops
before the logits) through :func:`tl_degen.fit_and_graph`, with each pair's time and route,
and the floor of the fit and of each pair: their flops (matmuls by
``torch.utils.flop_counter``, decompositions by textbook counts; :class:`_machine.Work`),
counted on ``--count-prompts`` and on twice as many prompts and extended affinely to all of
them, each dtype's at the matmul rate of that dtype measured in the same run, before and
after it, the faster of the two (the statistics are float64, the passes float32).

    python benchmarks/bench_lm.py [--model gpt2|pythia|smollm2] [--prompts 48] [--tokens 12]
                                  [--probes 32] [--no-graph] [--sites a,b,...]
    python benchmarks/bench_lm.py --whole [--model gpt2|smollm2] [--no-logits]
"""

from __future__ import annotations

import argparse
import time
import warnings

import torch
from _lm import gpt2_small_shaped, pythia_70m_shaped, word_tokens
from _machine import Work, machine_line, matmul_gflops, peak_rss_mib

import tl_degen

SITES = ["resid_pre.1", "resid_mid.1", "resid_post.1:last", "resid_post.2:last"]
PYTHIA_SITES = ["resid_pre.1", "mlp_post.1:last", "resid_post.1:last", "resid_post.2:last"]
SMOLLM2_SITES = ["resid_pre.8", "resid_mid.8", "resid_post.8:last", "resid_post.9:last"]


def forward_backward_seconds(model, tokens: torch.Tensor, batch_size: int,
                             repeats: int = 3) -> float:
    """Best of ``repeats``: the model's forward pass on ``tokens`` and one backward pass of
    the summed logits to the embedding weights, in batches of ``batch_size`` (as the fit runs;
    one batch of everything would hold every layer's activations of every prompt at once)."""
    best = float("inf")
    for _ in range(repeats):
        model.zero_grad(set_to_none=True)
        start = time.perf_counter()
        for batch in tokens.split(batch_size):
            model(batch).sum().backward()
        best = min(best, time.perf_counter() - start)
    model.zero_grad(set_to_none=True)
    return best


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--model", default="gpt2", choices=["gpt2", "pythia", "smollm2"])
    parser.add_argument("--prompts", type=int, default=48)
    parser.add_argument("--tokens", type=int, default=12)
    parser.add_argument("--probes", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--dtype", default="float32", choices=["float32", "float64"])
    parser.add_argument("--no-graph", action="store_true")
    parser.add_argument("--sites", help="comma-separated sites (default: the setting's)")
    parser.add_argument("--whole", action="store_true", help="every layer (fit_and_graph)")
    parser.add_argument("--no-logits", action="store_true", help="--whole without the logits")
    parser.add_argument("--count-prompts", type=int, default=4,
                        help="prompts the flops are counted on (--whole)")
    parser.add_argument("--folder", help="--whole: keep the run's state here (resumable)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    warnings.simplefilter("ignore", tl_degen.AmbiguousRankWarning)
    dtype = getattr(torch, args.dtype)
    print(machine_line())
    if args.model == "gpt2":
        model, sites, name = gpt2_small_shaped().to(dtype), SITES, "GPT-2-small-shaped"
    elif args.model == "pythia":
        model, sites, name = pythia_70m_shaped().to(dtype), PYTHIA_SITES, "Pythia-70m-shaped"
    else:
        from tl_degen.tasks import ioi
        from tl_degen.trained import smollm2

        model, sites, name = smollm2(dtype), SMOLLM2_SITES, "SmolLM2-135M-Instruct (trained)"
    if args.sites:
        sites = args.sites.split(",")
    task = ioi(model, args.prompts) if args.model == "smollm2" else None
    tokens = word_tokens(args.prompts, args.tokens) if task is None else task.clean
    if args.whole:
        whole(model, tokens, name, args, dtype)
        return
    print(f"{name} bridge, {tokens.shape[0]} prompts x {tokens.shape[1]} tokens, model in "
          f"{args.dtype}, n_probes={args.probes}, batch size {args.batch_size}, sites {sites}")
    # the library's stages first, so their peak RSS is theirs; the baseline pass (which
    # keeps every layer's activations and the logits for its backward pass) runs last
    start = time.perf_counter()
    bases = tl_degen.fit_bases(model, tokens, sites, n_probes=args.probes, dtype=dtype,
                               batch_size=args.batch_size, progress=False)
    fit = time.perf_counter() - start
    errors = ", ".join(f"{s.name} {bases[s].jacobian_gram_error:.1%}" for s in bases.sites
                       if bases[s].jacobian_gram_error is not None)  # (the logits have none)
    print(f"fit_bases                                              {fit:8.2f} s   peak RSS "
          f"{peak_rss_mib():.0f} MiB")
    print(f"  kept {[bases[s].k for s in bases.sites]}; relative SE of M′: {errors}")
    seconds = None
    if not args.no_graph:
        start = time.perf_counter()
        graph = tl_degen.interaction_graph(model, tokens, bases, n_probes=args.probes,
                                           dtype=dtype, batch_size=args.batch_size,
                                           progress=True)
        seconds = time.perf_counter() - start
        print(f"interaction_graph                                      {seconds:8.2f} s   "
              f"peak RSS {peak_rss_mib():.0f} MiB")
        print(f"  edge routes {graph.config['edge_routes']}; relative SE of the edges: "
              + ", ".join(f"{a.name}->{b.name} {e:.1%}" for (a, b), e in graph.errors.items()))
        print(f"bases + graph {fit + seconds:.1f} s")
    if task is not None:  # the indirect-object task's prompt pairs and logit difference
        start = time.perf_counter()
        attribution = tl_degen.attribution_patch(model, task.clean, task.corrupted, bases,
                                                 sites[0], task.logit_difference,
                                                 dtype=dtype, progress=False)
        print(f"attribution_patch at {sites[0]}                      "
              f"{time.perf_counter() - start:8.2f} s   peak RSS {peak_rss_mib():.0f} MiB")
        print("  " + repr(attribution).splitlines()[1].strip())
        start = time.perf_counter()
        patched = tl_degen.patch_directions(model, task.clean, task.corrupted, bases, sites[0],
                                            task.logit_difference,
                                            directions=attribution.top(sites[0], 16),
                                            dtype=dtype, progress=False)
        print(f"patch_directions, top 16 by attribution               "
              f"{time.perf_counter() - start:8.2f} s   peak RSS {peak_rss_mib():.0f} MiB")
        print(f"  recovered {[round(v, 3) for v in patched.recovered().tolist()[:4]]}...; "
              f"all kept together {patched.all_value:+.3f}, whole site {patched.site_value:+.3f}")
        start = time.perf_counter()
        tl_degen.degeneracy_report(model, tokens, sites, bases=bases, progress=False)
        print(f"degeneracy_report (bases given)                       "
              f"{time.perf_counter() - start:8.2f} s   peak RSS {peak_rss_mib():.0f} MiB")
    base = forward_backward_seconds(model, tokens, args.batch_size)
    print(f"baseline: one forward + backward pass over the tokens  {base:8.2f} s   peak RSS "
          f"{peak_rss_mib():.0f} MiB")
    print(f"fit_bases {fit / base:.0f}x the baseline"
          + ("" if seconds is None else f", interaction_graph {seconds / base:.0f}x"))


def whole(model, tokens: torch.Tensor, name: str, args, dtype: torch.dtype) -> None:
    """Every layer: fit_and_graph timed, then the flops of the fit and of each pair counted
    on a few prompts and extended to all (the work is affine in the prompts), against the
    matmul rates of this run."""
    sites = tl_degen.every_layer(model, end="resid_post:last" if args.no_logits else
                                 "logits:last")
    print(f"{name}, {tokens.shape[0]} prompts x {tokens.shape[1]} tokens, every layer: "
          f"{len(sites)} sites ({sites[0]} ... {sites[-1]}), model in {args.dtype}, "
          f"n_probes={args.probes}, batch size {args.batch_size}")
    kwargs = dict(n_probes=args.probes, dtype=dtype, batch_size=args.batch_size)
    before = {dt: matmul_gflops(dt) * 1e9 for dt in (torch.float32, torch.float64)}
    start = time.perf_counter()
    bases, graph = tl_degen.fit_and_graph(model, tokens, sites, folder=args.folder, **kwargs)
    total = time.perf_counter() - start
    seconds = graph.config["edge_seconds"]
    graph_s = sum(seconds.values())
    print(f"fit_and_graph: {total:.1f} s (fit {total - graph_s:.1f} s, graph {graph_s:.1f} s)"
          f"   peak RSS {peak_rss_mib():.0f} MiB")
    errors = [bases[s].jacobian_gram_error for s in bases.sites
              if bases[s].jacobian_gram_error]
    print(f"  kept {[bases[s].k for s in bases.sites]}")
    if errors:
        print(f"  probed Grams' relative SE: median {sorted(errors)[len(errors) // 2]:.1%}, "
              f"max {max(errors):.1%} ({len(errors)} sites)")
    # the machine's rate, measured before the run and after it, the faster of the two: a
    # floor at the faster rate is the lower bound (the rate moves between minutes)
    rates = {dt: max(before[dt], matmul_gflops(dt) * 1e9) for dt in before}
    p, n = args.count_prompts, tokens.shape[0]

    def counted(fn) -> Work:
        """``fn(tokens)``'s work on all the prompts, from counts on ``p`` and ``2p``: the
        work is affine in the prompts (per-prompt passes and products, plus per-pass
        products and decompositions counted once; per-batch ones counted once, which can
        only lower the floor)."""
        one, two = Work.of(lambda: fn(tokens[:p])), Work.of(lambda: fn(tokens[:2 * p]))
        return one + (two - one) * ((n - p) / p)

    fit_work = counted(lambda few: tl_degen.fit_bases(model, few, sites, progress=False,
                                                      **kwargs))
    fit_floor = fit_work.floor(rates)
    print(f"matmul, the faster of before and after the run: float32 "
          f"{rates[torch.float32] / 1e9:.0f}, float64 {rates[torch.float64] / 1e9:.0f} GFLOP/s; "
          "each floor is a stage's flops (matmuls and decompositions) at the rate of their "
          "dtype")
    print(f"fit: {fit_work}, floor {fit_floor:.1f} s, took {total - graph_s:.1f} s "
          f"({(total - graph_s) / fit_floor:.2f}x)")
    print(f"  {'pair':<36} {'route':<26} {'time':>8} {'TFLOP':>7} {'floor':>7} {'x':>5}")
    # each pair counted alone reads its input site with a model pass of its own, which the
    # whole run shares (one pass reads every site): that pass is taken out of each pair and
    # counted once, as the whole model's forward pass
    with torch.no_grad():
        reads = counted(model)
    floor = reads.floor(rates)
    print(f"  {'site reads (one forward pass)':<36} {'':<26} {'':>8} {reads.total / 1e12:7.2f} "
          f"{floor:6.1f}s")
    for (a, b) in graph.pairs():
        key = f"{a.name}->{b.name}"
        pair = tl_degen.BasisSet([bases[a], bases[b]])
        work = (counted(lambda few: tl_degen.interaction_graph(
            model, few, pair, progress=False, **kwargs))
            - counted(lambda few: tl_degen.site_activations(model, few, a)))
        pair_floor = work.floor(rates)
        floor += pair_floor
        print(f"  {key:<36} {graph.config['edge_routes'][key]:<26} {seconds[key]:7.1f}s "
              f"{work.total / 1e12:7.2f} {pair_floor:6.1f}s {seconds[key] / pair_floor:5.1f}")
    print(f"graph: {graph_s:.1f} s against a floor of {floor:.1f} s "
          f"({graph_s / floor:.2f}x); bases + graph {total:.1f} s")


if __name__ == "__main__":
    main()
