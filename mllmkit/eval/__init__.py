"""Evaluation: benchmark tasks (plugins of kind ``eval_task``), greedy batched answers, reports.

``mllmkit eval RECIPE --checkpoint CKPT --task NAME`` (:mod:`mllmkit.eval.command`) runs a task
(:mod:`mllmkit.eval.task` says what one is; the built-ins are in :mod:`mllmkit.eval.tasks`) through
:func:`mllmkit.eval.runner.run_task` and writes a report that stamps every setting
(:mod:`mllmkit.eval.report`). Training runs the same tasks at ``train.eval_every``
(:mod:`mllmkit.train.evaluate`); :mod:`mllmkit.eval.lmms` is the lmms-eval model adapter.
Importing this package loads nothing heavy.
"""
