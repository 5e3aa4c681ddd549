"""Language-model-shaped models for benchmarks, built offline from configs (random weights
cost the same to analyse as trained ones)."""

from __future__ import annotations

import tempfile

import torch


def _word_tokenizer():
    """A 64-word tokenizer ("w0" … "w63"), saved and reloaded as a Hugging Face one."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel(vocab={f"w{i}": i for i in range(64)}, unk_token="w0"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    folder = tempfile.mkdtemp()
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="w0", eos_token="w1",
                            pad_token="w2").save_pretrained(folder)
    return AutoTokenizer.from_pretrained(folder)


def gpt2_small_shaped(seed: int = 0, n_layers: int = 12):
    """A ``TransformerBridge`` around a randomly initialised GPT-2-small-shaped Hugging Face
    model (d_model 768, 12 heads, d_mlp 3072, vocab 50257) with a 64-word tokenizer."""
    from transformer_lens.model_bridge import TransformerBridge
    from transformers import GPT2Config, GPT2LMHeadModel

    tokenizer = _word_tokenizer()
    torch.manual_seed(seed)
    hf = GPT2LMHeadModel(GPT2Config(vocab_size=50257, n_positions=1024, n_embd=768,
                                    n_layer=n_layers, n_head=12))
    model = TransformerBridge.boot_transformers("gpt2-small-shaped", hf_model=hf,
                                                tokenizer=tokenizer)
    return model.eval()


def pythia_70m_shaped(seed: int = 0):
    """A ``TransformerBridge`` around a randomly initialised Pythia-70m-shaped GPT-NeoX
    model (6 layers, d_model 512, 8 heads, d_mlp 2048, vocab 50304, parallel attention and
    MLP, rotary embeddings on a quarter of each head) with a 64-word tokenizer."""
    from transformer_lens.model_bridge import TransformerBridge
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    tokenizer = _word_tokenizer()
    torch.manual_seed(seed)
    hf = GPTNeoXForCausalLM(GPTNeoXConfig(
        vocab_size=50304, hidden_size=512, num_hidden_layers=6, num_attention_heads=8,
        intermediate_size=2048, rotary_pct=0.25, max_position_embeddings=2048,
        use_parallel_residual=True))
    model = TransformerBridge.boot_transformers("pythia-70m-shaped", hf_model=hf,
                                                tokenizer=tokenizer)
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
