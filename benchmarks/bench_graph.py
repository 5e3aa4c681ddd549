"""Benchmark: the whole modadd interaction graph (bases + edges) in the reference setting.

3 sites + unrotated logits, 3830 samples, float64, gradient integration, absolute threshold
1e-15 (DESIGN.md §5). Prints wall time per stage and peak memory. Target: under 8 s on 2 CPU
cores (the reference implementation needs about 30 s here for the same work).

    python benchmarks/bench_graph.py [--threads 2] [--device cpu|cuda] [--repeats 3]
"""

from __future__ import annotations

import argparse
import resource
import time

import torch
from _machine import machine_line

import tl_degen
from tl_degen.toy import modadd

SITES = ["resid_pre.0", "resid_mid.0:last", "resid_post.0:last", "logits:last"]


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model = modadd.load_bridge().to(args.device)
    tokens = modadd.tokens_for(modadd.train_test_split()[0]).to(args.device)
    print(machine_line())
    print(f"torch {torch.__version__}, {args.threads} threads, device {args.device}, "
          f"{tokens.shape[0]} samples, float64")
    best = None
    for _ in range(args.repeats):
        sync()
        t0 = time.perf_counter()
        bases = tl_degen.fit_bases(model, tokens, SITES, batch_size=4000, progress=False,
                                   threshold=tl_degen.Threshold.absolute(1e-15))
        sync()
        t1 = time.perf_counter()
        graph = tl_degen.interaction_graph(model, tokens, bases, batch_size=4000,
                                           progress=False)
        sync()
        t2 = time.perf_counter()
        sums = [f"{float(E.sum()):.6e}" for E in graph.edges.values()]
        print(f"bases {t1 - t0:6.2f} s   edges {t2 - t1:6.2f} s   total {t2 - t0:6.2f} s   "
              f"edge sums {sums}   peak RSS "
              f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MiB")
        best = t2 - t0 if best is None else min(best, t2 - t0)
    print(f"best total: {best:.2f} s")
    if args.device.startswith("cuda"):
        print(f"peak CUDA memory {torch.cuda.max_memory_allocated() / 2**20:.0f} MiB")


if __name__ == "__main__":
    main()
