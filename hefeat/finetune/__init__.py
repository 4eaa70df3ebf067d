"""End-to-end fine-tuning jobs: a timm backbone plus a task head trained on tiles read from the store.

recipe.py (what a job is) -> tasks.py (one registration per task: targets.py's loader, evaluation,
baseline, wording) and heads.py (losses and scaling per head kind) -> data.py (tiles read
from the slides, sharded by slide) -> train.py (the loop) with checkpoint.py (atomic, resumable) and
ddp.py (torchrun) -> job.py (folds, results into the store) -> register.py (the backbone as an
encoder, per-gene heads) -> report.py.
"""
