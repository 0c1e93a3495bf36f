"""What the sCM tangent costs: one jax.jvp through the network, against a forward pass and a backward pass.

For a config's network (its TrigFlow function, methods/scm.py) at a batch size it
times, after compiling each once: the forward pass F(x_t / sd, t); the JVP of
Algorithm 1 (primal and tangent together); a forward + backward pass (the
gradient of a scalar of F); the whole sCT objective with its gradient (forward,
JVP, backward: a train step without the optimizer); and iCT's equivalent (student
forward + backward, teacher forward) for comparison. With --attention both of the
framework's attention implementations are timed ('xla': einsum-softmax-einsum;
'dot_product_attention': jax.nn.dot_product_attention, which JAX lowers through XLA
unless implementation='cudnn' is forced, and that cuDNN kernel is a custom_vjp
without a forward-mode rule, so jax.jvp cannot go through it).

Usage:
  python -m benchmarks.jvp_cost --config=configs/quickstart_scm.py --batch_size=128 [--repeats=10]
  python -m benchmarks.jvp_cost --config=configs/cifar10_scm_ct.py --batch_size=8 --attention
"""

import json
import os
import statistics
import time

import jax
import jax.numpy as jnp
import ml_collections
from absl import app, flags
from ml_collections import config_flags

from consistency_jax import methods
from consistency_jax.models import create_model

_CONFIG = config_flags.DEFINE_config_file("config", None, "An sCM experiment config.", lock_config=True)
_BATCH = flags.DEFINE_integer("batch_size", 16, "Batch size of every timed computation.")
_REPEATS = flags.DEFINE_integer("repeats", 10, "Timed runs per computation (the median is reported).")
_ATTENTION = flags.DEFINE_bool("attention", False, "Also time attention_impl='dot_product_attention'.")
_JSON = flags.DEFINE_string("json_out", None, "Append the results as one JSON line to this file.")


def _median_seconds(fn, *args) -> tuple[float, float, float]:
    """(compile + first run seconds, median wall seconds of the later runs, their mean process CPU seconds).

    The CPU time (all of XLA's threads) is what a run costs on a busy machine too; on a
    shared 2-core host the wall time depends on the other jobs, the CPU time much less.
    """
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    first = time.perf_counter() - start
    times = []
    cpu_start = time.process_time()
    for _ in range(_REPEATS.value):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - start)
    return first, statistics.median(times), (time.process_time() - cpu_start) / _REPEATS.value


def time_network(config: ml_collections.ConfigDict, batch_size: int) -> dict[str, float]:
    cls = methods.get_method(config.method.name)
    image_shape = (config.data.image_size, config.data.image_size, config.data.num_channels)
    fn = cls.make_function(config, create_model(config.model))
    num_classes = config.data.num_classes
    method = cls(config, fn, image_shape, num_classes, teacher_fn=fn if cls.teacher == "required" else None)
    keys = jax.random.split(jax.random.PRNGKey(0), 5)
    params = fn.init(keys[0], image_shape, num_classes > 0)
    sd = fn.sigma_data
    x0 = jax.random.uniform(keys[1], (batch_size, *image_shape), minval=-1, maxval=1)
    z = sd * jax.random.normal(keys[2], x0.shape)
    t = jnp.linspace(0.1, 1.5, batch_size)
    labels = jax.random.randint(keys[3], (batch_size,), 0, num_classes) if num_classes else None
    x_t = jnp.cos(t)[:, None, None, None] * x0 + jnp.sin(t)[:, None, None, None] * z
    v = jnp.cos(t)[:, None, None, None] * z - jnp.sin(t)[:, None, None, None] * x0
    state = method.init_state(params, params if cls.teacher == "required" else None)

    forward = jax.jit(lambda p: fn.raw(p, x_t / sd, t, labels, train=True, dropout_rng=keys[4]))
    jvp = jax.jit(lambda p: method.tangent_jvp(p, x_t, t, v, labels, keys[4]))
    backward = jax.jit(jax.grad(lambda p: jnp.sum(fn.raw(p, x_t / sd, t, labels, train=True,
                                                         dropout_rng=keys[4]) ** 2)))
    sct = jax.jit(jax.grad(lambda p: method.objective(p, state, x0, z, t, labels, keys[4], 1.0)[0]))

    def ict_like(p):  # student forward + backward, teacher forward (iCT's step without the optimizer)
        teacher = jax.lax.stop_gradient(fn.raw(p, 0.9 * x_t / sd, 0.9 * t, labels, train=True,
                                               dropout_rng=keys[4]))
        return jnp.sum((fn.raw(p, x_t / sd, t, labels, train=True, dropout_rng=keys[4]) - teacher) ** 2)

    ict = jax.jit(jax.grad(ict_like))
    results = {}
    for name, f in (("forward", forward), ("jvp", jvp), ("forward_backward", backward),
                    ("sct_objective_grad", sct), ("ict_like_grad", ict)):
        first, median, cpu = _median_seconds(f, params)
        results[f"{name}_s"], results[f"{name}_cpu_s"], results[f"{name}_compile_s"] = median, cpu, first
    for kind in ("s", "cpu_s"):
        results[f"jvp_over_forward_{kind}"] = results[f"jvp_{kind}"] / results[f"forward_{kind}"]
        results[f"sct_over_ict_{kind}"] = results[f"sct_objective_grad_{kind}"] / results[f"ict_like_grad_{kind}"]
    return results


def main(argv):
    del argv
    config = _CONFIG.value
    rows = {}
    impls = ["xla", "dot_product_attention"] if _ATTENTION.value else [config.model.get("attention_impl", "xla")]
    for impl in impls:
        cfg = ml_collections.ConfigDict(config.to_dict())
        if "attention_impl" in cfg.model:
            cfg.model.attention_impl = impl
        rows[impl] = time_network(cfg, _BATCH.value)
    load = os.getloadavg()
    print(f"{config.model.name}, batch {_BATCH.value}, {jax.devices()[0].platform}, "
          f"{os.cpu_count()} CPUs, load average {load[0]:.2f}")
    names = ["forward", "jvp", "forward_backward", "sct_objective_grad", "ict_like_grad"]
    for kind, label in (("s", "median wall seconds"), ("cpu_s", "mean process CPU seconds")):
        keys = [f"{n}_{kind}" for n in names] + [f"jvp_over_forward_{kind}", f"sct_over_ict_{kind}"]
        print(f"{label}:")
        print(f"{'attention':24s}" + "".join(f"{k.removesuffix('_' + kind):>20s}" for k in keys))
        for impl, row in rows.items():
            print(f"{impl:24s}" + "".join(f"{row[k]:20.4f}" for k in keys))
    if _JSON.value:
        with open(_JSON.value, "a") as f:
            f.write(json.dumps({"config": config.model.name, "batch_size": _BATCH.value, "load": load[0],
                                "results": rows}) + "\n")


if __name__ == "__main__":
    flags.mark_flags_as_required(["config"])
    app.run(main)
