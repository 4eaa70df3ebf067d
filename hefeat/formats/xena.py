"""UCSC Xena matrices: genes x samples, values already log2(x + pseudocount).

Layout as the Xena hubs publish them (xena.ucsc.edu, e.g. TCGA hub ``HiSeqV2`` = log2(RSEM norm
count + 1), GDC hub ``TCGA-BRCA.star_tpm.tsv`` = log2(TPM + 1)): tab-separated, first column the
gene or probe id (header ``sample``, ``Ensembl_ID``, ``gene`` ...), then one column per sample barcode.
The values are logged once already: hefeat stores them back on the linear scale
(2**v - pseudocount) so that a fit's own transform logs them once, not twice.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pandas as pd

from hefeat.errors import HefeatError
from hefeat.formats.cbioportal import dedupe_genes
from hefeat.formats.common import read_tsv, to_float
from hefeat.formats.gdc import strip_version


def xena_matrix(path: str | os.PathLike, *, pseudocount: float = 1.0) -> tuple[pd.DataFrame, list[str]]:
    """A Xena genes x samples matrix -> (samples x genes DataFrame on the linear scale, notes)."""
    df = read_tsv(path, "Xena matrix")
    if df.shape[1] < 2:
        raise HefeatError(f"Xena matrix {Path(path).name}: needs a gene column and at least one sample column")
    gcol = df.columns[0]
    genes = df[gcol].str.strip()
    if genes.str.match(r"^ENSG\d+\.\d+").any():
        genes = strip_version(genes)
    samples = list(df.columns[1:])
    V = np.stack([to_float(df[s], path, s, "Xena matrix").to_numpy() for s in samples])
    if np.nanmax(V) > 40:
        raise HefeatError(f"Xena matrix {Path(path).name}: values up to {np.nanmax(V):.0f} are not log2 values; "
                          "ingest it as a plain table (--format table)")
    lin = np.exp2(V) - pseudocount
    notes = [f"Xena values are log2(x + {pseudocount:g}); stored as x = 2**v - {pseudocount:g}, so fits log them once"]
    wide = pd.DataFrame(lin, index=pd.Index(samples, name="sample_id"), columns=genes.to_numpy())
    return dedupe_genes(wide, notes), notes
