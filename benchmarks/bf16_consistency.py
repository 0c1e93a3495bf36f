"""bfloat16 vs float32 compute for the iCT loss at adjacent sigmas of the N = 1281 grid.

The consistency loss compares two forward passes at neighbouring noise levels
(sigma_{i+1} / sigma_i - 1 is 0.8-1.5% at N = 1281), while bfloat16 rounds at
0.4% per operation. This measures what that does to the loss and its gradient
on a partly trained network:

1. trains the config's network in float32 for --train_steps iCT steps (the
   digits quickstart by default; any config and --config.x=... overrides work);
2. for adjacent pairs (sigma_i, sigma_{i+1}) of the 1281-point Karras grid near
   each of --sigmas, and for a batch of pairs drawn from iCT's lognormal index
   distribution ("iCT mix"), evaluates with the same params, images, noise and
   dropout rng in float32 and in bfloat16 compute (float32 params, as
   `model.dtype='bfloat16'` trains):
     delta err   ||D_bf16 - D_f32|| / ||D_f32||, D = f(x + s_{i+1} z) - f(x + s_i z)
                 the student-teacher difference the loss is made of
     dist err    relative error of the batch-mean pseudo-Huber distance
     grad err    ||g_bf16 - g_f32|| / ||g_f32|| of the loss gradient; grad cos
     batch noise ||g_A - g_B|| / ||g_A|| for two disjoint float32 batches: the
                 gradient noise SGD lives with anyway, and that noise scaled
                 to the paper's batch (--paper_batch, 1/sqrt(batch))
3. prints a table and a JSON line (--json_out appends it).

bfloat16 is harmless when grad err is well below the batch noise at the paper's
batch and grad cos is near 1. XLA may keep excess precision inside fused
elementwise ops on CPU; run with XLA_FLAGS=--xla_allow_excess_precision=false
to round every op to bfloat16 (the strict case; closer to GPU elementwise code).

Usage:
  python -m benchmarks.bf16_consistency [--config=configs/quickstart.py] [--train_steps=400] [--batch=64]
"""

import json
import math
import os
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import app, flags
from ml_collections import config_flags

from consistency_jax import methods, parallel, schedules, train
from consistency_jax.data import pipeline
from consistency_jax.experiment import create_experiment, validate_config
from consistency_jax.methods import distances, ict
from consistency_jax.models import create_model

def _flat(tree) -> jax.Array:
    return jnp.concatenate([jnp.ravel(leaf) for leaf in jax.tree.leaves(tree)])


def _rel(a: jax.Array, b: jax.Array) -> float:
    return float(jnp.linalg.norm(a - b) / jnp.linalg.norm(b))


def make_pair_evaluator(config: ml_collections.ConfigDict, dtype: str, image_shape: tuple[int, int, int]):
    """(params, x, labels, z, s_lo, s_hi, dropout_rng) -> (D, distance per image, gradient of the loss)."""
    fn = methods.get_method(config.method.name).make_function(config, create_model(config.model, dtype=dtype))
    c = ict.huber_c(config, image_shape)

    def loss(params, x, labels, z, s_lo, s_hi, dropout_rng):
        b = lambda s: s[:, None, None, None]  # noqa: E731
        student = fn(params, x + b(s_hi) * z, s_hi, labels, train=True, dropout_rng=dropout_rng)
        teacher = jax.lax.stop_gradient(fn(params, x + b(s_lo) * z, s_lo, labels, train=True,
                                           dropout_rng=dropout_rng))
        distance = distances.pseudo_huber(student, teacher, c)
        return jnp.mean(schedules.ict_loss_weight(s_lo, s_hi) * distance), (student - teacher, distance)

    def evaluate(params, x, labels, z, s_lo, s_hi, dropout_rng):
        (_, (delta, distance)), grad = jax.value_and_grad(loss, has_aux=True)(
            params, x, labels, z, s_lo, s_hi, dropout_rng)
        return delta, distance, _flat(grad)

    return jax.jit(evaluate)


def measure(config: ml_collections.ConfigDict, train_steps: int, batch: int, num_scales: int,
            sigma_targets: list[float], paper_batch: int) -> dict:
    exp = create_experiment(config, jax.devices()[:1])
    state, step = exp.create_state(), train.jit_train_step(exp)
    data = pipeline.create_train_iterator(config.data, global_batch_size=config.training.batch_size,
                                          seed=config.seed, process_index=0, process_count=1)
    start = time.time()
    for _ in range(train_steps):
        state, metrics = step(state, parallel.global_batch(next(data), exp.mesh))
    loss_after_training = float(metrics["loss"]) if train_steps else float("nan")
    train_seconds = time.time() - start
    params = jax.device_get(state.params)

    param = config.parametrization
    grid = np.asarray(schedules.karras_sigmas(num_scales, param.sigma_min, param.sigma_max, param.rho))
    measure_data = pipeline.create_train_iterator(config.data, global_batch_size=batch, seed=config.seed + 1,
                                                  process_index=0, process_count=1)
    batches = [next(measure_data) for _ in range(2)]
    evaluators = {d: make_pair_evaluator(config, d, exp.image_shape) for d in ("float32", "bfloat16")}
    key = jax.random.PRNGKey(1)

    def pairs_at(index: int) -> tuple[jax.Array, jax.Array]:
        return jnp.full((batch,), grid[index], jnp.float32), jnp.full((batch,), grid[index + 1], jnp.float32)

    rows = []
    cases = []
    for target in sigma_targets:
        index = int(np.clip(np.searchsorted(grid, target), 0, num_scales - 2))
        cases.append((f"sigma {grid[index]:.4g}", *pairs_at(index)))
    lo, hi = schedules.sample_ict_sigma_pairs(jax.random.PRNGKey(2), batch, jnp.int32(num_scales), num_scales,
                                              config.method.p_mean, config.method.p_std, param.sigma_min,
                                              param.sigma_max, param.rho)
    cases.append(("iCT mix", lo, hi))
    for name, s_lo, s_hi in cases:
        out = {}
        for which, images in (("A", batches[0]), ("B", batches[1])):
            x, labels = jnp.asarray(images["image"]), images.get("label")
            z = jax.random.normal(jax.random.fold_in(key, ord(which)), x.shape)
            rng = jax.random.fold_in(key, 100 + ord(which))
            for d in (("float32", "bfloat16") if which == "A" else ("float32",)):
                out[which, d] = evaluators[d](params, x, labels, z, s_lo, s_hi, rng)
        (delta32, dist32, grad32), (delta16, dist16, grad16) = out["A", "float32"], out["A", "bfloat16"]
        noise = _rel(out["B", "float32"][2], grad32)
        rows.append({
            "pairs": name,
            "sigma_gap": float(jnp.mean((s_hi - s_lo) / s_lo)),
            "delta_rel_err": _rel(delta16, delta32),
            "dist_rel_err": float(abs(jnp.mean(dist16) - jnp.mean(dist32)) / jnp.mean(dist32)),
            "grad_rel_err": _rel(grad16, grad32),
            "grad_cos": float(jnp.dot(grad16, grad32) / (jnp.linalg.norm(grad16) * jnp.linalg.norm(grad32))),
            "batch_noise": noise,
            "batch_noise_at_paper_batch": noise * math.sqrt(batch / paper_batch),
        })
    return {
        "benchmark": "bf16_consistency",
        "model": config.model.name,
        "image_shape": list(exp.image_shape),
        "param_count": int(sum(np.prod(p.shape) for p in jax.tree.leaves(params))),
        "train_steps": train_steps,
        "train_seconds": train_seconds,
        "loss_after_training": loss_after_training,
        "batch": batch,
        "num_scales": num_scales,
        "paper_batch": paper_batch,
        "xla_flags": os.environ.get("XLA_FLAGS", ""),
        "platform": jax.devices()[0].platform,
        "rows": rows,
    }


def format_table(result: dict) -> str:
    lines = [f"{result['model']} {result['param_count']:,} params, {result['image_shape']}, trained "
             f"{result['train_steps']} float32 steps (loss {result['loss_after_training']:.4g}); batch "
             f"{result['batch']}, adjacent pairs of N = {result['num_scales']}; XLA_FLAGS='{result['xla_flags']}'",
             f"{'pairs':>16s} {'gap':>7s} {'delta err':>10s} {'dist err':>9s} {'grad err':>9s} {'grad cos':>9s} "
             f"{'batch noise':>12s} {'@' + str(result['paper_batch']):>8s}"]
    for row in result["rows"]:
        lines.append(f"{row['pairs']:>16s} {row['sigma_gap']:7.2%} {row['delta_rel_err']:10.4f} "
                     f"{row['dist_rel_err']:9.4f} {row['grad_rel_err']:9.4f} {row['grad_cos']:9.5f} "
                     f"{row['batch_noise']:12.4f} {row['batch_noise_at_paper_batch']:8.4f}")
    return "\n".join(lines)


def _define_flags() -> None:
    # Defined only when run as a script, so that importing this module next to
    # another entry point that defines --config does not clash.
    config_flags.DEFINE_config_file("config", "configs/quickstart.py", "Experiment config (iCT).")
    flags.DEFINE_integer("train_steps", 400, "float32 iCT steps before measuring.")
    flags.DEFINE_integer("batch", 64, "Images per measured batch.")
    flags.DEFINE_integer("num_scales", 1281, "Points of the Karras grid the pairs are adjacent on.")
    flags.DEFINE_list("sigmas", ["0.01", "0.1", "0.33", "1", "5", "20", "80"],
                      "Measure the adjacent pair nearest each of these sigmas.")
    flags.DEFINE_integer("paper_batch", 4096, "Batch to scale the minibatch noise to.")
    flags.DEFINE_string("json_out", None, "Append the result as one JSON line to this file.")


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {' '.join(argv[1:])}")
    args = flags.FLAGS
    if args.config.method.name != "ict":
        raise app.UsageError(f"This benchmark measures the iCT loss; the config's method is "
                             f"{args.config.method.name!r}.")
    validate_config(args.config)
    result = measure(args.config, args.train_steps, args.batch, args.num_scales,
                     [float(s) for s in args.sigmas], args.paper_batch)
    print(format_table(result))
    line = json.dumps(result)
    print(line)
    if args.json_out:
        with open(args.json_out, "a") as f:
            f.write(line + "\n")


if __name__ == "__main__":
    _define_flags()
    app.run(main)
