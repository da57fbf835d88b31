"""`jaxedit bench`: every benchmark suite against its PyTorch reference, in one run.

    jaxedit bench [--suites editor_sft_step,grpo_rollout,grpo_update,planner_decode,opd_step]
        [--editor_config configs/shapes_editor_sft.py] [--planner_config ...]
        [--set KEY=VALUE ...] [--batch 32] [--repeats 5] [--cpu_devices N] [--out bench.json]
    jaxedit bench --suites edit_records --pipeline DIR --jsonl FILE [--bucket 512x512] ...

Runs each suite (jaxedit and the reference on the same config, medians after warm-up) and
quotes MFU = model FLOPs per step / jaxedit seconds / the device's matmul peak (in the
editor's compute dtype). The peak is measured before the suites and again after each one,
and MFU is quoted against the best reading: one brief measurement on a noisy machine read a
third of the peak once, and a suite came out above 100%. Every reading is kept
(`peak_readings`). Prints a table; writes JSON with one entry per suite (jaxedit_s,
reference_s, speedup = reference_s / jaxedit_s, mfu, matmul_peak_flops, peak_readings,
...). The edit_records suite (named only, it needs --pipeline and --jsonl) times the data
job's encoders and the records SFT step on cached inputs against the step that encodes them
(jaxedit/benchmarks/edit_records.py); its "reference" is the encoding step.
"""

from __future__ import annotations

import argparse

import jax.numpy as jnp

from jaxedit.benchmarks import (EXTRA_SUITES, SUITES, add_arguments, common, editor_step,
                                grpo_rollout, planner_decode)
from jaxedit.config import apply_overrides, load_file
from jaxedit.models.editor import DTYPES


def parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(prog="jaxedit bench", description=__doc__.split("\n")[0])
  add_arguments(p)
  return p


# The seconds MFU is quoted for, where not jaxedit_s (the SFT step on cached inputs).
MFU_SECONDS = {"edit_records": "step_cached_s"}
REFERENCES = {"planner_decode": "transformers generate", "grpo_rollout": "PyTorch SDE loop",
              "edit_records": "the SFT step encoding its inputs (VAE, T5, CLIP)"}


def check_suites(args: argparse.Namespace) -> list[str]:
  """The suites asked for, known and with their inputs (a clear error before any work)."""
  suites = [s for s in args.suites.split(",") if s]
  unknown = sorted(set(suites) - set(SUITES + EXTRA_SUITES))
  if unknown:
    raise SystemExit(f"jaxedit bench: unknown suite(s) {unknown}; choose from "
                     f"{SUITES + EXTRA_SUITES}")
  if "edit_records" in suites:
    from jaxedit.benchmarks import edit_records

    edit_records.check_inputs(args.pipeline, args.jsonl, "jaxedit bench: suite edit_records")
  return suites


def peak_reading(after: str, dtype) -> dict:
  """One reading of the matmul peak (the best of its repeats), labelled with what ran
  before it ('start' or a suite)."""
  flops = common.matmul_peak(dtype)
  print(f"matmul peak ({jnp.dtype(dtype).name}) after {after}: {flops / 1e12:.3f} TFLOP/s")
  return {"after": after, "flops": flops}


def run_suite(suite: str, args: argparse.Namespace) -> dict:
  if suite in editor_step.SUITES:
    return editor_step.run(suite, args.editor_config, args.set, args.batch, args.repeats,
                           reference=not args.no_reference)
  if suite == "grpo_rollout":
    return grpo_rollout.run(args.editor_config, args.set, args.batch, args.rollout_steps,
                            0.7, args.repeats)
  if suite == "edit_records":
    from jaxedit.benchmarks import edit_records

    return edit_records.run(args.pipeline, args.jsonl, edit_records.parse_bucket(args.bucket),
                            args.rows, args.batch, max_sequence_length=args.max_sequence_length,
                            repeats=args.repeats)
  return planner_decode.main(["--config", args.planner_config, "--batch", str(args.batch),
                              "--repeats", str(args.repeats), "--cpu_devices", "0", "--out", ""])


def with_peak(results: list[dict], readings: list[dict]) -> float:
  """Sets every result's matmul_peak_flops (the best reading), peak_readings and MFU;
  returns the peak. An MFU above 100% means the readings missed the device's peak."""
  peak = max(r["flops"] for r in readings)
  for result in results:
    result["matmul_peak_flops"], result["peak_readings"] = peak, readings
    seconds = result.get(MFU_SECONDS.get(result["suite"], "jaxedit_s"))
    if result.get("model_flops") and seconds:
      result["mfu"] = result["model_flops"] / seconds / peak
      if result["mfu"] > 1:
        print(f"warning: {result['suite']} at {result['mfu']:.1%} MFU: no peak reading "
              "reached the device's peak (a noisy machine?); compare within one run")
  return peak


def run(args: argparse.Namespace) -> list[dict]:
  suites = check_suites(args)
  common.expose_cpu_devices(args.cpu_devices)  # before any JAX operation
  editor = load_file(args.editor_config)
  apply_overrides(editor, args.set)
  dtype = DTYPES[editor.model.dtype]
  print(f"matmul peak: measured before the suites and after each, on {common.machine()}")
  readings = [peak_reading("start", dtype)]
  results = []
  for suite in suites:
    results.append(run_suite(suite, args))
    readings.append(peak_reading(suite, dtype))
  peak = with_peak(results, readings)
  print(f"matmul peak ({jnp.dtype(dtype).name}): {peak / 1e12:.3f} TFLOP/s, the best of "
        f"{len(readings)} readings (" + ", ".join(f"{r['flops'] / 1e12:.3f}"
                                                  for r in readings) + ")")
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
    if r["suite"] == "edit_records":  # jaxedit: cached inputs; reference: encoded each step
      times = (r["step_cached_s"], r["step_encoding_s"], r["step_ratio"])
      compile_s = "-"
    else:
      times = (r["jaxedit_s"], r["reference_s"], r["speedup"])
      compile_s = f"{r['jax_compile_s']:.1f}"
    reference = REFERENCES.get(r["suite"], "diffusers fwd+bwd+AdamW")
    rows.append(f"{r['suite']:<17}{times[0]:>11.4f}{times[1]:>13.4f}{times[2]:>8.2f}x"
                f"{mfu:>7}{compile_s:>11}  {reference}")
  return "\n".join(rows)


def main(argv=None) -> list[dict]:
  return run(parser().parse_args(argv))


if __name__ == "__main__":
  main()
