"""Small models for tests, built offline from configs, with every parameter randomised."""

from __future__ import annotations

from pathlib import Path

import torch

ARCHITECTURES = ["native_relu", "native_ln_gelu", "gpt2", "neox", "llama", "hooked_transformer"]
VOCAB = 40
N_CTX = 8

try:
    from transformer_lens import HookedTransformer  # noqa: F401  (3.x only)

    HAS_HOOKED_TRANSFORMER = True
except ImportError:
    HAS_HOOKED_TRANSFORMER = False


def save_word_tokenizer(folder: Path) -> Path:
    """A word-level tokenizer over ``t0 … t39`` saved to (and loadable from) ``folder``."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel(vocab={f"t{i}": i for i in range(VOCAB)}, unk_token="t0"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="t0", eos_token="t1",
                                   bos_token="t2", pad_token="t3")
    fast.save_pretrained(str(folder))
    return Path(folder)


def randomise(model: torch.nn.Module, seed: int = 0, scale: float = 0.3) -> torch.nn.Module:
    """Overwrite every parameter and float buffer named ``bias`` with seeded noise."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g, dtype=torch.float64).to(p.dtype)
            if name.endswith(("weight", "w")) and p.dim() == 1:  # norm scales stay positive
                p.copy_(1 + 0.2 * noise)
            else:
                p.copy_(scale * noise)
        for name, b in model.named_buffers():
            if name.endswith("bias") and b.is_floating_point() and b.dim() == 1:
                b.copy_(scale * torch.randn(b.shape, generator=g, dtype=torch.float64).to(b.dtype))
    return model


def build(arch: str, tokenizer_dir: Path | None = None, seed: int = 0,
          dtype: torch.dtype = torch.float64):
    """A two-layer model of the named architecture, in eval mode, weights randomised."""
    if arch.startswith("native"):
        from transformer_lens.config import TransformerBridgeConfig
        from transformer_lens.model_bridge import TransformerBridge

        cfg = TransformerBridgeConfig(
            d_model=16, n_heads=2, d_head=8, d_mlp=24, n_layers=2, d_vocab=VOCAB, n_ctx=N_CTX,
            act_fn="relu" if arch == "native_relu" else "gelu",
            normalization_type=None if arch == "native_relu" else "LN")
        model = TransformerBridge.boot_native(cfg)
    elif arch == "hooked_transformer":
        from transformer_lens import HookedTransformer, HookedTransformerConfig

        cfg = HookedTransformerConfig(
            d_model=16, n_heads=2, d_head=8, d_mlp=24, n_layers=2, d_vocab=VOCAB, n_ctx=N_CTX,
            act_fn="gelu", normalization_type="LN", seed=seed)
        model = HookedTransformer(cfg)
    else:
        model = _hf_bridge(arch, tokenizer_dir)
    randomise(model, seed)
    return model.to(dtype).eval()


def _hf_bridge(arch: str, tokenizer_dir: Path):
    import transformer_lens.model_bridge.sources.transformers  # noqa: F401
    from transformer_lens.model_bridge import TransformerBridge
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    if arch == "gpt2":
        from transformers import GPT2Config, GPT2LMHeadModel

        hf = GPT2LMHeadModel(GPT2Config(vocab_size=VOCAB, n_positions=N_CTX, n_embd=16,
                                        n_layer=2, n_head=2, n_inner=24))
    elif arch == "neox":
        from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

        hf = GPTNeoXForCausalLM(GPTNeoXConfig(
            vocab_size=VOCAB, max_position_embeddings=N_CTX, hidden_size=16,
            num_hidden_layers=2, num_attention_heads=2, intermediate_size=24,
            use_parallel_residual=True))
    elif arch == "llama":
        from transformers import LlamaConfig, LlamaForCausalLM

        hf = LlamaForCausalLM(LlamaConfig(
            vocab_size=VOCAB, max_position_embeddings=N_CTX, hidden_size=16,
            num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            intermediate_size=24))
    else:
        raise ValueError(arch)
    return TransformerBridge.boot_transformers(f"local-{arch}", hf_model=hf, tokenizer=tok)


def random_tokens(n: int = 12, n_pos: int = 6, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, VOCAB, (n, n_pos), generator=torch.Generator().manual_seed(seed))


def mid_sites(arch: str) -> list[str]:
    """A chain of sites exercising every kind the architecture has."""
    if arch == "neox":
        return ["resid_pre.0", "mlp_post.0:last", "resid_post.0:last", "resid_post.1:last",
                "logits:last"]
    return ["resid_pre.1", "resid_mid.1", "mlp_post.1:last", "resid_post.1:last", "logits:last"]


def full_rank_modadd(n_samples: int = 600):
    """``(state_dict, cfg, tokens)``: a random modadd-architecture model (d_model 32, d_mlp 64,
    float64, biases randomised) whose residual sites have full rank on ``n_samples`` pairs."""
    from tl_degen.toy import modadd

    cfg = modadd.ModAddConfig(d_model=32, n_heads=4, d_head=8, d_mlp=64)
    sd = modadd.init_state_dict(cfg, seed=3)
    g = torch.Generator().manual_seed(4)
    sd = {k: (v + 0.3 * torch.randn(v.shape, generator=g) if ".b_" in k else v).double()
          for k, v in sd.items()}
    return sd, cfg, modadd.tokens_for(modadd.train_test_split()[0][:n_samples])


def exact_float64(model):
    """Hugging Face's Llama RMSNorm, and TransformerLens 4's rotary attention bridge's softmax,
    compute in float32 even in a float64 model; for comparisons at 1e-10 between the model
    and a closed form (the final norm and unembedding,
    :class:`tl_degen.sections.unembed.UnembedSection`; rotary attention,
    :class:`tl_degen.sections.attention.NormAttentionSection`) they compute in their own
    dtype here: the same math, without the rounding. Returns the model."""
    import types

    def forward(self, x):
        return self.weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True)
                                              + self.variance_epsilon))

    softmax = torch.nn.functional.softmax

    def own_dtype_softmax(x, dim=None, _stacklevel=3, dtype=None):
        return softmax(x, dim=dim, dtype=None if dtype == torch.float32 else dtype)

    def attention(self, *args, **kwargs):  # a bound method: deep copies rebind it
        torch.nn.functional.softmax = own_dtype_softmax
        try:
            return type(self).forward(self, *args, **kwargs)
        finally:
            torch.nn.functional.softmax = softmax

    for m in model.modules():
        if type(m).__name__ == "LlamaRMSNorm":
            m.forward = types.MethodType(forward, m)
        elif type(m).__name__ == "PositionEmbeddingsAttentionBridge":
            # past the bridge's __setattr__, which hands attributes to the wrapped module
            object.__setattr__(m, "forward", types.MethodType(attention, m))
    return model


def restore_rounding(model):
    """Undo :func:`exact_float64` (the modules' own forward passes again). Returns the model."""
    for m in model.modules():
        m.__dict__.pop("forward", None)
    return model
