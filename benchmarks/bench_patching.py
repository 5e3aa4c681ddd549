"""Benchmark: basis-direction patching on the shipped modadd model, and the recovery table.

Clean prompts (a, b), corrupted prompts (a′, b), metric: the logit difference between the
clean and the corrupted answer at the last position. For LIB, PCA and neuron bases (fitted on
the 3830 training pairs) at resid_mid and at the MLP hidden site, this prints how many
directions must be patched in (denoising) to recover 90% of the clean logit difference,
adding directions either in the basis' own order (descending Λ / variance; index order for
neurons) or in order of their single-direction effect. It also prints the wall time of each
stage and the peak memory, and TransformerLens's whole-position patch of resid_pre in the same
process as a baseline.

    python benchmarks/bench_patching.py [--pairs 1000] [--threads 2] [--device cpu|cuda]
"""

from __future__ import annotations

import argparse
import resource
import statistics
import time

import torch
from _machine import machine_line

import tl_degen
from tl_degen.toy import modadd

SITES = ["resid_pre.0", "resid_mid.0:last", "mlp_post.0:last", "resid_post.0:last",
         "logits:last"]
TABLE_SITES = ["resid_mid.0:last", "mlp_post.0:last"]


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def first_reaching(recovered: torch.Tensor, level: float) -> int | None:
    hits = (recovered >= level).nonzero()
    return int(hits[0]) if len(hits) else None


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--pairs", type=int, default=1000)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--level", type=float, default=0.9)
    parser.add_argument("--deep", action="store_true",
                        help="also patch a GPT-2-small-shaped model (12 layers) at layers 6, 11")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model = modadd.load_bridge(dtype=torch.float64).to(args.device)
    tokens = modadd.tokens_for(modadd.train_test_split()[0]).to(args.device)
    clean, corrupted, logit_diff = modadd.patching_pairs(args.pairs, seed=0)
    clean, corrupted = clean.to(args.device), corrupted.to(args.device)
    print(machine_line())
    print(f"torch {torch.__version__}, {args.threads} threads, device {args.device}, "
          f"{args.pairs} clean/corrupted pairs, float64")

    timings: dict[str, float] = {}
    rows = []
    for method in ("lib", "pca", "neuron"):
        sync()
        t0 = time.perf_counter()
        bases = tl_degen.fit_bases(model, tokens, SITES, method=method, progress=False)
        sync()
        timings[f"fit {method}"] = time.perf_counter() - t0
        for site in TABLE_SITES:
            k = bases[site].k
            t0 = time.perf_counter()
            single = tl_degen.patch_directions(model, clean, corrupted, bases, site, logit_diff,
                                               progress=False)
            sync()
            timings[f"patch each of {k} {method} directions at {site}"] = (
                time.perf_counter() - t0)
            by_effect = single.effects.argsort(descending=True).tolist()
            orders = {"basis order": list(range(k)), "by single effect": by_effect}
            for name, order in orders.items():
                cumulative = tl_degen.patch_directions(
                    model, clean, corrupted, bases, site, logit_diff,
                    directions=[order[:n] for n in range(k + 1)], progress=False)
                n90 = first_reaching(cumulative.recovered(), args.level)
                rows.append((method, site, k, name, n90, float(single.recovered().max()),
                             cumulative.all_value, cumulative.site_value, cumulative.clean))
        sync()
        t0 = time.perf_counter()
        attr = tl_degen.attribution_patch(model, clean, corrupted, bases, SITES[:-1], logit_diff,
                                          progress=False)
        sync()
        timings[f"attribution {method} (4 sites)"] = time.perf_counter() - t0
        del attr

    from transformer_lens import patching

    t0 = time.perf_counter()
    _, cache = model.run_with_cache(clean)
    patching.get_act_patch_resid_pre(model, corrupted, cache,
                                     lambda lg: logit_diff(lg).mean())
    sync()
    timings["baseline: TransformerLens get_act_patch_resid_pre (3 positions)"] = (
        time.perf_counter() - t0)

    print(f"\nDirections needed to recover {args.level:.0%} of the clean logit difference "
          f"(denoising; clean {rows[0][8]:.3f}):")
    print(f"{'basis':<7} {'site':<18} {'k':>4} {'order':<17} {'n':>5} "
          f"{'best single':>11} {'all kept':>9} {'whole site':>10}")
    for method, site, k, order, n90, best, all_v, site_v, _ in rows:
        print(f"{method:<7} {site:<18} {k:>4} {order:<17} {str(n90):>5} {best:>11.3f} "
              f"{all_v:>9.3f} {site_v:>10.3f}")
    print("\nwall time:")
    for name, t in timings.items():
        print(f"  {t:7.2f} s  {name}")
    print(f"peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MiB")
    if args.deep:
        deep_patching(args.device)
    if args.device.startswith("cuda"):
        print(f"peak CUDA memory {torch.cuda.max_memory_allocated() / 2**20:.0f} MiB")


def deep_patching(device: str, n_prompts: int = 16, n_tokens: int = 12, n_dirs: int = 32,
                  repeats: int = 3):
    """Per-patch time on a 12-layer GPT-2-small-shaped model, as a ``TransformerBridge``
    and (TransformerLens 3.x) a ``HookedTransformer``: every pass resumed at the site's block
    (``start_at_layer``; on a bridge the blocks before it stood in for) against every pass
    from the embedding (the resume switched off), alternated in the same process, medians
    of ``repeats``."""
    from _lm import gpt2_small_shaped, gpt2_small_shaped_hooked

    hooked = gpt2_small_shaped_hooked()
    for model in [gpt2_small_shaped()] + ([hooked] if hooked is not None else []):
        deep_patching_on(model.to(device), n_prompts, n_tokens, n_dirs, repeats, device)


def deep_patching_on(model, n_prompts: int, n_tokens: int, n_dirs: int, repeats: int,
                     device: str):
    from _lm import word_tokens

    from tl_degen.adapters import get_adapter
    from tl_degen.sites import Site

    kind = type(model).__name__
    clean = word_tokens(n_prompts, n_tokens, seed=1).to(device)
    corrupted = word_tokens(n_prompts, n_tokens, seed=2).to(device)

    def metric(logits):
        return logits[:, -1, 5] - logits[:, -1, 6]

    adapter = get_adapter(model)
    with torch.no_grad():
        t0 = time.perf_counter()
        model(clean)
        t1 = time.perf_counter()
        adapter.read_sites(clean, [Site("resid_mid", 6)])
        t2 = time.perf_counter()
    print(f"\nGPT-2-small-shaped {kind} (12 layers, random weights), {n_prompts} prompt pairs × "
          f"{n_tokens} tokens, {n_dirs} PCA directions patched one at a time, float32; one "
          f"plain forward {1e3 * (t1 - t0):.0f} ms, of which blocks 0-5 {1e3 * (t2 - t1):.0f} ms:")
    adapter_cls = type(adapter)
    resume = adapter_cls.resume_state
    modes = (("from the embedding", lambda self, tokens, layer: None),
             ("resumed at the block", resume))
    for layer in (6, 11):
        site = f"resid_mid.{layer}"
        bases = tl_degen.fit_bases(model, clean, [site], method="pca", progress=False)
        times: dict[str, list[float]] = {name: [] for name, _ in modes}
        effects = {}
        for _ in range(repeats):
            for name, fn in modes:
                adapter_cls.resume_state = fn
                try:
                    sync()
                    t0 = time.perf_counter()
                    res = tl_degen.patch_directions(model, clean, corrupted, bases, site, metric,
                                                    directions=list(range(n_dirs)),
                                                    progress=False)
                    sync()
                    times[name].append((time.perf_counter() - t0) / n_dirs)
                finally:
                    adapter_cls.resume_state = resume
                effects[name] = res.effects
        same = torch.allclose(*effects.values(), rtol=1e-4, atol=1e-5)
        emb, res_t = (statistics.median(times[name]) for name, _ in modes)
        print(f"  {site}: {1e3 * emb:.0f} ms per patch from the embedding, {1e3 * res_t:.0f} ms "
              f"resumed ({emb / res_t:.2f}x); same effects: {same}")


if __name__ == "__main__":
    main()
