"""ACT's networks: the discriminator and the DDPM-style generator (ADM with conv resampling).

Parameter counts are computed with jax.eval_shape and compared with the
reference networks' counts, which were computed by instantiating the
reference's own PyTorch modules (kong13661/ACT models/unet.py,
models/discriminator_cifar10.py, models/discriminator_imagenet.py on
diffusers 0.23.1) with the settings of train_cifar10.py, train_imagenet64.py
and lsun_cat_256.py, outside this project.
"""

import importlib.util
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from consistency_jax.models import create_model
from consistency_jax.models.adm import ADM
from consistency_jax.models.discriminator import Discriminator

CONFIG_DIR = pathlib.Path(__file__).resolve().parents[1] / "configs"

# (config file, reference generator params, reference discriminator params)
REFERENCE_COUNTS = {
    "cifar10_act": (27_498_886, 17_976_834),
    "imagenet64_act": (107_601_667, 53_901_570),
    "lsun_cat256_act": (113_673_219, 56_985_090),
}
# The reference discriminators carry a second output layer `to_logit_fx` (Linear(4 C, 1)) that they never use.
UNUSED_TO_LOGIT_FX = {"cifar10_act": 4 * 256 + 1, "imagenet64_act": 4 * 512 + 1, "lsun_cat256_act": 4 * 512 + 1}
# CIFAR-10: the reference generator has a 6-channel output conv (3x3 from 128) and keeps 3 channels;
# ImageNet: ADM's label embedding has one more (null-class) row of 512 than the reference's 1000.
GENERATOR_DIFFERENCE = {"cifar10_act": -(3 * 128 * 9 + 3), "imagenet64_act": 512, "lsun_cat256_act": 0}

TINY_DISC = dict(channels=(8, 16), num_res_blocks=1, attn_resolutions=(4,), num_head_channels=8)


def load_config(name):
    spec = importlib.util.spec_from_file_location(name, CONFIG_DIR / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config()


def param_count(model, image_shape, with_labels):
    x = jnp.zeros((1, *image_shape))
    labels = jnp.zeros((1,), jnp.int32) if with_labels else None
    shapes = jax.eval_shape(lambda: model.init({"params": jax.random.key(0)}, x, jnp.zeros((1,)), labels,
                                               train=False))["params"]
    return sum(int(np.prod(leaf.shape)) for leaf in jax.tree.leaves(shapes))


@pytest.mark.parametrize("name", sorted(REFERENCE_COUNTS))
def test_act_configs_have_the_reference_networks(name):
    config = load_config(name)
    shape = (config.data.image_size, config.data.image_size, config.data.num_channels)
    conditional = config.data.num_classes > 0
    generator, discriminator = REFERENCE_COUNTS[name]
    assert param_count(create_model(config.model), shape, conditional) == generator + GENERATOR_DIFFERENCE[name]
    disc = Discriminator(**config.method.discriminator, num_classes=config.data.num_classes)
    assert param_count(disc, shape, conditional) == discriminator - UNUSED_TO_LOGIT_FX[name]


def random_params(model, x, labels=None, seed=0):
    init = jax.jit(lambda key: model.init({"params": key}, x, jnp.zeros((x.shape[0],)), labels, train=False))
    params = init(jax.random.key(seed))["params"]
    leaves, tree = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.key(seed + 1), len(leaves))
    # Every leaf perturbed: the zero-initialised convolutions would hide the blocks they end.
    return jax.tree.unflatten(tree, [p + 0.1 * jax.random.normal(k, p.shape) for p, k in zip(leaves, keys)])


def test_discriminator_is_one_logit_per_image_conditioned_on_sigma_and_class():
    model = Discriminator(**TINY_DISC, num_classes=3)
    x = jax.random.normal(jax.random.key(0), (4, 8, 8, 1))
    labels = jnp.array([0, 1, 2, 0])
    params = random_params(model, x, labels)
    apply = jax.jit(lambda p, x, s, c: model.apply({"params": p}, x, s, c, train=False))
    logits = apply(params, x, jnp.full((4,), 0.5), labels)
    assert logits.shape == (4,) and logits.dtype == jnp.float32
    # Each image's logit depends on its own image only.
    np.testing.assert_allclose(apply(params, x[:1], jnp.full((1,), 0.5), labels[:1]), logits[:1], rtol=1e-5)
    assert float(jnp.abs(apply(params, x, jnp.full((4,), 3.0), labels) - logits).min()) > 1e-4
    assert float(jnp.abs(apply(params, x, jnp.full((4,), 0.5), (labels + 1) % 3) - logits).min()) > 1e-4


def test_discriminator_output_norm_is_the_only_difference_between_the_variants():
    with_norm = param_count(Discriminator(**TINY_DISC), (8, 8, 1), False)
    without = param_count(Discriminator(**TINY_DISC, output_norm=False), (8, 8, 1), False)
    assert with_norm - without == 2 * 16  # GroupNorm scale and bias


def test_discriminator_rejects_sizes_it_cannot_pool():
    with pytest.raises(ValueError, match="divisible by 4"):
        Discriminator(**TINY_DISC).init(jax.random.key(0), jnp.zeros((1, 6, 6, 1)), jnp.zeros((1,)), train=False)
    with pytest.raises(ValueError, match="class_labels must be given"):
        Discriminator(**TINY_DISC, num_classes=2).init(jax.random.key(0), jnp.zeros((1, 8, 8, 1)), jnp.zeros((1,)),
                                                       train=False)


def test_adm_conv_resampling_replaces_the_resampling_res_blocks():
    """resblock_updown=False: a strided 3x3 conv down and a 3x3 conv after nearest upsampling (DDPM, diffusers)."""
    tiny = dict(model_channels=8, channel_mult=(1, 2), num_res_blocks=1, attn_resolutions=(), num_head_channels=8,
                scale_shift_norm=False)
    model = ADM(**tiny, resblock_updown=False)
    x = jax.random.normal(jax.random.key(0), (2, 8, 8, 1))
    params = random_params(model, x)
    assert set(params["enc8_down"]) == {"kernel", "bias"} and params["enc8_down"]["kernel"].shape == (3, 3, 8, 8)
    assert set(params["dec4_up"]) == {"kernel", "bias"} and params["dec4_up"]["kernel"].shape == (3, 3, 16, 16)
    assert "conv0" in random_params(ADM(**tiny), x)["enc8_down"]  # the default: BigGAN-style res blocks
    out = jax.jit(lambda p: model.apply({"params": p}, x, jnp.zeros((2,)), None, train=False))(params)
    assert out.shape == x.shape and bool(jnp.all(jnp.isfinite(out)))
