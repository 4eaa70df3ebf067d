"""Transfer: representations learned on A only, AUC per arm on B, Wilcoxon between arms."""

from __future__ import annotations

import numpy as np
import pytest

from hefeat.errors import HefeatError
from hefeat.learn.emo import GenesParams, fit_genes
from hefeat.learn.transfer import TransferParams, fit_transfer, representations


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


def test_transfer_on_synthetic_msi(learned):
    st, eid, _, _ = learned
    src = fit_genes(st, GenesParams(extraction_id=eid))
    s = fit_transfer(st, TransferParams(from_model=src["model_id"], label="msi_status", b_shares=[0.5], n_splits=3,
                                        epochs=100))
    # MSI follows the immune share in the generator: every arm should beat chance clearly.
    assert s["auc_raw_b0.5"] > 0.7 and s["auc_representation_b0.5"] > 0.7
    assert len(s["tests"]) == 2 and all(0 <= t["wilcoxon_p"] <= 1 for t in s["tests"])
    aucs = st.sql(f"SELECT * FROM read_parquet('{st.model_dir(s['model_id'])}/aucs.parquet')")
    assert len(aucs) == 9 and set(aucs["arm"]) == {"raw", "representation", "autoencoder"}
    with pytest.raises(HefeatError, match="clinical column"):
        fit_transfer(st, TransferParams(from_model=src["model_id"], label="nope", n_splits=1))
