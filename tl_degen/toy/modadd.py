"""Modular addition: data, a one-layer transformer, training, and loaders.

The task: inputs ``[a, b, p]`` (``p`` is the "=" token), label ``(a + b) mod p`` read at the
last position. The model is a one-layer, LayerNorm-free, ReLU transformer in
HookedTransformer parameter format (``embed.W_E``, ``blocks.0.attn.W_Q`` [n_heads, d_model,
d_head], ...), the format of the reference checkpoint in DESIGN.md §5. The same state dict
loads into a TransformerLens 4 ``TransformerBridge`` (:func:`load_bridge`) and, when
TransformerLens 3.x is installed, into a ``HookedTransformer`` (:func:`load_hooked_transformer`).

Training uses :func:`forward`, a plain-torch implementation of the same function, which is
also an independent reference for the backends in the tests.

Command line::

    python -m tl_degen.toy.modadd train --out modadd.safetensors [--steps 20000]
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from importlib import resources
from pathlib import Path

import torch
from jaxtyping import Float, Int
from safetensors.torch import load_file
from torch import Tensor

from tl_degen.errors import DataError

__all__ = [
    "ModAddConfig",
    "all_pairs",
    "train_test_split",
    "tokens_for",
    "labels_for",
    "patching_pairs",
    "forward",
    "forward_last",
    "init_state_dict",
    "train",
    "load_state_dict",
    "load_bridge",
    "load_hooked_transformer",
    "shipped_checkpoint_path",
]


@dataclass(frozen=True)
class ModAddConfig:
    """Architecture of the modular-addition transformer (the reference's settings)."""

    p: int = 113
    d_model: int = 128
    n_heads: int = 4
    d_head: int = 32
    d_mlp: int = 512
    n_ctx: int = 3
    act_fn: str = "relu"

    @property
    def d_vocab(self) -> int:
        return self.p + 1


def all_pairs(p: int = 113) -> Int[Tensor, "p_squared 2"]:
    """All ``p²`` pairs ``(a, b)``, enumerated a-major, b-minor."""
    a = torch.arange(p).repeat_interleave(p)
    b = torch.arange(p).repeat(p)
    return torch.stack([a, b], dim=1)


def train_test_split(
    p: int = 113, frac_train: float = 0.3, seed: int = 0
) -> tuple[Int[Tensor, "n_train 2"], Int[Tensor, "n_test 2"]]:
    """The reference split: ``randperm(p², seed)``; the first ``floor(frac·p²)`` pairs train.

    For ``p=113, frac_train=0.3, seed=0`` this is the 3830 / 8939 split of DESIGN.md §5.
    """
    pairs = all_pairs(p)
    perm = torch.randperm(p * p, generator=torch.Generator().manual_seed(seed))
    n_train = int(frac_train * p * p)
    return pairs[perm[:n_train]], pairs[perm[n_train:]]


def tokens_for(pairs: Int[Tensor, "n 2"], p: int = 113) -> Int[Tensor, "n 3"]:
    """Token sequences ``[a, b, p]`` for pairs ``(a, b)``, each in ``[0, p)``."""
    pairs = torch.as_tensor(pairs)
    if pairs.dim() != 2 or pairs.shape[1] != 2 or pairs.is_floating_point() or (
            pairs.numel() and (int(pairs.min()) < 0 or int(pairs.max()) >= p)):
        raise DataError(f"pairs must be [n, 2] integers in [0, {p}), got shape "
                        f"{tuple(pairs.shape)}"
                        + (f" from {int(pairs.min())} to {int(pairs.max())}"
                           if pairs.numel() and not pairs.is_floating_point() else ""))
    eq = torch.full((pairs.shape[0], 1), p, dtype=torch.long)
    return torch.cat([pairs.long(), eq], dim=1)


def labels_for(pairs: Int[Tensor, "n 2"], p: int = 113) -> Int[Tensor, " n"]:
    """Labels ``(a + b) mod p``."""
    return (pairs[:, 0] + pairs[:, 1]) % p


def patching_pairs(
    n: int = 1000, p: int = 113, seed: int = 0
) -> tuple[Int[Tensor, "n 3"], Int[Tensor, "n 3"], Callable[[Tensor], Tensor]]:
    """Clean prompts ``(a, b)``, corrupted prompts ``(a′, b)`` with ``a′ ≠ a``, and the logit
    difference metric ``logit[(a + b) mod p] − logit[(a′ + b) mod p]`` at the last position
    (per example; it closes over these ``n`` prompts, in this order).

    Returns:
        ``(clean_tokens, corrupted_tokens, logit_diff)``.
    """
    from tl_degen import checks

    n = checks.integer("n", n, minimum=1)
    p = checks.integer("p", p, minimum=2)
    g = torch.Generator().manual_seed(seed)
    a = torch.randint(0, p, (n,), generator=g)
    b = torch.randint(0, p, (n,), generator=g)
    a2 = (a + torch.randint(1, p, (n,), generator=g)) % p
    clean, corrupted = tokens_for(torch.stack([a, b], 1), p), tokens_for(torch.stack([a2, b], 1), p)
    right, wrong = (a + b) % p, (a2 + b) % p

    def logit_diff(logits: Tensor) -> Tensor:
        last = logits[:, -1]
        idx = torch.arange(last.shape[0], device=last.device)
        return last[idx, right.to(last.device)] - last[idx, wrong.to(last.device)]

    return clean, corrupted, logit_diff


def init_state_dict(cfg: ModAddConfig = ModAddConfig(), seed: int = 0) -> dict[str, Tensor]:
    """A freshly initialised HookedTransformer-format state dict (float32)."""
    g = torch.Generator().manual_seed(seed)

    def normal(*shape: int, fan_in: int) -> Tensor:
        return torch.randn(*shape, generator=g) / math.sqrt(fan_in)

    d, h, dh, m, v = cfg.d_model, cfg.n_heads, cfg.d_head, cfg.d_mlp, cfg.d_vocab
    return {
        "embed.W_E": normal(v, d, fan_in=d),
        "pos_embed.W_pos": normal(cfg.n_ctx, d, fan_in=d),
        "blocks.0.attn.W_Q": normal(h, d, dh, fan_in=d),
        "blocks.0.attn.W_K": normal(h, d, dh, fan_in=d),
        "blocks.0.attn.W_V": normal(h, d, dh, fan_in=d),
        "blocks.0.attn.W_O": normal(h, dh, d, fan_in=h * dh),
        "blocks.0.attn.b_Q": torch.zeros(h, dh),
        "blocks.0.attn.b_K": torch.zeros(h, dh),
        "blocks.0.attn.b_V": torch.zeros(h, dh),
        "blocks.0.attn.b_O": torch.zeros(d),
        "blocks.0.mlp.W_in": normal(d, m, fan_in=d),
        "blocks.0.mlp.b_in": torch.zeros(m),
        "blocks.0.mlp.W_out": normal(m, d, fan_in=m),
        "blocks.0.mlp.b_out": torch.zeros(d),
        "unembed.W_U": normal(d, v, fan_in=d),
        "unembed.b_U": torch.zeros(v),
    }


def forward(
    state_dict: dict[str, Tensor], tokens: Int[Tensor, "batch pos"]
) -> Float[Tensor, "batch pos d_vocab"]:
    """Logits of the one-layer model, written out in plain torch (HookedTransformer semantics)."""
    sd = state_dict
    n_pos = tokens.shape[1]
    resid = sd["embed.W_E"][tokens] + sd["pos_embed.W_pos"][:n_pos]
    q = torch.einsum("bpd,hde->bphe", resid, sd["blocks.0.attn.W_Q"]) + sd["blocks.0.attn.b_Q"]
    k = torch.einsum("bpd,hde->bphe", resid, sd["blocks.0.attn.W_K"]) + sd["blocks.0.attn.b_K"]
    v = torch.einsum("bpd,hde->bphe", resid, sd["blocks.0.attn.W_V"]) + sd["blocks.0.attn.b_V"]
    scores = torch.einsum("bqhe,bkhe->bhqk", q, k) / math.sqrt(q.shape[-1])
    mask = torch.triu(torch.ones(n_pos, n_pos, dtype=torch.bool, device=tokens.device), 1)
    pattern = scores.masked_fill(mask, float("-inf")).softmax(-1)
    z = torch.einsum("bhqk,bkhe->bqhe", pattern, v)
    attn_out = torch.einsum("bqhe,hed->bqd", z, sd["blocks.0.attn.W_O"]) + sd["blocks.0.attn.b_O"]
    resid = resid + attn_out
    post = torch.relu(resid @ sd["blocks.0.mlp.W_in"] + sd["blocks.0.mlp.b_in"])
    resid = resid + post @ sd["blocks.0.mlp.W_out"] + sd["blocks.0.mlp.b_out"]
    return resid @ sd["unembed.W_U"] + sd["unembed.b_U"]


def forward_last(
    state_dict: dict[str, Tensor], tokens: Int[Tensor, "batch pos"]
) -> Float[Tensor, "batch d_vocab"]:
    """Logits at the last position only (same function as :func:`forward`, cheaper:
    the queries, attention output and MLP of the other positions are never computed).

    The last query position attends to every position, so no mask is needed there.
    """
    sd = state_dict
    n_pos = tokens.shape[1]
    h, d, e = sd["blocks.0.attn.W_Q"].shape
    resid = sd["embed.W_E"][tokens] + sd["pos_embed.W_pos"][:n_pos]
    w_kv = torch.cat([sd["blocks.0.attn.W_K"], sd["blocks.0.attn.W_V"]], 0)  # [2h, d, e]
    kv = resid @ w_kv.permute(1, 0, 2).reshape(d, 2 * h * e)
    k, v = kv.view(-1, n_pos, 2, h, e).unbind(2)
    k, v = k + sd["blocks.0.attn.b_K"], v + sd["blocks.0.attn.b_V"]
    q = resid[:, -1] @ sd["blocks.0.attn.W_Q"].permute(1, 0, 2).reshape(d, h * e)
    q = q.view(-1, h, e) + sd["blocks.0.attn.b_Q"]
    pattern = (torch.einsum("bhe,bkhe->bhk", q, k) / math.sqrt(e)).softmax(-1)
    z = torch.einsum("bhk,bkhe->bhe", pattern, v).reshape(-1, h * e)
    resid = resid[:, -1] + z @ sd["blocks.0.attn.W_O"].reshape(h * e, d) + sd["blocks.0.attn.b_O"]
    post = torch.relu(resid @ sd["blocks.0.mlp.W_in"] + sd["blocks.0.mlp.b_in"])
    resid = resid + post @ sd["blocks.0.mlp.W_out"] + sd["blocks.0.mlp.b_out"]
    return resid @ sd["unembed.W_U"] + sd["unembed.b_U"]


def accuracy(state_dict: dict[str, Tensor], pairs: Int[Tensor, "n 2"], p: int = 113) -> float:
    """Fraction of pairs whose last-position argmax is ``(a + b) mod p``."""
    with torch.no_grad():
        logits = forward_last(state_dict, tokens_for(pairs, p))[:, :p]
    return (logits.argmax(-1) == labels_for(pairs, p)).double().mean().item()


def train(
    cfg: ModAddConfig = ModAddConfig(),
    *,
    steps: int = 20000,
    lr: float = 1e-3,
    weight_decay: float = 1.0,
    frac_train: float = 0.3,
    seed: int = 0,
    log_every: int = 1000,
    target_test_accuracy: float | None = 0.995,
) -> tuple[dict[str, Tensor], dict]:
    """Full-batch AdamW training until the model groks (or ``steps`` run out).

    Returns the state dict and a log (step, train loss, test accuracy, seconds). Stops early
    once the test accuracy has stayed above ``target_test_accuracy`` for two log points.
    """
    torch.manual_seed(seed)
    train_pairs, test_pairs = train_test_split(cfg.p, frac_train, seed)
    tokens, labels = tokens_for(train_pairs, cfg.p), labels_for(train_pairs, cfg.p)
    params = {k: t.clone().requires_grad_() for k, t in init_state_dict(cfg, seed).items()}
    opt = torch.optim.AdamW(params.values(), lr=lr, weight_decay=weight_decay, betas=(0.9, 0.98))
    log: list[dict] = []
    start, above = time.perf_counter(), 0
    for step in range(1, steps + 1):
        logits = forward_last(params, tokens)[:, : cfg.p].double()
        loss = torch.nn.functional.cross_entropy(logits, labels)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % log_every == 0 or step == steps:
            acc = accuracy(params, test_pairs, cfg.p)
            log.append({"step": step, "train_loss": loss.item(), "test_accuracy": acc,
                        "seconds": round(time.perf_counter() - start, 1)})
            print(json.dumps(log[-1]), flush=True)
            above = above + 1 if target_test_accuracy and acc >= target_test_accuracy else 0
            if above >= 2:
                break
    state = {k: t.detach().clone() for k, t in params.items()}
    meta = {"config": asdict(cfg), "frac_train": frac_train, "seed": seed, "lr": lr,
            "weight_decay": weight_decay, "log": log}
    return state, meta


def shipped_checkpoint_path() -> Path:
    """Path of the checkpoint trained by :func:`train` and shipped inside the package."""
    return Path(str(resources.files("tl_degen.toy") / "modadd_p113.safetensors"))


def load_state_dict(path: str | Path | None = None) -> dict[str, Tensor]:
    """A HookedTransformer-format modadd state dict (default: the shipped checkpoint).

    Buffers that HookedTransformer stores (``attn.mask``, ``attn.IGNORE``) are dropped.
    """
    path = shipped_checkpoint_path() if path is None else Path(path)
    if not path.exists():
        raise DataError(f"no checkpoint at {path}; train one with "
                        "`python -m tl_degen.toy.modadd train --out FILE`")
    try:
        sd = load_file(str(path))
    except Exception as err:  # noqa: BLE001  (safetensors raises its own error types)
        raise DataError(f"{path} is not a readable safetensors state dict ({err}); give a "
                        "checkpoint written by `python -m tl_degen.toy.modadd train`") from None
    return {k: v for k, v in sd.items() if not k.endswith(("attn.mask", "attn.IGNORE"))}


def _bridge_config(cfg: ModAddConfig):
    from transformer_lens.config import TransformerBridgeConfig

    return TransformerBridgeConfig(
        d_model=cfg.d_model, n_heads=cfg.n_heads, d_head=cfg.d_head, d_mlp=cfg.d_mlp,
        act_fn=cfg.act_fn, normalization_type=None, d_vocab=cfg.d_vocab, n_ctx=cfg.n_ctx,
        n_layers=1,
    )


def load_bridge(
    state_dict: dict[str, Tensor] | str | Path | None = None,
    cfg: ModAddConfig = ModAddConfig(),
    dtype: torch.dtype = torch.float32,
):
    """A TransformerLens 4 native ``TransformerBridge`` holding a modadd state dict (eval mode)."""
    from transformer_lens.model_bridge import TransformerBridge

    sd = state_dict if isinstance(state_dict, dict) else load_state_dict(state_dict)
    bcfg = _bridge_config(cfg)
    with contextlib.redirect_stdout(io.StringIO()):  # TransformerLens prints on each cast
        model = TransformerBridge.boot_native(bcfg).to(dtype)  # cast first: load without rounding
        try:  # TransformerLens >= 4
            from transformer_lens.utilities.tl_checkpoint_conversion import convert_tl_checkpoint

            converted = convert_tl_checkpoint(sd, bcfg)
        except ImportError:  # TransformerLens 3.x: the same mapping, written out
            converted = _to_bridge_keys(sd)
        model.load_state_dict(converted, strict=True)
        return model.to(dtype).eval()


def _to_bridge_keys(sd: dict[str, Tensor]) -> dict[str, Tensor]:
    """HookedTransformer keys/shapes → native-bridge ``nn.Linear`` keys/shapes (one layer)."""
    a, m = "blocks.0.attn.", "blocks.0.mlp."
    out = {"embed.weight": sd["embed.W_E"], "pos_embed.weight": sd["pos_embed.W_pos"],
           "unembed.weight": sd["unembed.W_U"].T, "unembed.bias": sd["unembed.b_U"],
           m + "in.weight": sd[m + "W_in"].T, m + "in.bias": sd[m + "b_in"],
           m + "out.weight": sd[m + "W_out"].T, m + "out.bias": sd[m + "b_out"],
           a + "o.weight": sd[a + "W_O"].reshape(-1, sd[a + "W_O"].shape[-1]).T,
           a + "o.bias": sd[a + "b_O"]}
    for x in "QKV":
        W = sd[a + f"W_{x}"]  # [h, d, e]
        out[a + f"{x.lower()}.weight"] = W.permute(0, 2, 1).reshape(-1, W.shape[1])
        out[a + f"{x.lower()}.bias"] = sd[a + f"b_{x}"].reshape(-1)
    return {k: v.contiguous() for k, v in out.items()}


def load_hooked_transformer(
    state_dict: dict[str, Tensor] | str | Path | None = None,
    cfg: ModAddConfig = ModAddConfig(),
    dtype: torch.dtype = torch.float32,
):
    """A TransformerLens 3.x ``HookedTransformer`` holding a modadd state dict.

    Raises ``ImportError`` with an explanation under TransformerLens 4, which has no
    HookedTransformer.
    """
    try:
        from transformer_lens import HookedTransformer, HookedTransformerConfig
    except ImportError as err:  # TransformerLens 4.x
        raise ImportError("HookedTransformer needs transformer_lens 3.x "
                          "(`pip install 'transformer_lens<4'`); use load_bridge() on 4.x") from err
    sd = state_dict if isinstance(state_dict, dict) else load_state_dict(state_dict)
    htcfg = HookedTransformerConfig(
        n_layers=1, d_model=cfg.d_model, n_heads=cfg.n_heads, d_head=cfg.d_head, d_mlp=cfg.d_mlp,
        act_fn=cfg.act_fn, normalization_type=None, d_vocab=cfg.d_vocab, n_ctx=cfg.n_ctx,
        d_vocab_out=cfg.d_vocab, dtype=torch.float32, device="cpu", seed=0,
    )
    with contextlib.redirect_stdout(io.StringIO()):  # TransformerLens prints on each cast
        model = HookedTransformer(htcfg).to(dtype)  # cast first: load without rounding
    missing, unexpected = model.load_state_dict(sd, strict=False)
    missing = [k for k in missing if not k.endswith(("attn.mask", "attn.IGNORE"))]
    if missing or unexpected:
        raise DataError(f"state dict does not fit the modadd HookedTransformer: missing "
                        f"{missing}, unexpected {unexpected}")
    with contextlib.redirect_stdout(io.StringIO()):
        return model.to(dtype).eval()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tl_degen.toy.modadd", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    t = sub.add_parser("train", help="train a modadd model until it groks")
    t.add_argument("--out", required=True, help="output .safetensors file")
    t.add_argument("--steps", type=int, default=20000)
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--threads", type=int, default=None)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    state, meta = train(steps=args.steps, seed=args.seed)
    from tl_degen.io import save_safetensors_atomic

    out = save_safetensors_atomic(args.out, state, {"tl_degen_modadd": json.dumps(meta)})
    final = meta["log"][-1]
    print(f"wrote {out}: test accuracy {final['test_accuracy']:.4f} after {final['step']} steps")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
