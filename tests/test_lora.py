"""LoRA adapters: merged equals applied, disabled equals the base model, bad targets fail."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxedit import lora
from jaxedit.models.editor import Editor, editor_config

from test_editor import inputs, tiny_model


@pytest.mark.parametrize("scan_layers", [True, False])
def test_merged_equals_applied_and_disabled_equals_base(scan_layers):
  lora_model = Editor(editor_config(tiny_model(lora_rank=4, lora_alpha=8.0,
                                               scan_layers=scan_layers), 32, 100))
  base_model = Editor(editor_config(tiny_model(scan_layers=scan_layers), 32, 100))
  params = nn.unbox(jax.jit(lora_model.init)(jax.random.key(0), *inputs())["params"])
  lora_apply, base_apply = jax.jit(lora_model.apply), jax.jit(base_model.apply)
  adapters, base = lora.split(params)
  # Gates and the output projection start at zero (the blocks contribute nothing): perturb.
  leaves, tree = jax.tree.flatten(base)
  keys = jax.random.split(jax.random.key(2), len(leaves))
  base = jax.tree.unflatten(tree, [x + 0.1 * jax.random.normal(k, x.shape)
                                   for k, x in zip(keys, leaves)])
  params = lora.join(adapters, base)
  assert jax.tree.leaves(adapters)
  lora.check_targets(params, lora_model.cfg.flux.lora_targets)
  # B starts at zero: the adapted model starts as the base model (up to XLA's fusion order).
  np.testing.assert_allclose(lora_apply({"params": params}, *inputs()),
                             base_apply({"params": base}, *inputs()), rtol=1e-6,
                             atol=1e-6)
  # Trained adapters (random B): merging them into the kernels gives the same function.
  leaves, tree = jax.tree.flatten(adapters)
  keys = jax.random.split(jax.random.key(1), len(leaves))
  adapters = jax.tree.unflatten(tree, [0.3 * jax.random.normal(k, x.shape)
                                       for k, x in zip(keys, leaves)])
  params = lora.join(adapters, base)
  applied = lora_apply({"params": params}, *inputs())
  merged = base_apply({"params": lora.merge(params, 4, 8.0)}, *inputs())
  assert float(jnp.abs(applied - base_apply({"params": base}, *inputs())).max()) > 1e-2
  np.testing.assert_allclose(merged, applied, rtol=1e-5, atol=1e-5)


def test_unknown_target_is_named():
  model = Editor(editor_config(tiny_model(lora_rank=2, lora_targets=("to_q", "to_qq")), 32,
                               100))
  params = nn.unbox(model.init(jax.random.key(0), *inputs())["params"])
  with pytest.raises(ValueError, match=r"\['to_qq'\] match no Dense"):
    lora.check_targets(params, model.cfg.flux.lora_targets)
