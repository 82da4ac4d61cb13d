"""Every entry point reports a command-line or config mistake as one line on stderr with exit
status 2, before any start-up work (no traceback, no absl dump, no log line first)."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
from absl import flags
from ml_collections import config_flags

from dico_jax import command

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DIGITS = os.path.join(ROOT, "configs", "digits.py")


def one_line_error(args, *, help_=False):
    """Runs `python ARGS`; returns its only stderr line (exit status 2)."""
    done = subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=120, env={**os.environ, "PYTHONPATH": ROOT})
    assert done.returncode == 2, (args, done.stderr[-3000:])
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, (args, done.stderr[-3000:])
    return lines[0]


def parse_training_flags(argv, capsys):
    """The training command's flags (as dico_jax.main defines them) parsed by
    `command.absl_parser`; returns (exit status, stderr)."""
    values = flags.FlagValues()
    flags.DEFINE_string("workdir", None, "", flag_values=values)
    config_flags.DEFINE_config_file("config", None, "", flag_values=values, sys_argv=argv)
    flags.mark_flags_as_required(["config", "workdir"], flag_values=values)
    with pytest.raises(SystemExit) as exit_info:
        command.absl_parser("dico_jax.main", values)(argv)
    return exit_info.value.code, capsys.readouterr().err


@pytest.mark.parametrize("args,message", [
    (["--config=/nonexistent/nope.py", "--workdir=w"], "no such config file"),
    ([f"--config={ROOT}/configs/dico.py:XXL", "--workdir=w"], "unknown scale 'XXL'"),
    ([f"--config={DIGITS}", "--config.num_trian_steps=3", "--workdir=w"],
     "--config.num_trian_steps: the config has no field 'num_trian_steps' "
     "(did you mean --config.num_train_steps?)"),
    ([f"--config={DIGITS}", "--config.eval.evry_steps=3", "--workdir=w"],
     "(did you mean --config.eval.every_steps?)"),
    ([f"--config={DIGITS}", "--config.num_train_steps=abc", "--workdir=w"],
     "--config.num_train_steps=abc: expected an integer"),
    ([f"--config={DIGITS}", "--config.learning_rate=fast", "--workdir=w"],
     "--config.learning_rate=fast: expected a number"),
    ([f"--config={DIGITS}"], "--workdir is required"),
    ([f"--config={DIGITS}", "--wrokdir=w"], "(did you mean --workdir?)"),
    ([f"--config={DIGITS}", "--workdir=w", "extra"], "unexpected arguments: extra"),
])
def test_training_flag_mistakes_are_one_line(args, message, capsys):
    code, err = parse_training_flags(["dico_jax.main", *args], capsys)
    assert code == 2 and err.count("\n") == 1, err
    assert err.startswith("dico_jax.main: error: ") and message in err, err


def test_training_command_refuses_before_start_up(tmp_path):
    afile = tmp_path / "afile"
    afile.write_text("")
    line = one_line_error(["-m", "dico_jax.main", f"--config={DIGITS}", f"--workdir={afile}"])
    assert line == f"dico_jax.main: error: --workdir {afile} is a file; give a folder (new or a run's)"
    workdir = tmp_path / "run"
    line = one_line_error(["-m", "dico_jax.main", f"--config={DIGITS}", f"--workdir={workdir}",
                           "--config.global_bach_size=8"])
    assert "(did you mean --config.global_batch_size?)" in line
    assert not workdir.exists()


def test_sampling_mistakes_are_one_line(tmp_path):
    out = str(tmp_path / "s.npz")
    base = ["-m", "dico_jax.sample", "--out", out, "--workdir", str(tmp_path)]
    # An override is parsed as the flags are defined, before anything else.
    line = one_line_error([*base, "--config.sampling.num_sampels=3"])
    assert line == ("dico_jax.sample: error: --config.sampling.num_sampels: the config has no "
                    "field 'sampling.num_sampels' (did you mean --config.sampling.num_samples?)")
    line = one_line_error([*base, "--config.sampling.num_samples=0",
                           f"--vae_weights={tmp_path}/vae"])
    assert line == "dico_jax.sample: error: --config.sampling.num_samples=0: must be >= 1"


def test_evaluate_run_mistakes_are_one_line(tmp_path):
    line = one_line_error(["-m", "dico_jax.tools.evaluate_run", f"--workdir={tmp_path}",
                           "--config.model.hidden_size=8"])
    assert line.startswith("dico_jax.tools.evaluate_run: error: --config.model.hidden_size: only "
                           "--config.eval.*, --config.vae_weights")


def test_help_lists_one_line_per_flag_not_the_config():
    done = subprocess.run([sys.executable, "-m", "dico_jax.sample", "--help"], cwd=ROOT,
                          capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": ROOT})
    text = done.stdout
    assert "--config: Overrides of the run's sampling settings" in text, text
    assert "adam_b1" not in text and len(text.splitlines()) < 45, text
    assert not any("  " in line.strip() for line in text.splitlines()), text  # runs of spaces


def _argparse_error(capsys, fn, argv):
    with pytest.raises(SystemExit) as exit_info:
        fn(argv)
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and err.count("\n") == 1, err
    return err.strip()


def test_argparse_commands_mistakes_are_one_line(tmp_path, capsys):
    from dico_jax import evaluate
    from dico_jax.convert import __main__ as convert
    from dico_jax.data import extract, records
    from dico_jax.tools import benchmark, local_pod

    out = str(tmp_path / "o")
    cases = [
        (evaluate.parse_args, ["--samples", out, "--batch_size=0", "--digits"],
         "dico_jax.evaluate: error: --batch_size must be positive"),
        (evaluate.parse_args, ["--samples", out, "--batch_sise=4"],
         "dico_jax.evaluate: error: unrecognized arguments: --batch_sise=4 (did you mean "
         "--batch_size?)"),
        (convert.main, ["from-torch", "--model", "DiCo-XXL", "--src", out, "--out", out],
         "(did you mean DiCo-XL?)"),
        (extract.parse_args, ["--source", "folder:x", "--vae_weights", str(tmp_path), "--out",
                              out, "--batch_size", "0"],
         "dico_jax.data.extract: error: --batch_size must be >= 1, got 0"),
        (extract.parse_args, ["--source", f"folder:{tmp_path}", "--vae-weights", f"{tmp_path}/v",
                              "--out", out],
         f"error: --vae_weights {tmp_path}/v: no such file or folder"),
        (extract.parse_args, ["--source", "folder:x", "--vae_weights", str(tmp_path)],
         "dico_jax.data.extract: error: the following arguments are required: --out"),
        (records.main, [f"{tmp_path}/none"], "manifest.json does not exist"),
        (local_pod.parse_args, ["-n", "0", "--", "true"], "-n must be >= 1"),
        # An abbreviation is a typo, not a choice.
        (benchmark.main, ["--sample_step", "2"], "(did you mean --sample_steps?)"),
    ]
    for fn, argv, message in cases:
        err = _argparse_error(capsys, fn, argv)
        assert message in err, (argv, err)


def test_argparse_options_take_underscores_and_hide_the_dashed_alias():
    parser = command.ArgumentParser("tool")
    parser.add_argument("--vae-weights")
    parser.add_argument("--batch_size", type=int, required=True)
    assert parser.parse_args(["--vae-weights", "a", "--batch_size", "1"]).vae_weights == "a"
    assert parser.parse_args(["--vae_weights", "b", "--batch-size", "3"]).batch_size == 3
    text = parser.format_help()
    assert "--vae_weights" in text and "--vae-weights" not in text and "--batch-size" not in text


def test_local_pod_leaves_out_the_gloo_connection_lines():
    import io

    from dico_jax.tools import local_pod

    out = io.StringIO()
    # As two connections of one process print them: whole, or interleaved across lines.
    script = ("print('[Gloo] Rank 0 is connected to 1 peer ranks. Expected number of connected "
              "peer ranks is : 1'); print('[Gloo] Rank [Gloo] Rank 7 is connected to 6 is "
              "connected to 7 peer ranks. Expected number of connected peer ranks is : 7'); "
              "print('7 peer ranks. Expected number of connected peer ranks is : 7'); "
              "print('step 1')")
    pod = local_pod.Pod([sys.executable, "-c", script], 1, None, out=out)
    assert pod.wait(5.0) == 0
    lines = [line for line in out.getvalue().splitlines() if not line.startswith("[local_pod]")]
    assert lines == ["[0] step 1"]


def test_a_file_the_run_would_not_read_is_named():
    from configs import digits

    from dico_jax import errors, train

    config = digits.get_config()
    train.check_settings(config)
    config.vae_weights = "sd-vae-ft-ema/"
    with pytest.raises(errors.UserError, match="config.vae_weights=sd-vae-ft-ema/: the built-in "
                       "digits are pixels, so this run uses no such file"):
        train.check_settings(config)
