"""Benchmark: the whole modadd interaction graph (bases + edges) in the reference setting.

3 sites + unrotated logits, 3830 training pairs of the seed-0 reference model, float64,
gradient integration, absolute threshold 1e-15 (DESIGN.md §5). Prints, per repeat, the wall
time of the bases and of the edges and the peak memory; then the floating-point work of one
fit + graph (every matmul, counted by ``torch.utils.flop_counter``) and its floor at the
float64 matmul rate measured just before each repeat (the machine's speed drifts), so each
time is read against the machine as it was.

With ``--rib``, Apollo Research's reference implementation (``rib``, when it is installed
beside the project) builds the same graph from its own config in the same process, repeats
alternated with ours, and the ratio of the medians is printed. Without ``rib`` the
benchmark says so and prints our figures only.

    python benchmarks/bench_graph.py [--threads 2] [--device cpu|cuda] [--repeats 3] [--rib]
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import torch
from _machine import machine_line, matmul_gflops, peak_rss_mib
from torch.utils.flop_counter import FlopCounterMode

import tl_degen
from tl_degen.toy import modadd

SITES = ["resid_pre.0", "resid_mid.0:last", "resid_post.0:last", "logits:last"]
REFERENCE = Path(__file__).resolve().parents[2] / "shared" / "reference" / "rib_modadd" / "seed0"


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def build(model, tokens):
    bases = tl_degen.fit_bases(model, tokens, SITES, progress=False,
                               threshold=tl_degen.Threshold.absolute(1e-15))
    graph = tl_degen.interaction_graph(model, tokens, bases, progress=False)
    return bases, graph


def rib_builder(workdir: Path):
    """A function that runs rib's own build of the reference graph, or None without rib."""
    try:
        from rib.rib_builder import RibBuildConfig, rib_build
    except ImportError:
        return None
    from safetensors.torch import load_file

    shutil.copy(REFERENCE / "model_config.yaml", workdir / "config.yaml")
    torch.save(load_file(str(REFERENCE / "model.safetensors")), workdir / "model.pt")
    config = RibBuildConfig(
        exp_name="bench_graph", out_dir=None, seed=0, tlens_model_path=workdir / "model.pt",
        last_pos_module_type="add_resid1",
        dataset={"dataset_type": "modular_arithmetic", "return_set": "train", "fn_name": "add",
                 "modulus": 113, "frac_train": 0.3},
        node_layers=["ln1.0", "ln2.0", "unembed", "output"], rotate_final_node_layer=False,
        batch_size=99999, truncation_threshold=1e-15, n_intervals=0,
        integration_method="gradient", dtype="float64", basis_formula="jacobian",
        edge_formula="squared", center=True, dist_split_over="out_dim", calculate_edges=True)
    return lambda: rib_build(config, force=True)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--rib", action="store_true",
                        help="also run rib's own build (when installed), alternated with ours")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model = modadd.load_bridge(modadd.load_state_dict(REFERENCE / "model.safetensors"))
    model = model.to(args.device)
    tokens = modadd.tokens_for(modadd.train_test_split()[0]).to(args.device)
    print(machine_line())
    print(f"{args.threads} threads, device {args.device}, {tokens.shape[0]} samples, float64, "
          f"batch size from the memory budget ({tl_degen.memory.auto_batch_size(model, 3)})")
    workdir = Path(tempfile.mkdtemp())
    rib = rib_builder(workdir) if args.rib else None
    if args.rib and rib is None:
        print("rib is not installed beside the project (pip install -e path/to/rib); "
              "printing tl_degen's figures only")
    with FlopCounterMode(display=False) as counter:
        build(model, tokens)
    gflop = counter.get_total_flops() / 1e9
    ours, theirs, rates = [], [], []
    for _ in range(args.repeats):
        # the machine's rate just before each repeat: its speed drifts by ±15 % within a
        # session, so each repeat is read against its own floor
        rates.append(matmul_gflops(torch.float64))
        sync()
        t0 = time.perf_counter()
        bases = tl_degen.fit_bases(model, tokens, SITES, progress=False,
                                   threshold=tl_degen.Threshold.absolute(1e-15))
        sync()
        t1 = time.perf_counter()
        graph = tl_degen.interaction_graph(model, tokens, bases, progress=False)
        sync()
        t2 = time.perf_counter()
        ours.append(t2 - t0)
        sums = [f"{float(E.sum()):.6e}" for E in graph.edges.values()]
        print(f"tl_degen: bases {t1 - t0:6.2f} s   edges {t2 - t1:6.2f} s   total "
              f"{t2 - t0:6.2f} s = {(t2 - t0) * rates[-1] / gflop:.2f}x the floor at "
              f"{rates[-1]:.0f} GFLOP/s   edge sums {sums}   peak RSS {peak_rss_mib():.0f} MiB")
        if rib is not None:
            sync()
            t0 = time.perf_counter()
            rib()
            sync()
            theirs.append(time.perf_counter() - t0)
            print(f"rib:      bases + edges {theirs[-1]:6.2f} s")
    shutil.rmtree(workdir, ignore_errors=True)
    rate = statistics.median(rates)
    floor = gflop / rate
    best, median = min(ours), statistics.median(ours)
    ratios = [t * r / gflop for t, r in zip(ours, rates)]
    print(f"work: {gflop:.1f} GFLOP of matmuls per fit + graph; float64 matmul "
          f"{min(rates):.0f}–{max(rates):.0f} GFLOP/s before the repeats (median {rate:.0f}) "
          f"→ floor {floor:.2f} s")
    print(f"tl_degen best {best:.2f} s, median {median:.2f} s; each repeat against its own "
          f"floor: median {statistics.median(ratios):.2f}x (best {min(ratios):.2f}x)")
    if theirs:
        print(f"rib median {statistics.median(theirs):.2f} s: tl_degen is "
              f"{statistics.median(theirs) / median:.1f}x faster side by side")
    if args.device.startswith("cuda"):
        print(f"peak CUDA memory {torch.cuda.max_memory_allocated() / 2**20:.0f} MiB")


if __name__ == "__main__":
    main()
