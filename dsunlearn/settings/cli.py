"""The command line of a settings dataclass, the same for every command (train, eval, relearn): ``--config
FILE.yaml`` plus one flag per field (``--train.lr 2e-6``), with each field's docstring as its help."""

from __future__ import annotations


def settings_parser(settings_class: type, prog: str, launched: bool = False):
    """The jsonargparse parser of ``settings_class`` for the command ``prog``. ``launched``: the command runs as ranks
    that the deepspeed launcher may start, which appends ``--local_rank`` (the rank comes from the environment)."""
    from jsonargparse import ActionConfigFile, ArgumentParser, set_parsing_settings

    set_parsing_settings(docstring_parse_attribute_docstrings=True)
    parser = ArgumentParser(prog=prog, description=settings_class.__doc__, default_meta=False)
    parser.add_argument("--config", action=ActionConfigFile, help="YAML file of settings (flags after it override)")
    parser.add_class_arguments(settings_class, as_group=False)
    if launched:
        parser.add_argument("--local_rank", type=int, default=-1, help="set by the deepspeed launcher (ignored)")
    return parser
