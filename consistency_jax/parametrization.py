"""EDM and consistency-boundary preconditioning (SPEC section 1).

`ConsistencyFunction` turns a raw network F into f(x, sigma) = c_skip x + c_out
F(c_in x, c_noise(sigma)), which satisfies f(x, sigma_min) = x exactly. It holds
only the module and numbers; params are always an argument.
"""

import dataclasses
from typing import Any, Protocol

import flax.linen as nn
import jax
import jax.numpy as jnp

C_NOISE_KINDS = ("edm", "cm", "raw")


def c_noise(sigma: jax.Array, kind: str) -> jax.Array:
    """Noise label fed to the network: 'edm' ln(s)/4, 'cm' 1000 ln(s)/4, 'raw' s."""
    if kind == "edm":
        return jnp.log(sigma) / 4
    if kind == "cm":
        return 1000 * jnp.log(sigma) / 4
    if kind == "raw":
        return sigma
    raise ValueError(f"Unknown c_noise kind {kind!r}; valid: {', '.join(C_NOISE_KINDS)}.")


def edm_scalings(sigma: jax.Array, sigma_data: float) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(c_skip, c_out, c_in) of the EDM denoiser."""
    total = sigma**2 + sigma_data**2
    return sigma_data**2 / total, sigma * sigma_data / jnp.sqrt(total), 1 / jnp.sqrt(total)


def consistency_scalings(sigma: jax.Array, sigma_min: float,
                         sigma_data: float) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(c_skip, c_out, c_in) with c_skip(sigma_min) = 1 and c_out(sigma_min) = 0."""
    shifted = sigma - sigma_min
    c_skip = sigma_data**2 / (shifted**2 + sigma_data**2)
    c_out = shifted * sigma_data / jnp.sqrt(sigma**2 + sigma_data**2)
    c_in = 1 / jnp.sqrt(sigma**2 + sigma_data**2)
    return c_skip, c_out, c_in


class NetworkFunction(Protocol):
    """A network wrapped in a parametrization: what methods and samplers call.

    It holds only the module and numbers; params are always an argument.
    """

    sigma_min: float
    sigma_data: float

    def __call__(self, params: Any, x: jax.Array, sigma: jax.Array, labels: jax.Array | None = None,
                 *, train: bool = False, dropout_rng: jax.Array | None = None) -> jax.Array: ...

    def init(self, rng: jax.Array, image_shape: tuple[int, ...], with_labels: bool) -> Any: ...


@dataclasses.dataclass(frozen=True)
class ConsistencyFunction:
    """f_theta(x, sigma) around a network from the model registry."""

    model: nn.Module
    sigma_min: float
    sigma_data: float
    c_noise_kind: str = "edm"
    boundary: bool = True  # False: the EDM denoiser (diffusion teachers)

    def __call__(self, params: Any, x: jax.Array, sigma: jax.Array, labels: jax.Array | None = None,
                 *, train: bool = False, dropout_rng: jax.Array | None = None) -> jax.Array:
        sigma = jnp.broadcast_to(jnp.asarray(sigma, jnp.float32), x.shape[:1])
        if self.boundary:
            c_skip, c_out, c_in = consistency_scalings(sigma, self.sigma_min, self.sigma_data)
        else:
            c_skip, c_out, c_in = edm_scalings(sigma, self.sigma_data)
        rngs = {"dropout": dropout_rng} if dropout_rng is not None else {}
        out = self.model.apply({"params": params}, _bcast(c_in) * x, c_noise(sigma, self.c_noise_kind),
                               labels, train=train, rngs=rngs)
        return _bcast(c_skip) * x + _bcast(c_out) * out.astype(x.dtype)

    def init(self, rng: jax.Array, image_shape: tuple[int, ...], with_labels: bool) -> Any:
        """Network params for images of `image_shape` (H, W, C)."""
        x = jnp.zeros((1, *image_shape), jnp.float32)
        labels = jnp.zeros((1,), jnp.int32) if with_labels else None
        return self.model.init({"params": rng, "dropout": rng}, x, jnp.zeros((1,)), labels,
                               train=False)["params"]


def _bcast(v: jax.Array) -> jax.Array:
    return v[:, None, None, None]
