"""Level-0 regions decoded straight from a slide's JPEG tiles on the CPU, checked equal to OpenSlide.

OpenSlide's `read_region` decodes the same JPEG tiles with libjpeg-turbo, then composites them on a
premultiplied ARGB canvas that openslide-python converts to RGBA and hefeat to RGB: on 224 px tiles
that costs ~1.2 CPU-s per 1,000 tiles where decoding the tiles (each once) with libjpeg-turbo through
simplejpeg and pasting them costs ~0.3 (benchmarks/read_regions.py). Same decoder, same settings
(accurate DCT, fancy upsampling), and like OpenSlide it treats libjpeg's warnings (corrupt or truncated
entropy data) as errors (`strict`): a decoder that fills a damaged tile with grey instead, as
imagecodecs' does, would embed it where OpenSlide fails the slide. Same pixels, but that is checked,
not assumed: the first region a `Slide` reads this way is also read through OpenSlide and the direct
path is used only if every byte is equal (otherwise never again for that slide). Only Aperio SVS and
generic tiled TIFFs qualify (their TIFF tile grid is the image; Philips' sparse tiles, Ventana's
overlaps, NDPI and Leica layouts go through OpenSlide), and a tile that fails to decode sends that read
to OpenSlide, so a slide's pixels, errors and extraction id never depend on which path ran. `HEFEAT_DIRECT_JPEG=0` turns it off.
"""

from __future__ import annotations

import os
import threading
from collections import OrderedDict

import numpy as np
import simplejpeg

from hefeat.slides.jpeg_tiles import JpegTiles, Level

VENDORS = ("aperio", "generic-tiff")
CACHE_BYTES = 64 << 20  # decoded tiles kept per slide: two rows of 256 px tiles across a 60k px slide


def enabled() -> bool:
    """False when HEFEAT_DIRECT_JPEG=0 (every region through OpenSlide)."""
    return os.environ.get("HEFEAT_DIRECT_JPEG", "1").strip().lower() not in ("0", "false", "no", "off")


class DirectRegions:
    """Level-0 RGB regions of a JPEG-tiled TIFF/SVS, each JPEG tile decoded once while it stays cached."""

    def __init__(self, src: JpegTiles, level: Level, cache_bytes: int | None = None):
        self.src, self.level = src, level
        self.cache_bytes = CACHE_BYTES if cache_bytes is None else cache_bytes
        self._tiles: OrderedDict[int, np.ndarray] = OrderedDict()
        self._held = 0
        self._lock = threading.Lock()
        self.decoded = 0  # JPEG tiles decoded so far (tests and benchmarks read it)

    @classmethod
    def open(cls, path: str, vendor: str, dimensions: tuple[int, int]) -> DirectRegions | None:
        """The reader for `path`, or None when its layout does not qualify."""
        if vendor not in VENDORS:
            return None
        try:
            src = JpegTiles(path)
        except Exception:  # not a JPEG-tiled TIFF (or tifffile disagrees): OpenSlide reads it
            return None
        lv = src.levels[0]
        if (lv.width, lv.height) != tuple(dimensions):
            src.close()
            return None
        return cls(src, lv)

    def close(self) -> None:
        """Close the file and drop the cached tiles."""
        self.src.close()
        self._tiles.clear()

    def _tile(self, i: int) -> np.ndarray:
        with self._lock:
            t = self._tiles.get(i)
            if t is not None:
                self._tiles.move_to_end(i)
                return t
        t = simplejpeg.decode_jpeg(self.src.stream(self.level, i), colorspace="RGB", fastdct=False,
                                   fastupsample=False, strict=True)
        if t.ndim != 3 or t.shape[2] != 3:
            raise ValueError(f"JPEG tile {i} decodes to shape {t.shape}, not RGB")
        with self._lock:
            self.decoded += 1
            if i not in self._tiles:
                self._tiles[i] = t
                self._held += t.nbytes
            while self._held > self.cache_bytes and len(self._tiles) > 1:
                self._held -= self._tiles.popitem(last=False)[1].nbytes
        return t

    def read(self, x: int, y: int, n: int) -> np.ndarray:
        """uint8 (n, n, 3) region at level-0 (x, y); outside the image is white, as OpenSlide composites it."""
        out = np.full((n, n, 3), 255, np.uint8)
        for i, dst, src in self.src.pieces(self.level, x, y, n):
            out[dst] = self._tile(i)[src]
        return out
