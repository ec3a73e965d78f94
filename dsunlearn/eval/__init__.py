"""Evaluation: the end-of-run evaluation (``evaluation``, with its settings in ``eval_config``, the per-rank shards in
``sharding``, the teacher-forced and generated measurements in ``likelihood`` and ``generation``, the summaries in
``summary``), the evaluation during training (``eval_during``), membership inference (``mia``), the three
applications (``applications``), metrics from their libraries (``metrics``), the report (``report``) and relearning
(``relearn``).

May import ``settings``, ``data``, ``objective``, ``kernels`` and ``runtime``; never ``tools`` or the trainer.
"""
