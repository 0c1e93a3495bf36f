"""Command-line entry point: flags -> train, sample or eval.

    python -m consistency_jax.main --config=configs/quickstart.py --workdir=/tmp/qs
    python -m consistency_jax.main --config=configs/quickstart.py --workdir=/tmp/qs --mode=sample
    python -m consistency_jax.main --config=configs/quickstart.py --workdir=/tmp/qs --mode=edit \
        --config.edit.task=inpaint --config.edit.images=digit.png --config.edit.masks=hole.png
    python -m consistency_jax.main --config=configs/cifar10_ict.py --workdir=... --config.training.batch_size=512
"""

import difflib
import errno
import logging as std_logging
import os
import sys

import ml_collections
from absl import app, flags, logging
from ml_collections import config_flags

from consistency_jax import host_memory, parallel
from consistency_jax import workdir as workdir_lib
from consistency_jax.errors import UserError

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Experiment config file (configs/*.py).", lock_config=True)
flags.DEFINE_string("workdir", None, "Directory for checkpoints, logs and samples (local or gs://).")
flags.DEFINE_enum("mode", "train", ["train", "sample", "eval", "edit"],
                  "train: train (resuming from the workdir); sample: write samples of a checkpoint to .npz "
                  "and PNG; eval: write metrics of a checkpoint to JSON; edit: zero-shot editing of "
                  "config.edit.images with a consistency model (results beside the images).")
flags.DEFINE_integer("step", None, "Checkpoint step for sample/eval (default: the latest).")
flags.DEFINE_bool("distributed", False, "Call jax.distributed.initialize() (TPU pods, SLURM, clusters).")
flags.DEFINE_string("coordinator_address", None,
                    "host:port of process 0, to start a multi-process job by hand (with --num_processes and "
                    "--process_id); not needed on TPU pods or under SLURM.")
flags.DEFINE_integer("num_processes", None, "Number of processes of a job started with --coordinator_address.")
flags.DEFINE_integer("process_id", None, "This process's index (0..num_processes-1) with --coordinator_address.")
flags.mark_flags_as_required(["config", "workdir"])


class _QuietLibraries(std_logging.Filter):
    """Drops INFO lines of orbax and TFDS (orbax logs every step of every save); keeps their warnings."""

    _NOISY = (os.sep + "orbax" + os.sep, os.sep + "tensorflow_datasets" + os.sep)

    def filter(self, record: std_logging.LogRecord) -> bool:
        if record.name == "asyncio" and "exception was never retrieved" in record.getMessage():
            # orbax's write tasks orphaned by a failed save or restore, which is reported on its own:
            # thousands of lines of tracebacks that say nothing more.
            return False
        return record.levelno >= std_logging.WARNING or not any(p in record.pathname for p in self._NOISY)


def _drop_closed_loop_callbacks(original):
    """sys.excepthook without the 'Event loop is closed' tracebacks of tensorstore writes that outlive a failed save.

    When a background save fails (a full disk), orbax closes its event loop while
    tensorstore still completes the other writes; each completion prints a
    traceback from C (hundreds of them) before the one-line error of the run.
    """
    def hook(kind, value, traceback):
        if kind is RuntimeError and str(value) == "Event loop is closed":
            return
        original(kind, value, traceback)

    return hook


# Write errors that mean "no room": the run stops with one line, and the same command resumes it later.
_STORAGE_FULL = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)


def fail(message: str, code: int = 1) -> None:
    """Ends the program with `message` alone on stderr: bad input gets no traceback and no flag help."""
    sys.stderr.write(message.rstrip() + "\n")
    sys.stderr.flush()
    sys.exit(code)


def parse_flags(argv: list[str]) -> list[str]:
    """absl's flag parsing, with one-line messages for a misspelt --config.<field> or a config file that fails."""
    try:
        return FLAGS(argv)
    except flags.Error as e:  # a value of the wrong type, a missing value, an unknown top-level flag
        fail(f"{e}\nSee python -m consistency_jax.main --helpshort.", code=2)
    except (KeyError, AttributeError) as e:  # ml_collections: an override of a field the config lacks
        fail(unknown_field_message(argv) or f"Invalid --config override: {e}", code=2)
    return []


def unknown_field_message(argv: list[str]) -> str | None:
    """'--config.training.batch_szie: config.training has no field ...; did you mean ...? Valid fields: ...'."""
    paths = [a.split("=", 1)[1] for a in argv[1:] if a.startswith("--config=")]
    try:  # ml_collections sets the flag's value only after every override parsed: load the file again
        config = FLAGS["config"].parser.parse(paths[-1])
    except Exception:  # noqa: BLE001 -- fall back to ml_collections' own message
        return None
    for arg in argv[1:]:
        if not arg.startswith("--config."):
            continue
        path = arg[len("--config."):].split("=", 1)[0]
        node, parts = config, path.split(".")
        for depth, part in enumerate(parts):
            section = "config" + "".join(f".{p}" for p in parts[:depth])
            if not isinstance(node, ml_collections.ConfigDict):
                return f"--config.{path}: {section} is a value ({node!r}), not a section with fields."
            if part not in node:
                fields = sorted(node.keys())
                close = difflib.get_close_matches(part, fields, n=1)
                hint = f" Did you mean {section}.{close[0]}?" if close else ""
                return (f"--config.{path}: {section} has no field {part!r}.{hint} Valid fields of {section}: "
                        f"{', '.join(fields)}.")
            node = node[part]
    return None


def main(argv):
    if len(argv) > 1:
        fail(f"Unexpected arguments: {' '.join(argv[1:])} (flags take the form --name=value).", code=2)
    logging.get_absl_handler().addFilter(_QuietLibraries())
    sys.excepthook = _drop_closed_loop_callbacks(sys.excepthook)
    try:
        parallel.maybe_initialize_distributed(FLAGS.distributed, FLAGS.coordinator_address, FLAGS.num_processes,
                                              FLAGS.process_id)
    except ValueError as e:
        fail(str(e), code=2)
    if FLAGS.mode == "train" and FLAGS.step is not None:
        fail(f"--step={FLAGS.step} selects a checkpoint for --mode=sample, eval and edit; --mode=train always "
             f"resumes from the newest intact checkpoint in the workdir.", code=2)
    # Imported after distributed start-up: nothing may touch the devices before it.
    from consistency_jax.experiment import ConfigError, validate_config

    config_file = config_flags.get_config_filename(FLAGS["config"])
    try:
        config = FLAGS.config
        config.get("method")  # a config file that failed to load raises here
    except AttributeError:
        fail(f"--config={config_file}: get_config() must return an ml_collections.ConfigDict.", code=2)
    except OSError as e:
        lines = [line.strip() for line in str(e).splitlines() if line.strip()]
        fail(f"--config={config_file} cannot be loaded: {lines[-1]}", code=2)
    parallel.use_cpu_devices(config.mesh.cpu_devices)  # before validate_config builds the mesh
    # Validated before the heavy imports below (TensorFlow via clu), so a bad value fails in seconds.
    try:
        validate_config(config, FLAGS.mode)
        workdir_lib.check_usable(FLAGS.workdir, must_exist=FLAGS.mode != "train")
    except ConfigError as e:
        fail(f"Invalid config: {e}", code=2)
    except UserError as e:
        fail(str(e), code=2)
    logging.info("Config:\n%s", config)
    host_memory.keep_freed_memory_on_cpu()  # the backend runs now (validate_config built the mesh)

    from consistency_jax import train
    from consistency_jax.evaluation import generate

    try:
        if FLAGS.mode == "train":
            train.train_and_evaluate(config, FLAGS.workdir)
        elif FLAGS.mode == "sample":
            generate.run_sample(config, FLAGS.workdir, FLAGS.step)
        elif FLAGS.mode == "edit":
            from consistency_jax.evaluation import edit

            try:
                edit.check_edit_config(config)
            except ConfigError as e:
                fail(f"Invalid config: {e}", code=2)
            edit.run_edit(config, FLAGS.workdir, FLAGS.step)
        else:
            generate.run_eval(config, FLAGS.workdir, FLAGS.step)
    except UserError as e:
        fail(f"{type(e).__name__}: {e}")
    except OSError as e:
        if e.errno not in _STORAGE_FULL:
            raise
        fail(f"{e.strerror}: {e.filename or ''} ({type(e).__name__}). The checkpoints written before are complete; "
             f"free space and run the same command again to resume.")


if __name__ == "__main__":
    app.run(main, flags_parser=parse_flags)
