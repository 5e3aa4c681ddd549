import pytest
import torch

import tl_degen
from tests import models as M
from tl_degen import BasisMismatchError, BasisSet, DataError


@pytest.fixture(scope="module")
def fitted():
    model = M.build("native_relu", seed=0)
    bases = tl_degen.fit_bases(model, M.random_tokens(16, 5),
                               ["resid_pre.1", "resid_mid.1:last", "logits:last"], progress=False)
    return model, bases


def test_roundtrip(fitted, tmp_path):
    model, bases = fitted
    path = bases.save(tmp_path / "b.safetensors")
    again = BasisSet.load(path, model=model)
    assert again.sites == bases.sites
    assert again.config == bases.config
    for s in bases:
        a, b = bases[s], again[s]
        for f in ("C", "C_pinv", "eigenvalues", "mean", "gram", "gram_eigenvalues"):
            assert torch.equal(getattr(a, f), getattr(b, f)), f
        assert a.dropped == b.dropped and a.method == b.method
    assert "resid_mid.1:last" in repr(again) and "kept=" in repr(again)
    assert list(tmp_path.iterdir()) == [path]  # no temporary files left behind


def test_refuses_other_model(fitted, tmp_path):
    _, bases = fitted
    path = bases.save(tmp_path / "b.safetensors")
    with pytest.raises(BasisMismatchError, match="different weights"):
        BasisSet.load(path, model=M.build("native_relu", seed=1))
    with pytest.raises(BasisMismatchError, match="different architecture: .*d_mlp"):
        BasisSet.load(path, model=_wider())


def _wider():
    from transformer_lens.config import TransformerBridgeConfig
    from transformer_lens.model_bridge import TransformerBridge

    cfg = TransformerBridgeConfig(d_model=16, n_heads=2, d_head=8, d_mlp=32, n_layers=2,
                                  d_vocab=M.VOCAB, n_ctx=M.N_CTX, act_fn="relu",
                                  normalization_type=None)
    return TransformerBridge.boot_native(cfg).eval()


def test_bad_files(tmp_path, fitted):
    with pytest.raises(DataError, match="no basis file"):
        BasisSet.load(tmp_path / "missing.safetensors")
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"not a safetensors file")
    with pytest.raises(DataError, match="not a readable safetensors file"):
        BasisSet.load(junk)
    from safetensors.torch import save_file

    other = tmp_path / "other.safetensors"
    save_file({"x": torch.ones(2)}, str(other))
    with pytest.raises(DataError, match="not a tl_degen basis file"):
        BasisSet.load(other)


def test_failed_save_leaves_nothing(fitted, tmp_path, monkeypatch):
    _, bases = fitted
    import tl_degen.io as io

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(io, "save_file", boom)
    with pytest.raises(OSError, match="disk full"):
        bases.save(tmp_path / "b.safetensors")
    assert list(tmp_path.iterdir()) == []
