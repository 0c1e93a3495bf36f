"""ACT: adversarial consistency training (Kong et al. 2024), SPEC section 3.

Consistency training with an EMA target (the original CT curriculum) plus a
discriminator D(image, sigma[, class]) that judges the generator's one-step
outputs, so that a much smaller batch suffices. Reference code:
kong13661/ACT train_cifar10.py, train_imagenet64.py, lsun_cat_256.py,
models/consistency_wrapper.py, models/loss.py, augmentation.py.

One training step (`update`) takes the global batch and splits it: half for
the generator step, a quarter of generated and a quarter of real images for
the discriminator step (the reference doubles its per-device batch for this;
`batch_split` sets another ratio).

  generator (first, with D as it was):
    n ~ U{1..N-1} on the N(k)-point Karras grid, z ~ N(0, I)
    L_G = mean[(1 - l(n)) d(f(x + s_n z, s_n), sg f_target(x + s_{n-1} z, s_{n-1}))
               + l(n) softplus(-D(aug(f(x + s_n z, s_n)), s_n))]
    then the EMA target: target <- mu target + (1 - mu) params
  discriminator (then, on images of the updated generator):
    n, n' ~ U{1..N-1} drawn independently for the generated and the real images
    L_D = mean[l(n) softplus(D(aug(sg f(x + s_n z, s_n)), s_n))]
          + mean[l(n') softplus(-D(aug(x'), s_n'))]
          + every r1_interval steps: (gamma / 2) mean[l(n') ||grad_a D(a, s_n')||^2], a = aug(x')

  l(n) = adv_weight, or adv_weight (n / (N - 1))^e with e = log_0.5(adv_weight_mid / adv_weight)
  (ImageNet-64 / LSUN: 0.6 and 0.2, e = 1.585); n / (N - 1) is where s_n lies on the grid.

The augmentation probability p (augmentation.py) moves every R1 step by
+-(batch * r1_interval / ada_length), up while an EMA of the R1 term
(gamma / 2) mean[w ||grad||^2] is above `ada_r1_threshold`, down otherwise.

The generator's params and optimizer state are the train state's own; the
method state holds the EMA target, the discriminator's params and optimizer
state, p and the R1 EMA, so a resumed run continues exactly.

Curriculum, as in the reference (not the CT paper's formula):
N(k) = round(sqrt(k / K (s1^2 - s0^2) + s0^2)) points (2 .. s1), and the
target's EMA rate mu(k) = exp(s0 ln(mu0) / (N(k) - 1)) (0.81 at the start for
mu0 = 0.9): schedules.ct_num_scales(code='act') and ct.target_ema_rate, the
functions of CT. Where the reference differs from the paper:
configs/cifar10_act.py.

`base='ict'` (not in the paper or the reference; configs/quickstart_act.py)
swaps the CT part for iCT's (methods/ict.py, SPEC section 2): the doubling
curriculum from s0 to s1 intervals, the lognormal interval draw (p_mean,
p_std) for the generator's and the discriminator's noise levels, the weight
1 / (sigma_n - sigma_{n-1}) on d, and the student under stop-gradient as the
target (no EMA target in the method state). The adversarial term and l(n)
are unchanged.

Distance: 'pseudo_huber' (iCT's, c = 0.00054 sqrt(d)), 'l2' (the Euclidean
norm, the reference's 'l2') or 'squared_l2'. The paper trains with LPIPS,
which needs VGG weights that cannot be downloaded here; it is not offered.
"""

import math
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import optax

from consistency_jax import config_rules as rules
from consistency_jax import augmentation, schedules
from consistency_jax.methods import ct, distances
from consistency_jax.methods.base import Method
from consistency_jax.models.discriminator import Discriminator
from consistency_jax.parametrization import c_noise
from consistency_jax.state import ema_update

DISTANCES = ("pseudo_huber", "l2", "squared_l2")
BASES = ("ct", "ict")
DISC_OPTIMIZERS = ("radam", "adam")


# ----------------------------------------------------------------------------
# Schedules and weights (pure functions of traced values).
# ----------------------------------------------------------------------------


def adv_exponent(adv_weight: float, adv_weight_mid: float) -> float:
    """e of l(n) = adv_weight (n / (N - 1))^e, so that l = adv_weight_mid at the middle index; 0: constant l."""
    return 0.0 if adv_weight_mid <= 0 else math.log(adv_weight_mid / adv_weight, 0.5)


def time_weight(sigma: jax.Array, exponent: float, sigma_min: float, sigma_max: float, rho: float) -> jax.Array:
    """w = (n / (N - 1))^e for sigma = sigma_n of an N-point Karras grid: the part of l = adv_weight w that varies.

    n / (N - 1) is where sigma sits on the grid, (s^(1/rho) - s_min^(1/rho)) /
    (s_max^(1/rho) - s_min^(1/rho)), whatever N; the reference computes it
    the same way from sigma (consistency_wrapper.time_to_timesteps).
    """
    sigma = jnp.asarray(sigma, jnp.float32)
    if exponent == 0:
        return jnp.ones_like(sigma)
    lo, hi = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    return jnp.clip((sigma ** (1 / rho) - lo) / (hi - lo), 0.0, 1.0) ** exponent


def generator_objective(distance: jax.Array, fake_logits: jax.Array, weight: jax.Array) -> jax.Array:
    """mean[(1 - l) d + l softplus(-D(fake))] over the generator's examples; `weight` is l per example."""
    return jnp.mean((1 - weight) * distance + weight * jax.nn.softplus(-fake_logits))


def discriminator_objective(fake_logits: jax.Array, fake_weight: jax.Array, real_logits: jax.Array,
                            real_weight: jax.Array, r1: jax.Array, adv_weight: float) -> jax.Array:
    """adv_weight (mean[w softplus(D(fake))] + mean[w' softplus(-D(real))] + R1); w, w' = l / adv_weight.

    The reference scales the whole discriminator loss, R1 included, by l.
    """
    return adv_weight * (jnp.mean(fake_weight * jax.nn.softplus(fake_logits))
                         + jnp.mean(real_weight * jax.nn.softplus(-real_logits)) + r1)


def input_gradient_sq_norms(logits_fn, images: jax.Array) -> jax.Array:
    """||d logit_i / d image_i||^2 per example; `logits_fn` maps [B, ...] images to [B] logits.

    The examples do not interact in the discriminator, so the gradient of the
    summed logits holds each example's own gradient.
    """
    grads = jax.grad(lambda a: jnp.sum(logits_fn(a)))(images)
    return jnp.sum(jnp.square(grads).reshape(images.shape[0], -1), axis=-1)


def update_augmentation(p: jax.Array, r1_ema: jax.Array, r1: jax.Array, *, ema_decay: float, threshold: float,
                        adjustment: float) -> tuple[jax.Array, jax.Array]:
    """One R1 step of the reference's rule: EMA the R1 term, then p +- adjustment (clipped to [0, 1])."""
    r1_ema = r1_ema * ema_decay + r1 * (1 - ema_decay)
    p = jnp.clip(p + jnp.where(r1_ema > threshold, adjustment, -adjustment), 0.0, 1.0)
    return p, r1_ema


def split_batch(batch: dict, split: tuple[int, int, int] = (2, 1, 1)) -> tuple[dict, dict, dict]:
    """(generator part, generated-image part, real-image part) of the global batch, in the ratio `split`.

    The reference's (2, 1, 1): a generator half and two quarters. Examples are
    dealt round-robin in groups of sum(split), so each device keeps its own
    share of every part when its local batch is a multiple of sum(split).
    """
    group = sum(split)
    ends = (split[0], split[0] + split[1], group)
    starts = (0, *ends[:2])

    def part(value, start, end):
        grouped = value.reshape(value.shape[0] // group, group, *value.shape[1:])[:, start:end]
        return grouped.reshape(-1, *value.shape[1:])

    return tuple({k: part(v, a, b) for k, v in batch.items()} for a, b in zip(starts, ends))


# ----------------------------------------------------------------------------
# The method.
# ----------------------------------------------------------------------------


class ACT(Method):
    name = "act"

    @classmethod
    def default_config(cls) -> ml_collections.ConfigDict:
        fields = super().default_config()
        # The consistency part. 'ct': the paper's (the reference's sqrt curriculum, n uniform, EMA target).
        # 'ict': iCT's instead, not in the paper: the doubling curriculum from s0 to s1 intervals, lognormal
        # interval draw (p_mean, p_std), weight 1 / (sigma_{n} - sigma_{n-1}), the student under stop-gradient
        # as the target (target_ema_mu0 unused).
        fields.base = "ct"
        fields.s0 = 2  # initial number of grid points N ('ict': of intervals, N - 1)
        fields.s1 = 150  # final N (ImageNet-64: 200; 'ict': final number of intervals)
        fields.curriculum_steps = -1  # K in N(k); -1: training.num_steps
        # Of every sum(batch_split) examples of the batch: how many the generator step takes, how many the
        # discriminator sees as generated images and how many as real ones (the reference: a half, two quarters).
        fields.batch_split = (2, 1, 1)
        fields.target_ema_mu0 = 0.9  # mu0 of the EMA target (ImageNet-64, LSUN: 0.95); 'ct' only
        fields.p_mean = -1.1  # 'ict' only: lognormal interval draw, mean of ln(sigma)
        fields.p_std = 2.0  # ... and its standard deviation
        fields.distance = "pseudo_huber"  # 'pseudo_huber', 'l2' (norm), 'squared_l2'; the paper's LPIPS: not here
        fields.huber_c = -1.0  # pseudo-Huber c; -1: 0.00054 * sqrt(H * W * C)
        # Adversarial term.
        fields.adv_weight = 0.3  # l, the reference's gan_ratio (CIFAR-10 0.3; ImageNet-64, LSUN 0.6)
        fields.adv_weight_mid = 0.0  # > 0: l(t) = adv_weight (n/(N-1))^e, equal to this at n/(N-1) = 1/2
        fields.r1_gamma = 10.0  # R1 weight: (gamma / 2) E||grad D(real)||^2; 0: off
        fields.r1_interval = 16  # lazy R1: every this many steps, not scaled up by the interval
        # Adaptive augmentation of D's inputs: p in the method state.
        fields.ada_r1_threshold = 1e4  # p rises while the R1 EMA is above this (ImageNet 1e7, LSUN 1e9: off)
        fields.ada_r1_ema_decay = 0.93  # EMA of the R1 term, updated every R1 step
        fields.ada_length = 500_000.0  # images: p moves by batch * r1_interval / ada_length per R1 step
        # The discriminator's optimizer (the generator's is config.optimizer).
        fields.disc_optimizer = "radam"  # 'radam' or 'adam'
        fields.disc_learning_rate = 1e-4
        fields.disc_b1 = 0.0
        fields.disc_b2 = 0.99 * 16 / 17  # the reference's value (the paper writes 0.99^(16/17))
        fields.disc_eps = 1e-8
        # The discriminator network (models/discriminator.py); CIFAR-10 reference sizes.
        fields.discriminator = ml_collections.ConfigDict(dict(
            channels=(128, 256, 256, 256), num_res_blocks=3, attn_resolutions=(16,), num_head_channels=8,
            output_norm=True, dropout=0.0, dtype="float32", attention_impl="xla"))
        return fields

    @classmethod
    def config_rules(cls) -> dict[str, rules.Rule]:
        disc = {"channels": rules.Numbers(rules.Int(ge=1), min_len=1),
                "num_res_blocks": rules.Int(ge=1),
                "attn_resolutions": rules.Numbers(rules.Int(ge=1), unique=True),
                "num_head_channels": rules.Int(ge=1),
                "output_norm": rules.Flag(),
                "dropout": rules.Float(ge=0, lt=1),
                "dtype": rules.Choice(("float32", "bfloat16")),
                "attention_impl": rules.Choice(("xla", "dot_product_attention"))}
        return {**super().config_rules(),
                "base": rules.Choice(BASES),
                "s0": rules.Int(ge=1),
                "s1": rules.Int(gt="method.s0"),
                "curriculum_steps": rules.Int(ge=1, special={-1: "training.num_steps"}),
                "batch_split": rules.Numbers(rules.Int(ge=1), min_len=3, max_len=3),
                "target_ema_mu0": rules.Float(gt=0, lt=1),
                "p_mean": rules.Float(),
                "p_std": rules.Float(gt=0),
                "distance": rules.Choice(DISTANCES, why="LPIPS needs VGG weights that this framework does not ship"),
                "huber_c": rules.Float(gt=0, special={-1.0: "0.00054 * sqrt(H * W * C)"}),
                "adv_weight": rules.Float(ge=0, le=1),
                "adv_weight_mid": rules.Float(ge=0, le="method.adv_weight", why="0: a constant weight"),
                "r1_gamma": rules.Float(ge=0, why="0: off"),
                "r1_interval": rules.Int(ge=1),
                "ada_r1_threshold": rules.Float(ge=0),
                "ada_r1_ema_decay": rules.Float(ge=0, lt=1),
                "ada_length": rules.Float(gt=0),
                "disc_optimizer": rules.Choice(DISC_OPTIMIZERS),
                "disc_learning_rate": rules.Float(gt=0),
                "disc_b1": rules.Float(ge=0, lt=1),
                "disc_b2": rules.Float(ge=0, lt=1),
                "disc_eps": rules.Float(gt=0),
                **{f"discriminator.{name}": rule for name, rule in disc.items()}}

    @classmethod
    def check_config(cls, config: ml_collections.ConfigDict) -> None:
        f = config.method
        if not 1 <= f.s0 < f.s1:
            raise ValueError(f"config.method.s0 and s1 must satisfy 1 <= s0 < s1; got s0={f.s0}, s1={f.s1}.")
        if not 0 < f.target_ema_mu0 < 1:
            raise ValueError(f"config.method.target_ema_mu0 must lie in (0, 1); got {f.target_ema_mu0}.")
        if f.distance not in DISTANCES:
            hint = " (LPIPS needs VGG weights that this framework does not ship)" if f.distance == "lpips" else ""
            raise ValueError(f"Unknown config.method.distance {f.distance!r}{hint}; valid: {', '.join(DISTANCES)}.")
        if not 0 <= f.adv_weight <= 1:
            raise ValueError(f"config.method.adv_weight must lie in [0, 1]; got {f.adv_weight}.")
        if f.adv_weight_mid < 0 or (f.adv_weight_mid > 0 and not f.adv_weight_mid <= f.adv_weight):
            raise ValueError(f"config.method.adv_weight_mid must be 0 (constant weight) or in (0, adv_weight = "
                             f"{f.adv_weight}]; got {f.adv_weight_mid}.")
        if f.r1_gamma < 0 or f.r1_interval < 1:
            raise ValueError(f"config.method.r1_gamma must be >= 0 and r1_interval >= 1; got {f.r1_gamma} and "
                             f"{f.r1_interval}.")
        if not 0 <= f.ada_r1_ema_decay < 1 or f.ada_length <= 0:
            raise ValueError(f"config.method.ada_r1_ema_decay must lie in [0, 1) and ada_length be > 0; got "
                             f"{f.ada_r1_ema_decay} and {f.ada_length}.")
        if f.disc_optimizer not in DISC_OPTIMIZERS:
            raise ValueError(f"Unknown config.method.disc_optimizer {f.disc_optimizer!r}; valid: "
                             f"{', '.join(DISC_OPTIMIZERS)}.")
        if not (f.disc_learning_rate > 0 and 0 <= f.disc_b1 < 1 and 0 <= f.disc_b2 < 1):
            raise ValueError(f"config.method.disc_learning_rate must be > 0 and disc_b1, disc_b2 in [0, 1); got "
                             f"{f.disc_learning_rate}, {f.disc_b1}, {f.disc_b2}.")
        group = sum(f.batch_split)
        if config.training.batch_size % group:
            raise ValueError(f"ACT splits each batch in the ratio config.method.batch_split = "
                             f"{tuple(f.batch_split)} (generator : generated : real): config.training.batch_size "
                             f"must be a multiple of {group}, got {config.training.batch_size}.")
        size, levels = config.data.image_size, len(f.discriminator.channels)
        if size % 2**levels:
            raise ValueError(f"config.method.discriminator.channels has {levels} levels: it halves the image "
                             f"{levels - 1} times and pools to 2x2, so data.image_size ({size}) must be divisible "
                             f"by {2**levels}.")

    def __init__(self, config, fn, image_shape, num_classes, teacher_fn=None):
        super().__init__(config, fn, image_shape, num_classes, teacher_fn)
        f = self.fields
        self.discriminator = Discriminator(**f.discriminator, num_classes=num_classes)
        make = optax.radam if f.disc_optimizer == "radam" else optax.adam
        self.disc_optimizer = make(f.disc_learning_rate, b1=f.disc_b1, b2=f.disc_b2, eps=f.disc_eps)
        k = f.curriculum_steps
        self.total_steps = config.training.num_steps if k < 0 else k
        c = f.huber_c
        self.huber_c = distances.default_huber_c(image_shape) if c < 0 else c

    # -- State --------------------------------------------------------------

    def init_discriminator(self) -> Any:
        """The discriminator's initial params, from a key of config.seed (init_state has no rng of its own)."""
        key = jax.random.fold_in(jax.random.PRNGKey(self.config.seed), 0xAC7)
        x = jnp.zeros((1, *self.image_shape), jnp.float32)
        labels = jnp.zeros((1,), jnp.int32) if self.num_classes > 0 else None
        return self.discriminator.init({"params": key}, x, jnp.zeros((1,)), labels, train=False)["params"]

    def keeps_target(self) -> bool:
        """'ct': an EMA target in the method state; 'ict': the student itself under stop-gradient."""
        return self.fields.base == "ct"

    def init_state(self, params, teacher_params):
        disc = self.init_discriminator()
        # The EMA target network of consistency training ('ct' only).
        target = {"target": params} if self.keeps_target() else {}
        return {
            **target,
            "disc": disc,
            "disc_opt": self.disc_optimizer.init(disc),
            "ada_p": jnp.zeros((), jnp.float32),
            # The reference starts its R1 EMA at the threshold.
            "r1_ema": jnp.asarray(self.fields.ada_r1_threshold, jnp.float32),
        }

    def after_update(self, method_state, params, step):
        """The EMA target with mu(k) of the step's N(k)."""
        if not self.keeps_target():
            return method_state
        return {**method_state, "target": ema_update(method_state["target"], params, self.target_decay(step))}

    # -- Curriculum (CT's or iCT's, schedules.py) -----------------------------

    def num_scales(self, step: jax.Array) -> jax.Array:
        """N(k): 'ct' the reference's rounded sqrt curriculum; 'ict' iCT's doubling one (s0 + 1 .. s1 + 1)."""
        f = self.fields
        if f.base == "ict":
            return schedules.ict_num_scales(step, self.total_steps, f.s0, f.s1)
        return schedules.ct_num_scales(step, self.total_steps, f.s0, f.s1, code="act")

    def target_decay(self, step: jax.Array) -> jax.Array:
        """mu(k) = exp(s0 ln(mu0) / (N(k) - 1)): the reference divides by the number of intervals."""
        f = self.fields
        return ct.target_ema_rate(self.num_scales(step), f.s0, f.target_ema_mu0, "intervals")

    # -- Pieces -------------------------------------------------------------

    def distance(self, a: jax.Array, b: jax.Array) -> jax.Array:
        name = self.fields.distance
        if name == "pseudo_huber":
            return distances.pseudo_huber(a, b, self.huber_c)
        return distances.l2(a, b) if name == "l2" else distances.squared_l2(a, b)

    def disc_logits(self, disc_params, images, sigma, labels, dropout_rng) -> jax.Array:
        noise_labels = c_noise(sigma, self.config.parametrization.c_noise)
        return self.discriminator.apply({"params": disc_params}, images, noise_labels,
                                        labels if self.num_classes > 0 else None, train=True,
                                        rngs={"dropout": dropout_rng})

    def draw_intervals(self, rng, batch_size, num_scales):
        """(s_{n-1}, s_n) of the N-point Karras grid: n ~ U{1..N-1} ('ct'), or iCT's lognormal draw ('ict')."""
        param, f = self.config.parametrization, self.fields
        if f.base == "ict":
            return schedules.sample_ict_sigma_pairs(rng, batch_size, num_scales, f.s1 + 1, f.p_mean, f.p_std,
                                                    param.sigma_min, param.sigma_max, param.rho)
        return ct.sample_intervals(rng, batch_size, num_scales, param.sigma_min, param.sigma_max, param.rho)

    def _time_weight(self, sigma):
        param, f = self.config.parametrization, self.fields
        return time_weight(sigma, adv_exponent(f.adv_weight, f.adv_weight_mid), param.sigma_min, param.sigma_max,
                           param.rho)

    # -- Training -----------------------------------------------------------

    def generator_loss(self, params, target_params, disc_params, ada_p, batch, rng, num_scales):
        """L_G on the generator's part of the batch; differentiated w.r.t. `params` only."""
        x, labels = batch["image"], batch.get("label")
        index_rng, noise_rng, dropout_rng, aug_rng, disc_rng = jax.random.split(rng, 5)
        sigma_prev, sigma = self.draw_intervals(index_rng, x.shape[0], num_scales)
        z = jax.random.normal(noise_rng, x.shape, x.dtype)
        b = lambda v: v[:, None, None, None]  # noqa: E731
        student = self.fn(params, x + b(sigma) * z, sigma, labels, train=True, dropout_rng=dropout_rng)
        target = jax.lax.stop_gradient(self.fn(target_params, x + b(sigma_prev) * z, sigma_prev, labels,
                                               train=True, dropout_rng=dropout_rng))
        distance = self.distance(student, target)
        # 'ict': iCT's lambda = 1 / (s_n - s_{n-1}) on the distance.
        scale = schedules.ict_loss_weight(sigma_prev, sigma) if self.fields.base == "ict" else 1.0
        logits = self.disc_logits(jax.lax.stop_gradient(disc_params), augmentation.augment(aug_rng, student, ada_p),
                                  sigma, labels, disc_rng)
        weight = self.fields.adv_weight * self._time_weight(sigma)
        loss = generator_objective(scale * distance, logits, weight)
        return loss, {"distance": jnp.mean(distance), "gen_adv_loss": jnp.mean(jax.nn.softplus(-logits))}

    def discriminator_inputs(self, params, ada_p, fake_batch, real_batch, rng, num_scales):
        """Augmented generated and real images with their sigmas, labels and time weights (no gradients)."""
        fake_idx_rng, real_idx_rng, noise_rng, dropout_rng, fake_aug_rng, real_aug_rng = jax.random.split(rng, 6)
        x, fake_labels = fake_batch["image"], fake_batch.get("label")
        _, fake_sigma = self.draw_intervals(fake_idx_rng, x.shape[0], num_scales)
        noisy = x + fake_sigma[:, None, None, None] * jax.random.normal(noise_rng, x.shape, x.dtype)
        generated = jax.lax.stop_gradient(self.fn(params, noisy, fake_sigma, fake_labels, train=True,
                                                  dropout_rng=dropout_rng))
        _, real_sigma = self.draw_intervals(real_idx_rng, real_batch["image"].shape[0], num_scales)
        fake = (augmentation.augment(fake_aug_rng, generated, ada_p), fake_sigma, fake_labels,
                self._time_weight(fake_sigma))
        real = (augmentation.augment(real_aug_rng, real_batch["image"], ada_p), real_sigma, real_batch.get("label"),
                self._time_weight(real_sigma))
        return fake, real

    def discriminator_loss(self, disc_params, fake, real, with_r1, rng):
        """L_D on prepared inputs (discriminator_inputs); differentiated w.r.t. `disc_params` only.

        The R1 term, (gamma / 2) mean[w' ||grad_a D(a)||^2] over the augmented
        real images a, is computed only when `with_r1` (lazy regularisation).
        """
        fake_images, fake_sigma, fake_labels, fake_weight = fake
        real_images, real_sigma, real_labels, real_weight = real
        fake_rng, real_rng = jax.random.split(rng)
        fake_logits = self.disc_logits(disc_params, fake_images, fake_sigma, fake_labels, fake_rng)
        real_logits_fn = lambda d, a: self.disc_logits(d, a, real_sigma, real_labels, real_rng)  # noqa: E731
        real_logits = real_logits_fn(disc_params, real_images)

        def r1_term(d):
            sq_norms = input_gradient_sq_norms(lambda a: real_logits_fn(d, a), real_images)
            return self.fields.r1_gamma / 2 * jnp.mean(real_weight * sq_norms)

        r1 = jax.lax.cond(with_r1, r1_term, lambda d: jnp.zeros((), jnp.float32), disc_params)
        loss = discriminator_objective(fake_logits, fake_weight, real_logits, real_weight, r1,
                                       self.fields.adv_weight)
        accuracy = 0.5 * (jnp.mean(real_logits > 0) + jnp.mean(fake_logits < 0))
        return loss, {"r1": r1, "disc_accuracy": accuracy, "disc_real_logit": jnp.mean(real_logits),
                      "disc_fake_logit": jnp.mean(fake_logits)}

    def update(self, state, batch, rng, optimizer):
        """The generator step on half the batch, then the discriminator step on the other half."""
        f, ms = self.fields, state.method_state
        gen_batch, fake_batch, real_batch = split_batch(batch, tuple(f.batch_split))
        num_scales = self.num_scales(state.step)
        gen_rng, inputs_rng, disc_rng = jax.random.split(rng, 3)

        target_params = ms["target"] if self.keeps_target() else state.params  # 'ict': the student, stop-gradient
        (gen_loss, gen_metrics), gen_grads = jax.value_and_grad(self.generator_loss, has_aux=True)(
            state.params, target_params, ms["disc"], ms["ada_p"], gen_batch, gen_rng, num_scales)
        updates, opt_state = optimizer.update(gen_grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        ms = self.after_update(ms, params, state.step)

        fake, real = self.discriminator_inputs(params, ms["ada_p"], fake_batch, real_batch, inputs_rng, num_scales)
        with_r1 = (state.step % f.r1_interval == 0) & (f.r1_gamma > 0)
        (disc_loss, disc_metrics), disc_grads = jax.value_and_grad(self.discriminator_loss, has_aux=True)(
            ms["disc"], fake, real, with_r1, disc_rng)
        disc_updates, disc_opt = self.disc_optimizer.update(disc_grads, ms["disc_opt"], ms["disc"])
        p, r1_ema = update_augmentation(
            ms["ada_p"], ms["r1_ema"], disc_metrics["r1"], ema_decay=f.ada_r1_ema_decay,
            threshold=f.ada_r1_threshold, adjustment=batch["image"].shape[0] * f.r1_interval / f.ada_length)
        p, r1_ema = jnp.where(with_r1, p, ms["ada_p"]), jnp.where(with_r1, r1_ema, ms["r1_ema"])
        ms = {**ms, "disc": optax.apply_updates(ms["disc"], disc_updates), "disc_opt": disc_opt,
              "ada_p": p, "r1_ema": r1_ema}

        gen_norm, disc_norm = optax.global_norm(gen_grads), optax.global_norm(disc_grads)
        metrics = {
            **gen_metrics, **disc_metrics,
            # The loop's guard reads 'loss' and 'grad_norm': the generator's loss (the discriminator's when
            # that one is not finite) and the norm of both networks' gradients together.
            "loss": jnp.where(jnp.isfinite(disc_loss), gen_loss, disc_loss),
            "grad_norm": jnp.sqrt(gen_norm**2 + disc_norm**2),
            "gen_loss": gen_loss, "disc_loss": disc_loss,
            "gen_grad_norm": gen_norm, "disc_grad_norm": disc_norm,
            "ada_p": p, "r1_ema": r1_ema, "num_scales": num_scales,
        }
        if self.keeps_target():
            metrics["target_ema"] = self.target_decay(state.step)
        metrics.pop("r1")  # zero on most steps; r1_ema carries it
        return state.replace(params=params, opt_state=opt_state, method_state=ms), metrics
