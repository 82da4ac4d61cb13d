"""Every command in README.md and docs/ works as written.

The commands are the lines of fenced code blocks (a trailing backslash joins lines, `&&`
separates commands, `#` starts a comment) and the code spans that are whole `python`
commands. The placeholder convention of the docs:

- `[ ... ]` is an optional part, `[A | B]` a choice between optional parts, and a part
  ending in `...` (`[--config.key=value ...]`) stands for options of that form;
- `A|B` inside one word is a choice of values (`--image-size 256|512`, `logs|status`);
- a word in capitals (`DIR`, `N`, `gs://BUCKET/runs`) is a value the reader fills in;
- `...` on its own elides the rest of a command: only its program is checked.

Every optional part and every choice must be valid with every other choice: each is
checked on the command without optional parts and with that part alone. For each command
its program must exist (a module of this project, a file of the repository), and every
variant must parse with the command's own parser: its flags exist and take the values
given (for absl commands, config files load and `--config.*` fields exist). The cheap ones
then run, in the order the docs give them, in one scratch directory: the digits commands
with tiny settings appended, and `launch/tpu.py` with `--dry-run`.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import importlib
import importlib.util
import io
import json
import os
import re
import runpy
import shlex
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PLACEHOLDER = re.compile(r"\b[A-Z][A-Z0-9_]*\b")
WHOLE_PLACEHOLDER = re.compile(r"^[A-Z][A-Z0-9_]*$")
# absl entry points: parsed in a process of their own (their flags are process-global).
ABSL_MODULES = ("dico_jax.main", "dico_jax.sample", "dico_jax.tools.evaluate_run",
                "dico_jax.tools.plan")
# What the cheap commands get appended (later flags win): a couple of steps, a few samples.
TINY = {
    "dico_jax.main": [
        "--config.num_train_steps=2", "--config.global_batch_size=16",
        "--config.log_every_steps=1", "--config.checkpoint_every_steps=2",
        "--config.keep_every_steps=2", "--config.sample_at_end=False",
        "--config.eval.every_steps=0"],
    "dico_jax.sample": [
        "--config.sampling.num_samples=16", "--config.sampling.batch_size=16",
        "--config.sampling.respacing=2", "--config.sampling.num_steps=1"],
    "dico_jax.evaluate": [],
}


def doc_files() -> list[str]:
    files = ["README.md"]
    for folder in ("docs", "launch"):
        path = os.path.join(ROOT, folder)
        if os.path.isdir(path):
            files += sorted(f"{folder}/{f}" for f in os.listdir(path) if f.endswith(".md"))
    return files


@dataclasses.dataclass
class Command:
    where: str  # file:line
    text: str
    env: dict
    argv: list  # the words after any VAR=value prefix, with the placeholder markup

    @property
    def program(self) -> tuple[str, str] | None:
        """("module", name), ("script", path), ("shell", path) or None (another tool)."""
        a = self.argv
        if len(a) >= 3 and re.fullmatch(r"python3?", a[0]) and a[1] == "-m":
            return "module", a[2]
        if len(a) >= 2 and re.fullmatch(r"python3?", a[0]):
            return "script", a[1]
        if len(a) >= 2 and a[0] == "bash":
            return "shell", a[1]
        return None

    def args(self) -> list:
        kind, _ = self.program
        return self.argv[3:] if kind == "module" else self.argv[2:]


def split_commands(text: str, where: str) -> list[Command]:
    out = []
    for part in re.split(r"\s&&\s", text):
        words = shlex.split(part, comments=True)
        env = {}
        while words and re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*=\S*", words[0]):
            key, _, value = words.pop(0).partition("=")
            env[key] = value
        if words:
            out.append(Command(where, part.strip(), env, words))
    return out


def collect() -> list[Command]:
    commands = []
    for name in doc_files():
        with open(os.path.join(ROOT, name)) as f:
            lines = f.read().split("\n")
        prose, in_block, pending, start = [], False, "", 0
        for i, line in enumerate(lines, 1):
            if line.strip().startswith("```"):
                in_block = not in_block
                prose.append("")
                continue
            if not in_block:
                prose.append(line)
                continue
            prose.append("")
            if not pending:
                start = i
            if line.rstrip().endswith("\\"):
                pending += line.rstrip()[:-1] + " "
                continue
            commands += split_commands(pending + line, f"{name}:{start}")
            pending = ""
        # Code spans of the prose that are whole commands.
        text = "\n".join(prose)
        for match in re.finditer(r"`([^`]+)`", text):
            span = " ".join(match.group(1).split())
            if re.match(r"^([A-Z_]+=\S+ )*python3? (-m dico_jax|launch/)", span):
                line = text[:match.start()].count("\n") + 1
                commands += split_commands(span, f"{name}:{line}")
    return commands


def expand(words: list) -> list[list]:
    """The variants of a command: no optional part, then each optional part (each choice of
    a `[A | B]`) alone; every `A|B` word is expanded in each. Parts ending in `...` are
    dropped (they describe a form, not a value)."""
    base, groups, current = [], [], None
    for word in words:
        if current is None and word.startswith("["):
            current, word = [[]], word[1:]
        if current is None:
            base.append(("word", word))
            continue
        closes = word.endswith("]")
        word = word[:-1] if closes else word
        if word == "|":
            current.append([])
        elif word:
            current[-1].append(word)
        if closes:
            groups.append(current)
            base.append(("group", len(groups) - 1))
            current = None
    assert current is None, f"unclosed [ in {words}"

    def build(chosen: dict) -> list:
        out = []
        for kind, value in base:
            if kind == "word":
                out.append(value)
            elif value in chosen:
                out += chosen[value]
        return out

    variants = [build({})]
    for g, choices in enumerate(groups):
        for choice in choices:
            if choice and choice[-1] != "...":
                variants.append(build({g: choice}))
    expanded = []
    for variant in variants:  # word choices: the first of each, then each other in turn
        words = [w.split("|")[0] if _is_choice(w) else w for w in variant]
        expanded.append(words)
        for i, w in enumerate(variant):
            if _is_choice(w):
                expanded += [words[:i] + [alt] + words[i + 1:] for alt in w.split("|")[1:]]
    return expanded


def _is_choice(word: str) -> bool:
    return "|" in word and not word.startswith(("'", '"', "-c"))


def fill(words: list) -> list:
    """Placeholder values as a parser can take them: a whole capital word becomes 1 (a
    number or a name); capitals inside a path stay (they parse as text)."""
    out = []
    for w in words:
        flag, eq, value = w.partition("=")
        if eq and w.startswith("-") and WHOLE_PLACEHOLDER.match(value):
            out.append(f"{flag}=1")
        else:
            out.append("1" if WHOLE_PLACEHOLDER.match(w) else w)
    return out


def has_placeholder(words: list) -> bool:
    return any(PLACEHOLDER.search(w.split("=", 1)[-1]) and not w.startswith("--config=")
               for w in words)


COMMANDS = collect()
PROJECT = [c for c in COMMANDS
           if c.program and (c.program[0] != "module" or c.program[1].startswith("dico_jax."))]


def test_the_docs_hold_the_commands_of_each_job():
    modules = {c.program[1] for c in COMMANDS if c.program and c.program[0] == "module"}
    assert {"dico_jax.main", "dico_jax.sample", "dico_jax.evaluate", "dico_jax.convert",
            "dico_jax.data.extract", "dico_jax.tools.plan", "dico_jax.tools.local_pod"} <= modules
    assert any(c.program == ("script", "launch/tpu.py") for c in COMMANDS)
    assert all(expand(c.args()) for c in COMMANDS if c.program)


def test_every_program_exists():
    missing = []
    for c in COMMANDS:
        if not c.program:
            continue
        kind, name = c.program
        if kind == "module":
            if importlib.util.find_spec(name.removesuffix(".__main__")) is None:
                missing.append(f"{c.where}: no module {name}")
        elif not os.path.isfile(os.path.join(ROOT, name)):
            missing.append(f"{c.where}: no file {name}")
    assert not missing, "\n".join(missing)


def test_every_config_file_named_exists():
    missing = []
    for c in PROJECT:
        for i, word in enumerate(c.argv):
            path = word.split("=", 1)[1] if word.startswith("--config=") else (
                c.argv[i + 1] if word == "--config" and i + 1 < len(c.argv) else "")
            if WHOLE_PLACEHOLDER.match(path):
                continue  # a preset to fill in (`--config=PRESET`), named in the text around it
            if path and not os.path.isfile(os.path.join(ROOT, path.split(":")[0])):
                missing.append(f"{c.where}: no config file {path}")
    assert not missing, "\n".join(missing)


def test_the_readme_numbers_come_from_the_record():
    """Quality and speed figures of the README (paragraphs and list items naming FID, img/s
    or MFU) are those of the record in docs/, where each has its date, device and command."""
    with open(os.path.join(ROOT, "README.md")) as f:
        readme = f.read()
    record = ""
    for name in doc_files()[1:]:
        with open(os.path.join(ROOT, name)) as f:
            record += f.read()
    stray = [f"README.md: {n} in {part[:60]!r}..." for part in re.split(r"\n\s*\n|\n- ", readme)
             if re.search(r"FID|img/s|MFU", part)
             for n in re.findall(r"\d[\d,]*\.\d+(?:e\d+)?", part)
             if not re.search(rf"(?<![\d.,]){re.escape(n)}(?![\d])", record)]
    assert not stray, "numbers of the README missing from docs/:\n" + "\n".join(stray)


class _Parsed(Exception):
    pass


def _parse_argparse(command: Command, argv: list) -> str | None:
    """None if the command's own argparse parser takes `argv`, else its error."""
    kind, name = command.program
    original = argparse.ArgumentParser.parse_args

    def parse_then_stop(self, args=None, namespace=None):
        original(self, args, namespace)
        raise _Parsed

    stderr = io.StringIO()
    saved_argv = sys.argv
    sys.argv = [name, *argv]
    argparse.ArgumentParser.parse_args = parse_then_stop
    try:
        with contextlib.redirect_stderr(stderr):
            if kind == "script":
                module = runpy.run_path(os.path.join(ROOT, name))
                return _launch_parse(module, argv)
            if importlib.util.find_spec(name).submodule_search_locations:
                name += ".__main__"  # a package run with -m
            main = importlib.import_module(name).main
            main(argv) if main.__code__.co_argcount else main()
    except _Parsed:
        return None
    except SystemExit as exit_:
        return stderr.getvalue().strip().splitlines()[-1] if stderr.getvalue() else str(exit_)
    finally:
        argparse.ArgumentParser.parse_args = original
        sys.argv = saved_argv
    return "the command ran past its argument parsing"


def _launch_parse(module: dict, argv: list) -> None:
    if "parse_args" in module:
        module["parse_args"](argv)
    else:
        module["main"]()  # a bench script: reads sys.argv; its parsing is patched to stop
    raise _Parsed


def test_every_argparse_command_parses():
    failures = []
    for c in PROJECT:
        if c.program[0] == "shell" or c.program[0] == "module" and c.program[1] in ABSL_MODULES:
            continue
        if "..." in c.args() or not c.args():  # elided, or the program named in prose
            continue
        for variant in expand(c.args()):
            argv = fill(variant)
            inner = argv.index("--") if "--" in argv else None
            error = _parse_argparse(c, argv)
            if error:
                failures.append(f"{c.where}: {shlex.join(variant)}: {error}")
            if inner is not None:  # local_pod's command runs as written too
                assert argv[inner + 1:inner + 3] == ["python", "-m"], c.text
    assert not failures, "\n".join(failures)


@pytest.mark.slow
def test_every_absl_command_parses():
    """Each absl command's variants go to one process of that command, which parses them
    with its flags and config (`_absl_worker` below)."""
    by_module = {}
    for c in COMMANDS:
        words = c.argv
        if "--" in words:  # local_pod -- python -m dico_jax.main ...
            words = words[words.index("--") + 1:]
        if len(words) < 3 or words[:2] != ["python", "-m"] or words[2] not in ABSL_MODULES:
            continue
        if "..." in words or len(words) == 3:
            continue
        for variant in expand(words[3:]):
            by_module.setdefault(words[2], []).append((c.where, fill(variant)))
    assert set(by_module) == set(ABSL_MODULES)
    procs = {m: subprocess.Popen([sys.executable, __file__, m], cwd=ROOT, text=True,
                                 stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                 stderr=subprocess.PIPE, env=_env())
             for m in by_module}
    failures = []
    for module, proc in procs.items():
        out, err = proc.communicate(json.dumps([argv for _, argv in by_module[module]]))
        assert proc.returncode == 0, err[-3000:]
        for (where, argv), error in zip(by_module[module], json.loads(out)):
            if error:
                failures.append(f"{where}: {module} {shlex.join(argv)}: {error}")
    assert not failures, "\n".join(failures)


def _env(**extra) -> dict:
    env = dict(os.environ, PYTHONPATH=ROOT, TF_CPP_MIN_LOG_LEVEL="3", **extra)
    return env


def _absl_worker(module: str) -> None:
    """In a process of its own: imports `module` as `__main__` with `app.run` replaced by a
    parse of each argv read from stdin; prints the errors (null: parsed) as JSON."""
    from absl import app, flags

    argvs = json.load(sys.stdin)
    results = []

    def parse_each(main, *args, **kwargs):
        del main, args, kwargs
        for argv in argvs:
            flags.FLAGS.unparse_flags()
            for name in [n for n in flags.FLAGS if n.startswith("config.")]:
                delattr(flags.FLAGS, name)  # the previous command's overrides
            # ml_collections finds the `--config.*` overrides in sys.argv when `--config` is
            # parsed: a config file flag as it is parsed, a config dict flag here.
            sys.argv = [module, *argv]
            config = flags.FLAGS["config"]
            try:
                if not any(a.startswith(("--config=", "-config=")) for a in argv):
                    config.parse(config.default)
                flags.FLAGS([module, *argv])
                flags.FLAGS.config  # a config file loads when first read
                results.append(None)
            except Exception as err:  # noqa: BLE001 (every parse error is reported)
                results.append(f"{type(err).__name__}: {' '.join(str(err).split())[:300]}")
        print(json.dumps(results))
        sys.exit(0)

    app.run = parse_each
    sys.argv = [module]
    runpy.run_module(module, run_name="__main__", alter_sys=True)


def _value(argv: list, flag: str) -> str | None:
    for i, word in enumerate(argv):
        if word.startswith(f"{flag}="):
            return word.split("=", 1)[1]
        if word == flag and i + 1 < len(argv):
            return argv[i + 1]
    return None


# The one training run as the docs give it: the flow example (a flow run trains, evaluates its
# settings at start-up, samples and scores through every path the DDPM demo takes, which
# test_eval_during_training trains through the same entry point).
RUN_TRAINING = "configs/digits.py:flow"


@pytest.mark.slow
def test_the_cheap_commands_run(tmp_path):
    """In the docs' order, in one scratch directory: the digits flow example's training with
    tiny settings appended, then every sampling command of its workdir and every scoring of
    the samples so written; launch/tpu.py with --dry-run."""
    os.symlink(os.path.join(ROOT, "configs"), tmp_path / "configs")
    done, ran, workdirs, written = set(), [], set(), set()
    for c in PROJECT:
        if c.program == ("script", "launch/tpu.py"):
            for variant in expand(c.args()):
                argv = fill(variant) + ["--dry-run"]
                out = io.StringIO()
                with contextlib.redirect_stdout(out):
                    module = runpy.run_path(os.path.join(ROOT, "launch/tpu.py"))
                    assert module["main"](argv) == 0, f"{c.where}: {shlex.join(argv)}"
                assert "gcloud" in out.getvalue(), (c.where, argv)
            continue
        if c.program[0] != "module" or c.program[1] not in TINY or has_placeholder(c.args()):
            continue
        argv = max(expand(c.args()), key=len)  # the variant with the most options
        module = c.program[1]
        if module == "dico_jax.main" and _value(argv, "--config") != RUN_TRAINING:
            continue
        if module == "dico_jax.sample" and _value(argv, "--workdir") not in workdirs:
            continue
        if module == "dico_jax.evaluate" and _value(argv, "--samples") not in written:
            continue
        if shlex.join(argv) in done:
            continue
        done.add(shlex.join(argv))
        cmd = [sys.executable, "-m", module, *argv, *TINY[module]]
        result = subprocess.run(cmd, cwd=tmp_path, env=_env(**c.env), text=True,
                                capture_output=True, timeout=900)
        assert result.returncode == 0, (f"{c.where}: {shlex.join(cmd)} exited "
                                        f"{result.returncode}:\n{result.stderr[-3000:]}")
        if module == "dico_jax.main":
            workdirs.add(_value(argv, "--workdir"))
        if module == "dico_jax.sample":
            written.add(_value(argv, "--out"))
        ran.append(module)
    # The training first; then at least one sampling of its workdir and one scoring.
    assert ran[0] == "dico_jax.main" and ran.count("dico_jax.main") == 1, ran
    assert {"dico_jax.sample", "dico_jax.evaluate"} <= set(ran), ran


if __name__ == "__main__":
    _absl_worker(sys.argv[1])
