"""Matmul FLOPs of a JAX function, counted on its jaxpr.

XLA's `cost_analysis()` counts the body of a loop once, so a model scanned over its layers
(and the loops of a sampler) would be undercounted by the trip count. This walks the jaxpr
instead: every `dot_general` and convolution (2 FLOPs per multiply-add), each scan body
times its length, recomputation under remat included, as the hardware executes them. The
count is for the whole (global) program; divide by the devices for a per-device share.
"""

from __future__ import annotations

import math

import jax
from jax.extend import core


def _dot_flops(eqn) -> int:
  (contract, _), _ = eqn.params["dimension_numbers"]
  lhs = eqn.invars[0].aval
  return 2 * math.prod(eqn.outvars[0].aval.shape) * math.prod(lhs.shape[i] for i in contract)


def _conv_flops(eqn) -> int:
  rhs = eqn.invars[1].aval  # kernel: its non-output-feature dims are summed per output
  spec = eqn.params["dimension_numbers"]
  out_feature_dim = spec.rhs_spec[0] if spec is not None else 0
  per_output = math.prod(s for i, s in enumerate(rhs.shape) if i != out_feature_dim)
  return 2 * math.prod(eqn.outvars[0].aval.shape) * per_output


def _sub_jaxprs(params):
  for value in params.values():
    values = value if isinstance(value, (tuple, list)) else [value]
    for v in values:
      if isinstance(v, core.ClosedJaxpr):
        yield v.jaxpr
      elif isinstance(v, core.Jaxpr):
        yield v


def jaxpr_flops(jaxpr) -> int:
  total = 0
  for eqn in jaxpr.eqns:
    name = eqn.primitive.name
    if name == "dot_general":
      total += _dot_flops(eqn)
    elif name == "conv_general_dilated":
      total += _conv_flops(eqn)
    elif name == "scan":
      total += eqn.params["length"] * jaxpr_flops(eqn.params["jaxpr"].jaxpr)
    elif name == "cond":  # the costliest branch
      total += max(jaxpr_flops(b.jaxpr) for b in eqn.params["branches"])
    elif name == "while":  # trip count unknown: one pass of the body
      total += jaxpr_flops(eqn.params["body_jaxpr"].jaxpr)
    else:  # pjit, remat, custom_jvp/vjp, shard_map, ...: their inner jaxprs
      total += sum(jaxpr_flops(sub) for sub in _sub_jaxprs(eqn.params))
  return total


def count(fn, *args, **kwargs) -> int:
  """Matmul FLOPs of `fn(*args, **kwargs)` (arguments may be ShapeDtypeStructs)."""
  return jaxpr_flops(jax.make_jaxpr(fn)(*args, **kwargs).jaxpr)
