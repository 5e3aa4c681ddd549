"""Benchmark: LIB bases in the reference setting (DESIGN.md §5) on the modadd model.

3 sites + unrotated logits, 3830 samples, float64, gradient integration. Prints wall time
and peak memory per stage, and the time of the same fit with the closed-form sections
switched off (the autograd path), run in the same process as the baseline.

``--baseline-rev REV`` also times the fit of an earlier commit (default ``937560e``, the
last one whose statistics were formed Grams, before the square-root statistics of issue 11):
both run in fresh subprocesses, alternated, and the ratio is printed.

    python benchmarks/bench_bases.py [--threads 2] [--device cpu|cuda] [--baseline-rev REV]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

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


CHILD = """
import json, sys, time, torch, warnings
warnings.simplefilter("ignore")
torch.set_num_threads({threads})
import tl_degen
from tl_degen.toy import modadd
model = modadd.load_bridge()
tokens = modadd.tokens_for(modadd.train_test_split()[0])
kw = dict(batch_size=4000, threshold=tl_degen.Threshold.absolute(1e-15), progress=False)
tl_degen.fit_bases(model, tokens[:200], {sites}, **kw)  # warm-up
times = []
for _ in range({repeats}):
    start = time.perf_counter()
    tl_degen.fit_bases(model, tokens, {sites}, **kw)
    times.append(time.perf_counter() - start)
print(json.dumps(times))
"""


def timed_in_subprocess(package_root: str, threads: int, repeats: int) -> list[float]:
    code = CHILD.format(threads=threads, repeats=repeats, sites=SITES)
    env = {**os.environ, "PYTHONPATH": package_root}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                         text=True, check=True, cwd=package_root)
    return json.loads(out.stdout.strip().splitlines()[-1])


def compare_with(rev: str, threads: int, rounds: int = 3) -> None:
    """Our fit and ``rev``'s, each in fresh subprocesses, alternated ``rounds`` times."""
    repo = Path(__file__).resolve().parents[1]
    with tempfile.TemporaryDirectory() as tmp:
        archive = subprocess.run(["git", "-C", str(repo), "archive", rev, "tl_degen"],
                                 capture_output=True, check=True).stdout
        subprocess.run(["tar", "-x", "-C", tmp], input=archive, check=True)
        ours, theirs = [], []
        for _ in range(rounds):
            ours += timed_in_subprocess(str(repo), threads, 2)
            theirs += timed_in_subprocess(tmp, threads, 2)
    ours.sort()
    theirs.sort()
    print(f"this tree:   median {ours[len(ours) // 2]:.2f} s, "
          f"best {ours[0]:.2f} s over {len(ours)} fits")
    print(f"{rev:<11}: median {theirs[len(theirs) // 2]:.2f} s, "
          f"best {theirs[0]:.2f} s over {len(theirs)} fits")
    print(f"ratio this/{rev}: {ours[len(ours) // 2] / theirs[len(theirs) // 2]:.2f}x (median), "
          f"{ours[0] / theirs[0]:.2f}x (best)")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--baseline-rev", default=None, metavar="REV",
                        help="also time this git revision's fit (e.g. 937560e)")
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
    if args.baseline_rev:
        compare_with(args.baseline_rev, args.threads)


if __name__ == "__main__":
    main()
