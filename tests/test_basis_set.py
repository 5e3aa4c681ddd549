"""tl_degen.basis_set: BasisSet as a mapping, its summary, and save/load on the shipped modadd
model (and on damaged files)."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch

import tl_degen
from tests import models as M
from tl_degen import BasisMismatchError, BasisSet, DataError, Site
from tl_degen.toy import modadd

pytestmark = pytest.mark.filterwarnings("ignore::tl_degen.AmbiguousRankWarning")

SITES = ["resid_mid.0:last", "resid_post.0:last", "logits:last"]
N_PAIRS = 150


@pytest.fixture(scope="module")
def modadd_bases():
    """The shipped modadd model (float32, as a user loads it) and its LIB bases."""
    model = modadd.load_bridge()
    tokens = modadd.tokens_for(modadd.train_test_split()[0][:N_PAIRS])
    return model, tokens, tl_degen.fit_bases(model, tokens, SITES, progress=False)


def test_mapping_by_name_or_site_in_forward_order(modadd_bases):
    _, _, bases = modadd_bases
    assert len(bases) == 3 and bases.method == "lib"
    assert list(bases) == bases.sites == [Site.parse(s) for s in SITES]
    for s in SITES:
        assert bases[s] is bases[Site.parse(s)] and bases[s].site == Site.parse(s)
        assert s in bases and Site.parse(s) in bases
    assert [b.site for b in bases.values()] == bases.sites
    assert dict(bases.items()).keys() == set(bases.sites)
    assert "resid_pre.0" not in bases and "resid_mid.0" not in bases  # another position set
    with pytest.raises(KeyError, match=r"no basis for site 'resid_pre.0'; this set has "
                                       r"\['resid_mid.0:last', 'resid_post.0:last'"):
        bases["resid_pre.0"]
    # a set built by hand keeps the order it is given
    again = BasisSet([bases["logits:last"], bases["resid_mid.0:last"]])
    assert [s.name for s in again] == ["logits:last", "resid_mid.0:last"]
    assert again.config == {} and again.method is None and again.model_probe is None


def test_summary_has_one_line_per_site_with_its_numbers(modadd_bases):
    _, _, bases = modadd_bases
    lines = repr(bases).splitlines()
    ambiguous = [s.name for s, b in bases.items() if b.dropped.ambiguous]
    assert repr(bases) == bases.summary() and len(lines) == 1 + len(bases) + bool(ambiguous)
    if ambiguous:  # marked on its line and counted on the last
        assert lines[-1].startswith(f"  rank ambiguous at {len(ambiguous)} site(s)")
    assert lines[0].startswith(f"BasisSet(method='lib', n_samples={N_PAIRS}, ")
    for line, (site, b) in zip(lines[1:], bases.items()):
        fields = line.split()
        assert fields[0] == site.name
        assert f"d={b.d_site}" in fields and f"kept={b.k}" in fields
        assert f"{b.dropped.activation} type-1, {b.dropped.jacobian} type-2" in line
        assert line.endswith("[rank ambiguous]") == b.dropped.ambiguous
        top = [float(v) for v in re.search(r"top=\[([^\]]*)\]", line).group(1).split(", ")]
        rest = b.eigenvalues[1:] if b.has_constant else b.eigenvalues
        np.testing.assert_allclose(top, rest.sort(descending=True).values[:3].numpy(), rtol=1e-4)
        if b.has_constant:
            const = float(re.search(r"const=(\S+)", line).group(1))
            assert const == pytest.approx(float(b.eigenvalues[0]), rel=1e-4)
        else:
            assert "const=" not in line


def test_save_load_round_trip_on_modadd(modadd_bases, tmp_path):
    """Every tensor and setting comes back; the loaded bases still satisfy §4 step 6 on the
    data (x̂ = x C has second moment diag(Λ)) and accept the model they were fitted on."""
    from safetensors import safe_open

    model, tokens, bases = modadd_bases
    path = bases.save(tmp_path / "modadd.safetensors")
    with safe_open(str(path), "pt") as f:
        keys = set(f.keys())
        assert all(f.get_tensor(k).dtype == torch.float64 for k in keys)
    fields = {"C", "C_pinv", "eigenvalues", "mean", "gram", "gram_eigenvalues"}
    assert {k.split("/")[1] for k in keys} == fields | {"lambda_all"}
    assert {k.split("/")[0] for k in keys} == set(SITES)
    again = BasisSet.load(path, model=model)
    assert again.sites == bases.sites and again.config == bases.config
    assert again.model_signature == bases.model_signature
    assert again.model_probe == bases.model_probe
    for s in SITES:
        a, b = bases[s], again[s]
        for f in fields:
            assert torch.equal(getattr(a, f), getattr(b, f)), (s, f)
        if s == "logits:last":  # the last site, unrotated: no Λ
            assert a.lambda_all is None and b.lambda_all is None
        else:
            assert torch.equal(a.lambda_all, b.lambda_all), s
        assert (a.dropped, a.method, a.center, a.n_samples) == (b.dropped, b.method, b.center,
                                                                 b.n_samples)
    b = again["resid_post.0:last"]
    model64 = modadd.load_bridge(dtype=torch.float64)  # the fit ran in float64 too
    x = tl_degen.site_activations(model64, tokens, b.site).reshape(-1, b.d_site)
    xh = b.to_coords(x)
    root = b.eigenvalues.sqrt()
    torch.testing.assert_close(xh.T @ xh / x.shape[0] / root[:, None] / root[None],
                               torch.eye(b.k, dtype=torch.float64), rtol=0, atol=1e-8)


def test_bf16_bases_accept_their_own_model(tokenizer_dir, tmp_path):
    model = M.build("gpt2", tokenizer_dir, dtype=torch.bfloat16)
    bases = tl_degen.fit_bases(model, M.random_tokens(6, 5), ["resid_pre.1", "logits"],
                               method="pca", progress=False)
    bases.check_model(model)
    BasisSet.load(bases.save(tmp_path / "b.safetensors"), model=model)


def test_damaged_basis_files(tmp_path):
    from safetensors import safe_open
    from safetensors.torch import save_file

    model = M.build("native_relu")
    bases = tl_degen.fit_bases(model, M.random_tokens(6, 5), ["resid_pre.1", "logits"],
                               method="pca", progress=False)
    path = bases.save(tmp_path / "b.safetensors")
    with safe_open(str(path), "pt") as f:
        meta, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    broken = dict(tensors)
    del broken["resid_pre.1/gram"]
    save_file(broken, str(tmp_path / "missing.safetensors"), metadata=meta)
    with pytest.raises(DataError, match="is damaged"):  # the checksum catches it first
        BasisSet.load(tmp_path / "missing.safetensors")
    meta = {k: v for k, v in meta.items() if k != "tl_degen_sha256"}  # as files before it
    save_file(broken, str(tmp_path / "missing.safetensors"), metadata=meta)
    with pytest.raises(DataError, match="incomplete"):
        BasisSet.load(tmp_path / "missing.safetensors")
    broken = dict(tensors, **{"resid_pre.1/C_pinv": tensors["resid_pre.1/C_pinv"][:-1]})
    save_file(broken, str(tmp_path / "shape.safetensors"), metadata=meta)
    with pytest.raises(DataError, match="C_pinv has shape"):
        BasisSet.load(tmp_path / "shape.safetensors")
    other = modadd.load_bridge()
    with pytest.raises(BasisMismatchError):
        BasisSet.load(path, model=other)
