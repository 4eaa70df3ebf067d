"""Readers of published layouts (TCGA/GDC, UCSC Xena, cBioPortal, 10x Visium, HEST-1k, ST).

Each reader turns one published layout into hefeat's canonical tables (a slide manifest, an
expression matrix, a clinical table, spots with counts); `hefeat.store.ingest` validates and
writes them. Readers import nothing of hefeat but `hefeat.errors`, and change nothing on disk.
"""
