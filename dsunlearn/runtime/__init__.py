"""The distributed runtime: the process group, exit codes and the watchdog (``distributed``), DeepSpeed configs
(``ds_config``), the ZeRO-3 engines and the fused head (``engines``), checkpoints and their rank-count reshaping
(``checkpoints``, ``checkpoint_reshape``), the Hugging Face export (``export``), the one-pass reference cache
(``reference_cache``), the step's guards (``guards``) and phase timing (``step_timing``).

May import ``settings``, ``data``, ``objective`` and ``kernels``; never ``eval``, ``tools`` or the trainer.
"""
