"""noise.py silences the third-party warnings it names, and only those."""

import warnings

from dsunlearn.settings.noise import silence_known_noise


def warn_from(module: str, message: str, category=FutureWarning):
    warnings.warn_explicit(message, category, filename=f"{module.replace('.', '/')}.py", lineno=1, module=module)


def test_only_the_known_noise_is_silenced():
    with warnings.catch_warnings(record=True) as shown:
        warnings.simplefilter("always")
        silence_known_noise()
        for name, replacement in (("all_gather_into_tensor", "all_gather_single"),
                                  ("reduce_scatter_tensor", "reduce_scatter_single")):
            message = f"`torch.distributed.{name}` is deprecated. Please use `torch.distributed.{replacement}` instead."
            warn_from("torch.distributed.c10d_logger", message)  # torch with its collective wrapper
            warn_from("deepspeed.comm.torch", message)  # torch without it: DeepSpeed's call site
        warn_from("torch.distributed.distributed_c10d", "`torch.distributed.reduce_op` is deprecated")
        warn_from("dsunlearn.settings.config", "`torch.distributed.all_gather_into_tensor` is deprecated", UserWarning)
        warn_from("transformers.generation.utils", "the model's generation settings look wrong", UserWarning)
    assert [str(w.message) for w in shown] == [
        "`torch.distributed.reduce_op` is deprecated",
        "`torch.distributed.all_gather_into_tensor` is deprecated",
        "the model's generation settings look wrong",
    ]
