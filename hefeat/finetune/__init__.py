"""End-to-end fine-tuning jobs: a timm backbone plus a task head trained on tiles read from the store.

recipe.py (what a job is) -> tasks.py (targets, losses, evaluation per task) -> data.py (tiles read
from the slides, sharded by slide) -> train.py (the loop) with checkpoint.py (atomic, resumable) and
ddp.py (torchrun) -> job.py (folds, results into the store) -> register.py (the backbone as an
encoder, per-gene heads) -> report.py.
"""
