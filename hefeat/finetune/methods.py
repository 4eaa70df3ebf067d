"""Fine-tuning job kinds in the method registry (contract 7): `hefeat predict` and `hefeat report` on a job id.

Jobs are made by `hefeat finetune run` (not `hefeat fit`), so the kinds register without params/fit.
"""

from __future__ import annotations

from hefeat.finetune.recipe import TASKS
from hefeat.learn.registry import Method, register


def _predict(store, mid, *, slides=None, top=20) -> dict:
    from hefeat.finetune.predict import predict_job

    return predict_job(store, mid, slides=slides, top=top)


def _report(store, mid, out=None) -> dict:
    from hefeat.finetune.report import report_job

    return report_job(store, mid, out)


def _headline(s: dict) -> str:
    from hefeat.finetune.report import headline

    return headline(s)


def _spot_units(params: dict, column: str) -> str:
    from hefeat.learn.spots import TARGET_UNITS

    return f"predicted {TARGET_UNITS}"


def _gene_units(params: dict, column: str) -> str:
    from hefeat.learn.emo import expression_units

    return expression_units(params, column)


def _class_units(params: dict, column: str) -> str:
    return f"predicted probability of {column.removeprefix('p_')}" if column.startswith("p_") else "model output"


UNITS = {"spots": _spot_units, "genes": _gene_units, "classify": _class_units}

for _task in TASKS:
    register(Method(name=f"finetune-{_task}", prefix="ft-", headline=_headline, predict=_predict, report=_report,
                    units=UNITS.get(_task), summary=f"a fine-tuning job ({_task}); run with hefeat finetune run"))
