"""Sample generation for evaluation: chunked and resumable, --mode=eval's JSON, the best-FID checkpoint."""

import copy
import dataclasses
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from consistency_jax import checkpointing, experiment, train
from consistency_jax.evaluation import extractors, frechet, generate, metrics, reference_stats
from tests.helpers import tiny_config

BATCH = 8  # one chunk = one sampler batch of 8 images
REAL_MAKE_SAMPLER = generate.make_sampler


@pytest.fixture(scope="module")
def tiny():
    """An experiment on the 8 test devices and its (untrained, fixed-seed) params."""
    exp = experiment.create_experiment(tiny_config(), jax.devices()[:8])
    return exp, exp.create_state().params


class Interrupted(Exception):
    pass


def count_sampler_calls(monkeypatch, interrupt_after: int | None = None) -> list:
    """Patches make_sampler so that its calls are counted (and raise Interrupted after `interrupt_after`)."""
    calls = []

    def make_counting_sampler(exp, num_steps):
        spec, sampler = REAL_MAKE_SAMPLER(exp, num_steps)

        def counted(*args):
            if interrupt_after is not None and len(calls) == interrupt_after:
                raise Interrupted
            calls.append(args)
            return sampler(*args)

        return spec, counted

    monkeypatch.setattr(generate, "make_sampler", make_counting_sampler)
    return calls


def test_chunked_generation_equals_one_shot_and_does_not_depend_on_devices(tiny, tmp_path):
    exp, params = tiny
    in_memory, labels = generate.generate(exp, params, 20, 2, seed=3, batch_size=BATCH)
    on_disk, _ = generate.generate(exp, params, 20, 2, seed=3, batch_size=BATCH, chunk_dir=str(tmp_path / "c"))
    assert in_memory.shape == (20, 8, 8, 1) and in_memory.dtype == np.uint8 and labels is None
    np.testing.assert_array_equal(in_memory, on_disk)
    assert sorted(os.listdir(tmp_path / "c")) == ["chunk_000000.npz", "chunk_000001.npz", "chunk_000002.npz",
                                                  "manifest.json"]
    # Every chunk (including the last, cut to 4 images) holds a full batch on disk.
    stored = np.concatenate([np.load(tmp_path / "c" / f"chunk_00000{i}.npz")["images"] for i in range(3)])
    assert stored.shape == (24, 8, 8, 1)
    np.testing.assert_array_equal(stored[:20], in_memory)
    # Chunks draw different noise; fewer samples are a prefix of more.
    assert not np.array_equal(in_memory[:8], in_memory[8:16])
    fewer, _ = generate.generate(exp, params, 11, 2, seed=3, batch_size=BATCH)
    assert generate.make_sampler(exp, 2)[1] is generate.make_sampler(exp, 2)[1]  # compiled once per experiment
    np.testing.assert_array_equal(fewer, in_memory[:11])
    # One device instead of eight: the same images (up to a rare rounding flip of one level).
    exp1 = experiment.create_experiment(tiny_config(), jax.devices()[:1])
    one_device, _ = generate.generate(exp1, jax.device_get(params), 20, 2, seed=3, batch_size=BATCH)
    difference = np.abs(one_device.astype(int) - in_memory.astype(int))
    assert difference.max() <= 1 and np.mean(difference > 0) < 0.01


def test_interrupted_generation_resumes_with_identical_output(tiny, tmp_path, monkeypatch):
    exp, params = tiny
    chunk_dir = str(tmp_path / "chunks")
    expected, _ = generate.generate(exp, params, 36, 1, seed=5, batch_size=BATCH)

    count_sampler_calls(monkeypatch, interrupt_after=2)
    with pytest.raises(Interrupted):
        generate.generate(exp, params, 36, 1, seed=5, batch_size=BATCH, chunk_dir=chunk_dir)
    assert sorted(n for n in os.listdir(chunk_dir) if n.startswith("chunk")) == ["chunk_000000.npz",
                                                                                   "chunk_000001.npz"]

    calls = count_sampler_calls(monkeypatch)
    resumed, _ = generate.generate(exp, params, 36, 1, seed=5, batch_size=BATCH, chunk_dir=chunk_dir)
    assert len(calls) == 3  # chunks 2, 3 and 4 of 5
    np.testing.assert_array_equal(resumed, expected)

    # Chunks on disk are read, not recomputed: a (valid) replaced chunk shows up in the output...
    marked = np.full((BATCH, 8, 8, 1), 7, np.uint8)
    np.savez(os.path.join(chunk_dir, "chunk_000001.npz"), images=marked)
    # ...and one of the wrong shape is sampled again.
    np.savez(os.path.join(chunk_dir, "chunk_000003.npz"), images=marked[:5])
    calls = count_sampler_calls(monkeypatch)
    again, _ = generate.generate(exp, params, 36, 1, seed=5, batch_size=BATCH, chunk_dir=chunk_dir)
    assert len(calls) == 1
    np.testing.assert_array_equal(again[8:16], marked)
    np.testing.assert_array_equal(again[24:32], expected[24:32])


def test_chunks_of_other_settings_or_params_are_discarded(tiny, tmp_path):
    exp, params = tiny
    chunk_dir = str(tmp_path / "chunks")
    generate.generate(exp, params, 16, 1, seed=5, batch_size=BATCH, chunk_dir=chunk_dir)
    other_seed, _ = generate.generate(exp, params, 16, 1, seed=6, batch_size=BATCH, chunk_dir=chunk_dir)
    np.testing.assert_array_equal(other_seed, generate.generate(exp, params, 16, 1, seed=6, batch_size=BATCH)[0])
    assert json.load(open(os.path.join(chunk_dir, "manifest.json")))["seed"] == 6
    changed = jax.tree.map(lambda x: x * 1.5, params)
    assert generate.params_fingerprint(changed) != generate.params_fingerprint(params)
    from_changed, _ = generate.generate(exp, changed, 16, 1, seed=6, batch_size=BATCH, chunk_dir=chunk_dir)
    np.testing.assert_array_equal(from_changed, generate.generate(exp, changed, 16, 1, seed=6, batch_size=BATCH)[0])


def save_checkpoint(exp, workdir, step):
    """A checkpoint as training writes it, of a state whose EMA differs from the raw params."""
    state = exp.create_state()
    state = state.replace(step=state.step + step, ema_params=jax.tree.map(lambda x: x * 0.9, state.ema_params))
    checkpointer = checkpointing.Checkpointer(os.path.join(workdir, "checkpoints"), keep=1, async_save=False)
    checkpointer.save(step, state, {}, force=True)
    checkpointer.close()
    return state


def test_eval_mode_writes_the_json_result(tmp_path):
    config = tiny_config()
    config.eval.num_samples = 16
    exp = experiment.create_experiment(config)
    saved = save_checkpoint(exp, str(tmp_path), 2)
    generate.run_eval(config, str(tmp_path))
    result = json.load(open(tmp_path / "eval" / "step_00000002.json"))
    assert result["checkpoint_step"] == 2
    assert result["feature_extractor"] == "digits"
    assert result["num_samples"] == 16 and result["steps"] == [1, 2] and result["ema_rate"] == 0.9
    assert result["sigmas"] == {"1": [80.0], "2": [80.0, 0.821]}
    assert result["clip_denoised"] is True
    assert result["reference"]["config"] == "train" and result["reference"]["source"].startswith("digits train")
    assert set(result["results"]) == {"samples_1step", "samples_2step"}
    for row in result["results"].values():
        assert row["num_samples"] == 16 and row["fid"] > 0 and row["is"] >= 1
        assert 0 <= row["precision"] <= 1 and 0 <= row["recall"] <= 1
    # Only the JSON and the grids are left: the sample chunks were removed once the metrics were written.
    assert sorted(os.listdir(tmp_path / "eval")) == ["step_00000002.json", "step_00000002_1step.png",
                                                    "step_00000002_2step.png"]
    # The 1-step row is the metrics of the EMA's 1-step samples with seed + 1, computed here independently.
    images, _ = generate.generate(exp, saved.ema_params[0], 16, 1, config.seed + 1, config.sampling.batch_size)
    extractor = extractors.create_feature_extractor(config.eval, cache_dir=str(tmp_path / "eval_cache"))
    reference = reference_stats.reference_statistics(extractor, config.data, str(tmp_path / "eval_cache"), "train")
    expected = metrics.compute_metrics(extractor, images, reference)
    for key in ("fid", "is", "precision", "recall"):
        assert result["results"]["samples_1step"][key] == pytest.approx(expected[key], rel=1e-5, abs=1e-6)


class StubInception:
    """Stands in for the Inception network (no weights offline): features are a fixed function of the pixels."""

    name = "inception"

    def __call__(self, images):
        flat = images.reshape(len(images), -1).astype(np.float64) / 255
        return {"pool": flat[:, :16] + 0.5 * flat[:, 16:32], "logits": None}


def test_evaluation_against_an_adm_reference_batch(tiny, tmp_path, monkeypatch):
    """eval.reference = an ADM .npz: FID against its mu/sigma, precision/recall against its images arr_0."""
    exp, params = tiny
    monkeypatch.setattr(extractors, "create_feature_extractor", lambda *args, **kwargs: StubInception())
    rng = np.random.default_rng(0)
    reference_images = rng.integers(0, 256, (40, 8, 8, 1), np.uint8)
    a = rng.normal(size=(16, 16))
    mu, sigma = rng.normal(size=16), a @ a.T / 16 + 0.1 * np.eye(16)
    path = str(tmp_path / "VIRTUAL_digits_labeled.npz")
    np.savez(path, arr_0=reference_images, mu=mu, sigma=sigma)
    config = copy.deepcopy(exp.config)
    config.eval.update(dict(feature_extractor="inception", reference=path, num_samples=16, steps=(1,)))
    reference_stats.check_reference(config.eval)
    adm_exp = dataclasses.replace(exp, config=config, jitted_samplers=exp.jitted_samplers)
    weights = generate.Weights(step=jnp.int32(7), params=params, ema_params=(params,))
    generate.evaluate_state(adm_exp, weights, str(tmp_path), 7)

    result = json.load(open(tmp_path / "eval" / "step_00000007.json"))
    assert result["reference"] == {"config": path, "source": "ADM reference VIRTUAL_digits_labeled.npz",
                                   "num_examples": 40}
    images, _ = generate.generate(adm_exp, params, 16, 1, config.seed + 1, config.sampling.batch_size)
    features = StubInception()(images)["pool"]
    row = result["results"]["samples_1step"]
    assert row["fid"] == pytest.approx(frechet.frechet_distance(*frechet.feature_statistics(features), mu, sigma),
                                       rel=1e-6)
    precision, recall = metrics.precision_recall(StubInception()(reference_images)["pool"], features)
    assert (row["precision"], row["recall"]) == pytest.approx((precision, recall))


def test_best_checkpoint_is_replaced_only_on_improvement(tiny, tmp_path):
    exp, _ = tiny
    state = exp.create_state()
    workdir = str(tmp_path)

    def record(step, fid):
        saved_state = state.replace(step=state.step + step)
        return generate.record_evaluation(exp, saved_state, workdir, step, {"samples_1step/fid": fid,
                                                                             "samples_2step/fid": 0.0})

    assert record(10, 5.0) == {"best_fid": 5.0}
    assert record(20, 7.0) == {"best_fid": 5.0}
    assert record(30, float("nan")) == {"best_fid": 5.0}
    assert os.listdir(tmp_path / "best") == ["10"]
    assert record(40, 3.0) == {"best_fid": 3.0}
    assert os.listdir(tmp_path / "best") == ["40"]
    step, best = generate.restore_best_state(exp, workdir)
    assert step == 40 and int(best.step) == 40
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)), best.params, state.params)
    with pytest.raises(KeyError, match="samples_1step/fid"):
        generate.record_evaluation(exp, state, workdir, 50, {"samples_2step/fid": 1.0})


@pytest.mark.slow
def test_evaluation_during_training_keeps_the_best_checkpoint(tmp_path):
    config = tiny_config(num_steps=6)
    config.eval.every_steps = 2
    config.eval.steps = (1,)
    config.eval.num_samples = 16
    train.train_and_evaluate(config, str(tmp_path))
    logged = [json.loads(line) for line in open(tmp_path / "metrics.jsonl") if "best_fid" in line]
    assert [line["step"] for line in logged] == [2, 4]
    fids = [line["samples_1step/fid"] for line in logged]
    assert [line["best_fid"] for line in logged] == [fids[0], min(fids)]
    assert os.listdir(tmp_path / "best") == [str(2 + 2 * int(np.argmin(fids)))]
