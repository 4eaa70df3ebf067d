"""Fine-tuning job kinds in the method registry (contract 7): `hefeat predict` and `hefeat report` on a job id.

Every registered fine-tuning task (hefeat.finetune.tasks) is a kind `finetune-<task>`, its units and
headline from the task's registration. Jobs are made by `hefeat finetune run` (not `hefeat fit`), so
the kinds register without params/fit.
"""

from __future__ import annotations

from hefeat.finetune.tasks import Task, tasks
from hefeat.learn.registry import Method, register


def _predict(store, mid, *, slides=None, top=20) -> dict:
    from hefeat.finetune.predict import predict_job

    return predict_job(store, mid, slides=slides, top=top)


def _report(store, mid, out=None) -> dict:
    from hefeat.finetune.report import report_job

    return report_job(store, mid, out)


def register_method(task: Task) -> Method:
    """The job kind `finetune-<task>` of a fine-tuning task, in the method registry."""
    return register(Method(name=f"finetune-{task.name}", prefix="ft-", headline=task.headline, predict=_predict,
                           report=_report, units=task.units,
                           summary=f"a fine-tuning job ({task.name}); run with hefeat finetune run"))


for _task in tasks().values():
    register_method(_task)
