"""Benchmark: 2 processes over 1 on this machine, for the modadd reference build.

The reference build (bases + edges: 3830 training pairs of the seed-0 modadd model, float64,
``Threshold.absolute(1e-15)``, sites resid_pre.0, resid_mid.0:last, resid_post.0:last,
logits:last; as in ``bench_graph.py``) runs, repeats alternated:

* in this process with ``--threads`` torch threads (default 2: the whole machine here), and
* under ``torchrun --nproc_per_node 2`` on gloo, each process with ``--threads / 2`` threads
  (default 1), each fitting its half of the pairs and reducing the statistics.

The distributed time is measured inside the ranks, from a barrier after the process group is
up to the end of the graph (the launch, imports and model loading are printed apart, as
"launch"). Prints medians, the speed-up, peak memory of every process, the matmul rates, and
the largest difference of the leading Λ between the two results.

``--setting lm`` runs ``benchmarks/bench_lm.py``'s setting instead (a GPT-2-small-shaped
bridge, 48 prompts × 12 tokens, ``n_probes=32``, float32 passes): the bases only; each rank
draws its own probes, so the two results differ by the estimates' standard error, not by
rounding.

    python benchmarks/bench_distributed.py [--threads 2] [--repeats 3] [--setting modadd|lm]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch
from _machine import machine_line, peak_rss_mib

import tl_degen
from tl_degen.toy import modadd

SITES = ["resid_pre.0", "resid_mid.0:last", "resid_post.0:last", "logits:last"]
REFERENCE = Path(__file__).resolve().parents[2] / "shared" / "reference" / "rib_modadd" / "seed0"


LM_SITES = ["resid_pre.1", "resid_mid.1", "resid_post.1:last", "resid_post.2:last"]
SETTING = "modadd"


def model_and_tokens():
    if SETTING == "lm":
        from _lm import gpt2_small_shaped, word_tokens

        return gpt2_small_shaped().to(torch.float32), word_tokens(48, 12)
    path = REFERENCE / "model.safetensors"
    sd = modadd.load_state_dict(path if path.exists() else None)
    return modadd.load_bridge(sd), modadd.tokens_for(modadd.train_test_split()[0])


def build(model, tokens):
    if SETTING == "lm":
        return tl_degen.fit_bases(model, tokens, LM_SITES, n_probes=32, dtype=torch.float32,
                                  batch_size=16, progress=False), None
    bases = tl_degen.fit_bases(model, tokens, SITES, progress=False,
                               threshold=tl_degen.Threshold.absolute(1e-15))
    graph = tl_degen.interaction_graph(model, tokens, bases, progress=False)
    return bases, graph


def worker(out: Path, threads: int) -> None:
    """One rank: its half of the pairs, timed between barriers; rank 0 writes the figures."""
    import torch.distributed as dist

    torch.set_num_threads(threads)
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    model, tokens = model_and_tokens()
    shard = tokens.tensor_split(world)[rank]
    dist.barrier()
    start = time.perf_counter()
    bases, _ = build(model, shard)
    dist.barrier()
    seconds = time.perf_counter() - start
    rss = [None] * world
    dist.all_gather_object(rss, peak_rss_mib())
    if rank == 0:
        out.write_text(json.dumps({"seconds": seconds, "rss": rss,
                                   "top": {s.name: bases[s].eigenvalues[:8].tolist()
                                           for s in bases.sites}}))
    dist.destroy_process_group()


def launch(threads: int) -> tuple[dict, float]:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "result.json"
        env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
        start = time.perf_counter()
        subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                        "--nproc_per_node", "2", __file__, "--worker", str(out),
                        "--threads", str(threads), "--setting", SETTING], env=env, check=True,
                       timeout=1800,
                       stdout=subprocess.DEVNULL)
        return json.loads(out.read_text()), time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2, help="threads of the one process")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--setting", choices=["modadd", "lm"], default="modadd")
    parser.add_argument("--worker", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    global SETTING
    SETTING = args.setting
    warnings.simplefilter("ignore", tl_degen.AmbiguousRankWarning)
    if args.worker is not None:
        return worker(args.worker, args.threads)
    per_rank = max(1, args.threads // 2)
    torch.set_num_threads(args.threads)
    print(machine_line())
    model, tokens = model_and_tokens()
    what = (f"GPT-2-small-shaped bases (bench_lm.py setting): {tokens.shape[0]} prompts x "
            f"{tokens.shape[1]} tokens, n_probes 32, sites {', '.join(LM_SITES)}"
            if SETTING == "lm" else
            f"modadd reference build: {tokens.shape[0]} pairs, sites {', '.join(SITES)}")
    print(f"{what}; 1 process x {args.threads} threads vs 2 processes (gloo) x {per_rank} "
          "thread(s)")
    build(model, tokens[:64 if SETTING == "modadd" else 16])  # warm-up
    ones, twos, launches = [], [], []
    for r in range(args.repeats):
        start = time.perf_counter()
        bases, _ = build(model, tokens)
        ones.append(time.perf_counter() - start)
        result, wall = launch(per_rank)
        twos.append(result["seconds"])
        launches.append(wall - result["seconds"])
        print(f"  repeat {r + 1}: 1 process {ones[-1]:.2f} s | 2 processes "
              f"{twos[-1]:.2f} s (+ {launches[-1]:.1f} s launch, imports, model load)")
    diff = max(abs(a - b) / max(abs(b), 1e-300)
               for s in bases.sites
               for a, b in zip(result["top"][s.name], bases[s].eigenvalues[:8].tolist()))
    one, two = statistics.median(ones), statistics.median(twos)
    print(f"median: 1 process {one:.2f} s, 2 processes {two:.2f} s -> speed-up "
          f"{one / two:.2f}x (with the launch: {one / (two + statistics.median(launches)):.2f}x)")
    print(f"peak RSS: 1 process {peak_rss_mib():.0f} MiB; 2 processes "
          f"{' + '.join(f'{m:.0f}' for m in result['rss'])} MiB")
    print(f"largest relative difference of the top 8 Λ per site, 2 processes vs 1: {diff:.1e}"
          + (" (independent probes on each rank)" if SETTING == "lm" else ""))


if __name__ == "__main__":
    main()
