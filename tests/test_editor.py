"""Editor model options: precomputed text, remat, dtypes, patchify layout."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxedit import schema
from jaxedit.models.editor import (Editor, TextEncoder, editor_config, layout_ids,
                                    patchify, unpatchify)


def tiny_model(**overrides):
  m = schema.editor_model()
  m.patch_size, m.num_heads, m.head_dim, m.axes_dims_rope = 8, 2, 16, (4, 6, 6)
  m.num_layers, m.num_single_layers = 1, 2
  m.text_width, m.text_layers, m.text_heads, m.text_max_len = 32, 1, 2, 12
  for k, v in overrides.items():
    m[k] = v
  return m


def inputs(text_encoder="shapes", batch=2):
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(size=(batch, 32, 32, 3)), jnp.float32)
  t = jnp.asarray([0.3, 0.9][:batch])
  if text_encoder == "shapes":
    text = {"ids": jnp.asarray(rng.integers(0, 100, (batch, 12)), jnp.int32),
            "mask": jnp.ones((batch, 12), bool)}
  else:
    text = {"context": jnp.asarray(rng.normal(size=(batch, 7, 40)), jnp.float32),
            "pooled": jnp.asarray(rng.normal(size=(batch, 40)), jnp.float32)}
  return x, t, x[::-1], text


def test_patchify_matches_diffusers_packing():
  """(c, ph, pw) channel order, row-major tokens, as diffusers' _pack_latents."""
  x = np.arange(2 * 4 * 6 * 3).reshape(2, 4, 6, 3).astype(np.float32)
  tokens = np.asarray(patchify(x, 2))
  b, h, w, c, p = 2, 4, 6, 3, 2
  ref = x.transpose(0, 3, 1, 2).reshape(b, c, h // p, p, w // p, p)
  ref = ref.transpose(0, 2, 4, 1, 3, 5).reshape(b, (h // p) * (w // p), c * p * p)
  np.testing.assert_array_equal(tokens, ref)
  np.testing.assert_array_equal(unpatchify(tokens, 2, (2, 3)), x)


def test_precomputed_text_embeddings_path():
  model = Editor(editor_config(tiny_model(text_encoder="precomputed", context_dim=40), 32, 100))
  args = inputs("precomputed")
  params = jax.jit(model.init)(jax.random.key(0), *args)["params"]
  assert "text_encoder" not in params
  out = jax.jit(model.apply)({"params": params}, *args)
  assert out.shape == (2, 32, 32, 3)
  loss = lambda p, ctx: jnp.sum(model.apply({"params": p}, *args[:3],
                                            {**args[3], "context": ctx}) ** 2)
  params = jax.tree.map(lambda x: x + 0.01, nn.unbox(params))  # lift zero-init outputs
  grad = jax.jit(jax.grad(loss, argnums=1))(params, args[3]["context"])
  assert float(jnp.abs(grad).sum()) > 0


def test_precomputed_needs_a_width():
  with pytest.raises(ValueError, match="context_dim"):
    editor_config(tiny_model(text_encoder="precomputed"), 32, 100)
  with pytest.raises(ValueError, match="not divisible"):
    editor_config(tiny_model(patch_size=5), 32, 100)


@pytest.mark.parametrize("policy", ["full", "dots_with_no_batch_dims_saveable"])
def test_remat_gives_the_same_loss_and_gradients(policy):
  args = inputs()
  plain = Editor(editor_config(tiny_model(), 32, 100))
  remat = Editor(editor_config(tiny_model(remat_policy=policy), 32, 100))
  params = jax.jit(plain.init)(jax.random.key(0), *args)["params"]
  params = jax.tree.map(lambda x: x + 0.01, nn.unbox(params))
  loss = lambda m: jax.jit(jax.value_and_grad(
      lambda p: jnp.mean(m.apply({"params": p}, *args) ** 2)))
  (l1, g1), (l2, g2) = loss(plain)(params), loss(remat)(params)
  np.testing.assert_allclose(l1, l2, rtol=1e-6)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7), g1, g2)


def test_bfloat16_compute_with_float32_params():
  args = inputs()
  model = Editor(editor_config(tiny_model(dtype="bfloat16"), 32, 100))
  variables = jax.jit(model.init)(jax.random.key(0), *args)
  assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(nn.unbox(variables)))
  ref = Editor(editor_config(tiny_model(), 32, 100))
  params = jax.tree.map(lambda x: x + 0.01, nn.unbox(variables["params"]))
  a = jax.jit(model.apply)({"params": params}, *args)
  b = jax.jit(ref.apply)({"params": params}, *args)
  assert a.dtype == jnp.float32  # the velocity comes back in float32
  rel = float(jnp.linalg.norm(a - b) / jnp.linalg.norm(b))
  assert 0 < rel < 0.05, rel


def test_qk_norm_init_sets_every_q_and_k_norm_weight():
  model = Editor(editor_config(tiny_model(qk_norm_init=2.0), 32, 100))
  params = nn.unbox(jax.jit(model.init)(jax.random.key(0), *inputs())["params"])
  flat = {jax.tree_util.keystr(p): x for p, x in jax.tree_util.tree_flatten_with_path(params)[0]}
  norms = {k: x for k, x in flat.items() if "'norm_q'" in k or "'norm_k'" in k
           or "'norm_added_q'" in k or "'norm_added_k'" in k}
  # Per layer (unrolled): 4 in each of the 1 double block (image and text streams), 2 in each
  # of the 2 single blocks.
  assert len(norms) == 4 * 1 + 2 * 2
  assert all(np.all(np.asarray(x) == 2.0) for x in norms.values())


def test_layout_tokens_sit_at_cell_centres_and_carry_the_grounding():
  assert np.array_equal(layout_ids(2, (4, 6)), [[0, 0.5, 1], [0, 0.5, 4], [0, 2.5, 1],
                                                 [0, 2.5, 4]])
  model = Editor(editor_config(tiny_model(text_layout_grid=2), 32, 100))
  x, t, source, text = inputs()
  params = nn.unbox(jax.jit(model.init)(jax.random.key(0), x, t, source, text)["params"])
  rng = np.random.default_rng(0)  # random everywhere: zero-initialised outputs hide paths
  params = jax.tree.map(lambda p: p + 0.1 * rng.normal(size=p.shape).astype(np.float32),
                        params)
  apply = jax.jit(model.apply, static_argnames="with_cell_logits")
  v, logits = apply({"params": params}, x, t, source, text, with_cell_logits=True)
  assert v.shape == x.shape and logits.shape == (2, 4)
  context, pooled, logits_again = TextEncoder(model.cfg.text).apply(
      {"params": params["text_encoder"]}, text["ids"], text["mask"], source)
  np.testing.assert_allclose(logits_again, logits, rtol=1e-6)
  g = params["text_encoder"]["grounding"]
  expected = g["layout_base"] + jax.nn.sigmoid(logits)[..., None] * g["layout_here"]
  np.testing.assert_allclose(context[:, 12:], expected, rtol=1e-5, atol=1e-6)

  # Only the grounding loss trains the grounding's encoder and head: the flow output gives
  # them no gradient ...
  with_g = lambda g: {**params, "text_encoder": {**params["text_encoder"], "grounding": g}}
  trained = {k: v for k, v in g.items() if k not in ("layout_base", "layout_here")}
  flow_grad = jax.jit(jax.grad(lambda tr: jnp.sum(apply(
      {"params": with_g({**g, **tr})}, x, t, source, text) ** 2)))(trained)
  assert all(float(jnp.abs(a).max()) == 0 for a in jax.tree.leaves(flow_grad))
  # ... but the gates' values reach the transformer.
  shifted = with_g({**g, "text_out": jax.tree.map(lambda b: b + 3.0, g["text_out"])})
  assert float(jnp.abs(apply({"params": shifted}, x, t, source, text) - v).max()) > 1e-4
  # The grounding reads the source image: another source, other cell logits.
  _, other = apply({"params": params}, x, t, source[::-1], text, with_cell_logits=True)
  assert float(jnp.abs(other - logits).max()) > 1e-4  # same texts, swapped sources


def test_layout_grid_errors_name_the_problem():
  with pytest.raises(ValueError, match="text_layout_grid 3 must divide the 4x4 token grid"):
    editor_config(tiny_model(text_layout_grid=3), 32, 100)
  with pytest.raises(ValueError, match="text_layout_grid needs the 'shapes' text encoder"):
    editor_config(tiny_model(text_encoder="precomputed", context_dim=40, text_layout_grid=2),
                  32, 100)


def test_initial_parameters_do_not_depend_on_the_layer_layout():
  """The same seed draws the same weights scanned or unrolled (switching layouts for speed
  must not change what a run trains), with the unrolled layers' logical axis names."""
  from jaxedit.models.editor import init_params

  weights = {}
  for scan in (True, False):
    model = Editor(editor_config(tiny_model(scan_layers=scan), 32, 100))
    weights[scan] = jax.jit(lambda rng: init_params(model, rng, *inputs()))(jax.random.key(0))
    want = nn.get_partition_spec(jax.eval_shape(model.init, jax.random.key(1),
                                                *inputs())["params"])
    assert nn.get_partition_spec(weights[scan]) == want  # same tree and axis names
  stacked = weights[True]["transformer"]["single_transformer_blocks"]["proj_mlp"]["kernel"]
  layer1 = weights[False]["transformer"]["single_transformer_blocks_1"]["proj_mlp"]["kernel"]
  np.testing.assert_array_equal(layer1.value, stacked.value[1])
  total = lambda tree: sum(float(np.abs(np.asarray(x)).sum())
                          for x in jax.tree.leaves(nn.unbox(tree)))
  np.testing.assert_allclose(total(weights[False]), total(weights[True]), rtol=1e-6)
