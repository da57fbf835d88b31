import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxedit import flow


def test_shift_maps_endpoints_and_pushes_towards_noise():
  t = jnp.linspace(0, 1, 11)
  s = flow.shift_time(t, 3.0)
  np.testing.assert_allclose([s[0], s[-1]], [0.0, 1.0])
  assert (s[1:-1] > t[1:-1]).all()
  np.testing.assert_allclose(flow.shift_time(t, 1.0), t)
  # closed form at t = 0.5: 3 * 0.5 / (1 + 2 * 0.5) = 0.75
  np.testing.assert_allclose(flow.shift_time(jnp.array(0.5), 3.0), 0.75)


@pytest.mark.parametrize("kind", ["logit_normal", "uniform"])
def test_sample_time_in_unit_interval(kind):
  t = flow.sample_time(jax.random.key(0), 10_000, kind=kind, shift=2.0)
  assert t.shape == (10_000,) and float(t.min()) > 0 and float(t.max()) < 1
  with pytest.raises(ValueError, match="unknown timestep sampling"):
    flow.sample_time(jax.random.key(0), 4, kind="beta")


def test_euler_on_the_exact_velocity_lands_on_the_data():
  """Paths are straight: with v = eps - x0 any number of Euler steps reaches x0 exactly."""
  x0 = jax.random.normal(jax.random.key(1), (3, 4, 4, 3))
  eps = jax.random.normal(jax.random.key(2), x0.shape)
  for steps, shift in [(1, 1.0), (7, 3.0)]:
    out = flow.euler_sample(lambda x, t: eps - x0, eps, flow.sigmas(steps, shift))
    np.testing.assert_allclose(out, x0, atol=1e-5)


def test_interpolation_and_loss_against_float64():
  rng = np.random.default_rng(0)
  x0, eps, v = (rng.normal(size=(2, 3, 5)) for _ in range(3))
  t = np.array([0.2, 0.9])
  np.testing.assert_allclose(flow.interpolate(x0, eps, t),
                             (1 - t)[:, None, None] * x0 + t[:, None, None] * eps, rtol=1e-6)
  np.testing.assert_allclose(flow.sft_loss(v, x0, eps), np.mean((v - (eps - x0)) ** 2), rtol=1e-5)
  assert float(flow.sft_loss(eps - x0, x0, eps)) == pytest.approx(0.0, abs=1e-12)


def test_classifier_free_guidance_formula():
  v = lambda x, t, cond: x * (2.0 if cond else 0.5)
  x = jnp.ones((2, 3))
  np.testing.assert_allclose(flow.guided(v, 3.0)(x, None), 0.5 + 3.0 * (2.0 - 0.5))
  np.testing.assert_allclose(flow.guided(v, 1.0)(x, None), 2.0)


def test_uint8_round_trip():
  img = np.arange(256, dtype=np.uint8).reshape(16, 16, 1)
  np.testing.assert_array_equal(flow.to_uint8(flow.to_model_space(img)), img)


def test_changed_patch_weights_and_weighted_loss_against_numpy():
  rng = np.random.default_rng(0)
  source = rng.integers(0, 256, (2, 8, 8, 3)).astype(np.uint8)
  target = source.copy()
  target[0, 5, 2, 1] += 1  # one pixel in patch (1, 0) of example 0 (patch 4)
  target[1, 0:4, 4:8] = 0  # all of patch (0, 1) of example 1
  w = np.asarray(flow.changed_patch_weights(jnp.asarray(source), jnp.asarray(target), (2, 2),
                                            4, 5.0))
  expected = np.ones((2, 8, 8, 1))
  expected[0, 4:8, 0:4] = 5.0
  expected[1, 0:4, 4:8] = 5.0
  np.testing.assert_array_equal(w, expected)
  # 4x4 latents (a VAE's 2x downsampling), patch 2: the same tokens, read from the pixels.
  latent_w = np.asarray(flow.changed_patch_weights(jnp.asarray(source), jnp.asarray(target),
                                                   (2, 2), 2, 5.0))
  np.testing.assert_array_equal(latent_w, expected[:, ::2, ::2])

  v, x0, eps = (rng.normal(size=(2, 8, 8, 3)) for _ in range(3))
  err = (v - (eps - x0)) ** 2
  want = (expected * err).sum() / (np.broadcast_to(expected, err.shape)).sum()
  got = flow.sft_loss(jnp.asarray(v, jnp.float32), jnp.asarray(x0, jnp.float32),
                      jnp.asarray(eps, jnp.float32), jnp.asarray(w))
  np.testing.assert_allclose(float(got), want, rtol=1e-5)
  unweighted = flow.sft_loss(*(jnp.asarray(a, jnp.float32) for a in (v, x0, eps)))
  assert float(unweighted) == pytest.approx(err.mean(), rel=1e-5)
  assert float(flow.sft_loss(*(jnp.asarray(a, jnp.float32) for a in (v, x0, eps)),
                             jnp.ones((2, 8, 8, 1)))) == pytest.approx(err.mean(), rel=1e-5)


def test_grounding_loss_against_float64():
  rng = np.random.default_rng(1)
  source = rng.integers(0, 256, (3, 8, 8, 3)).astype(np.uint8)
  target = source.copy()
  target[0, 1, 6, 0] += 1  # cell (0, 1) of a 2x2 grid
  target[1, 4:, :4] = 0  # cell (1, 0); example 2 unchanged
  changed = np.array([[0, 1, 0, 0], [0, 0, 1, 0], [0, 0, 0, 0]], np.float64)
  np.testing.assert_array_equal(flow.changed_regions(source, target, 2, 2).reshape(3, 4),
                                changed.astype(bool))
  logits = rng.normal(size=(3, 4)) * 3
  p = 1 / (1 + np.exp(-logits))
  per_example = -(changed * np.log(p) + (1 - changed) * np.log(1 - p)).sum(-1)
  got = flow.grounding_loss(jnp.asarray(logits, jnp.float32), source, target)
  assert float(got) == pytest.approx(per_example.mean(), rel=1e-5)
  keep = jnp.asarray([True, False, True])
  got = flow.grounding_loss(jnp.asarray(logits, jnp.float32), source, target, keep)
  assert float(got) == pytest.approx(per_example[[0, 2]].mean(), rel=1e-5)
