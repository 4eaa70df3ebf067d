"""Transfer: representations learned on A only, AUC per arm on B, Wilcoxon between arms."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from hefeat.errors import HefeatError
from hefeat.learn.emo import GenesParams
from hefeat.learn.registry import fit_model
from hefeat.learn.transfer import TransferParams, representations


def test_representations_use_hospital_a_only():
    rng = np.random.default_rng(0)
    XA, YA, XB = rng.normal(size=(12, 16)), rng.normal(size=(12, 5)), rng.normal(size=(6, 16))
    p = TransferParams(from_model="x", label="y", hidden=32, code=8, epochs=20)
    a = representations(XA, YA, XB, p, seed=0)
    b = representations(XA, YA, XB * 0 + XB, p, seed=0)
    assert a["representation"].shape == (6, 8) and a["autoencoder"].shape == (6, 8)
    assert ((a["representation"] > 0) & (a["representation"] < 1)).all()  # sigmoid code
    np.testing.assert_allclose(a["representation"], b["representation"])
    c = representations(XA, YA + rng.normal(size=YA.shape), XB, p, seed=0)  # A's targets shape B's code
    assert not np.allclose(a["representation"], c["representation"])


def test_transfer_on_synthetic_msi(learned, tmp_path):
    from hefeat.learn.models import load_table

    st, eid, _, _ = learned
    src = fit_model(st, "genes", GenesParams(extraction_id=eid))
    s = fit_model(st, "transfer", TransferParams(from_model=src["model_id"], label="msi_status", b_shares=[0.5],
                                                 n_splits=3, epochs=60))
    assert s["model_id"].startswith("xfr-")  # not 'tra-', which traits models used too
    # MSI follows the immune share in the generator: every arm should beat chance clearly.
    assert s["auc_raw_b0.5"] > 0.7 and s["auc_representation_b0.5"] > 0.7
    tests = load_table(st, s["model_id"], "tests")
    assert len(tests) == 2 and tests["wilcoxon_p"].between(0, 1).all()
    aucs = load_table(st, s["model_id"], "aucs")
    assert len(aucs) == 9 and set(aucs["arm"]) == {"raw", "representation", "autoencoder"}
    # 3 splits can never reach p < 0.05 with a two-sided Wilcoxon test: the fit says so.
    assert any("cannot give a Wilcoxon p below 0.05" in n for n in s["notes"])
    from hefeat.learn.report import report

    rep = report(st, s["model_id"], tmp_path)
    assert "median AUC raw" in rep["headline"] and [Path(f).name for f in rep["files"]] == ["transfer.png"]
    with pytest.raises(HefeatError, match="clinical column"):
        fit_model(st, "transfer", TransferParams(from_model=src["model_id"], label="nope", n_splits=1))
    with pytest.raises(HefeatError, match="is a transfer model|expression model"):
        fit_model(st, "transfer", TransferParams(from_model=s["model_id"], label="msi_status", n_splits=1))


def test_thread_policy():
    """Small steps run single-threaded (a thread pool costs more than it saves), big ones on every core; BLAS 1."""
    import torch

    from hefeat.learn.threads import (
        PARALLEL_MIN_FLOPS,
        available_cores,
        thread_policy,
        training_threads,
    )

    assert thread_policy(PARALLEL_MIN_FLOPS / 10) == {"torch": 1, "blas": 1}
    assert thread_policy(PARALLEL_MIN_FLOPS * 10)["torch"] == available_cores()

    before = torch.get_num_threads()
    with training_threads(flops_per_step=1.0) as pol:
        assert torch.get_num_threads() == 1 == pol["torch"]
        with training_threads(flops_per_step=1e12):  # nested: the outer choice holds
            assert torch.get_num_threads() == 1
    assert torch.get_num_threads() == before
