"""Language-model-shaped models for benchmarks, built offline from configs (random weights
cost the same to analyse as trained ones)."""

from __future__ import annotations

import tempfile

import torch


def gpt2_small_shaped(seed: int = 0, n_layers: int = 12):
    """A ``TransformerBridge`` around a randomly initialised GPT-2-small-shaped Hugging Face
    model (d_model 768, 12 heads, d_mlp 3072, vocab 50257) with a 64-word tokenizer."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformer_lens.model_bridge import TransformerBridge
    from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel(vocab={f"w{i}": i for i in range(64)}, unk_token="w0"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    folder = tempfile.mkdtemp()
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="w0", eos_token="w1",
                            pad_token="w2").save_pretrained(folder)
    torch.manual_seed(seed)
    hf = GPT2LMHeadModel(GPT2Config(vocab_size=50257, n_positions=1024, n_embd=768,
                                    n_layer=n_layers, n_head=12))
    model = TransformerBridge.boot_transformers("gpt2-small-shaped", hf_model=hf,
                                                tokenizer=AutoTokenizer.from_pretrained(folder))
    return model.eval()


def word_tokens(n_prompts: int, n_tokens: int, seed: int = 0) -> torch.Tensor:
    """``[n_prompts, n_tokens]`` ids of the 64-word vocabulary."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, 64, (n_prompts, n_tokens), generator=g)


def gpt2_small_shaped_hooked(seed: int = 0, n_layers: int = 12):
    """The same shape as a TransformerLens 3.x ``HookedTransformer`` (random weights), or
    ``None`` on TransformerLens 4, which has no HookedTransformer."""
    try:
        from transformer_lens import HookedTransformer, HookedTransformerConfig
    except ImportError:
        return None
    cfg = HookedTransformerConfig(n_layers=n_layers, d_model=768, n_heads=12, d_head=64,
                                  d_mlp=3072, d_vocab=50257, n_ctx=1024, act_fn="gelu_new",
                                  normalization_type="LN", seed=seed)
    return HookedTransformer(cfg).eval()
