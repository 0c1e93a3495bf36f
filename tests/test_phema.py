"""EDM2's power-function EMA (consistency_jax/phema.py): widths, per-step decay, post-hoc reconstruction."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from consistency_jax import phema, state


def test_sigma_rel_and_gamma():
    # EDM2 section 3: gamma = 16.97 is sigma_rel = 0.05 and gamma = 6.94 is sigma_rel = 0.10.
    assert phema.sigma_rel_to_gamma(0.05) == pytest.approx(16.97, abs=0.01)
    assert phema.sigma_rel_to_gamma(0.10) == pytest.approx(6.94, abs=0.01)
    for s in (0.01, 0.05, 0.2, 0.28):
        assert phema.gamma_to_sigma_rel(phema.sigma_rel_to_gamma(s)) == pytest.approx(s, rel=1e-9)
    with pytest.raises(ValueError, match="sigma_rel"):
        phema.sigma_rel_to_gamma(0.3)


def track(trajectory: np.ndarray, sigma_rel: float) -> np.ndarray:
    """The EMA the train step keeps (state.update_emas with state.ema_decays), after every step."""
    decays = np.asarray(jax.vmap(lambda k: state.ema_decays(k, (), (sigma_rel,))[0])(jnp.arange(len(trajectory))))
    ema, out = trajectory[0], []
    for value, beta in zip(trajectory, decays):
        ema = beta * ema + (1 - beta) * value
        out.append(ema)
    return np.stack(out)


def test_power_ema_averages_with_the_power_profile():
    """The EMA of p_k = k after T steps is the mean of the profile (g + 1) tau^g / T^(g + 1): T (g + 1)/(g + 2)."""
    steps = 2000
    for sigma_rel in (0.05, 0.15):
        gamma = phema.sigma_rel_to_gamma(sigma_rel)
        ema = track(np.arange(1, steps + 1, dtype=np.float64), sigma_rel)
        assert ema[-1] == pytest.approx(steps * (gamma + 1) / (gamma + 2), rel=2e-3)
        assert ema[0] == 1.0  # beta(1) = 0: the first update copies the params


def test_posthoc_reconstruction_matches_a_tracked_ema():
    """Snapshots of two tracked widths every 100 steps rebuild a third width at the last step."""
    rng = np.random.RandomState(0)
    steps, dim = 3000, 16
    trajectory = np.cumsum(rng.randn(steps, dim), axis=0) + np.linspace(0, 50, steps)[:, None]
    stored = (0.05, 0.10)
    tracked = {s: track(trajectory, s) for s in (*stored, 0.07, 0.2)}
    snapshot_steps = list(range(100, steps + 1, 100))
    for target in (0.07, 0.2):
        coefficients = phema.posthoc_coefficients(
            [t for t in snapshot_steps for _ in stored], [s for _ in snapshot_steps for s in stored], steps, [target])
        pieces = [tracked[s][t - 1] for t in snapshot_steps for s in stored]
        rebuilt = np.asarray(phema.combine(pieces, coefficients[:, 0]))
        truth = tracked[target][-1]
        # Within 2% of how far the two stored EMAs are from each other.
        spread = np.abs(tracked[0.05][-1] - tracked[0.10][-1]).max()
        assert np.abs(rebuilt - truth).max() < 0.02 * spread + 1e-3, (np.abs(rebuilt - truth).max(), spread)
        # And the stored EMA alone would be a much worse answer.
        assert np.abs(tracked[0.10][-1] - truth).max() > 5 * np.abs(rebuilt - truth).max()
