"""`jaxedit bench`: every benchmark suite against its PyTorch reference, in one run.

    jaxedit bench [--suites editor_sft_step,grpo_rollout,grpo_update,planner_decode,opd_step]
        [--editor_config configs/shapes_editor_sft.py] [--planner_config ...]
        [--set KEY=VALUE ...] [--batch 32] [--repeats 5] [--cpu_devices N] [--out bench.json]

Measures the device's matmul peak first (in the editor's compute dtype), then runs each
suite (jaxedit and the reference on the same config, medians after warm-up), and quotes
MFU = model FLOPs per step / jaxedit seconds / that peak. Prints a table; writes JSON with
one entry per suite (jaxedit_s, reference_s, speedup = reference_s / jaxedit_s, mfu, ...).
"""

from __future__ import annotations

import argparse

import jax.numpy as jnp

from jaxedit.benchmarks import (SUITES, add_arguments, common, editor_step, grpo_rollout,
                                planner_decode)
from jaxedit.config import apply_overrides, load_file
from jaxedit.models.editor import DTYPES


def parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(prog="jaxedit bench", description=__doc__.split("\n")[0])
  add_arguments(p)
  return p


def run(args: argparse.Namespace) -> list[dict]:
  suites = [s for s in args.suites.split(",") if s]
  unknown = sorted(set(suites) - set(SUITES))
  if unknown:
    raise SystemExit(f"jaxedit bench: unknown suite(s) {unknown}; choose from {SUITES}")
  common.expose_cpu_devices(args.cpu_devices)  # before any JAX operation
  editor = load_file(args.editor_config)
  apply_overrides(editor, args.set)
  dtype = DTYPES[editor.model.dtype]
  peak = common.matmul_peak(dtype)
  print(f"matmul peak ({jnp.dtype(dtype).name}, measured): {peak / 1e12:.3f} TFLOP/s on "
        f"{common.machine()}")
  results = []
  for suite in suites:
    if suite in editor_step.SUITES:
      result = editor_step.run(suite, args.editor_config, args.set, args.batch, args.repeats,
                               reference=not args.no_reference)
    elif suite == "grpo_rollout":
      result = grpo_rollout.run(args.editor_config, args.set, args.batch, args.rollout_steps,
                                0.7, args.repeats)
    else:
      result = planner_decode.main(["--config", args.planner_config, "--batch",
                                    str(args.batch), "--repeats", str(args.repeats),
                                    "--cpu_devices", "0", "--out", ""])
    result["matmul_peak_flops"] = peak
    if result.get("model_flops"):
      result["mfu"] = result["model_flops"] / result["jaxedit_s"] / peak
    results.append(result)
  print(table(results))
  common.write_json(results, args.out)
  if args.out:
    print(f"wrote {args.out}")
  return results


def table(results: list[dict]) -> str:
  rows = [f"{'suite':<17}{'jaxedit s':>11}{'reference s':>13}{'speedup':>9}{'MFU':>7}"
          f"{'compile s':>11}  reference"]
  for r in results:
    mfu = f"{r['mfu']:.1%}" if "mfu" in r else "-"
    reference = {"planner_decode": "transformers generate",
                 "grpo_rollout": "PyTorch SDE loop"}.get(r["suite"], "diffusers fwd+bwd+AdamW")
    rows.append(f"{r['suite']:<17}{r['jaxedit_s']:>11.4f}{r['reference_s']:>13.4f}"
                f"{r['speedup']:>8.2f}x{mfu:>7}{r['jax_compile_s']:>11.1f}  {reference}")
  return "\n".join(rows)


def main(argv=None) -> list[dict]:
  return run(parser().parse_args(argv))


if __name__ == "__main__":
  main()
