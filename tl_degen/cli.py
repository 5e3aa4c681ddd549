"""The ``tl-degen`` command.

``tl-degen demo`` fits the LIB, PCA and neuron bases of the shipped modular-addition model
(the reference setting of DESIGN.md §5) and prints a summary of each site.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

from tl_degen.errors import TLDegenError

REFERENCE_SITES = ["resid_pre.0", "resid_mid.0:last", "resid_post.0:last", "logits:last"]


def demo(args: argparse.Namespace) -> int:
    import tl_degen
    from tl_degen.toy import modadd

    torch.set_num_threads(args.threads) if args.threads else None
    model = modadd.load_bridge(args.checkpoint)
    train, test = modadd.train_test_split()
    tokens = modadd.tokens_for(train)
    acc = modadd.accuracy(modadd.load_state_dict(args.checkpoint), test)
    print(f"model: shipped modular-addition transformer (p=113), test accuracy {acc:.4f}")
    print(f"data: {tokens.shape[0]} training pairs; sites: {', '.join(REFERENCE_SITES)}\n")
    out = Path(args.out) if args.out else None
    for method in ("lib", "pca", "neuron"):
        start = time.perf_counter()
        bases = tl_degen.fit_bases(model, tokens, REFERENCE_SITES, method=method,
                                   batch_size=4000, progress=not args.quiet)
        seconds = time.perf_counter() - start
        print(bases.summary())
        print(f"  ({method} bases in {seconds:.1f} s)\n")
        if out is not None:
            path = bases.save(out / f"modadd_{method}.safetensors")
            print(f"  saved to {path}\n")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="tl-degen", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    d = sub.add_parser("demo", help="fit LIB/PCA/neuron bases of the shipped modadd model")
    d.add_argument("--out", help="folder to save the bases to (.safetensors)")
    d.add_argument("--checkpoint", help="a HookedTransformer-format modadd state dict "
                   "(default: the shipped one)")
    d.add_argument("--threads", type=int, help="torch CPU threads")
    d.add_argument("--quiet", action="store_true", help="no progress bars")
    args = parser.parse_args(argv)
    try:
        return demo(args)
    except TLDegenError as err:
        print(f"tl-degen: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
