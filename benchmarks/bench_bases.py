"""Benchmark: LIB bases in the reference setting (DESIGN.md §5) on the modadd model.

3 sites + unrotated logits, 3830 samples, float64, gradient integration. Prints wall time
and peak memory per stage, and the time of the same fit with the closed-form sections
switched off (the autograd path), run in the same process as the baseline.

    python benchmarks/bench_bases.py [--threads 2] [--device cpu|cuda]
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


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run(model, tokens, label: str, closed_form: bool = True) -> float:
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    start = time.perf_counter()
    bases = tl_degen.fit_bases(model, tokens, SITES, batch_size=4000,
                               threshold=tl_degen.Threshold.absolute(1e-15), progress=False,
                               closed_form=closed_form)
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    kept = [bases[s].k for s in SITES]
    print(f"{label:<34} {seconds:7.2f} s   kept {kept}   peak RSS {peak_rss_mib():.0f} MiB")
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model = modadd.load_bridge().to(args.device)
    tokens = modadd.tokens_for(modadd.train_test_split()[0]).to(args.device)
    print(machine_line())
    print(f"torch {torch.__version__}, {args.threads} threads, device {args.device}, "
          f"{tokens.shape[0]} samples, float64")
    if args.device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    best = min(run(model, tokens, "LIB bases (closed forms on)") for _ in range(args.repeats))
    base = run(model, tokens, "baseline: autograd only", closed_form=False)
    print(f"speed-up of closed forms over autograd: {base / best:.1f}x (best of {args.repeats})")
    if args.device.startswith("cuda"):
        print(f"peak CUDA memory {torch.cuda.max_memory_allocated() / 2**20:.0f} MiB")


if __name__ == "__main__":
    main()
