"""Run an experiments/ script inside the test process, as `python experiments/<script> <args>`.

A subprocess pays ~4 s of CPU importing JAX, lpe_jax, scipy and matplotlib, then traces every
program again (the persistent XLA cache of tests/conftest.py saves only the compiles); in the
test process the imports are done once and the jit caches are shared between runs. What a script
does is the same: the module is executed afresh as ``__main__`` under ``common.run`` (its path
checks, its one-line input errors, absl's flag parsing and exit codes), with every flag the
previous script defined removed first, so each run starts from the script's own defaults.
The command line itself (argv, the interpreter, imports from a bare checkout) is covered by the
tests that still launch each script as a process (the 2-process runs of tests/test_experiments.py
and tests/test_experiments_estimate.py, the SIGKILLed estimate.py, abliterate.py's end-to-end run
in tests/test_abliterate_script.py, tests/test_scripts_cli.py, the README's bash blocks).
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import logging
import os
import runpy
import socket
import subprocess
import sys
import traceback
from pathlib import Path

import absl.logging
import jax
from absl import app, flags

ROOT = Path(__file__).resolve().parents[1]
EXP = ROOT / "experiments"
# absl's own flags (app's, logging's, --help: app.run defines those once), defined before any
# script's; every other flag is a script's, removed before the next script runs.
app.define_help_flags()
_ABSL_FLAGS = frozenset(flags.FLAGS)
# The experiments/ modules a script imports by name (`import common`): executed afresh per run.
_SCRIPT_MODULES = ("common", "train_toy_common")


@dataclasses.dataclass(frozen=True)
class Completed:
    """What a finished script left: its exit status and what it printed (subprocess's fields)."""

    args: list[str]
    returncode: int
    stdout: str
    stderr: str


def run_main(script: str, *args: str, cwd: Path = ROOT) -> Completed:
    """`python experiments/<script> *args` from the directory `cwd`, in this process.

    The exit status is the process's: SystemExit's (0 when main returns, 1 for an input error
    reported by common.run), 1 with the traceback on stderr for any other exception. stdout and
    stderr are what the script printed and logged."""
    fv = flags.FLAGS
    for name in set(fv) - _ABSL_FLAGS:
        delattr(fv, name)
    fv.unparse_flags()
    # app.run raises --verbosity to INFO when the command line leaves it unset, on its first run
    # in a process only; every run here starts from that default instead.
    fv.set_default("verbosity", 0)
    for name in _SCRIPT_MODULES:
        sys.modules.pop(name, None)
    argv = [str(EXP / script), *args]
    out, err = io.StringIO(), io.StringIO()
    old_argv, old_path, old_cwd = sys.argv, list(sys.path), os.getcwd()
    code: int | str | None = 0
    # JAX's settings as a fresh process has them: some test modules set the matmul precision to
    # 'highest' for the whole test process when imported.
    precision = jax.config.jax_default_matmul_precision
    jax.config.update("jax_default_matmul_precision", None)
    # absl's log records (INFO and up, as a script's process writes them to stderr) go to its
    # stderr too: tests read lines such as estimate.py's "drew N rollouts".
    log = logging.StreamHandler(err)
    log.setFormatter(absl.logging.PythonFormatter())
    absl.logging.get_absl_logger().addHandler(log)
    try:
        sys.argv = argv
        sys.path.insert(0, str(EXP))  # as `python experiments/x.py` puts the script's folder first
        os.chdir(cwd)
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            runpy.run_path(str(EXP / script), run_name="__main__")
    except SystemExit as e:
        code = e.code
    except Exception:  # a crash: the process would print the traceback and exit 1
        traceback.print_exc(file=err)
        code = 1
    finally:
        absl.logging.get_absl_logger().removeHandler(log)
        jax.config.update("jax_default_matmul_precision", precision)
        sys.argv, sys.path[:] = old_argv, old_path
        os.chdir(old_cwd)
    if code is None:
        code = 0
    elif not isinstance(code, int):  # sys.exit("message"): printed to stderr, status 1
        err.write(f"{code}\n")
        code = 1
    return Completed(argv, code, out.getvalue(), err.getvalue())


def run_script(script: str, *args: str, check: bool = True) -> Completed:
    """run_main, raising with the script's output when `check` and it exited non-zero."""
    p = run_main(script, *args)
    if check and p.returncode != 0:
        raise AssertionError(f"{script} failed ({p.returncode}):\n{p.stdout}\n{p.stderr[-4000:]}")
    return p


def script_env() -> dict[str, str]:
    """The environment of a script launched as a process: CPU JAX, this checkout's lpe_jax."""
    return {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(ROOT)}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_two_processes(script: str, *args: str) -> list[str]:
    """Run `script` as a 2-process jax.distributed job on this host; returns both stdouts."""
    port = _free_port()
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                str(EXP / script),
                *args,
                f"--coordinator_address=127.0.0.1:{port}",
                "--num_processes=2",
                f"--process_id={i}",
            ],
            env=script_env(),
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i in range(2)
    ]
    outs = [p.communicate(timeout=600) for p in procs]
    for p, (_, se) in zip(procs, outs, strict=True):
        assert p.returncode == 0, se[-3000:]
    return [so for so, _ in outs]
