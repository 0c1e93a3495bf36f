"""Command-line entry point: flags -> train, sample or eval.

    python -m consistency_jax.main --config=configs/quickstart.py --workdir=/tmp/qs
    python -m consistency_jax.main --config=configs/quickstart.py --workdir=/tmp/qs --mode=sample
    python -m consistency_jax.main --config=configs/cifar10_ict.py --workdir=... --config.training.batch_size=512
"""

from absl import app, flags, logging
from ml_collections import config_flags

from consistency_jax import parallel

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Experiment config file (configs/*.py).", lock_config=True)
flags.DEFINE_string("workdir", None, "Directory for checkpoints, logs and samples (local or gs://).")
flags.DEFINE_enum("mode", "train", ["train", "sample", "eval"],
                  "train: train (resuming from the workdir); sample: write samples of a checkpoint to .npz "
                  "and PNG; eval: write metrics of a checkpoint to JSON.")
flags.DEFINE_integer("step", None, "Checkpoint step for sample/eval (default: the latest).")
flags.DEFINE_bool("distributed", False, "Call jax.distributed.initialize() (TPU pods, SLURM, clusters).")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {' '.join(argv[1:])}")
    parallel.maybe_initialize_distributed(FLAGS.distributed)
    # Imported after distributed start-up: nothing may touch the devices before it.
    from consistency_jax import train
    from consistency_jax.evaluation import generate

    from consistency_jax.experiment import ConfigError

    config = FLAGS.config
    logging.info("Config:\n%s", config)
    try:
        if FLAGS.mode == "train":
            train.train_and_evaluate(config, FLAGS.workdir)
        elif FLAGS.mode == "sample":
            generate.run_sample(config, FLAGS.workdir, FLAGS.step)
        else:
            generate.run_eval(config, FLAGS.workdir, FLAGS.step)
    except ConfigError as e:
        raise app.UsageError(f"Invalid config: {e}") from e


if __name__ == "__main__":
    app.run(main)
