"""Named gene sets that methods and their reports share (one place, so report.py imports no method module)."""

from __future__ import annotations

PAM50_PROLIFERATION = ("BIRC5", "CCNB1", "CDC20", "NUF2", "CEP55", "NDC80", "MKI67", "PTTG1", "RRM2", "TYMS", "UBE2C")
ALIASES = {"CDCA1": "NUF2", "KNTC2": "NDC80"}  # old symbols of PAM50 genes in some expression tables
