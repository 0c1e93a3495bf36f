"""Command-line entry point: flags -> train, sample or eval.

    python -m consistency_jax.main --config=configs/quickstart.py --workdir=/tmp/qs
    python -m consistency_jax.main --config=configs/quickstart.py --workdir=/tmp/qs --mode=sample
    python -m consistency_jax.main --config=configs/quickstart.py --workdir=/tmp/qs --mode=edit \
        --config.edit.task=inpaint --config.edit.images=digit.png --config.edit.masks=hole.png
    python -m consistency_jax.main --config=configs/cifar10_ict.py --workdir=... --config.training.batch_size=512
"""

import logging as std_logging
import os

from absl import app, flags, logging
from ml_collections import config_flags

from consistency_jax import parallel

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
        return record.levelno >= std_logging.WARNING or not any(p in record.pathname for p in self._NOISY)


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {' '.join(argv[1:])}")
    logging.get_absl_handler().addFilter(_QuietLibraries())
    try:
        parallel.maybe_initialize_distributed(FLAGS.distributed, FLAGS.coordinator_address, FLAGS.num_processes,
                                              FLAGS.process_id)
    except ValueError as e:
        raise app.UsageError(str(e)) from e
    # Imported after distributed start-up: nothing may touch the devices before it.
    from consistency_jax.experiment import ConfigError, validate_config

    config = FLAGS.config
    logging.info("Config:\n%s", config)
    # Validated before the heavy imports below (JAX, orbax), so a bad value fails in seconds.
    try:
        validate_config(config)
    except ConfigError as e:
        raise app.UsageError(f"Invalid config: {e}") from e

    from consistency_jax import train
    from consistency_jax.evaluation import generate

    if FLAGS.mode == "train":
        train.train_and_evaluate(config, FLAGS.workdir)
    elif FLAGS.mode == "sample":
        generate.run_sample(config, FLAGS.workdir, FLAGS.step)
    elif FLAGS.mode == "edit":
        from consistency_jax.evaluation import edit

        try:
            edit.check_edit_config(config)
        except ConfigError as e:
            raise app.UsageError(f"Invalid config: {e}") from e
        edit.run_edit(config, FLAGS.workdir, FLAGS.step)
    else:
        generate.run_eval(config, FLAGS.workdir, FLAGS.step)


if __name__ == "__main__":
    app.run(main)
