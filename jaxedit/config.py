"""Config files, command-line overrides and validation (docs/design.md section 10).

A config file is Python with `get_config(arg=None) -> ml_collections.ConfigDict`, selected as
`path/to/file.py[:arg]` and overridden with `--config.key.sub=value`. Every job validates its
config against its reference config at start-up, so a misspelt or ill-typed key stops the
run before any work with an error that names it.
"""

from __future__ import annotations

import ast
import difflib
import importlib.util
import os
from typing import Any, Sequence

import ml_collections


class ConfigError(ValueError):
  """A config that cannot be used: unknown key, wrong type, bad value, unloadable file."""


def load_module(path: str):
  """The module of a config file (which holds get_config and maybe get_sweep)."""
  if not os.path.isfile(path):
    raise ConfigError(f"config file {path!r} does not exist")
  module_spec = importlib.util.spec_from_file_location("_jaxedit_config", path)
  module = importlib.util.module_from_spec(module_spec)
  try:
    module_spec.loader.exec_module(module)
  except Exception as e:
    raise ConfigError(f"config file {path!r} failed to load: {e!r}") from e
  return module


def load_file(spec: str) -> ml_collections.ConfigDict:
  """Loads `path.py[:arg]` by calling its `get_config(arg)`."""
  path, _, arg = spec.partition(":")
  module = load_module(path)
  if not hasattr(module, "get_config"):
    raise ConfigError(f"config file {path!r} has no get_config() function")
  try:
    config = module.get_config(arg) if arg else module.get_config()
  except (AttributeError, KeyError, TypeError, ValueError) as e:  # ConfigDict type checks, typos
    raise ConfigError(f"{spec}: get_config() failed: {e}") from e
  if not isinstance(config, ml_collections.ConfigDict):
    raise ConfigError(f"{path}: get_config() must return an ml_collections.ConfigDict, "
                      f"got {type(config).__name__}")
  return config


def _flatten(config: ml_collections.ConfigDict, prefix: str = "") -> dict[str, Any]:
  out = {}
  for key, value in config.items():
    name = f"{prefix}{key}"
    if isinstance(value, ml_collections.ConfigDict):
      out.update(_flatten(value, name + "."))
    else:
      out[name] = value
  return out


# Sections whose keys are the user's names, not the schema's (OPD's teachers by task tag):
# any key, each a string.
NAMED_BY_USER = ("opd.teachers",)


def _named_by_user(name: str) -> bool:
  return any(name.startswith(section + ".") for section in NAMED_BY_USER)


def _unknown(name: str, known: Sequence[str]) -> ConfigError:
  close = difflib.get_close_matches(name, known, n=1)
  hint = f" (did you mean {close[0]!r}?)" if close else ""
  return ConfigError(f"unknown config key {name!r}{hint}")


def _type_ok(value: Any, reference: Any) -> bool:
  if reference is None or value is None:
    return True
  if isinstance(reference, bool) or isinstance(value, bool):
    return isinstance(value, bool) and isinstance(reference, bool)
  if isinstance(reference, float):
    return isinstance(value, (int, float))
  if isinstance(reference, (tuple, list)):
    return isinstance(value, (tuple, list))
  return isinstance(value, type(reference))


def plain(value: Any) -> Any:
  """JSON-like form of a config value (ConfigDicts to dicts, tuples to lists), for comparing
  a saved config (or a config.json) with a live one."""
  if hasattr(value, "to_dict"):
    value = value.to_dict()
  if isinstance(value, dict):
    return {k: plain(v) for k, v in value.items()}
  return [plain(v) for v in value] if isinstance(value, (tuple, list)) else value


def validate(config: ml_collections.ConfigDict, reference: ml_collections.ConfigDict) -> None:
  """Checks that `config` has exactly the keys of `reference`, with compatible types."""
  have, want = _flatten(config), _flatten(reference)
  for name, value in have.items():
    if _named_by_user(name):
      if not isinstance(value, str):
        raise ConfigError(f"config key {name!r} must be of type str, got "
                          f"{type(value).__name__} {value!r}")
      continue
    if name not in want:
      raise _unknown(name, list(want))
    if not _type_ok(value, want[name]):
      raise ConfigError(f"config key {name!r} must be of type {type(want[name]).__name__}, "
                        f"got {type(value).__name__} {value!r}")
  missing = sorted(name for name in set(want) - set(have) if not _named_by_user(name))
  if missing:
    raise ConfigError(f"config is missing keys: {', '.join(missing)}")


def _parse_value(name: str, text: str, current: Any) -> Any:
  if isinstance(current, str):
    return text
  if isinstance(current, bool):
    if text.lower() in ("true", "1", "yes"):
      return True
    if text.lower() in ("false", "0", "no"):
      return False
    raise ConfigError(f"config key {name!r} is a bool; cannot parse {text!r}")
  try:
    value = ast.literal_eval(text)
  except (ValueError, SyntaxError):
    if current is None:
      return text
    raise ConfigError(f"config key {name!r} is a {type(current).__name__}; "
                      f"cannot parse {text!r}") from None
  if isinstance(current, float) and isinstance(value, int) and not isinstance(value, bool):
    value = float(value)
  if isinstance(current, tuple) and isinstance(value, list):
    value = tuple(value)
  if not _type_ok(value, current):
    raise ConfigError(f"config key {name!r} must be of type {type(current).__name__}, "
                      f"got {text!r}")
  return value


def apply_overrides(config: ml_collections.ConfigDict, overrides: Sequence[str]) -> None:
  """Applies `key.sub=value` overrides in place; values parse by the key's current type."""
  known = list(_flatten(config))
  for override in overrides:
    name, eq, text = override.partition("=")
    if not eq:
      raise ConfigError(f"override {override!r} must look like key=value")
    *parents, leaf = name.split(".")
    node = config
    for part in parents:
      if not isinstance(node, ml_collections.ConfigDict) or part not in node:
        raise _unknown(name, known)
      node = node[part]
    if isinstance(node, ml_collections.ConfigDict) and leaf not in node and _named_by_user(name):
      with node.unlocked():
        node[leaf] = text  # a new name in a section of the user's names
      continue
    if not isinstance(node, ml_collections.ConfigDict) or leaf not in node:
      raise _unknown(name, known)
    if isinstance(node[leaf], ml_collections.ConfigDict):
      raise ConfigError(f"config key {name!r} is a section; override its keys instead")
    with node.unlocked():
      node[leaf] = _parse_value(name, text, node[leaf])


def write_file(config: ml_collections.ConfigDict, path: str) -> str:
  """Writes `config` as a config file whose get_config() returns it: a resolved config
  (overrides and sweep settings applied) that a launcher ships to every worker."""
  text = (f'"""Written by jaxedit.config.write_file."""\n\nimport ml_collections\n\n\n'
          f"def get_config(arg=None):\n"
          f"  return ml_collections.ConfigDict({config.to_dict()!r})\n")
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  with open(path, "w") as f:
    f.write(text)
  return path


def load(spec: str, overrides: Sequence[str] = (),
         reference: ml_collections.ConfigDict | None = None) -> ml_collections.ConfigDict:
  """Loads a config file, applies overrides and validates against `reference`."""
  config = load_file(spec)
  if reference is not None:
    validate(config, reference)
  apply_overrides(config, overrides)
  return config
