"""Deep-zoom tiles of catalogued slides (OpenSlide's DeepZoomGenerator), for the explorer's slide viewer."""

from __future__ import annotations

import io
import threading
from collections import OrderedDict

from hefeat.errors import HefeatError

TILE_SIZE = 254
OVERLAP = 1
FORMAT = "jpeg"
QUALITY = 85


class DeepZoomCache:
    """One DeepZoomGenerator per slide path, the most recently used `size` kept open."""

    def __init__(self, size: int = 8):
        self.size = size
        self._lock = threading.Lock()
        self._open: OrderedDict[str, tuple] = OrderedDict()

    def generator(self, path: str):
        """The slide's DeepZoomGenerator (limit_bounds: only the scanned area)."""
        import openslide
        from openslide.deepzoom import DeepZoomGenerator

        with self._lock:
            if path in self._open:
                self._open.move_to_end(path)
                return self._open[path][1]
            try:
                osr = openslide.OpenSlide(path)
            except Exception as e:
                raise HefeatError(f"OpenSlide cannot open the slide file: {type(e).__name__}") from None
            dz = DeepZoomGenerator(osr, tile_size=TILE_SIZE, overlap=OVERLAP, limit_bounds=True)
            self._open[path] = (osr, dz)
            while len(self._open) > self.size:
                old, _ = self._open.popitem(last=False)[1]
                old.close()
            return dz

    def dzi(self, path: str) -> str:
        """The DZI XML descriptor."""
        return self.generator(path).get_dzi(FORMAT)

    def tile(self, path: str, level: int, col: int, row: int) -> bytes:
        """JPEG bytes of one deep-zoom tile; a clear error for coordinates outside the pyramid."""
        dz = self.generator(path)
        if not 0 <= level < dz.level_count:
            raise HefeatError(f"level must be 0..{dz.level_count - 1}")
        cols, rows = dz.level_tiles[level]
        if not (0 <= col < cols and 0 <= row < rows):
            raise HefeatError(f"tile {col}_{row} is outside level {level} ({cols} x {rows} tiles)")
        img = dz.get_tile(level, (col, row))
        buf = io.BytesIO()
        img.convert("RGB").save(buf, "JPEG", quality=QUALITY)
        return buf.getvalue()

    def bounds(self, path: str) -> dict:
        """Level-0 offset and size of the area the deep-zoom image shows (limit_bounds)."""
        dz = self.generator(path)
        osr = self._open[path][0]
        p = osr.properties
        x0 = int(p.get("openslide.bounds-x", 0))
        y0 = int(p.get("openslide.bounds-y", 0))
        w, h = dz.level_dimensions[-1]
        return {"x0": x0, "y0": y0, "width": w, "height": h}

    def close(self) -> None:
        """Close every open slide."""
        with self._lock:
            for osr, _ in self._open.values():
                osr.close()
            self._open.clear()
