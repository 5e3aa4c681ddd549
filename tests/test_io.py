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


def _header_end(raw: bytes) -> int:
    return 8 + int.from_bytes(raw[:8], "little")


def test_damaged_files_are_refused(fitted, tmp_path):
    """A checksum of the tensors and the header is written with every file and verified on
    load: one flipped bit in a tensor, or an edited header, is refused, not loaded."""
    model, bases = fitted
    graph = tl_degen.interaction_graph(model, M.random_tokens(8, 5), bases, progress=False)
    for obj, load in ((bases, BasisSet.load), (graph, tl_degen.InteractionGraph.load)):
        path = obj.save(tmp_path / "a.safetensors")
        raw = path.read_bytes()
        load(path)  # intact
        flipped = bytearray(raw)
        flipped[len(raw) - 3] ^= 0x10  # a bit of the last tensor's data
        path.write_bytes(bytes(flipped))
        with pytest.raises(DataError, match="is damaged"):
            load(path)
        end = _header_end(raw)
        renamed = raw[:end].replace(b"n_samples", b"n_sampled")
        assert renamed != raw[:end]
        path.write_bytes(renamed + raw[end:])
        with pytest.raises(DataError, match="is damaged"):
            load(path)


def test_saves_clean_up_after_killed_saves_and_follow_the_umask(fitted, tmp_path):
    _, bases = fitted
    stale = tmp_path / ".b.safetensors.abc1_3x9.tmp"  # what a save killed mid-write leaves
    stale.write_bytes(b"x" * 1000)
    other = tmp_path / "notes.tmp"  # not ours
    other.write_text("keep")
    alike = tmp_path / ".b.safetensors.backup.tmp"  # a user's file that looks alike
    alike.write_text("keep")
    import os

    old = os.umask(0o027)
    try:
        path = bases.save(tmp_path / "b.safetensors")
    finally:
        os.umask(old)
    assert not stale.exists() and other.exists() and alike.read_text() == "keep"
    assert path.stat().st_mode & 0o777 == 0o640
    old = os.umask(0o022)
    try:
        bases.save(path)
    finally:
        os.umask(old)
    assert path.stat().st_mode & 0o777 == 0o644


# ---------------------------------------------------------------------------- every result
@pytest.fixture(scope="module")
def results():
    """One real instance of every public result type, from the shipped modadd model."""
    import warnings

    with warnings.catch_warnings():  # short samples: R̂ and rank warnings are expected
        warnings.simplefilter("ignore")
        return _results()


def _results():
    from tl_degen.toy import modadd

    sites = ["resid_pre.0", "resid_mid.0:last", "resid_post.0:last", "logits:last"]
    model = modadd.load_bridge(dtype=torch.float64)
    train, test = modadd.train_test_split()
    tokens = modadd.tokens_for(train[:300])
    labels = modadd.labels_for(train[:300])
    clean, corrupted, ld = modadd.patching_pairs(40, seed=1)
    bases = tl_degen.fit_bases(model, tokens, sites, progress=False)
    graph = tl_degen.interaction_graph(model, tokens, bases, n_probes=4, progress=False)
    assert graph.errors  # set by the stochastic estimate: must survive the round trip
    mid, post = graph.pairs()[1]
    effective = tl_degen.effective_parameters(model, tokens[:20], ["model", "blocks.0.mlp"],
                                              num_chains=2, num_draws=3, num_burnin_steps=0,
                                              progress=False)
    degeneracy = tl_degen.degeneracy_report(model, tokens, sites, bases=bases,
                                            effective=effective, progress=False)
    invariance = tl_degen.InvarianceReport("permute_neurons", 1e-16, [
        {"method": "lib", "site": "resid_pre.0", "k_before": 5, "k_after": 5, "n_leading": 4,
         "n_small": 5, "eigenvalue_change": 1e-12, "eigenvalue_change_small": float("inf"),
         "coordinate_change": 3e-11, "edge_change": float("nan"), "patching_change": 0.0,
         "gap": 12.5}])  # check_invariance fits twice per method: built by hand
    return {
        "InteractionBasis": bases["resid_mid.0:last"],
        "BasisSet": bases,
        "InteractionGraph": graph,
        "Modules": graph.modules(),
        "PatchResult": tl_degen.patch_directions(model, clean, corrupted, bases,
                                                 "resid_mid.0:last", ld, directions=[0, [1, 2]],
                                                 progress=False),
        "AttributionResult": tl_degen.attribution_patch(model, clean, corrupted, bases,
                                                        ["resid_pre.0", "resid_mid.0:last"], ld,
                                                        progress=False),
        "PathPatchResult": tl_degen.path_patch(model, clean, corrupted, graph, mid, post, ld,
                                               edges=[(1, 1), (2, None)], progress=False),
        "AblationCurve": tl_degen.ablation_curve(model, tokens, bases, mid, "accuracy",
                                                 labels=labels, n_kept=[0, 3], progress=False),
        "EdgeAblationResult": tl_degen.edge_ablation(model, tokens, graph, "accuracy",
                                                     labels=labels, pairs=[(mid, post)],
                                                     n_edges=[0, 50], tolerance=0.5, upper=4,
                                                     progress=False),
        "LLCEstimate": effective["blocks.0.mlp"],
        "EffectiveParameters": effective,
        "SiteDegeneracy": degeneracy.sites[1],
        "LayerDegeneracy": degeneracy.layers[0],
        "DegeneracyReport": degeneracy,
        "InvarianceReport": invariance,
    }


def assert_same(a, b, where="result"):
    """Equal field by field: same types, tensors bit for bit (dtype, shape, NaNs included)."""
    assert type(a) is type(b), (where, type(a), type(b))
    if isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype and a.shape == b.shape, (where, a.dtype, b.dtype)
        assert torch.equal(a.flatten().view(torch.uint8), b.flatten().view(torch.uint8)), where
    elif isinstance(a, float):
        assert a == b or (a != a and b != b), (where, a, b)
    elif isinstance(a, dict):
        assert list(a) == list(b), (where, list(a), list(b))
        for k in a:
            assert_same(a[k], b[k], f"{where}[{k!r}]")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same(x, y, f"{where}[{i}]")
    elif hasattr(a, "__dict__") and not isinstance(a, tl_degen.Site):
        assert_same(vars(a), vars(b), where)
    else:
        assert a == b, (where, a, b)


@pytest.mark.parametrize("name", [
    "InteractionBasis", "BasisSet", "InteractionGraph", "Modules", "PatchResult",
    "AttributionResult", "PathPatchResult", "AblationCurve", "EdgeAblationResult",
    "LLCEstimate", "EffectiveParameters", "SiteDegeneracy", "LayerDegeneracy",
    "DegeneracyReport", "InvarianceReport"])
def test_every_result_round_trips(results, name, tmp_path):
    r = results[name]
    cls = getattr(tl_degen, name, None) or getattr(tl_degen.diagnostics, name)
    assert type(r) is cls
    assert_same(r, cls.from_dict(r.to_dict()))
    path = r.save(tmp_path / f"{name}.safetensors")
    assert_same(r, cls.load(path))
    assert list(tmp_path.iterdir()) == [path]


def test_result_files_old_and_wrong(results, tmp_path):
    import json

    from safetensors import safe_open
    from safetensors.torch import save_file

    # an interaction graph saved before errors were stored loads with no errors
    graph = results["InteractionGraph"]
    path = graph.save(tmp_path / "g.safetensors")
    with safe_open(str(path), framework="pt") as f:
        header, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    meta = json.loads(header["tl_degen_graph"])
    del meta["errors"]
    del header["tl_degen_sha256"]  # nor checksums
    save_file(tensors, str(path), metadata={**header, "tl_degen_graph": json.dumps(meta)})
    old = tl_degen.InteractionGraph.load(path)
    assert old.errors == {} and old.config == graph.config
    # JSON (as_dict) forms still read back
    res = results["PathPatchResult"]
    back = tl_degen.PathPatchResult.from_dict(json.loads(json.dumps(res.as_dict())))
    assert_same(res, back)
    # a file of another type, or of no result, is refused by name
    saved = results["PatchResult"].save(tmp_path / "p.safetensors")
    with pytest.raises(DataError, match="holds a PatchResult, not a PathPatchResult"):
        tl_degen.PathPatchResult.load(saved)
    with pytest.raises(DataError, match="an interaction graph"):
        tl_degen.PatchResult.load(path)
    with pytest.raises(DataError, match="no file"):
        tl_degen.PatchResult.load(tmp_path / "missing.safetensors")
