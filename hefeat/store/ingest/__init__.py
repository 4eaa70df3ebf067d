"""Bring slides, expression, clinical tables and spots into a store's catalog.

Every ingest validates the whole input before touching the catalog, writes in one transaction,
and either does what was asked or fails with a one-line error naming the offending rows or
columns; the previous data stays as it was.

One module per kind of input (slides, expression, clinical, spots) over the shared pieces in
`common` (the report, reading a table, numeric blocks, MPP checks); every name is re-exported
here, so `from hefeat.store.ingest import ingest_expression` keeps working.
"""

from hefeat.store.ingest.clinical import (
    CLINICAL_FORMATS,
    clinical_by_slide,
    clinical_format,
    ingest_clinical,
    ingest_clinical_source,
    write_clinical,
)
from hefeat.store.ingest.common import (
    GENE_COLUMN_NAMES,
    MPP_AGREE,
    MPP_RANGE,
    IngestReport,
    check_mpp,
    first_line,
    numeric_block,
    read_table,
)
from hefeat.store.ingest.expression import (
    EXPRESSION_FORMATS,
    ExpressionMatrix,
    expression_format,
    expression_matrix,
    find_sample_sheet,
    ingest_expression,
    ingest_expression_source,
    ingest_matrix,
    match_expression_samples,
    matrix_of,
)
from hefeat.store.ingest.slides import SlideManifest, register_slides, slide_row
from hefeat.store.ingest.spots import check_spot_set, ingest_spots, write_spot_set

__all__ = [
    "CLINICAL_FORMATS", "EXPRESSION_FORMATS", "GENE_COLUMN_NAMES", "MPP_AGREE", "MPP_RANGE", "ExpressionMatrix", "IngestReport",
    "SlideManifest", "check_mpp", "check_spot_set", "clinical_by_slide", "clinical_format",
    "expression_format", "expression_matrix", "find_sample_sheet", "first_line", "ingest_clinical",
    "ingest_clinical_source", "ingest_expression", "ingest_expression_source", "ingest_matrix", "ingest_spots",
    "match_expression_samples", "matrix_of", "numeric_block", "read_table", "register_slides", "slide_row",
    "write_clinical", "write_spot_set",
]
