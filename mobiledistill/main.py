"""Entry point: `python -m mobiledistill.main --config=configs/progressive.py[:variant] --workdir=DIR`.

Every config is a recipe run by one engine (mobiledistill.engine): a single job (a pre-training pipeline such as
configs/progressive.py, a fine-tuning / task-distillation run such as configs/finetune_glue.py) or a list of stages
(`c.stages`: configs/peakd.py, configs/mobilebert_task.py) handing their models on. `--config.mode=eval`
re-evaluates a finished fine-tuning run and writes its predictions.

Re-running the same command resumes: finished stages are skipped and the interrupted one continues from its last
checkpoint. `--dry_run` prints the plan of every stage (sizes, FLOPs, a memory estimate) without training or reading
the workdir.
Exit codes: 0 done, 2 bad input (one line saying what and what is valid), 3 preempted by SIGTERM (re-run to continue).
"""

import os
import sys

from absl import app, flags, logging
from ml_collections import config_flags

from mobiledistill import engine, sharding

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file, e.g. configs/progressive.py:local.",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Where stages keep checkpoints, metrics and the report (local or "
                               "gs://).")
_DRY_RUN = flags.DEFINE_bool("dry_run", False, "Print the plan, parameter counts, FLOPs and memory; do not train.")
_DEVICES = flags.DEFINE_integer("devices", None, "With --dry_run: plan for this many devices (default: this "
                                "machine's).")
_ALLOW = flags.DEFINE_bool("allow_config_change", False, "Resume a workdir whose recorded config differs.")


def _fail(message: str, code: int = 2):
    print(f"error: {message}", file=sys.stderr, flush=True)
    sys.exit(code)


def main(argv):
    if len(argv) > 1:
        _fail(f"unexpected arguments {argv[1:]}; options are --config, --workdir, --dry_run, --devices, "
              f"--allow_config_change and --config.<field>=<value>")
    from mobiledistill.checkpoint import CheckpointError
    from mobiledistill.config import ConfigError
    from mobiledistill.convert import ConversionError
    from mobiledistill.data.errors import DataError
    from mobiledistill.train import NonFiniteLoss, Preempted

    logging.set_verbosity(logging.WARNING)  # Orbax logs every save at INFO
    c = _CONFIG.value
    if c is None:
        _fail("--config is required, e.g. --config=configs/progressive.py:local")
    try:
        c.get("kind")
    except OSError as e:  # ml_collections reports a config file that failed to load on first use
        lines = [line.strip() for line in str(e).splitlines() if line.strip()]
        _fail(f"cannot load --config={flags.FLAGS['config'].serialize().split('=', 1)[-1]}: {lines[-1]}")
    workdir = _WORKDIR.value
    if workdir and "://" not in workdir:
        workdir = os.path.abspath(workdir)  # Orbax needs absolute paths; gs:// URLs stay as they are
    try:
        if _DRY_RUN.value:
            import jax
            print(engine.describe(c, _DEVICES.value or jax.device_count()))
            return
        if not workdir:
            _fail("--workdir is required (a local directory or gs://bucket/path)")
        sharding.initialize_distributed()
        engine.run(c, workdir, allow_config_change=_ALLOW.value)
    except Preempted as e:
        _fail(str(e), code=3)
    except (ConfigError, DataError, CheckpointError, ConversionError, NonFiniteLoss, ValueError) as e:
        _fail(str(e))


def _parse(argv):
    """Parses flags, turning config-file and override errors into one line (absl would print a usage banner)."""
    try:
        return flags.FLAGS(argv)
    except (flags.Error, KeyError, ValueError, TypeError, AttributeError, OSError, SyntaxError, ImportError) as e:
        cause = e if isinstance(e, KeyError) else (e.__cause__ or e.__context__)
        if isinstance(cause, KeyError):
            key = str(cause.args[0] if cause.args else "?").strip("'\"")
            bad = [a for a in argv if a.startswith("--config.") and f".{key}=" in a + "="]
            _fail(f"unknown config key {key!r} in {' '.join(bad) or ' '.join(argv[1:])}; the valid keys are in "
                  f"the config file and mobiledistill/config.py")
        lines = [line.strip() for line in str(e).splitlines() if line.strip()]
        message = lines[-1] if "Traceback" in str(e) else " ".join(lines)  # a config file raised: keep its error
        _fail(f"bad command line or config: {message}")


def run():
    from mobiledistill.errors import one_line_stderr

    one_line_stderr()
    argv = _parse(sys.argv)
    logging.use_absl_handler()
    main(argv)


if __name__ == "__main__":
    run()
