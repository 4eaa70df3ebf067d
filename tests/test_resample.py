"""Tiles resized on a device (decode='device') equal the CPU reader's Pillow resize."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from hefeat.slides.resample import product_dtype, reader_filter, resize, weights

SIZES = [(128, 64), (448, 224), (96, 64), (300, 224), (512, 64), (65, 64), (50, 64), (64, 224)]


def _pil(img: np.ndarray, m: int) -> np.ndarray:
    kind = Image.Resampling.LANCZOS if img.shape[1] > m else Image.Resampling.BILINEAR  # as Slide.read
    return np.stack([np.array(Image.fromarray(i).resize((m, m), kind)) for i in img])


def _images(n: int) -> np.ndarray:
    """Noise (every rounding case) and a smooth gradient with an edge (where Lanczos rings past 0 and 255)."""
    rng = np.random.default_rng(n)
    noise = rng.integers(0, 256, (1, n, n, 3), np.uint8)
    yy, xx = np.mgrid[:n, :n]
    smooth = np.stack([(xx * 255 // max(n - 1, 1)), (yy * 255 // max(n - 1, 1)), ((xx > n // 2) * 255)], -1)
    return np.concatenate([noise, smooth[None].astype(np.uint8)])


@pytest.mark.parametrize("n,m", SIZES)
def test_resize_is_pillows_byte_for_byte(n, m):
    """float64 (the CPU, and enlarging anywhere): Pillow's fixed-point sums exactly, so Pillow's bytes."""
    img = _images(n)
    got = resize(torch.from_numpy(img), m)
    assert got.dtype == torch.uint8 and got.shape == (2, m, m, 3)
    np.testing.assert_array_equal(got.numpy(), _pil(img, m))


@pytest.mark.parametrize("n,m", [s for s in SIZES if s[0] > s[1]])
def test_float32_shrinking_is_within_one_level_rarely(n, m):
    """float32 (shrinking on a GPU): a sum can land across a rounding step, one level off, in few pixels."""
    img = _images(n)
    got = resize(torch.from_numpy(img), m, dtype=torch.float32).numpy().astype(int)
    diff = np.abs(got - _pil(img, m))
    assert diff.max() <= 1 and (diff > 0).mean() < 1e-3


def test_float32_only_to_shrink_on_a_gpu_without_tf32():
    assert product_dtype("cuda", True, False) == torch.float32
    assert product_dtype("cuda", True, True) == torch.float64  # TF32 would round the sums to 10 bits
    assert product_dtype("cuda", False, False) == torch.float64  # enlarging: many sums on a rounding step
    assert product_dtype("cpu", True, False) == torch.float64


def test_weights_are_pillows_filters():
    """Rows sum to one (Lanczos-3 stretched by the scale to shrink, bilinear to enlarge) and reach as far as
    the filter's support."""
    W = weights(128, 64, "lanczos")
    np.testing.assert_allclose(W.sum(1), 1.0, atol=64 / 2**22)
    assert (W[32] != 0).sum() == 12 and W.min() < 0  # 2 x 3 px each side at scale 2; negative lobes
    up = weights(50, 64, "bilinear")
    assert ((up != 0).sum(1) <= 2).all() and up.min() >= 0
    assert reader_filter(100, 64) == "lanczos" and reader_filter(50, 64) == "bilinear"
    assert not W.flags.writeable  # cached: nobody may change them


def _device_read(s, src, xy, size: int, mpp: float, device: str):
    """read_regions of level-0 origins `xy` at (size, mpp), the level chosen as the device-decode reader chooses it;
    returns (tiles as a numpy array, n: the level pixels each region spans)."""
    import hefeat.slides.jpeg_tiles as J

    level = src.levels[s.best_level(mpp)]
    down = s.dimensions[0] / level.width
    n = int(round(s.level0_size(size, mpp) / down))
    got = J.read_regions(src, level, [(int(round(x / down)), int(round(y / down)), n) for x, y in xy], size, device)
    return got.cpu().numpy(), n


def test_device_read_of_a_shrunk_level_equals_the_cpu_reader(cohort):
    """read_regions (the device-decode reader, on the CPU here) at a size its level must shrink equals Slide.read;
    it resized with torch's antialiased bilinear until now: 3.7 levels off on average, features 0.1 apart."""
    import hefeat.slides.jpeg_tiles as J
    from hefeat.slides.reader import Slide

    path = str(cohort / "slides" / "S01.tiff")
    with Slide(path) as s, J.JpegTiles(path) as src:
        for size, mpp in [(64, 2.0), (96, 0.75), (224, 1.0)]:
            # the last two reach past the slide's edge: white there
            xy = [(512, 256), (1024, 768), (300, 900), (s.dimensions[0] - 100, 200), (-50, s.dimensions[1] - 60)]
            got, n = _device_read(s, src, xy, size, mpp, "cpu")
            want = np.stack([s.read(x, y, size, mpp) for x, y in xy])
            assert (n != size) == (mpp != 1.0)  # 2.0 and 0.75 resize, 1.0 reads level 1 as it is
            np.testing.assert_array_equal(got, want)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_read_of_a_shrunk_level_is_the_cpu_readers_within_the_decoders_difference(cohort):
    """On a GPU: float32 products and nvJPEG (which differs from libjpeg-turbo by a level here and there)."""
    import hefeat.slides.jpeg_tiles as J
    from hefeat.slides.reader import Slide

    img = _images(448)
    diff = np.abs(resize(torch.from_numpy(img).cuda(), 224).cpu().numpy().astype(int) - _pil(img, 224))
    assert diff.max() <= 1 and (diff > 0).mean() < 1e-3
    path = str(cohort / "slides" / "S01.tiff")
    with Slide(path) as s, J.JpegTiles(path) as src:
        xy = [(512, 256), (1024, 768), (300, 900)]
        got, n = _device_read(s, src, xy, 64, 2.0, "cuda")
        want = np.stack([s.read(x, y, 64, 2.0) for x, y in xy]).astype(int)
    assert n == 128 and np.abs(got.astype(int) - want).mean() < 1.5
