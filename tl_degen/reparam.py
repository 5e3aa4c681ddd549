"""Function-preserving reparameterisations of a model (DESIGN.md §4, invariance properties).

Each built-in takes a model and returns a *new* model of the same kind (the input is left
untouched) that computes the same function with different weights:

* :func:`permute_neurons`: permute the MLP neurons of every layer (any activation);
* :func:`rescale_neurons`: ``W_in[:, i]·s_i, b_in[i]·s_i, W_out[i]/s_i`` (ReLU only: it needs
  a positively homogeneous activation);
* :func:`split_neuron`: replace neuron ``i`` by two copies, each writing half (any activation);
* :func:`add_dead_neurons`: add neurons with bias ``−1e4`` that never fire;
* :func:`change_residual_basis`: ``x → x T`` in the residual stream for a random invertible
  ``T`` (every writer ``W → W T``, every reader ``W → T⁻¹ W``; LayerNorm-free models only).

* :func:`permute_heads`: permute the attention heads of every layer (within each key/value
  group where heads share keys and values, as in grouped-query attention);
* :func:`rotate_residual`: ``x → x R`` in the residual stream for a random orthogonal ``R``,
  the RMSNorm weights folded into their readers (Hugging Face Llama-family bridges).

They edit the TransformerLens-format weights (``HookedTransformer.state_dict()`` or a
``TransformerBridge``'s ``get_params()``) and rebuild the model; supported are
``HookedTransformer`` and native bridges (``TransformerBridge.boot_native``) on
TransformerLens 4, and bridges of Hugging Face Llama-family models (gated MLP
``down(act(gate(x)) · up(x))``, grouped-query attention: SmolLM2, Llama, Mistral, Qwen), whose
MLP and attention weights are read as ``W_in = upᵀ``, ``W_gate = gateᵀ``, ``W_out = downᵀ``,
``W_Q``/``W_O`` per head from ``q_proj``/``o_proj``, edited the same way and written into a
copy of the model. For other models pass your own function ``model -> model``.
"""

from __future__ import annotations

import contextlib
import copy
import io
import re
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from tl_degen.adapters import Architecture, get_adapter
from tl_degen.errors import BackendError, TLDegenError

__all__ = [
    "REPARAMETERISATIONS",
    "permute_neurons",
    "rescale_neurons",
    "split_neuron",
    "add_dead_neurons",
    "change_residual_basis",
    "permute_heads",
    "rotate_residual",
    "get_reparameterisation",
]

Params = dict[str, Tensor]


# ---------------------------------------------------------------------------- plumbing
@dataclass
class _HFGated:
    """The "config" of a Hugging Face Llama-family bridge's weights (:func:`_hf_params`):
    its head counts, and ``d_mlp`` when a built-in changes it."""

    n_heads: int
    n_kv_heads: int
    d_head: int
    d_mlp: int | None = None


def _unwrap(m):
    return getattr(m, "_original_component", m)


def _hf_layers(model) -> list | None:
    """``[(attn, mlp)]`` Hugging Face modules of a Llama-family bridge, else None."""
    try:
        layers = list(_unwrap(_unwrap(model.original_model).model).layers)
        out = [(_unwrap(_unwrap(layer).self_attn), _unwrap(_unwrap(layer).mlp))
               for layer in layers]
    except (AttributeError, TypeError):
        return None
    names = ("gate_proj", "up_proj", "down_proj")
    if not out or not all(hasattr(m, n) for _, m in out for n in names) or not all(
            hasattr(a, "q_proj") and hasattr(a, "o_proj") for a, _ in out):
        return None
    return out


def _hf_params(model, layers) -> tuple[Params, _HFGated]:
    cfg = model.cfg
    n_kv = getattr(cfg, "n_key_value_heads", None) or cfg.n_heads
    params = {}
    for L, (attn, mlp) in enumerate(layers):
        if mlp.gate_proj.bias is not None or attn.o_proj.bias is not None:
            raise BackendError("built-in reparameterisations of a Hugging Face gated-MLP model "
                               "need bias-free gate and output projections; pass your own "
                               "transform= function model -> model")
        params[f"blocks.{L}.mlp.W_in"] = mlp.up_proj.weight.detach().T.clone()
        params[f"blocks.{L}.mlp.W_gate"] = mlp.gate_proj.weight.detach().T.clone()
        params[f"blocks.{L}.mlp.W_out"] = mlp.down_proj.weight.detach().T.clone()
        if mlp.up_proj.bias is not None:
            params[f"blocks.{L}.mlp.b_in"] = mlp.up_proj.bias.detach().clone()
        for name, heads in (("q", cfg.n_heads), ("k", n_kv), ("v", n_kv)):
            lin = getattr(attn, f"{name}_proj")  # [heads dh, d]
            params[f"blocks.{L}.attn.W_{name.upper()}"] = lin.weight.detach().reshape(
                heads, cfg.d_head, -1).transpose(1, 2)
            if lin.bias is not None:
                params[f"blocks.{L}.attn.b_{name.upper()}"] = lin.bias.detach().reshape(heads, -1)
        o = attn.o_proj.weight.detach()  # [d, H dh]
        params[f"blocks.{L}.attn.W_O"] = o.T.reshape(cfg.n_heads, cfg.d_head, -1).clone()
    return params, _HFGated(cfg.n_heads, n_kv, cfg.d_head)


def _hf_rebuild(model, params: Params, cfg: _HFGated):
    new = copy.deepcopy(model)
    for L, (attn, mlp) in enumerate(_hf_layers(new)):
        a = f"blocks.{L}.attn."
        weights = {mlp.up_proj: params[f"blocks.{L}.mlp.W_in"].T,
                   mlp.gate_proj: params[f"blocks.{L}.mlp.W_gate"].T,
                   mlp.down_proj: params[f"blocks.{L}.mlp.W_out"].T,
                   attn.o_proj: params[a + "W_O"].flatten(0, 1).T}
        biases = {mlp.up_proj: params.get(f"blocks.{L}.mlp.b_in")}
        for name in "QKV":
            lin = getattr(attn, f"{name.lower()}_proj")
            weights[lin] = params[a + f"W_{name}"].transpose(1, 2).flatten(0, 1)
            biases[lin] = None if params.get(a + f"b_{name}") is None else params[
                a + f"b_{name}"].flatten()
        for lin, w in weights.items():
            lin.weight = torch.nn.Parameter(w.contiguous())
            lin.out_features, lin.in_features = w.shape
        for lin, b in biases.items():
            if lin.bias is not None:
                lin.bias = torch.nn.Parameter(b.contiguous())
    if cfg.d_mlp is not None:
        new.cfg.d_mlp = cfg.d_mlp
    return new.eval()


def _params(model) -> tuple[Params, object]:
    adapter = get_adapter(model)
    if adapter.backend == "hooked_transformer":
        return dict(model.state_dict()), model.cfg
    if not adapter.arch.native and (layers := _hf_layers(model)) is not None:
        return _hf_params(model, layers)
    if not adapter.arch.native or not hasattr(model, "get_params"):
        raise BackendError(
            f"built-in reparameterisations support HookedTransformer, native TransformerBridge "
            f"models (boot_native) and Hugging Face Llama-family bridges, not a "
            f"{model.cfg.architecture!r} bridge; "
            "pass your own transform= function model -> model")
    with contextlib.redirect_stdout(io.StringIO()):
        return {k: v.detach().clone() for k, v in model.get_params().items()}, model.cfg


def _rebuild(model, params: Params, cfg) -> torch.nn.Module:
    if isinstance(cfg, _HFGated):
        return _hf_rebuild(model, params, cfg)
    dtype = next(model.parameters()).dtype
    device = next(model.parameters()).device
    adapter = get_adapter(model)
    with contextlib.redirect_stdout(io.StringIO()):
        if adapter.backend == "hooked_transformer":
            new = type(model)(cfg).to(dtype)  # cast first: load without rounding
            new.load_state_dict(params, strict=True)
            return new.to(device).to(dtype).eval()
        try:
            from transformer_lens.model_bridge import TransformerBridge
            from transformer_lens.utilities.tl_checkpoint_conversion import convert_tl_checkpoint
        except ImportError:
            raise BackendError(
                "built-in reparameterisations of a TransformerBridge need TransformerLens 4 "
                "(convert_tl_checkpoint); use a HookedTransformer or pass your own "
                "transform=") from None
        try:
            new = TransformerBridge.boot_native(cfg).to(dtype)
            new.load_state_dict(convert_tl_checkpoint(params, cfg), strict=True)
        except Exception as exc:  # noqa: BLE001  (any key/shape mismatch)
            raise BackendError(
                "built-in reparameterisations support HookedTransformer and native "
                "TransformerBridge models (boot_native); this model's weights could not be "
                f"rebuilt ({type(exc).__name__}: {str(exc)[:200]}). Pass your own "
                "transform= function model -> model") from None
        return new.to(device).to(dtype).eval()


def _with(cfg, **changes):
    new = copy.deepcopy(cfg)
    for k, v in changes.items():
        setattr(new, k, v)
    return new


def _layers(params: Params) -> list[int]:
    return sorted({int(m.group(1)) for k in params if (m := re.match(r"blocks\.(\d+)\.", k))})


def _mlp_keys(params: Params, L: int) -> dict[str, str]:
    keys = {k.rsplit(".", 1)[1]: k for k in params if k.startswith(f"blocks.{L}.mlp.")}
    if "W_in" not in keys or "W_out" not in keys:
        raise TLDegenError(f"layer {L} has no MLP (W_in/W_out) to reparameterise")
    return keys


def _act_fn(model) -> str:
    return Architecture.from_model(model).act_fn or ""


# ---------------------------------------------------------------------------- built-ins
def permute_neurons(model, seed: int = 0):
    """Permute the MLP neurons of every layer (W_in/W_gate columns, b_in, W_out rows).

    Examples:
        >>> new = reparam.permute_neurons(model, seed=1)
        >>> (new(tokens) - model(tokens)).abs().max()  # ~0: the same function
    """
    params, cfg = _params(model)
    g = torch.Generator().manual_seed(seed)
    for L in _layers(params):
        if not any(k.startswith(f"blocks.{L}.mlp.") for k in params):
            continue
        keys = _mlp_keys(params, L)
        perm = torch.randperm(params[keys["W_in"]].shape[1], generator=g)
        for name in ("W_in", "W_gate"):
            if name in keys:
                params[keys[name]] = params[keys[name]][:, perm]
        if "b_in" in keys:
            params[keys["b_in"]] = params[keys["b_in"]][perm]
        params[keys["W_out"]] = params[keys["W_out"]][perm]
    return _rebuild(model, params, cfg)


def rescale_neurons(model, seed: int = 0, spread: float = 0.7):
    """Scale neuron ``i``'s input weights and bias by ``s_i = exp(spread·N(0,1))`` and its
    output weights by ``1/s_i``: function-preserving for ReLU (positively homogeneous) and,
    in a gated MLP (``act(x W_gate) · (x W_in)``), for any activation (only the linear
    branch ``W_in`` is scaled).

    Examples:
        >>> rep = tl_degen.check_invariance(model, tokens, bases.sites,
        ...                                 lambda m: reparam.rescale_neurons(m, spread=1.0))
        >>> rep.worst("neuron", "coordinate_change"), rep.worst("lib", "coordinate_change")
    """
    params, cfg = _params(model)
    gated = any(k.endswith("mlp.W_gate") for k in params)
    if not gated and _act_fn(model) != "relu":
        raise TLDegenError(f"rescaling neurons preserves the function only for ReLU (positively "
                           f"homogeneous) or gated MLPs; this model uses act_fn={_act_fn(model)!r}")
    g = torch.Generator().manual_seed(seed)
    for L in _layers(params):
        keys = _mlp_keys(params, L)
        w_in = params[keys["W_in"]]
        s = torch.exp(spread * torch.randn(w_in.shape[1], generator=g, dtype=torch.float64))
        s = s.to(w_in.dtype)
        params[keys["W_in"]] = w_in * s
        if "b_in" in keys:
            params[keys["b_in"]] = params[keys["b_in"]] * s
        params[keys["W_out"]] = params[keys["W_out"]] / s[:, None]
    return _rebuild(model, params, cfg)


def split_neuron(model, layer: int | None = None, neuron: int | None = None):
    """Replace one neuron by two identical neurons that each write half of its output (any
    activation, gated or not): neuron ``neuron`` (default: the one with the largest output
    norm) of ``layer``, or of every layer when ``layer`` is None. ``d_mlp`` is one number
    for the whole model, so a model with several layers splits one neuron in each.

    Examples:
        >>> new = reparam.split_neuron(model, neuron=7)
        >>> new.cfg.d_mlp, model.cfg.d_mlp
        (513, 512)
    """
    params, cfg = _params(model)
    layers = _layers(params)
    if layer is not None:
        if layer not in layers:
            raise TLDegenError(f"no layer {layer} (layers {layers})")
        if len(layers) > 1:
            raise TLDegenError(f"d_mlp is shared by the model's {len(layers)} layers: split one "
                               "neuron in each with layer=None")
    d_mlp = None
    for L in layers:
        keys = _mlp_keys(params, L)
        w_in, w_out = params[keys["W_in"]], params[keys["W_out"]]
        j = int(w_out.norm(dim=1).argmax()) if neuron is None else int(neuron)
        if not 0 <= j < w_in.shape[1]:
            raise TLDegenError(f"neuron {j} out of range (d_mlp={w_in.shape[1]})")
        for name in ("W_in", "W_gate"):
            if name in keys:
                w = params[keys[name]]
                params[keys[name]] = torch.cat([w, w[:, j : j + 1]], 1)
        if "b_in" in keys:
            b = params[keys["b_in"]]
            params[keys["b_in"]] = torch.cat([b, b[j : j + 1]])
        halved = w_out.clone()
        halved[j] /= 2
        params[keys["W_out"]] = torch.cat([halved, w_out[j : j + 1] / 2])
        d_mlp = w_in.shape[1] + 1
    return _rebuild(model, params, _with(cfg, d_mlp=d_mlp))


def add_dead_neurons(model, n: int = 3, seed: int = 0):
    """Add ``n`` neurons to every MLP that never contribute, with random output weights:
    input bias ``−1e4`` (they never fire), or in a gated MLP a zero linear branch ``W_in``
    (their gate may fire, their product is zero).

    Examples:
        >>> new = reparam.add_dead_neurons(model, n=5)
        >>> tl_degen.degeneracy_report(new, tokens, bases.sites).layer(0).dead_neurons[-5:]
        [512, 513, 514, 515, 516]
    """
    from tl_degen import checks

    n = checks.integer("n", n, minimum=1)
    seed = checks.integer("seed", seed, minimum=0, maximum=2**63 - 1)
    params, cfg = _params(model)
    gated = any(k.endswith("mlp.W_gate") for k in params)
    act = _act_fn(model)
    if not gated and act not in ("relu", "gelu", "gelu_new", "gelu_fast", "gelu_pytorch_tanh",
                                 "silu"):
        raise TLDegenError(f"dead neurons need an activation that is 0 far below zero; "
                           f"act_fn={act!r} is not known to be")
    g = torch.Generator().manual_seed(seed)
    d_mlp = None
    for L in _layers(params):
        keys = _mlp_keys(params, L)
        w_in, w_out = params[keys["W_in"]], params[keys["W_out"]]
        d_mlp = w_in.shape[1] + n
        fresh = 1e-3 * torch.randn(w_in.shape[0], n, generator=g).to(w_in.dtype)
        if gated:
            params[keys["W_in"]] = torch.cat([w_in, torch.zeros_like(fresh)], 1)
            w_gate = params[keys["W_gate"]]
            params[keys["W_gate"]] = torch.cat([w_gate, fresh.to(w_gate.dtype)], 1)
            if "b_in" in keys:
                b = params[keys["b_in"]]
                params[keys["b_in"]] = torch.cat([b, torch.zeros(n, dtype=b.dtype)])
        else:
            if "b_in" not in keys:
                raise TLDegenError("add_dead_neurons needs MLPs with an input bias b_in")
            params[keys["W_in"]] = torch.cat([w_in, fresh], 1)
            b = params[keys["b_in"]]
            params[keys["b_in"]] = torch.cat([b, torch.full((n,), -1e4, dtype=b.dtype)])
        params[keys["W_out"]] = torch.cat(
            [w_out, torch.randn(n, w_out.shape[1], generator=g).to(w_out.dtype)])
    return _rebuild(model, params, _with(cfg, d_mlp=d_mlp))


def change_residual_basis(model, seed: int = 0, condition: float = 4.0):
    """Write the residual stream in the basis ``x T``, ``T`` a random invertible matrix with
    condition number ``condition``: ``T = P diag(σ) Q`` with ``P``, ``Q`` random orthogonal and
    ``σ`` spaced geometrically from ``condition^(-1/2)`` to ``condition^(1/2)``.

    Writers (``W_E``, ``W_pos``, ``W_O``, ``b_O``, ``W_out``, ``b_out``) become ``W T``; readers
    (``W_Q/K/V``, ``W_in``, ``W_gate``, ``W_U``) become ``T⁻¹ W``. LayerNorm-free models only
    (a LayerNorm does not commute with a non-orthogonal ``T``). Load the model in float64
    for an exact test: the transform's own rounding is ``~condition·eps`` of the dtype.

    Examples:
        >>> new = reparam.change_residual_basis(model, seed=1, condition=10.0)
        >>> rep = tl_degen.check_invariance(model, tokens, bases.sites, "change_residual_basis")
        >>> rep.holds("lib"), rep.worst("pca", "eigenvalue_change")
    """
    params, cfg = _params(model)
    normalization = Architecture.from_model(model).normalization
    if normalization is not None:
        raise TLDegenError(f"a change of residual basis preserves the function only without "
                           f"LayerNorm; this model has normalization_type={normalization!r}")
    if not condition >= 1:
        raise TLDegenError(f"condition must be at least 1, got {condition}")
    d = params["embed.W_E"].shape[1]
    g = torch.Generator().manual_seed(seed)
    P = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=torch.float64)).Q
    Q = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=torch.float64)).Q
    sigma = torch.logspace(-0.5, 0.5, d, base=float(condition), dtype=torch.float64)
    T = P @ torch.diag(sigma) @ Q
    Ti = torch.linalg.inv(T)
    out = {}
    for k, v in params.items():
        Tk, Tik = T.to(v.dtype), Ti.to(v.dtype)
        leaf = k.rsplit(".", 1)[-1]
        if k in ("embed.W_E", "pos_embed.W_pos") or leaf in ("W_O", "b_O", "W_out", "b_out"):
            out[k] = v @ Tk
        elif leaf in ("W_Q", "W_K", "W_V", "_W_K", "_W_V"):
            out[k] = torch.einsum("dD,...De->...de", Tik, v)
        elif leaf in ("W_in", "W_gate", "W_U"):
            out[k] = Tik @ v
        else:
            out[k] = v
    return _rebuild(model, out, cfg)


def permute_heads(model, seed: int = 0):
    """Permute the attention heads of every layer: each head's query weights and bias and its
    output weights, and, where every head has its own keys and values, those too. With
    grouped-query attention (several query heads sharing one key/value head) heads move
    only within their group, which keeps the function. Rotary embeddings act on every head
    alike, so they allow it.

    Examples:
        >>> rep = tl_degen.check_invariance(model, tokens, sites, "permute_heads")
    """
    params, cfg = _params(model)
    g = torch.Generator().manual_seed(seed)
    for L in _layers(params):
        keys = {k.rsplit(".", 1)[1]: k for k in params if k.startswith(f"blocks.{L}.attn.")}
        if "W_Q" not in keys or "W_O" not in keys:
            continue
        H = params[keys["W_Q"]].shape[0]
        n_kv = params[keys.get("_W_K", keys.get("W_K"))].shape[0]
        if n_kv == H:  # every head its own keys and values: one group, all move together
            perm = torch.randperm(H, generator=g)
            per_head = ["W_Q", "b_Q", "W_K", "b_K", "W_V", "b_V", "W_O"]
        else:  # grouped-query attention: query heads move within their key/value group
            size = H // n_kv
            perm = torch.cat([group * size + torch.randperm(size, generator=g)
                              for group in range(n_kv)])
            per_head = ["W_Q", "b_Q", "W_O"]
        for name in per_head:
            if name in keys and params[keys[name]].shape[0] == H:
                params[keys[name]] = params[keys[name]][perm]
    return _rebuild(model, params, cfg)


def rotate_residual(model, seed: int = 0):
    """Write the residual stream of an RMSNorm model in a random orthogonal basis, ``x → x R``:
    the norms' weights are first folded into the matrices that read their outputs (the
    norms become weightless; ``RMS(x R) = RMS(x)``), then every writer (embedding, attention
    output, MLP output, their biases) becomes ``W R`` and every reader (query, key, value,
    gate, up, unembedding) ``Rᵀ W``. Tied embeddings stay consistent (``W_E R`` both ways)
    unless the final norm's weight is folded into the unembedding, which unties them.
    Hugging Face Llama-family bridges (RMSNorm) only: a LayerNorm's centring does not commute
    with a general rotation. Load the model in float64 for an exact test.

    Examples:
        >>> rep = tl_degen.check_invariance(model, tokens, sites, "rotate_residual")
        >>> rep.holds("lib"), rep.worst("neuron", "coordinate_change")
    """
    norm = Architecture.from_model(model).normalization
    if _hf_layers(model) is None or norm not in ("RMS", "RMSPre"):
        raise BackendError("rotate_residual supports bridges of Hugging Face Llama-family "
                           "models (RMSNorm, gated MLP); pass your own transform= function "
                           "model -> model")
    new = copy.deepcopy(model)
    hf = _unwrap(_unwrap(new.original_model).model)
    lm_head = _unwrap(new.original_model).lm_head
    embed = _unwrap(hf.embed_tokens)
    d = embed.weight.shape[1]
    g = torch.Generator().manual_seed(seed)
    R = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=torch.float64)).Q

    def param(w):
        return torch.nn.Parameter(w.contiguous())

    def fold(norm, readers):
        norm = _unwrap(norm)
        w = norm.weight.detach().double()
        for lin in readers:
            lin.weight = param((lin.weight.detach().double() * w).to(lin.weight.dtype))
        norm.weight = param(torch.ones_like(norm.weight))

    def read(lin):  # y = x Wᵀ reads x: x R → W R
        lin.weight = param((lin.weight.detach().double() @ R).to(lin.weight.dtype))

    def write(lin):  # y = a Wᵀ + b writes the stream: → y R
        lin.weight = param((R.T @ lin.weight.detach().double()).to(lin.weight.dtype))
        if lin.bias is not None:
            lin.bias = param((lin.bias.detach().double() @ R).to(lin.bias.dtype))

    untied = _unwrap(lm_head)
    untied.weight = param(untied.weight.detach().clone())  # folded and rotated on its own
    for layer in hf.layers:
        layer = _unwrap(layer)
        attn, mlp = _unwrap(layer.self_attn), _unwrap(layer.mlp)
        fold(layer.input_layernorm, [_unwrap(attn.q_proj), _unwrap(attn.k_proj),
                                     _unwrap(attn.v_proj)])
        fold(layer.post_attention_layernorm, [_unwrap(mlp.gate_proj), _unwrap(mlp.up_proj)])
        for lin in (attn.q_proj, attn.k_proj, attn.v_proj, mlp.gate_proj, mlp.up_proj):
            read(_unwrap(lin))
        write(_unwrap(attn.o_proj))
        write(_unwrap(mlp.down_proj))
    fold(hf.norm, [untied])
    read(untied)
    embed.weight = param((embed.weight.detach().double() @ R).to(embed.weight.dtype))
    return new.eval()


REPARAMETERISATIONS: dict[str, Callable] = {
    "permute_neurons": permute_neurons,
    "rescale_neurons": rescale_neurons,
    "split_neuron": split_neuron,
    "add_dead_neurons": add_dead_neurons,
    "change_residual_basis": change_residual_basis,
    "permute_heads": permute_heads,
    "rotate_residual": rotate_residual,
}


def get_reparameterisation(transform: str | Callable) -> tuple[str, Callable]:
    """``(name, function model -> model)`` for a built-in name or a user function.

    Examples:
        >>> name, fn = reparam.get_reparameterisation("permute_neurons")
        >>> new = fn(model)
        >>> reparam.get_reparameterisation(reparam.split_neuron)[0]
        'split_neuron'
    """
    if callable(transform):
        return getattr(transform, "__name__", "user transform"), transform
    if transform not in REPARAMETERISATIONS:
        raise TLDegenError(f"unknown reparameterisation {transform!r}; built-ins: "
                           f"{', '.join(REPARAMETERISATIONS)}, or pass a function model -> model")
    return transform, REPARAMETERISATIONS[transform]
