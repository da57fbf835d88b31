"""Errors that name a problem with a user's input, caught by the CLI to end a command cleanly.
(`config.ConfigError` for configs and `shapes.world.SceneError` for scenes live with what they
check.) Importing this module loads nothing else, so `jaxedit --help` stays fast."""


class CorruptRecordError(RuntimeError):
  """A record that cannot be read or decoded, or whose content is inconsistent."""


class MappingError(ValueError):
  """Tensors missing, unexpected or of the wrong shape when loading weights."""


class DatasetError(ValueError):
  """A row of an input dataset (a lab's JSONL) that cannot be used, named by file and line."""
