"""BatchNorm folding: the same function, only where it is exact, decided and recorded once per extraction."""

from __future__ import annotations

import glob
import json
import pickle

import numpy as np
import pytest
import torch
from conftest import cpu_runs_bf16

from hefeat.extract.fold import fold_batchnorm
from hefeat.extract.pipeline import ExtractOptions, run_extraction
from hefeat.slides.run import ingest_slides, run_tiling
from hefeat.slides.tiling import TilingParams
from hefeat.store import layout
from hefeat.store.catalog import Store
from hefeat.store.features import read_features

ENC = dict(encoder="resnet18", weights="none", layer="layer1", fit="native")  # on 64 px tiles (_two_slide_store)
# oneDNN's bf16 kernels (AVX-512 BF16 / AMX, or AVX-512 emulation): an AVX2-only CPU refuses every fused bf16 call
NEEDS_BF16 = pytest.mark.skipif(not cpu_runs_bf16(), reason="this CPU has no oneDNN bf16 kernels")


def _norms(net) -> int:
    return sum(isinstance(m, torch.nn.BatchNorm2d) for m in net.modules())


def _random_stats(net, seed: int = 0) -> None:
    """Running statistics and affine parameters far from the identity, so a wrong fold shows."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                n = m.num_features
                m.running_mean.copy_(torch.rand(n, generator=g) * 2 - 1)
                m.running_var.copy_(torch.rand(n, generator=g) * 2 + 0.25)
                if m.weight is not None:
                    m.weight.copy_(torch.rand(n, generator=g) + 0.5)
                    m.bias.copy_(torch.rand(n, generator=g) - 0.5)


@pytest.mark.parametrize("name,kwargs,n_folds", [
    ("resnet18", {}, 20),  # every conv → BatchNorm2d, the downsample branches' included
    ("tf_efficientnet_lite0", {}, 49),  # timm's BatchNormAct2d after Conv2dSame: the activation must stay
])
def test_folding_computes_the_same_function(name, kwargs, n_folds):
    import timm

    torch.manual_seed(0)
    net = timm.create_model(name, pretrained=False, num_classes=0, **kwargs).eval()
    _random_stats(net)
    acts = sum(isinstance(m, (torch.nn.ReLU, torch.nn.ReLU6)) for m in net.modules())
    x = torch.randn(2, 3, 96, 96, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = net(x)
    assert fold_batchnorm(net) == n_folds
    assert _norms(net) == 0
    assert sum(isinstance(m, (torch.nn.ReLU, torch.nn.ReLU6)) for m in net.modules()) == acts
    with torch.no_grad():
        got = net(x)
    assert float((got - want).norm() / want.norm()) < 1e-5
    assert fold_batchnorm(net) == 0  # nothing left to fold


class _TwoUsers(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.bn = torch.nn.Conv2d(3, 3, 3, padding=1), torch.nn.BatchNorm2d(3)

    def forward(self, x):
        y = self.conv(x)
        return self.bn(y) + y  # the conv's output is used twice: folding would change the second use


class _SharedNorm(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b, self.bn = torch.nn.Conv2d(3, 3, 1), torch.nn.Conv2d(3, 3, 1), torch.nn.BatchNorm2d(3)

    def forward(self, x):
        return self.bn(self.a(x)) + self.bn(self.b(x))  # one norm after two convs


class _Untraceable(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.bn = torch.nn.Conv2d(3, 3, 3, padding=1), torch.nn.BatchNorm2d(3)

    def forward(self, x):
        if x.mean() > 0:  # data-dependent control flow: torch.fx cannot trace it
            x = -x
        return self.bn(self.conv(x))


def _std_conv():
    from timm.layers import StdConv2d

    return torch.nn.Sequential(StdConv2d(3, 3, 3, padding=1), torch.nn.BatchNorm2d(3))


@pytest.mark.parametrize("make,train", [
    (_TwoUsers, False), (_SharedNorm, False), (_Untraceable, False),
    (_std_conv, False),  # StdConv2d standardises its weight: a folded scale would be normalised away
    (lambda: torch.nn.Sequential(torch.nn.Conv2d(3, 3, 3), torch.nn.BatchNorm2d(3)), True),  # batch statistics
])
def test_what_cannot_fold_exactly_is_left_alone(make, train):
    torch.manual_seed(0)
    net = make()
    _random_stats(net)
    net.train(train)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    x = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    assert fold_batchnorm(net) == 0
    after = net.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert _norms(net) == len([k for k in before if k.endswith("running_mean")])
    net.eval()
    with torch.no_grad():
        net(x)  # still runs as built


def _two_slide_store(root, cohort):
    st = Store.init(root)
    ingest_slides(st, sorted(glob.glob(str(cohort / "slides" / "*.tiff")))[:2])
    return st, run_tiling(st, TilingParams(size=64, mpp=2.0)).extra["tiling_id"]  # small tiles: folding is under test


@pytest.fixture
def spy(monkeypatch):
    """(BatchNorm modules, fused conv+ReLU modules and residual blocks) of the encoder at each embedding call of the extraction loop
    and of query-by-image."""
    import hefeat.extract.compute as compute
    import hefeat.extract.pipeline as pipeline

    seen: list[tuple[int, int]] = []
    real = compute.embed_batch

    def spying(enc, *a, **k):
        seen.append((_norms(enc.net), sum(hasattr(m, "fused_ok") for m in enc.net.modules())))
        return real(enc, *a, **k)

    monkeypatch.setattr(pipeline, "embed_batch", spying)
    monkeypatch.setattr(compute, "embed_batch", spying)
    return seen


def test_auto_extraction_folds_records_it_and_query_by_image_follows(tmp_path, cohort, spy):
    from PIL import Image

    from hefeat.explore.embed import embed_image
    from hefeat.explore.tiles import tile_image

    st, tid = _two_slide_store(tmp_path / "st", cohort)
    sid = st.sql("SELECT min(slide_id) AS s FROM slides")["s"][0]
    s = run_extraction(st, tiling_id=tid, slides=[sid], options=ExtractOptions(batch_size=8), **ENC)
    eid = s.extra["extraction_id"]
    assert s.ok == [sid] and s.extra["precision_choice"]["fold_bn"] is True
    assert s.extra["precision_choice"]["fuse_residual"] is True
    # every batch ran the folded network: the stem's and layer1 blocks' first convs fused, and the blocks' residuals
    assert spy and set(spy) == {(0, 5)}
    decision = json.loads(layout.precision_decision_path(st.root, eid).read_text())
    assert decision["fold_bn"] is True and decision["fuse_residual"] is True
    meta = json.loads((st.extraction_dir(eid) / "_extraction.json").read_text())
    assert meta["precision_choice"]["fold_bn"] is True and meta["precision_choice"]["fuse_residual"] is True
    # a tile's own pixels embedded for a query run the extraction's network: folded too
    spy.clear()
    Image.fromarray(tile_image(st, sid, 2, extraction_id=eid)).save(tmp_path / "t.png")
    q = embed_image(st, eid, str(tmp_path / "t.png"))
    assert spy == [(0, 5)]
    stored = read_features(st.features_path(eid, sid))[2]
    # stored as float16 (up to 2^-11 relative per value); bf16 rounds at 2^-8. auto decides fp32 or bf16 by measuring
    # (fp32 where the machine is busy enough: CI under two pytest workers)
    tol = 1e-3 if s.extra["precision"] == "fp32" else 3e-2
    assert float(np.linalg.norm(q - stored) / np.linalg.norm(stored)) < tol


def test_an_extraction_recorded_before_folding_keeps_running_unfolded(tmp_path, cohort, spy):
    """A decision without fold_bn (written by an older hefeat) runs its remaining slides as built: one extraction,
    one network; and a fixed --precision never folds."""
    st, tid = _two_slide_store(tmp_path / "st", cohort)
    first, second = st.sql("SELECT slide_id FROM slides ORDER BY 1")["slide_id"].tolist()
    s = run_extraction(st, tiling_id=tid, slides=[first], options=ExtractOptions(batch_size=8), **ENC)
    eid = s.extra["extraction_id"]
    path = layout.precision_decision_path(st.root, eid)
    old = json.loads(path.read_text())
    old.pop("fold_bn")
    old.pop("fuse_residual")
    path.write_text(json.dumps(old))  # as an extraction begun before folding existed recorded it
    spy.clear()
    again = run_extraction(st, tiling_id=tid, options=ExtractOptions(batch_size=8), **ENC)
    assert again.extra["extraction_id"] == eid and again.ok == [second]
    assert again.extra["precision_choice"]["fold_bn"] is False
    assert spy and all(n > 0 and f == 0 for n, f in spy)  # every batch ran the network with its BatchNorms
    spy.clear()
    fixed = run_extraction(st, tiling_id=tid, slides=[first], precision="fp32", options=ExtractOptions(batch_size=8),
                           **ENC)
    assert fixed.extra["extraction_id"] != eid and fixed.extra["precision_choice"]["fold_bn"] is False
    assert spy and all(n > 0 and f == 0 for n, f in spy)


def _folded_resnet18():
    import timm

    torch.manual_seed(0)
    net = timm.create_model("resnet18", pretrained=False, num_classes=0).eval()
    _random_stats(net)
    fold_batchnorm(net)
    return net


@pytest.mark.parametrize("precision", ["fp32", pytest.param("bf16", marks=NEEDS_BF16)])
def test_conv_relu_fusion_changes_no_bit(precision):
    import copy

    from hefeat.extract.fold import fuse_conv_relu
    from hefeat.extract.precision import autocast

    net = _folded_resnet18()
    fused = copy.deepcopy(net)
    assert fuse_conv_relu(fused) == 9  # the stem and each BasicBlock's first conv; the second feeds the residual add
    assert fused.state_dict().keys() == net.state_dict().keys()
    g = torch.Generator().manual_seed(2)
    for batch, size in ((6, 64), (3, 64), (6, 96)):  # a new tile shape is checked again; a known one runs fused
        x = torch.randn(batch, 3, size, size, generator=g).contiguous(memory_format=torch.channels_last)
        with torch.inference_mode(), autocast("cpu", precision):
            assert torch.equal(fused(x), net(x))  # every row, not only the checked ones
    convs = [m for m in fused.modules() if hasattr(m, "fused_ok")]
    assert len(convs) == 9 and all(len(m.checked) == 2 and all(m.checked.values()) for m in convs)
    with torch.inference_mode():
        assert torch.equal(pickle.loads(pickle.dumps(fused))(x), net(x))  # saves and loads as any model


def test_a_fused_call_that_differs_is_dropped_for_that_layer(monkeypatch):
    import copy

    from hefeat.extract.fold import ConvReLU2d, fuse_conv_relu

    net = _folded_resnet18()
    fused = copy.deepcopy(net)
    fuse_conv_relu(fused)
    real = ConvReLU2d._fused
    monkeypatch.setattr(ConvReLU2d, "_fused", lambda self, x: real(self, x) + 1e-3)  # an op that rounds otherwise
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(3))
    with torch.inference_mode():
        assert torch.equal(fused(x), net(x))
        assert torch.equal(fused(x), net(x))  # and stays on the two calls
    assert not any(any(m.checked.values()) for m in fused.modules() if hasattr(m, "fused_ok"))


@pytest.mark.parametrize("missing", [["fold_bn", "fuse_residual"], ["fuse_residual"]])
def test_a_worker_that_loses_the_decision_to_an_unfolding_one_embeds_nothing(tmp_path, cohort, monkeypatch, missing):
    """Two workers decide at once and the other one (an older hefeat) records no folding, or folding without fused
    residuals: this one, folded and fused already, stops before embedding a tile; run again, it follows the record."""
    import hefeat.store.atomic as atomic
    from hefeat.errors import HefeatError

    st, tid = _two_slide_store(tmp_path / "st", cohort)
    real = atomic.write_json_once

    def lose(path, rec):
        real(path, {k: v for k, v in rec.items() if k not in missing})  # the other worker's record lands first
        return real(path, rec)

    monkeypatch.setattr(atomic, "write_json_once", lose)
    with pytest.raises(HefeatError, match=f"{missing[0]}=False.* while .*run it again"):
        run_extraction(st, tiling_id=tid, options=ExtractOptions(batch_size=8), **ENC)
    assert st.sql("SELECT count(*) AS n FROM features_index")["n"][0] == 0
    monkeypatch.setattr(atomic, "write_json_once", real)
    again = run_extraction(st, tiling_id=tid, options=ExtractOptions(batch_size=8), **ENC)
    pc = again.extra["precision_choice"]
    assert len(again.ok) == 2 and pc["fuse_residual"] is False and pc["fold_bn"] is (missing == ["fuse_residual"])


def test_unfused_layers_run_as_two_calls_for_torch_compile(monkeypatch):
    import copy

    from hefeat.extract.fold import ConvReLU2d, fuse_conv_relu, unfuse_conv_relu

    net = _folded_resnet18()
    fused = copy.deepcopy(net)
    fuse_conv_relu(fused)
    assert unfuse_conv_relu(fused) == 9
    monkeypatch.setattr(ConvReLU2d, "_fused", lambda self, x: pytest.fail("a fused call after unfuse_conv_relu"))
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(4))
    with torch.inference_mode():
        assert torch.equal(fused(x), net(x))


def test_an_extraction_recorded_before_residual_fusion_keeps_its_blocks_as_built(tmp_path, cohort, spy):
    """A decision with fold_bn but without fuse_residual (an earlier hefeat) runs its remaining slides folded, with the
    residual blocks as built: one extraction, one network."""
    st, tid = _two_slide_store(tmp_path / "st", cohort)
    first, second = st.sql("SELECT slide_id FROM slides ORDER BY 1")["slide_id"].tolist()
    s = run_extraction(st, tiling_id=tid, slides=[first], options=ExtractOptions(batch_size=8), **ENC)
    path = layout.precision_decision_path(st.root, s.extra["extraction_id"])
    old = json.loads(path.read_text())
    assert old.pop("fuse_residual") is True and old["fold_bn"] is True
    path.write_text(json.dumps(old))
    spy.clear()
    again = run_extraction(st, tiling_id=tid, options=ExtractOptions(batch_size=8), **ENC)
    assert again.ok == [second] and again.extra["precision_choice"]["fuse_residual"] is False
    assert spy and set(spy) == {(0, 3)}  # folded, conv+ReLU fused, residual blocks as built


def _folded(name: str, **kwargs):
    import timm

    torch.manual_seed(0)
    net = timm.create_model(name, pretrained=False, num_classes=0, **kwargs).eval()
    _random_stats(net)
    fold_batchnorm(net)
    return net


@pytest.mark.parametrize("name,blocks", [("resnet18", 8), ("resnet26", 8)])  # BasicBlock, Bottleneck
@pytest.mark.parametrize("precision,tol", [("fp32", 1e-5), pytest.param("bf16", 2e-2, marks=NEEDS_BF16)])
def test_fused_residual_blocks_compute_the_block_rounded_once(name, blocks, precision, tol):
    import copy

    from hefeat.extract.fold import _ResidualReLU, fuse_conv_relu, fuse_residual_relu
    from hefeat.extract.precision import autocast

    net = _folded(name)
    fuse_conv_relu(net)
    fused = copy.deepcopy(net)
    assert fuse_residual_relu(fused) == blocks
    assert fused.state_dict().keys() == net.state_dict().keys()
    g = torch.Generator().manual_seed(5)
    for batch, size in ((6, 64), (3, 64), (5, 96)):  # a new tile shape is checked again; a known one runs fused
        x = torch.randn(batch, 3, size, size, generator=g).contiguous(memory_format=torch.channels_last)
        with torch.inference_mode(), autocast("cpu", precision):
            got, want = fused(x).float(), net(x).float()
        assert float((got - want).norm() / want.norm()) < tol  # every row, not only the checked ones
    res = [m for m in fused.modules() if isinstance(m, _ResidualReLU)]
    assert len(res) == blocks and all(len(m.checked) == 2 and all(m.checked.values()) for m in res)  # fused throughout
    with torch.inference_mode(), autocast("cpu", precision):
        again = pickle.loads(pickle.dumps(fused))  # saves and loads as any model
        assert torch.equal(again(x), fused(x))


def test_a_fused_block_the_op_refuses_runs_as_built():
    """oneDNN's fused op refuses bf16 in the NCHW layout (PyTorch's add_relu fallback has no bf16): the block's own
    forward runs, every bit of it."""
    import copy

    from hefeat.extract.fold import _ResidualReLU, fuse_residual_relu
    from hefeat.extract.precision import autocast

    net = _folded("resnet18")
    fused = copy.deepcopy(net)
    fuse_residual_relu(fused)
    x = torch.randn(3, 3, 64, 64, generator=torch.Generator().manual_seed(8))
    with torch.inference_mode(), autocast("cpu", "bf16"):
        assert torch.equal(fused(x), net(x))
    assert not any(any(m.checked.values()) for m in fused.modules() if isinstance(m, _ResidualReLU))


def test_a_shape_the_op_refuses_leaves_the_others_fused():
    """Calibration runs the network in layouts and dtypes the fused op may refuse (bf16 NCHW; bf16 in any layout on a
    CPU without oneDNN bf16) before the extraction runs the chosen one (bf16 channels-last where the CPU runs bf16,
    else fp32 channels-last): the refusal holds for that shape only."""
    import copy

    from hefeat.extract.fold import ConvReLU2d, _ResidualReLU, fuse_conv_relu, fuse_residual_relu
    from hefeat.extract.precision import autocast

    bf16 = cpu_runs_bf16()
    chosen, tol = ("bf16", 2e-2) if bf16 else ("fp32", 1e-5)
    net = _folded("resnet18")
    fuse_conv_relu(net)
    fused = copy.deepcopy(net)
    fuse_residual_relu(fused)
    x = torch.randn(3, 3, 64, 64, generator=torch.Generator().manual_seed(9))
    with torch.inference_mode():
        with autocast("cpu", "bf16"):
            fused(x)  # NCHW: refused
        cl = x.contiguous(memory_format=torch.channels_last)
        with autocast("cpu", chosen):
            got, want = fused(cl).float(), net(cl).float()
    assert float((got - want).norm() / want.norm()) < tol
    blocks = [m for m in fused.modules() if isinstance(m, _ResidualReLU)]
    assert blocks and all(sorted(m.checked.values()) == [False, True] for m in blocks)
    convs = [m for m in fused.modules() if isinstance(m, ConvReLU2d)]
    if bf16:  # conv+ReLU runs bf16 NCHW fused
        assert all(all(m.checked.values()) for m in convs)
    else:  # without oneDNN bf16 it refuses bf16 too, for that shape only
        assert convs and all(sorted(m.checked.values()) == [False, True] for m in convs)


def test_a_fused_block_that_is_not_its_own_forward_runs_as_built(monkeypatch):
    import copy

    from hefeat.extract.fold import _ResidualReLU, fuse_residual_relu

    net = _folded("resnet18")
    fused = copy.deepcopy(net)
    assert fuse_residual_relu(fused) == 8
    real = _ResidualReLU._last
    monkeypatch.setattr(_ResidualReLU, "_last", lambda self, *a: real(self, *a) * 1.1)  # a wrong op, not rounding
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(6))
    with torch.inference_mode():
        assert torch.equal(fused(x), net(x))
        assert torch.equal(fused(x), net(x))  # and stays on the block's own forward
    assert not any(any(m.checked.values()) for m in fused.modules() if isinstance(m, _ResidualReLU))


@pytest.mark.parametrize("name,kwargs,fold", [
    ("resnet18", {}, False),  # its last norm not folded away
    ("resnet18", {"drop_path_rate": 0.2}, True),  # drop path between the conv and the add (all blocks but the first)
    ("seresnet18", {}, True),  # squeeze-excitation between them
])
def test_blocks_with_more_than_conv_add_relu_are_left_alone(name, kwargs, fold):
    import timm

    from hefeat.extract.fold import fuse_residual_relu

    net = _folded(name, **kwargs) if fold else timm.create_model(name, pretrained=False, num_classes=0).eval()
    plain = [m for m in net.modules() if type(m).__name__ == "BasicBlock" and m.drop_path is None and m.se is None]
    assert fuse_residual_relu(net) == (len(plain) if fold else 0)
    assert len(plain) == {"drop_path_rate": 1}.get(next(iter(kwargs), None), 0 if name == "seresnet18" else 8)


def test_fused_blocks_run_as_built_for_torch_compile(monkeypatch):
    import copy

    from hefeat.extract.fold import (
        _ResidualReLU,
        fuse_conv_relu,
        fuse_residual_relu,
        unfuse_conv_relu,
    )

    net = _folded("resnet18")
    fused = copy.deepcopy(net)
    assert fuse_conv_relu(fused) == 9 and fuse_residual_relu(fused) == 8
    assert unfuse_conv_relu(fused) == 9 + 8
    monkeypatch.setattr(_ResidualReLU, "_last", lambda self, *a: pytest.fail("a fused call after unfuse_conv_relu"))
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(7))
    with torch.inference_mode():
        assert torch.equal(fused(x), net(x))
