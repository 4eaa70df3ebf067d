"""Read whole-slide images at a physical resolution (µm/px) with OpenSlide.

Files OpenSlide does not read (PNG, JPEG, flat TIFF: ROIs and small images) are read directly
through openslide-python's ImageSlide (PIL), with the same interface; they need --mpp unless a
TIFF states its resolution in cm/mm/inch.
"""

from __future__ import annotations

import math
import os
import threading
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from hefeat.errors import HefeatError
from hefeat.slides import direct_read
from hefeat.slides.resample import reader_filter

_PIL_FILTERS = {"lanczos": Image.Resampling.LANCZOS, "bilinear": Image.Resampling.BILINEAR}

# Ordered places where a slide may state its resolution.
MPP_KEYS = (
    ("openslide.mpp-x", "openslide.mpp-y"),
    ("aperio.MPP", "aperio.MPP"),
    ("hamamatsu.XResolution", "hamamatsu.YResolution"),
    ("philips.DICOM_PIXEL_SPACING", None),
)
_UNIT_TO_UM = {"centimeter": 1e4, "inch": 25400.0, "millimeter": 1e3, "micrometer": 1.0}
PLAIN_IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp")
# A plain image is decoded whole into memory; beyond this many pixels, convert it to a pyramidal TIFF.
MAX_PLAIN_PIXELS = 30_000 * 30_000


@dataclass(frozen=True)
class MPP:
    """A slide's level-0 resolution in µm/px and where it came from."""

    x: float
    y: float
    source: str


def _mpp_from_properties(props: dict[str, str]) -> MPP | None:
    for kx, ky in MPP_KEYS:
        if kx not in props:
            continue
        try:
            if kx == "philips.DICOM_PIXEL_SPACING":  # '"0.000243" "0.000243"' in mm
                vals = [float(v.strip('"')) * 1e3 for v in props[kx].split()]
                return MPP(vals[1], vals[0], kx)
            x = float(props[kx])
            y = float(props.get(ky, x))
            if kx.startswith("hamamatsu") and x > 100:  # stored as px per cm
                x, y = 1e4 / x, 1e4 / y
        except (ValueError, IndexError, ZeroDivisionError):
            continue
        if x > 0 and y > 0 and math.isfinite(x):
            return MPP(x, y, kx)
    unit = props.get("tiff.ResolutionUnit", "").lower()
    if "tiff.XResolution" in props and unit in _UNIT_TO_UM:
        try:
            rx = float(props["tiff.XResolution"])
            ry = float(props.get("tiff.YResolution", rx))
            if rx > 0 and ry > 0:
                return MPP(_UNIT_TO_UM[unit] / rx, _UNIT_TO_UM[unit] / ry, "tiff.XResolution")
        except ValueError:
            pass
    return None


class Slide:
    """A whole-slide image opened read-only; coordinates are level-0 pixels everywhere.

    Parameters
    ----------
    path : path to any file OpenSlide reads.
    mpp : override for the level-0 µm/px, used when the file states none (or to correct it).
    """

    def __init__(self, path: str | os.PathLike, *, mpp: float | None = None):
        import openslide

        self.path = Path(path)
        if not self.path.exists():
            raise HefeatError(f"Slide file not found: {self.path}")
        if self.path.is_dir():
            raise HefeatError(f"Expected a slide file, got a directory: {self.path}")
        self.plain = False
        try:
            self._osr = openslide.OpenSlide(str(self.path))
        except Exception as e:  # OpenSlideUnsupportedFormatError, OpenSlideError, OSError
            self._osr = _open_plain_image(self.path, e)
            self.plain = True
        self.properties = dict(self._osr.properties) if not self.plain else _plain_properties(self._osr)
        found = _mpp_from_properties(self.properties)
        self.stated_mpp = found  # what the file says (None: nothing trustworthy), whatever `mpp` overrides
        if mpp is not None:
            if not (mpp > 0):
                raise HefeatError(f"--mpp must be a positive number of µm/px, got {mpp}")
            self.mpp = MPP(float(mpp), float(mpp), "override")
        elif found is not None:
            self.mpp = found
        else:
            self.close()
            keys = ", ".join(k for k, _ in MPP_KEYS) + ", tiff.XResolution"
            where = ("a plain image states no trustworthy resolution" if self.plain else f"looked at {keys}")
            raise HefeatError(
                f"Slide {self.path.name} has no MPP ({where}). "
                "Pass --mpp 0.25 (the level-0 µm/px) or add an mpp column to the --manifest CSV."
            )
        self.dimensions: tuple[int, int] = self._osr.dimensions
        self.level_count: int = self._osr.level_count
        self.level_dimensions = self._osr.level_dimensions
        self.level_downsamples = self._osr.level_downsamples
        self.vendor = self.properties.get("openslide.vendor", "unknown")
        self._direct = None if (self.plain or not direct_read.enabled()) else False  # False: not opened yet
        self._direct_lock = threading.Lock()
        self._direct_same: dict[int, bool] = {}  # level -> its first direct read gave OpenSlide's bytes
        op = self.properties.get("openslide.objective-power")
        self.objective_power = float(op) if op else None

    # -- context manager -------------------------------------------------------------------
    def __enter__(self) -> Slide:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        """Release the OpenSlide handle."""
        if getattr(self, "_osr", None) is not None:
            self._osr.close()
            self._osr = None
        if getattr(self, "_direct", None):
            self._direct.close()
            self._direct = None

    # -- geometry --------------------------------------------------------------------------
    def level0_size(self, size_px: int, mpp: float) -> float:
        """Level-0 pixels spanned by `size_px` pixels at `mpp` µm/px."""
        return size_px * mpp / self.mpp.x

    def best_level(self, mpp: float) -> int:
        """Deepest pyramid level whose resolution is at least as fine as `mpp` (never upsample)."""
        target = mpp / self.mpp.x
        best = 0
        for i, ds in enumerate(self.level_downsamples):
            if ds <= target * 1.001:
                best = i
        return best

    # -- pixels ----------------------------------------------------------------------------
    def read(self, x: float, y: float, size_px: int, mpp: float) -> np.ndarray:
        """RGB uint8 array (size_px, size_px, 3) of the square at level-0 (x, y) seen at `mpp`.

        Reads the best pyramid level and resizes with antialiasing; outside the slide is white.
        """
        level = self.best_level(mpp)
        ds = self.level_downsamples[level]
        size0 = self.level0_size(size_px, mpp)
        n = max(1, int(round(size0 / ds)))
        x0, y0 = int(round(x)), int(round(y))
        rgb = self._read_direct(level, x0, y0, n) if self._direct is not None else None
        if rgb is not None and n == size_px:
            return rgb
        img = Image.fromarray(rgb) if rgb is not None else _rgba_to_rgb(self._osr.read_region((x0, y0), level, (n, n)))
        if n != size_px:
            img = img.resize((size_px, size_px), _PIL_FILTERS[reader_filter(n, size_px)])
        return np.array(img)

    def check_decodes(self) -> None:
        """Raise if the file's first pixels do not decode (through OpenSlide: no direct reader is opened for this)."""
        self._osr.read_region((0, 0), 0, (8, 8))

    def _read_direct(self, level: int, x: int, y: int, n: int) -> np.ndarray | None:
        """The region (level-0 origin, n level pixels) from the JPEG tiles (hefeat.slides.direct_read), or None:
        read it through OpenSlide."""
        ds = self.level_downsamples[level]
        lx, ly = x / ds, y / ds  # as OpenSlide divides: a fractional pixel is a sub-pixel shift, not a crop
        if lx != int(lx) or ly != int(ly):
            return None
        same = self._direct_same.get(level)
        if same is None:  # the first direct read of this level (and of the slide): open, then check it
            with self._direct_lock:
                if self._direct is False:
                    self._direct = direct_read.DirectRegions.open(str(self.path), self.vendor, self.level_dimensions)
                d = self._direct
                if d is None:
                    return None
                if level not in self._direct_same:
                    if level not in d.levels:  # a level the file lays out otherwise: OpenSlide, without asking again
                        self._direct_same[level] = False
                        return None
                    return self._check_direct(d, level, x, y, int(lx), int(ly), n)
            same = self._direct_same[level]
        if not same:
            return None
        try:
            return self._direct.read(level, int(lx), int(ly), n)
        except Exception:  # a tile that does not decode: OpenSlide's pixels or OpenSlide's error
            return None

    def _check_direct(self, d, level: int, x: int, y: int, lx: int, ly: int, n: int) -> np.ndarray:
        """OpenSlide's region; the level is read directly from now on only if the direct read gave the same bytes."""
        want = np.array(_rgba_to_rgb(self._osr.read_region((x, y), level, (n, n))))
        try:
            same = np.array_equal(d.read(level, lx, ly, n), want)
        except Exception:
            same = False
        self._direct_same[level] = same
        return want

    def thumbnail(self, mpp: float) -> np.ndarray:
        """The whole slide as an RGB uint8 array at roughly `mpp` µm/px (exact scale: self.mpp.x * w0 / w)."""
        w0, h0 = self.dimensions
        scale = self.mpp.x / mpp
        w, h = max(1, int(round(w0 * scale))), max(1, int(round(h0 * scale)))
        if self.plain:  # one level: resize the decoded image, without an RGBA copy of all of it
            img = self._osr._image
            img = img.convert("RGB") if img.mode != "RGB" else img
            return np.asarray(img.resize((w, h), Image.Resampling.BOX) if (w, h) != img.size else img)
        level = self.best_level(mpp)
        lw, lh = self.level_dimensions[level]
        region = self._osr.read_region((0, 0), level, (lw, lh))
        img = _rgba_to_rgb(region)
        if (lw, lh) != (w, h):
            img = img.resize((w, h), Image.Resampling.BOX)
        return np.asarray(img)


def _open_plain_image(path: Path, openslide_error: Exception):
    """An ImageSlide over a PNG/JPEG/flat TIFF, or the HefeatError explaining why neither reader opens it."""
    import openslide

    why = f"OpenSlide cannot open {path.name}: {type(openslide_error).__name__}: {openslide_error}."
    if path.suffix.lower() not in PLAIN_IMAGE_SUFFIXES:
        raise HefeatError(f"{why} Is the file complete and in a format OpenSlide reads?")
    try:
        img = Image.open(path)
        if img.width * img.height > MAX_PLAIN_PIXELS:
            img.close()
            raise HefeatError(f"{path.name} is a {img.width} x {img.height} plain image: too large to decode whole. "
                              "Convert it to a tiled pyramidal TIFF (e.g. with tifffile or vips) and ingest that.")
        img.load()
        if img.mode not in ("RGB", "RGBA", "L"):
            img = img.convert("RGB")
        return openslide.ImageSlide(img)
    except HefeatError:
        raise
    except Exception as e:
        raise HefeatError(f"{why} Read as a plain image it fails too ({type(e).__name__}: {e}). "
                          "Is the file complete?") from None


def _plain_properties(image_slide) -> dict[str, str]:
    """TIFF resolution tags of a plain image as OpenSlide-style properties (PNG/JPEG dpi is not trusted)."""
    img = image_slide._image
    props = {"openslide.vendor": f"plain-{(img.format or 'image').lower()}"}
    tags = getattr(img, "tag_v2", None)
    if img.format == "TIFF" and tags is not None and 282 in tags:
        unit = {2: "inch", 3: "centimeter"}.get(int(tags.get(296, 2)), "")
        res = float(tags[282])
        # 72/96/300 dpi are screen and print defaults, not a microscope's: trust only < 10 µm/px.
        if unit and res > 0 and _UNIT_TO_UM[unit] / res < 10:
            props.update({"tiff.XResolution": str(res), "tiff.YResolution": str(float(tags.get(283, res))),
                          "tiff.ResolutionUnit": unit})
    return props


def _rgba_to_rgb(region: Image.Image) -> Image.Image:
    """Composite OpenSlide's premultiplied RGBA on white (transparent = outside the scan)."""
    if region.mode != "RGBA":
        return region.convert("RGB")
    bg = Image.new("RGB", region.size, (255, 255, 255))
    bg.paste(region, mask=region.getchannel("A"))
    return bg


def open_catalog_slide(row, *, verify: bool = True) -> Slide:
    """Open a catalogued slide; with verify (batch jobs that store results) check it is the ingested file.

    Interactive reads (a tile image, a heatmap) skip the 2 MiB fingerprint hash.
    """
    if not Path(row["path"]).exists():
        raise HefeatError(f"slide file {row['path']} is gone; re-ingest it or restore the file", reason_code="slide_missing")
    from hefeat.store.ids import file_fingerprint

    if verify and file_fingerprint(row["path"]) != row["fingerprint"]:
        raise HefeatError(f"slide file {row['path']} changed since ingest (fingerprint differs); re-ingest it under a new slide_id",
                          reason_code="slide_changed")
    return Slide(row["path"], mpp=float(row["mpp_x"]))
