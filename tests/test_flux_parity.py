"""The editor's transformer equals diffusers FluxTransformer2DModel with the same weights."""

import flax
import jax
import numpy as np
import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

from jaxedit.interop import flux_diffusers  # noqa: E402
from jaxedit.models.editor import FLUX_STACKS  # noqa: E402
from jaxedit.models.flux import FluxConfig, FluxTransformer, position_ids  # noqa: E402
from jaxedit.models.layers import unstack_layers  # noqa: E402

B, H, W, L = 2, 4, 6, 5


def tiny(scan, guidance=False):
  return FluxConfig(in_channels=12, num_layers=2, num_single_layers=3, attention_head_dim=16,
                    num_attention_heads=2, joint_attention_dim=24, pooled_projection_dim=20,
                    axes_dims_rope=(4, 6, 6), guidance_embeds=guidance, scan_layers=scan)


def random_inputs(seed=0):
  # Guidance stays <= 2.5: at 3.5 * 1000 the fp32 sinusoid arguments make a 1-ulp difference
  # between torch's vectorised exp and a correctly rounded one show up as ~1e-5 relative
  # output error with these random weights; that is fp32 resolution, not a layout bug.
  rng = np.random.default_rng(seed)
  f = lambda *s: rng.normal(size=s).astype(np.float32)
  return dict(tokens=f(B, H * W, 12), source=f(B, H * W, 12), context=f(B, L, 24),
              pooled=f(B, 20), t=np.array([0.25, 0.8], np.float32),
              guidance=np.array([2.5, 1.0], np.float32))


def torch_model(cfg, params, seed=1):
  model = diffusers.FluxTransformer2DModel(**flux_diffusers.diffusers_config(cfg)).eval()
  state = flux_diffusers.to_diffusers(params)
  model.load_state_dict({k: torch.from_numpy(v) for k, v in state.items()}, strict=True)
  return model


def randomized_params(cfg, seed=0):
  """Random values everywhere (zero-initialised gates would hide bugs)."""
  model = FluxTransformer(cfg)
  x = random_inputs()
  params = jax.eval_shape(lambda: model.init(
      jax.random.key(seed), x["tokens"], x["t"], x["context"], x["pooled"], (H, W),
      source_tokens=x["source"], guidance=x["guidance"])["params"])
  leaves, tree = jax.tree.flatten(flax.linen.unbox(params))
  rng = np.random.default_rng(seed)
  leaves = [(rng.normal(size=l.shape) * 0.2).astype(np.float32) for l in leaves]
  return jax.tree.unflatten(tree, leaves)


# Text position ids as the editor's layout tokens use them: fractional (row, column) centres.
TEXT_IDS = np.stack([np.zeros(L), np.linspace(0, 3, L), np.linspace(5, 0.5, L)], -1)


@pytest.mark.parametrize("scan", [True, False])
@pytest.mark.parametrize("with_source", [True, False])
@pytest.mark.parametrize("guidance", [False, True])
def test_forward_matches_diffusers(scan, with_source, guidance):
  check_forward(scan, with_source, guidance, text_ids=None)


@pytest.mark.parametrize("guidance", [False, True])
def test_forward_with_text_position_ids_matches_diffusers(guidance):
  check_forward(True, True, guidance, text_ids=TEXT_IDS)


def check_forward(scan, with_source, guidance, text_ids):
  cfg = tiny(scan, guidance)
  params = randomized_params(cfg)
  x = random_inputs()
  ours = FluxTransformer(cfg).apply(
      {"params": params}, x["tokens"], x["t"], x["context"], x["pooled"], (H, W),
      source_tokens=x["source"] if with_source else None,
      guidance=x["guidance"] if guidance else None, text_ids=text_ids)

  img_ids = np.asarray(position_ids(H, W, 0))
  hidden = x["tokens"]
  if with_source:
    img_ids = np.concatenate([img_ids, np.asarray(position_ids(H, W, 1))])
    hidden = np.concatenate([hidden, x["source"]], axis=1)
  with torch.no_grad():
    ref = torch_model(cfg, params)(
        hidden_states=torch.from_numpy(hidden),
        encoder_hidden_states=torch.from_numpy(x["context"]),
        pooled_projections=torch.from_numpy(x["pooled"]),
        timestep=torch.from_numpy(x["t"]),
        img_ids=torch.from_numpy(img_ids.copy()).float(),
        txt_ids=torch.zeros(L, 3) if text_ids is None else torch.from_numpy(text_ids).float(),
        guidance=torch.from_numpy(x["guidance"]) if guidance else None,
        return_dict=False)[0].numpy()[:, :H * W]
  rel = np.linalg.norm(np.asarray(ours) - ref) / np.linalg.norm(ref)
  assert rel < 1e-5, rel


def test_round_trip_and_mismatch_errors():
  cfg = tiny(True)
  params = randomized_params(cfg)
  state = flux_diffusers.to_diffusers(params)
  back = flux_diffusers.from_diffusers(state, params)
  jax.tree.map(np.testing.assert_array_equal, back, jax.tree.map(np.asarray, params))
  broken = dict(state)
  del broken["x_embedder.weight"]
  broken["extra.weight"] = np.zeros(3)
  broken["proj_out.bias"] = np.zeros(5)
  with pytest.raises(flux_diffusers.MappingError) as e:
    flux_diffusers.from_diffusers(broken, params)
  msg = str(e.value)
  assert "missing tensors: x_embedder.weight" in msg
  assert "unexpected tensors: extra.weight" in msg
  assert "proj_out.bias has shape (5,), expected (12,)" in msg


def test_scanned_and_unrolled_give_the_same_loss_and_gradients():
  """The same weights, stacked or per layer: equal loss and gradients, so the unrolled
  model's last block (target rows only) and layout change no training maths."""
  scanned = randomized_params(tiny(True))
  unrolled = unstack_layers(scanned, FLUX_STACKS)
  x = random_inputs()

  def loss(scan, params):
    out = FluxTransformer(tiny(scan)).apply({"params": params}, x["tokens"], x["t"],
                                            x["context"], x["pooled"], (H, W),
                                            source_tokens=x["source"])
    return (out ** 2).mean()

  with jax.default_matmul_precision("highest"):
    want, grads = jax.jit(jax.value_and_grad(lambda p: loss(True, p)))(scanned)
    got, got_grads = jax.jit(jax.value_and_grad(lambda p: loss(False, p)))(unrolled)
  np.testing.assert_allclose(got, want, rtol=1e-6)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6),
               got_grads, unstack_layers(grads, FLUX_STACKS))
