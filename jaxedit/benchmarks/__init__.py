"""Benchmarks: each suite times jaxedit against its PyTorch reference (`jaxedit bench` runs
them all). This package's top level is argparse only, so the CLI can list its options
without importing JAX."""

from __future__ import annotations

import argparse
import os

SUITES = ("editor_sft_step", "grpo_rollout", "grpo_update", "planner_decode", "opd_step")
# Run only when named: they need inputs of the user's (edit_records: --pipeline and --jsonl).
EXTRA_SUITES = ("edit_records",)


def add_arguments(p: argparse.ArgumentParser) -> None:
  p.add_argument("--suites", default=",".join(SUITES),
                 help=f"comma-separated, from {', '.join(SUITES + EXTRA_SUITES)} (default: all "
                      "but edit_records, which needs --pipeline and --jsonl)")
  p.add_argument("--editor_config", default="configs/shapes_editor_sft.py")
  p.add_argument("--planner_config", default="configs/shapes_planner_sft.py")
  p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                 help="editor config override, e.g. model.num_layers=8 (repeatable)")
  p.add_argument("--batch", type=int, default=32)
  p.add_argument("--rollout_steps", type=int, default=8)
  p.add_argument("--repeats", type=int, default=5)
  p.add_argument("--out", default="bench.json")
  p.add_argument("--no_reference", action="store_true",
                 help="editor step suites: time jaxedit alone (speedup is NaN)")
  p.add_argument("--cpu_devices", type=int, default=os.cpu_count(),
                 help="JAX CPU devices, one per core by default: the rollout and planner "
                      "decoding split their batch over them (0: JAX's default)")
  e = p.add_argument_group("edit_records suite (jaxedit/benchmarks/edit_records.py)")
  e.add_argument("--pipeline", default="", help="a diffusers FLUX.1(-Kontext) pipeline folder")
  e.add_argument("--jsonl", default="", help="a JSONL of edits with source and target images")
  e.add_argument("--bucket", default="512x512", help="HxW every row is fitted to")
  e.add_argument("--rows", type=int, default=64, help="the JSONL's first rows (0: all)")
  e.add_argument("--max_sequence_length", type=int, default=512, help="T5 tokens")
