"""Regions decoded straight from a slide's JPEG tiles on the CPU, checked equal to OpenSlide.

OpenSlide's `read_region` decodes the same JPEG tiles with libjpeg-turbo, then composites them on a
premultiplied ARGB canvas that openslide-python converts to RGBA and hefeat to RGB: on 224 px tiles
that costs ~1.2 CPU-s per 1,000 tiles where decoding the tiles (each once) with libjpeg-turbo through
simplejpeg and pasting them costs ~0.3 (benchmarks/read_regions.py). Same decoder, same settings
(accurate DCT, fancy upsampling), and like OpenSlide it treats libjpeg's warnings (corrupt or truncated
entropy data) as errors (`strict`): a decoder that fills a damaged tile with grey instead, as
imagecodecs' does, would embed it where OpenSlide fails the slide. Same pixels, but that is checked,
not assumed: the first region a `Slide` reads this way from each pyramid level is also read through
OpenSlide and the direct path is used for that level only if every byte is equal (otherwise never again
for that slide and level). Below level 0, only regions whose level-0 origin maps to a whole pixel of
the level (x / downsample, as OpenSlide divides) qualify: a fractional one OpenSlide paints with a
sub-pixel shift, which is resampling, not a crop. Only Aperio SVS and
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
    """RGB regions of a JPEG-tiled TIFF/SVS's pyramid levels, each JPEG tile decoded once while it stays cached.

    Safe to read from several threads: a JPEG tile one thread is decoding, the others wait for instead of decoding
    it again (the in-process reader splits a batch's neighbouring tiles across threads)."""

    def __init__(self, src: JpegTiles, levels: dict[int, Level], cache_bytes: int | None = None):
        self.src, self.levels = src, levels  # OpenSlide's level index -> that level's JPEG tile grid
        self.cache_bytes = CACHE_BYTES if cache_bytes is None else cache_bytes
        self._tiles: OrderedDict[tuple[int, int], np.ndarray] = OrderedDict()
        self._held = 0
        self._lock = threading.Lock()
        self._busy: dict[tuple[int, int], threading.Event] = {}  # JPEG tiles being decoded now, by key
        self.decoded = 0  # JPEG tiles decoded so far (tests and benchmarks read it)

    @classmethod
    def open(cls, path: str, vendor: str, level_dimensions) -> DirectRegions | None:
        """The reader for `path`, or None when its layout does not qualify. `level_dimensions` are OpenSlide's:
        a level is read directly only where the file's level at the same position has exactly its size."""
        if vendor not in VENDORS:
            return None
        try:
            src = JpegTiles(path)
        except Exception:  # not a JPEG-tiled TIFF (or tifffile disagrees): OpenSlide reads it
            return None
        # strict=False: JpegTiles stops at the first level that is not JPEG-tiled (those stay with OpenSlide)
        levels = {i: lv for i, (lv, dims) in enumerate(zip(src.levels, level_dimensions, strict=False))
                  if (lv.width, lv.height) == tuple(dims)}
        if 0 not in levels:  # a level 0 OpenSlide sees differently: the file is not the simple pyramid assumed
            src.close()
            return None
        return cls(src, levels)

    def close(self) -> None:
        """Close the file and drop the cached tiles."""
        self.src.close()
        self._tiles.clear()

    def _tile(self, level: Level, i: int) -> np.ndarray:
        key = (level.index, i)
        while True:
            with self._lock:
                t = self._tiles.get(key)
                if t is not None:
                    self._tiles.move_to_end(key)
                    return t
                busy = self._busy.get(key)
                if busy is None:
                    self._busy[key] = threading.Event()
                    break
            busy.wait()  # another thread decodes this tile: take it from the cache (or decode it, if that failed)
        try:
            t = simplejpeg.decode_jpeg(self.src.stream(level, i), colorspace="RGB", fastdct=False,
                                       fastupsample=False, strict=True)
            if t.ndim != 3 or t.shape[2] != 3:
                raise ValueError(f"JPEG tile {i} decodes to shape {t.shape}, not RGB")
        except BaseException:
            with self._lock:
                self._busy.pop(key).set()
            raise
        with self._lock:
            self._busy.pop(key).set()
            self.decoded += 1
            if key not in self._tiles:
                self._tiles[key] = t
                self._held += t.nbytes
            while self._held > self.cache_bytes and len(self._tiles) > 1:
                self._held -= self._tiles.popitem(last=False)[1].nbytes
        return t

    def read(self, level: int, x: int, y: int, n: int) -> np.ndarray:
        """uint8 (n, n, 3) region at (x, y) in `level`'s own pixels; outside the image is white, as OpenSlide
        composites it."""
        lv = self.levels[level]
        out = np.full((n, n, 3), 255, np.uint8)
        for i, dst, src in self.src.pieces(lv, x, y, n):
            out[dst] = self._tile(lv, i)[src]
        return out
