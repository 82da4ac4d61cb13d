"""Training configs (`get_config(arg)` in each file) and `load`, which reads one as the
`--config=FILE[:ARG]` flag of the trainer does, for tools that take a run's config."""
from __future__ import annotations

import importlib.util
import os


def load(spec: str):
    """The ConfigDict of "configs/digits.py:flow" (a file, then its argument, if any)."""
    from dico_jax.errors import MissingFile, UserError

    path, _, arg = str(spec).partition(":")
    if not os.path.isfile(path):
        raise MissingFile(f"config file {path} does not exist (expected FILE.py[:ARG], e.g. "
                          "configs/digits.py:flow)")
    module_spec = importlib.util.spec_from_file_location(
        f"_config_{os.path.splitext(os.path.basename(path))[0]}", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    if not hasattr(module, "get_config"):
        raise UserError(f"config file {path} defines no get_config()")
    try:
        return module.get_config(arg) if arg else module.get_config()
    except (TypeError, ValueError) as err:
        raise UserError(f"config {spec}: {err}") from None
