"""Command-line parsing shared by every entry point.

A mistake on the command line (an unknown or misspelled flag or config field, a value of the
wrong type, a missing required flag, a config file that does not exist or does not load) is
reported as one line, `<tool>: error: <message>`, with exit status 2 (`dico_jax.errors`), while
the flags are parsed: before any start-up work, so no log line comes before it.

    command.run(tool, main)          instead of absl's `app.run(main)`
    command.ArgumentParser(tool)     instead of `argparse.ArgumentParser`

Both spell options with underscores (`--vae_weights`, as absl does); `ArgumentParser` also
accepts the dashed spelling (`--vae-weights`) without showing it in `--help`. `--help` lists
the flags with one line each: a config flag shows its help, not the whole default config.
"""
from __future__ import annotations

import argparse
import difflib
import os
import re
import sys
from typing import Any, Callable, NoReturn, Sequence

from dico_jax import errors


def fail(tool: str, message: str) -> NoReturn:
    """Prints `<tool>: error: <message>` as one line on stderr and exits with status 2."""
    sys.stdout.flush()
    print(f"{tool}: error: {' '.join(str(message).split())}", file=sys.stderr, flush=True)
    raise SystemExit(errors.EXIT_USER_ERROR)


def nearest(name: str, choices: Sequence[str]) -> str:
    """' (did you mean X?)' for the closest of `choices`, or ''."""
    close = difflib.get_close_matches(name, list(choices), n=1, cutoff=0.6)
    return f" (did you mean {close[0]}?)" if close else ""


# ---------------------------------------------------------------------------------------------
# absl flags and ml_collections config flags.


def _config_flags(flag_values: Any = None) -> list[Any]:
    from absl import flags
    from ml_collections.config_flags import config_flags as cf

    seen, found = set(), []
    # absl has no public iterator over the flag objects.
    for flag in (flag_values or flags.FLAGS)._flags().values():  # noqa: SLF001
        if isinstance(flag, cf._ConfigFlag) and id(flag) not in seen:  # noqa: SLF001
            seen.add(id(flag))
            found.append(flag)
    return found


def shorten_help() -> None:
    """`--help` shows a config flag's help line, not its whole default config."""
    for flag in _config_flags():
        flag.default_as_str = None


def _argv_value(argv: Sequence[str], name: str) -> str | None:
    for i, arg in enumerate(argv):
        if arg.startswith(f"--{name}="):
            return arg.split("=", 1)[1]
        if arg == f"--{name}" and i + 1 < len(argv):
            return argv[i + 1]
    return None


def _field_paths(config: Any, prefix: str = "") -> list[str]:
    paths = []
    for key, value in config.items():
        paths.append(prefix + key)
        if hasattr(value, "items"):
            paths.extend(_field_paths(value, f"{prefix}{key}."))
    return paths


def _unknown_field(argv: Sequence[str], flag: Any) -> str | None:
    """The message for the first `--<flag>.path` of argv that names no field of the config."""
    from ml_collections import ConfigDict

    try:
        config = flag.value
    except Exception:  # noqa: BLE001 - the config itself failed: reported otherwise
        return None
    if not isinstance(config, ConfigDict):
        return None
    paths = _field_paths(config)
    for arg in argv:
        match = re.match(rf"--{re.escape(flag.name)}\.([\w.]+)", arg)
        if match and match.group(1) not in paths:
            path = match.group(1)
            parent = path.rsplit(".", 1)[0] + "." if "." in path else ""
            siblings = [p for p in paths if p.startswith(parent) and "." not in p[len(parent):]]
            hint = nearest(path, siblings).replace("(did you mean ",
                                                   f"(did you mean --{flag.name}.")
            return f"--{flag.name}.{path}: the config has no field {path!r}{hint}"
    return None


def flag_error(err: BaseException, argv: Sequence[str], flag_values: Any = None) -> str:
    """One line saying what is wrong with the command line, from the error absl or
    ml_collections raised while parsing it."""
    for flag in _config_flags(flag_values):
        unknown = _unknown_field(argv, flag)
        if unknown:
            return unknown
    text = str(err.args[0] if isinstance(err, KeyError) and err.args else err)
    if isinstance(err, (AttributeError, KeyError)):
        # ml_collections names the missing field, and the nearest one when there is one.
        names = re.findall(r"\w+", text.split("Did you mean")[0])
        hint = re.search(r'Did you mean "(\w+)" instead of "(\w+)"', text)
        if names:
            name = hint.group(2) if hint else names[0]
            for arg in argv:
                match = re.match(r"--(\w+)\.([\w.]+)", arg)
                if match and name in match.group(2).split("."):
                    path = match.group(2)
                    fix = ""
                    if hint:
                        fixed = ".".join(hint.group(1) if part == name else part
                                         for part in path.split("."))
                        fix = f" (did you mean --{match.group(1)}.{fixed}?)"
                    return f"--{match.group(1)}.{path}: the config has no field {path!r}{fix}"
    if "Error whilst parsing config file" in text:
        # The config file's own error (e.g. an unknown preset) is the last line of its traceback.
        last = [line for line in text.splitlines() if line.strip()][-1].strip()
        last = re.sub(r"^\w+(Error|Exception): ", "", last)
        flag = re.match(r"flag (--\S+?=\S+):", text)
        return f"{flag.group(1)}: {last}" if flag else last
    missing = re.search(r"Flag --(\w+) must have a value other than None", text)
    if missing:
        return f"--{missing.group(1)} is required"
    exclusive = re.search(r"Exactly one of \(([\w, ]+)\) must have a value", text)
    if exclusive:
        names = [f"--{n.strip()}" for n in exclusive.group(1).split(",")]
        return f"give exactly one of {' or '.join(names)}"
    unknown = re.match(r"Unknown command line flag '([\w.-]+)'(?:\. Did you mean: ([\w.-]+)\b)?",
                       text)
    if unknown:
        hint = f" (did you mean --{unknown.group(2)}?)" if unknown.group(2) else ""
        return f"--{unknown.group(1)}: unknown flag{hint}"
    bad = re.match(r"flag (--[\w.]+)=(.*?): (.*)", text, re.S)
    if bad:
        name, value, why = bad.groups()
        if "invalid literal for int()" in why:
            why = "expected an integer"
        elif "could not convert string to float" in why:
            why = "expected a number"
        return f"{name}={value}: {why}"
    return text


def _check_config_files(flags_list: list[Any], argv: Sequence[str]) -> None:
    """A config file flag whose file is missing or failed to load: raise its error now (the
    library defers it to the first read of the config)."""
    from ml_collections.config_flags import config_flags as cf

    for flag in flags_list:
        value = flag.value
        if isinstance(value, cf._ErrorConfig):  # noqa: SLF001
            given = _argv_value(argv, flag.name) or ""
            path = given.split(":", 1)[0]
            if path and not os.path.exists(path):
                raise errors.MissingFile(f"--{flag.name}={given}: no such config file {path!r}")
            raise errors.UserError(f"--{flag.name}={given}: "
                                   f"{object.__getattribute__(value, '_error')}")


def absl_parser(tool: str, flag_values: Any = None) -> Callable[[list[str]], list[str]]:
    """A `flags_parser` for `absl.app.run` that reports every mistake as one line."""

    def parse(argv: list[str]) -> list[str]:
        from absl import flags

        values = flag_values or flags.FLAGS
        shorten_help()
        try:
            rest = values(argv)
            _check_config_files(_config_flags(values), argv)
        except errors.UserError as err:
            if errors.show_tracebacks():
                raise
            fail(tool, str(err))
        except Exception as err:  # noqa: BLE001 - whatever parsing raised is a command-line mistake
            if errors.show_tracebacks():
                raise
            fail(tool, flag_error(err, argv, values))
        if len(rest) > 1:
            fail(tool, f"unexpected arguments: {' '.join(rest[1:])} (every option is a --flag)")
        return rest

    return parse


def define_config_dict(tool: str, name: str, config: Any, help_string: str) -> None:
    """`config_flags.DEFINE_config_dict`, whose `--<name>.FIELD=VALUE` overrides are read from
    sys.argv as it is defined: a mistake in one is reported as one line there and then."""
    from ml_collections import config_flags

    try:
        config_flags.DEFINE_config_dict(name, config, help_string, lock_config=True)
    except Exception as err:  # noqa: BLE001 - the overrides are the user's command line
        if errors.show_tracebacks():
            raise
        fail(tool, flag_error(err, sys.argv))


def parse_config(spec: str, overrides: Sequence[str] = ()) -> Any:
    """The config that `--config=spec` and the `--config.FIELD=VALUE` `overrides` give, parsed
    as the training command parses them and checked as it checks them before it starts
    (`train.check_settings`); a mistake raises `UserError`. For commands that hand a config
    on (`launch/tpu.py`)."""
    from absl import flags
    from ml_collections import config_flags

    values = flags.FlagValues()
    argv = ["config", f"--config={spec}", *overrides]
    holder = config_flags.DEFINE_config_file("config", None, flag_values=values, sys_argv=argv)
    try:
        values(argv)
        _check_config_files([values["config"]], argv)
        config = holder.value
    except errors.UserError:
        raise
    except Exception as err:  # noqa: BLE001 - whatever parsing raised is a mistake in the spec
        raise errors.UserError(flag_error(err, argv)) from None
    from dico_jax import train

    train.check_settings(config)
    return config


def run(tool: str, main: Callable[[list[str]], Any]) -> None:
    """`absl.app.run(main)`, with the command line checked by `absl_parser(tool)`."""
    from absl import app

    # TensorFlow's and XLA's C++ notes at INFO (oneDNN, absl::InitializeLog) as the modules
    # load: nothing to act on.
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "1")
    app.run(main, flags_parser=absl_parser(tool))


# ---------------------------------------------------------------------------------------------
# argparse.


def _underscored(option: str) -> str:
    return "--" + option[2:].replace("-", "_") if option.startswith("--") else option


def _aliases(options: Sequence[str]) -> list[str]:
    """The options with each `--a-b` spelled `--a_b` first and the dashed form kept after."""
    out: list[str] = []
    for option in options:
        for spelling in (_underscored(option), option.replace("_", "-") if option.startswith("--")
                         else option):
            if spelling not in out:
                out.append(spelling)
    return out


def _one_spelling(formatter_class: type) -> type:
    """`formatter_class` showing only the first spelling of each option."""

    class Formatter(formatter_class):
        def _format_action_invocation(self, action):
            if action.option_strings:
                shown = [o for o in action.option_strings if not o.startswith("--")
                         or "-" not in o[2:]] or action.option_strings[:1]
                action = argparse.Action(shown, action.dest, nargs=action.nargs,
                                         metavar=action.metavar)
            return super()._format_action_invocation(action)

    return Formatter


class ArgumentParser(argparse.ArgumentParser):
    """`argparse.ArgumentParser` with one-line errors (`<tool>: error: ...`, exit 2) and
    options spelled with underscores (the dashed spelling accepted too)."""

    def __init__(self, tool: str | None = None, **kwargs):
        kwargs.setdefault("prog", f"python -m {tool}" if tool else None)
        kwargs["formatter_class"] = _one_spelling(
            kwargs.get("formatter_class", argparse.HelpFormatter))
        kwargs.setdefault("allow_abbrev", False)  # a shortened option is a typo, not a choice
        super().__init__(**kwargs)
        self.tool = tool or re.sub(r"^python -m ", "", self.prog).split()[0]

    def add_argument(self, *names, **kwargs):
        if names and all(n.startswith("-") for n in names):
            names = tuple(_aliases(names))
        return super().add_argument(*names, **kwargs)

    def _aliased(self, group):
        original = group.add_argument

        def add_argument(*names, **kwargs):
            if names and all(n.startswith("-") for n in names):
                names = tuple(_aliases(names))
            return original(*names, **kwargs)

        group.add_argument = add_argument
        return group

    def add_argument_group(self, *args, **kwargs):
        return self._aliased(super().add_argument_group(*args, **kwargs))

    def add_mutually_exclusive_group(self, **kwargs):
        return self._aliased(super().add_mutually_exclusive_group(**kwargs))

    def add_subparsers(self, **kwargs):
        kwargs.setdefault("parser_class", type(self))
        subparsers = super().add_subparsers(**kwargs)
        tool = self.tool
        original = subparsers.add_parser

        def add_parser(name, **kw):
            kw.setdefault("tool", tool)
            kw.setdefault("formatter_class", self.formatter_class)
            return original(name, **kw)

        subparsers.add_parser = add_parser
        return subparsers

    def error(self, message: str) -> NoReturn:
        message = re.sub(r"(--\w+)/--[\w-]+", r"\1", message)  # not the dashed alias
        unknown = re.match(r"unrecognized arguments: (\S+)", message)
        if unknown:
            given = unknown.group(1).split("=")[0]
            options = [o for a in self._actions for o in a.option_strings]
            message += nearest(_underscored(given), options)
        choice = re.search(r"invalid choice: '([^']*)' \(choose from (.*)\)", message)
        if choice:
            message += nearest(choice.group(1), re.findall(r"'([^']*)'", choice.group(2)))
        fail(self.tool, message)
