"""Benchmarks: each suite times jaxedit against its PyTorch reference (`jaxedit bench` runs
them all). This package's top level is argparse only, so the CLI can list its options
without importing JAX."""

from __future__ import annotations

import argparse
import os

SUITES = ("editor_sft_step", "grpo_rollout", "grpo_update", "planner_decode", "opd_step")


def add_arguments(p: argparse.ArgumentParser) -> None:
  p.add_argument("--suites", default=",".join(SUITES),
                 help=f"comma-separated, from {', '.join(SUITES)}")
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
