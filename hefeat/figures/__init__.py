"""Every matplotlib figure hefeat draws: functions that take data and what to say, and write a PNG.

`learn/`, `explore/` and `slides/` gather the data and call these; nothing else imports matplotlib.
Modules: `base` (backend, saving, colour scales, scale bars), `spatial` (maps over the H&E thumbnail),
`survival` (Kaplan–Meier), `metrics` (r distributions, predicted vs measured, ROC, comparisons,
learning curves), `umap` (latent-space scatter), `qc` (tiling QC thumbnails).
"""
