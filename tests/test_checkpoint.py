"""Resumable fits: interrupted anywhere, resumed with the same arguments, the same bases."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import tl_degen
from tl_degen import fitting
from tl_degen.checkpoint import FitCheckpoint
from tl_degen.toy import modadd

SITES = ["resid_pre.0", "resid_mid.0:last", "resid_post.0:last", "logits:last"]
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def setup():
    model = modadd.load_bridge(modadd.load_state_dict())
    tokens = modadd.tokens_for(modadd.train_test_split()[0][:200])
    whole = tl_degen.fit_bases(model, tokens, SITES, batch_size=40, progress=False)
    return model, tokens, whole


def assert_same(a, b):
    for site in SITES:
        assert a[site].k == b[site].k
        for key in ("C", "eigenvalues", "mean", "gram"):
            assert torch.equal(getattr(a[site], key), getattr(b[site], key)), (site, key)


class Stop(Exception):
    pass


def stop_after(monkeypatch, n: int):
    """Make the fit raise after its ``n``-th batch (counted over every stage)."""
    original, calls = fitting._FitRun.advance, {"n": 0}

    def advance(self, stage):
        original(self, stage)
        calls["n"] += 1
        if calls["n"] == n:
            raise Stop(f"stopped after batch {n} ({stage})")

    monkeypatch.setattr(fitting._FitRun, "advance", advance)


# 5 batches per stage, stages: moments, then the Jacobians of resid_post, resid_mid, resid_pre
@pytest.mark.parametrize("stop, every", [(1, 1), (3, 2), (5, 1), (7, 3), (12, 1), (19, 4)])
def test_a_fit_stopped_anywhere_resumes_to_the_same_bases(setup, tmp_path, monkeypatch,
                                                          stop, every):
    model, tokens, whole = setup
    ckpt = tmp_path / "fit.ckpt.safetensors"
    stop_after(monkeypatch, stop)
    with pytest.raises(Stop):
        tl_degen.fit_bases(model, tokens, SITES, batch_size=40, checkpoint=ckpt,
                           checkpoint_every=every, progress=False)
    monkeypatch.undo()
    resumed = tl_degen.fit_bases(model, tokens, SITES, batch_size=40, checkpoint=ckpt,
                                 checkpoint_every=every, progress=False)
    assert_same(resumed, whole)
    assert not ckpt.exists() and list(tmp_path.iterdir()) == []


def test_a_probed_fit_stopped_after_a_finished_stage_resumes_to_the_same_bases(
        setup, tmp_path, monkeypatch):
    """With random probes, a stage's estimate joins its Gram only in the merged total, never
    in the checkpointed sums: resuming after the stage does not count the estimate twice."""
    model, tokens, _ = setup
    kwargs = dict(batch_size=40, progress=False, n_probes=8, closed_form=False)
    whole = tl_degen.fit_bases(model, tokens, SITES, **kwargs)
    ckpt = tmp_path / "fit.ckpt.safetensors"
    stop_after(monkeypatch, 12)  # two batches into the second Jacobian stage
    with pytest.raises(Stop):
        tl_degen.fit_bases(model, tokens, SITES, checkpoint=ckpt, checkpoint_every=1, **kwargs)
    monkeypatch.undo()
    resumed = tl_degen.fit_bases(model, tokens, SITES, checkpoint=ckpt, checkpoint_every=1,
                                 **kwargs)
    assert_same(resumed, whole)


@pytest.fixture
def stale(setup, tmp_path, monkeypatch):
    """A checkpoint left by a fit stopped after 7 batches, and its bytes."""
    model, tokens, _ = setup
    ckpt = tmp_path / "fit.ckpt.safetensors"
    stop_after(monkeypatch, 7)
    with pytest.raises(Stop):
        tl_degen.fit_bases(model, tokens, SITES, batch_size=40, checkpoint=ckpt,
                           checkpoint_every=1, progress=False)
    monkeypatch.undo()
    return ckpt, ckpt.read_bytes()


@pytest.mark.parametrize("change, says", [
    ("threshold", "settings"),
    ("method", "settings"),
    ("batch_size", "tokens"),
    ("tokens", "tokens"),
    ("sites", "sites"),
    ("model", "weights"),
])
def test_a_checkpoint_of_another_run_is_refused_and_left_alone(setup, stale, change, says):
    model, tokens, _ = setup
    ckpt, before = stale
    kwargs = dict(batch_size=40, checkpoint=ckpt, checkpoint_every=1, progress=False)
    sites = SITES
    if change == "threshold":
        kwargs["threshold"] = 1e-12
    elif change == "method":
        kwargs["method"] = "pca"
    elif change == "batch_size":
        kwargs["batch_size"] = 50
    elif change == "tokens":
        tokens = tokens.flip(0)
    elif change == "sites":
        sites = SITES[1:]
    elif change == "model":
        model = modadd.load_bridge(modadd.load_state_dict())
        with torch.no_grad():
            next(model.parameters()).mul_(1.001)
    with pytest.raises(tl_degen.CheckpointError, match=f"belongs to another run.*{says}"):
        tl_degen.fit_bases(model, tokens, sites, **kwargs)
    assert ckpt.read_bytes() == before


def test_unreadable_checkpoints_and_bad_arguments(setup, tmp_path):
    model, tokens, _ = setup
    bad = tmp_path / "junk.safetensors"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(tl_degen.CheckpointError, match="not a readable tl_degen checkpoint"):
        tl_degen.fit_bases(model, tokens, SITES, checkpoint=bad, progress=False)
    with pytest.raises(tl_degen.CheckpointError, match="is a folder"):
        tl_degen.fit_bases(model, tokens, SITES, checkpoint=tmp_path, progress=False)
    with pytest.raises(tl_degen.TLDegenError, match="positive integer"):
        tl_degen.fit_bases(model, tokens, SITES, checkpoint=tmp_path / "c", checkpoint_every=0,
                           progress=False)
    assert FitCheckpoint.for_rank("a/f.st", 1, 2) == Path("a/f.st.rank1")
    assert FitCheckpoint.for_rank("a/f.st", 0, 1) == Path("a/f.st")


def test_a_killed_cli_fit_resumes_to_the_same_bases(tmp_path):
    """SIGKILL the command once its checkpoint exists, run it again: the bases equal an
    uninterrupted fit's, and the checkpoint is gone."""
    from tl_degen.cli import load_model

    tokens = modadd.tokens_for(modadd.train_test_split()[0][:1200])
    torch.save(tokens, tmp_path / "tokens.pt")
    cmd = [sys.executable, "-m", "tl_degen.cli", "fit", "--model", "modadd", "--tokens",
           "tokens.pt", "--sites", ",".join(SITES), "--batch-size", "20", "--quiet",
           "--checkpoint", "ck.safetensors", "--checkpoint-every", "1", "--out", "b.safetensors"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)
    ck = tmp_path / "ck.safetensors"
    deadline = time.monotonic() + 300
    while not ck.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(1.0)  # well inside the run (about 4 s of fitting after the first write)
    finished_early = proc.poll() is not None
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    assert not finished_early, proc.stderr.read().decode()[-2000:]
    assert ck.exists() and not (tmp_path / "b.safetensors").exists()
    header, _ = FitCheckpoint.read(ck)
    assert header["fingerprint"]["n_batches"] == 60
    assert 0 < sum(header["progress"].values()) < 4 * 60
    done = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    assert not ck.exists()
    # the same command, never interrupted (same process setup, so the same rounding)
    whole = [a if a != "b.safetensors" else "whole.safetensors" for a in cmd]
    done = subprocess.run(whole, cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    model = load_model("modadd")
    ours = tl_degen.BasisSet.load(tmp_path / "b.safetensors", model=model)
    ref = tl_degen.BasisSet.load(tmp_path / "whole.safetensors", model=model)
    for site in SITES:
        assert ours[site].k == ref[site].k
        for key in ("C", "eigenvalues", "mean"):
            a, b = getattr(ours[site], key), getattr(ref[site], key)
            assert float((a - b).abs().max() / b.abs().max()) <= 1e-12, (site, key)
