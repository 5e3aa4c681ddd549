"""Benchmark: the effective parameter count N_eff = 2λ of the shipped modular-addition model,
per block and in total (``tl_degen.effective_parameters`` with its defaults). Target: ≤ 3 min
on 2 CPU cores. Prints the wall time, peak memory, the machine's matmul rate and, as the
baseline, the time of one plain forward+backward pass of the same batch size (one SGLD step
costs about one such pass).

    python benchmarks/bench_neff.py [--threads 2] [--n 3830]
"""

from __future__ import annotations

import argparse
import time
import warnings

import torch
from _machine import machine_line, peak_rss_mib

import tl_degen
from tl_degen.toy import modadd


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--n", type=int, default=3830, help="training pairs (rib's split: 3830)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(machine_line())
    model = modadd.load_bridge()
    tokens = modadd.tokens_for(modadd.train_test_split()[0][: args.n])
    groups = ["model", "blocks.0"]  # in total and per block, as degeneracy_report shows them

    # baseline: one forward+backward of an SGLD batch through the same model
    batch = tokens[:64]
    for p in model.parameters():
        p.requires_grad_(True)
    model(batch)[:, -1].logsumexp(-1).mean().backward()
    start = time.perf_counter()
    for _ in range(20):
        model(batch)[:, -1].logsumexp(-1).mean().backward()
    step = (time.perf_counter() - start) / 20
    model.zero_grad(set_to_none=True)

    start = time.perf_counter()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        neff = tl_degen.effective_parameters(
            model, tokens, groups, positions="last", progress=False
        )
    wall = time.perf_counter() - start
    cfg = neff.config
    n_steps = len(groups) * cfg["num_chains"] * (cfg["num_burnin_steps"] + cfg["num_draws"])
    print(neff)
    print(
        f"N_eff of {len(groups)} groups on {len(tokens)} pairs: wall time {wall:.1f} s "
        f"({n_steps} SGLD steps, {wall / n_steps * 1e3:.1f} ms per step); baseline forward+"
        f"backward of {len(batch)} pairs {step * 1e3:.1f} ms (ratio "
        f"{wall / n_steps / step:.2f}); peak RSS {peak_rss_mib():.0f} MiB"
    )
    for w in caught:
        print("warning:", w.message)


if __name__ == "__main__":
    main()
