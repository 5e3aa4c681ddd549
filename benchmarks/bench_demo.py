"""Benchmark: ``tl-degen demo`` end to end (shipped modadd model → bases → graph → ablations,
patching, degeneracy → report folder). Prints the wall time, peak memory and the size of each
file of the report. Target: under 60 s on 2 CPU cores; the graph page under 5 MB.

    python benchmarks/bench_demo.py [--threads 2] [--out DIR]
"""

from __future__ import annotations

import argparse
import resource
import tempfile
import time
from pathlib import Path

import torch
from _machine import machine_line

from tl_degen import cli


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    out = Path(args.out) if args.out else Path(tempfile.mkdtemp()) / "report"
    start = time.perf_counter()
    code = cli.main(["demo", "--out", str(out), "--quiet", "--threads", str(args.threads)])
    wall = time.perf_counter() - start
    if code != 0:
        raise SystemExit(code)
    files = sorted(p for p in out.rglob("*") if p.is_file())
    total = sum(p.stat().st_size for p in files)
    print(machine_line())
    print(f"torch {torch.__version__}, {args.threads} threads")
    print(f"demo wall time {wall:.1f} s, peak RSS "
          f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MiB")
    print(f"report {out}: {total / 2**20:.2f} MiB in {len(files)} files")
    for p in files:
        print(f"  {p.stat().st_size / 2**10:9.1f} KiB  {p.relative_to(out)}")


if __name__ == "__main__":
    main()
