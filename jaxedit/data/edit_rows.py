"""Rows of a lab's own edit dataset: JSONL in the formats labs have, checked row by row, and
images fitted to a small set of aspect-ratio buckets.

Formats (`data.format`; "auto" tells them apart by the first row's keys):
  edit_r1    flow_grpo / Edit-R1 `train_metadata.jsonl`: {"prompt", "image", "requirement"?}
  dancegrpo  DanceGRPO / Pref-GRPO: {"instruction", "source_image", "target_image"?}
  editscore  EditScore RL data: {"instruction", "input_images": [one path]}
  gedit      GEdit-Bench / ImgEdit-style benchmarks: {"key", "task_type", "instruction",
             "input_image"}
  fields     anything else, through `data.fields` (which key holds what)
Image paths are relative to the JSONL file's folder (or absolute). An optional id comes from
"id", "key" or "uid" (or `data.fields.id`); rows without one are named by file and line. An
optional task type (what eval reports scores by) comes from "task_type" or "edit_type" (or
`data.fields.task_type`).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from typing import Any, Iterable, Mapping, Sequence

import numpy as np
from PIL import Image, ImageOps

from jaxedit.errors import DatasetError

ROLES = ("id", "instruction", "source_image", "target_image", "requirement", "task_type")
FORMATS: dict[str, dict[str, str]] = {
    "edit_r1": {"instruction": "prompt", "source_image": "image",
                "requirement": "requirement"},
    "dancegrpo": {"instruction": "instruction", "source_image": "source_image",
                  "target_image": "target_image"},
    "editscore": {"instruction": "instruction", "source_image": "input_images"},
    "gedit": {"instruction": "instruction", "source_image": "input_image"},
}
ID_KEYS = ("id", "key", "uid")
TASK_TYPE_KEYS = ("task_type", "edit_type")
BAD_ROW_POLICIES = ("error", "skip")
# Source and target must show the same scene: their aspect ratios may differ by rounding.
ASPECT_TOLERANCE = 0.05
EXIF_IN_HEADER = ("JPEG", "MPO", "TIFF", "WEBP")


@dataclasses.dataclass(frozen=True)
class EditRow:
  """One checked row: where it came from, what it asks, and its images' absolute paths."""

  id: str
  instruction: str
  source_image: str
  file: str
  line: int
  target_image: str = ""
  requirement: str = ""
  task_type: str = ""  # the benchmark's category of the edit, if it has one
  source_size: tuple[int, int] = (0, 0)  # (height, width), read from the file's header

  @property
  def where(self) -> str:
    return f"{self.file}:{self.line}"


@dataclasses.dataclass(frozen=True)
class BadRow:
  file: str
  line: int
  reason: str

  @property
  def where(self) -> str:
    return f"{self.file}:{self.line}"

  def as_dict(self) -> dict:
    return {"file": self.file, "line": self.line, "reason": self.reason}


def detect_format(row: Mapping[str, Any], where: str) -> str:
  """The known format whose keys `row` has."""
  for name, fields in FORMATS.items():
    if fields["instruction"] in row and fields["source_image"] in row:
      return name
  known = "; ".join(f"{n}: {{{', '.join(repr(v) for v in f.values())}}}"
                    for n, f in FORMATS.items())
  raise DatasetError(f"{where}: cannot tell the format from this row's keys {sorted(row)}; "
                     f"known formats ({known}), or set data.format='fields' and "
                     "data.fields.instruction / .source_image (/ .target_image, .id) to its keys")


def field_map(fmt: str, fields: Mapping[str, str], first_row: Mapping[str, Any] | None,
              where: str) -> dict[str, str]:
  """role -> key in the rows, for format `fmt` ('auto' reads it off `first_row`); a key
  named in `fields` overrides the format's."""
  if fmt == "auto":
    fmt = detect_format(first_row or {}, where)
  if fmt == "fields":
    mapping = {}
  elif fmt in FORMATS:
    mapping = dict(FORMATS[fmt])
  else:
    raise DatasetError(f"data.format must be 'auto', 'fields' or one of {sorted(FORMATS)}, "
                       f"got {fmt!r}")
  unknown = sorted(set(fields) - set(ROLES))
  if unknown:
    raise DatasetError(f"data.fields has unknown roles {unknown}; roles: {ROLES}")
  mapping.update({role: key for role, key in fields.items() if key})
  missing = [role for role in ("instruction", "source_image") if role not in mapping]
  if missing:
    raise DatasetError(f"data.format='fields' needs data.fields.{' and data.fields.'.join(missing)}"
                       " (the row keys that hold them)")
  return mapping


def _text(value: Any) -> str | None:
  return value.strip() if isinstance(value, str) else None


def _image_path(value: Any, role: str, folder: str) -> str:
  """The one image path in `value` (a string, or a list holding one), made absolute."""
  if isinstance(value, list):
    if len(value) != 1:
      raise ValueError(f"{role} lists {len(value)} images; jaxedit edits one source image")
    value = value[0]
  if not isinstance(value, str) or not value.strip():
    raise ValueError(f"{role} must be a non-empty image path, got {value!r}")
  return value if os.path.isabs(value) else os.path.normpath(os.path.join(folder, value))


def image_size(path: str, role: str) -> tuple[int, int]:
  """(height, width) from the image file's header; a named error if it is not one."""
  if not os.path.exists(path):
    raise ValueError(f"{role} {path} does not exist")
  try:
    with Image.open(path) as image:
      width, height = image.size
      # EXIF from the header where it lives there (PNG's getexif decodes the whole image)
      orientation = (image.getexif().get(0x0112, 1) if image.format in EXIF_IN_HEADER
                     else 1)
  except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
    raise ValueError(f"{role} {path} is not a readable image ({e})") from None
  if orientation in (5, 6, 7, 8):  # EXIF rotated by 90 degrees: shown transposed
    width, height = height, width
  if min(width, height) < 1:
    raise ValueError(f"{role} {path} is empty ({width}x{height})")
  return height, width


def parse_row(raw: Any, mapping: Mapping[str, str], file: str, line: int) -> EditRow:
  """An EditRow from one decoded JSON line, or ValueError saying what is wrong with it."""
  if not isinstance(raw, dict):
    raise ValueError(f"a row must be a JSON object, got {type(raw).__name__}")
  folder = os.path.dirname(os.path.abspath(file))
  for role in ("instruction", "source_image"):
    if mapping[role] not in raw:
      raise ValueError(f"no {mapping[role]!r} key ({role}); the row has {sorted(raw)}")
  instruction = _text(raw[mapping["instruction"]])
  if not instruction:
    raise ValueError(f"the instruction ({mapping['instruction']!r}) is empty or not a string: "
                     f"{raw[mapping['instruction']]!r}")
  source = _image_path(raw[mapping["source_image"]], "source image", folder)
  target = ""
  target_key = mapping.get("target_image")
  if target_key and raw.get(target_key) not in (None, ""):
    target = _image_path(raw[target_key], "target image", folder)
  requirement = raw.get(mapping.get("requirement", ""), "") or ""
  if not isinstance(requirement, str):
    requirement = json.dumps(requirement)  # a structured checklist, kept as its JSON
  task_key = mapping.get("task_type") or next((k for k in TASK_TYPE_KEYS if k in raw), None)
  if mapping.get("task_type") and mapping["task_type"] not in raw:
    raise ValueError(f"no {mapping['task_type']!r} key (task_type); the row has {sorted(raw)}")
  task_type = raw[task_key] if task_key else ""
  if not isinstance(task_type, str):
    raise ValueError(f"the task type ({task_key!r}) must be a string, got {task_type!r}")
  id_key = mapping.get("id") or next((k for k in ID_KEYS if k in raw), None)
  if mapping.get("id") and mapping["id"] not in raw:
    raise ValueError(f"no {mapping['id']!r} key (id); the row has {sorted(raw)}")
  row_id = (str(raw[id_key]).strip() if id_key else "") or f"{os.path.basename(file)}:{line}"
  size = image_size(source, "source image")
  if target:
    target_size = image_size(target, "target image")
    ratio = (size[1] / size[0]) / (target_size[1] / target_size[0])
    if abs(math.log(ratio)) > math.log1p(ASPECT_TOLERANCE):
      raise ValueError(f"the target image is {target_size[1]}x{target_size[0]} but the source "
                       f"is {size[1]}x{size[0]}: they do not show the same frame")
  return EditRow(id=row_id, instruction=instruction, source_image=source, file=file,
                 line=line, target_image=target, requirement=requirement,
                 task_type=task_type.strip(), source_size=size)


def read_rows(path: str, fmt: str = "auto", fields: Mapping[str, str] | None = None,
              ) -> tuple[list[EditRow], list[BadRow]]:
  """The good and the bad rows of one JSONL file (blank lines are not rows)."""
  if not os.path.isfile(path):
    raise DatasetError(f"{path} is not a file (data.train / data.test name JSONL files, or "
                       "a folder holding train_metadata.jsonl)")
  rows, bad, mapping = [], [], None
  with open(path, encoding="utf-8") as f:
    for line, text in enumerate(f, start=1):
      if not text.strip():
        continue
      try:
        raw = json.loads(text)
      except json.JSONDecodeError as e:
        bad.append(BadRow(path, line, f"not valid JSON ({e.msg} at column {e.colno})"))
        continue
      if mapping is None:
        mapping = field_map(fmt, fields or {}, raw if isinstance(raw, dict) else None,
                            f"{path}:{line}")
      try:
        rows.append(parse_row(raw, mapping, path, line))
      except ValueError as e:
        bad.append(BadRow(path, line, str(e)))
  return rows, bad


def check_unique(rows: Iterable[EditRow]) -> list[BadRow]:
  """Rows whose id, or whose source image and instruction, an earlier row (of any split)
  already has: training on one edit twice, or testing on a training edit, is never meant."""
  first, bad = {}, []
  for row in rows:
    for key, what in ((("id", row.id), f"duplicate id {row.id!r}"),
                      (("edit", row.source_image, row.instruction), "the same source image "
                       "and instruction as another row")):
      if key in first:
        bad.append(BadRow(row.file, row.line, f"{what} (first at {first[key].where})"))
        break
    else:
      first[("id", row.id)] = first[("edit", row.source_image, row.instruction)] = row
  return bad


def apply_policy(bad: Sequence[BadRow], policy: str, total: int) -> None:
  """Raises on the first bad row under 'error'; under 'skip' they are the caller's to list."""
  if policy not in BAD_ROW_POLICIES:
    raise DatasetError(f"data.on_bad_row must be one of {BAD_ROW_POLICIES}, got {policy!r}")
  if bad and policy == "error":
    more = f" (and {len(bad) - 1} more bad rows)" if len(bad) > 1 else ""
    raise DatasetError(f"{bad[0].where}: {bad[0].reason}{more}; fix the rows, or set "
                       "data.on_bad_row=skip to leave them out (they are listed in the summary)")
  if bad and len(bad) == total:
    raise DatasetError(f"every one of the {total} rows is bad; the first: {bad[0].where}: "
                       f"{bad[0].reason}")


# ------------------------------------------------------------------------------------------
# Aspect-ratio buckets: fixed shapes, as TPUs want.
# ------------------------------------------------------------------------------------------
def check_buckets(buckets: Sequence[Sequence[int]], multiple: int) -> list[tuple[int, int]]:
  """(height, width) pairs, each a positive multiple of `multiple` (the VAE's downsampling
  times the patch size), no two alike."""
  out = []
  for bucket in buckets:
    if len(bucket) != 2 or any(int(s) != s or s <= 0 or s % multiple for s in bucket):
      raise DatasetError(f"data.buckets: {tuple(bucket)} must be (height, width), positive "
                         f"multiples of {multiple}")
    out.append((int(bucket[0]), int(bucket[1])))
  if not out or len(set(out)) != len(out):
    raise DatasetError(f"data.buckets must list distinct (height, width) pairs, got {out}")
  return out


def nearest_bucket(size: tuple[int, int], buckets: Sequence[tuple[int, int]]) -> int:
  """The index of the bucket whose aspect ratio is closest to (height, width)'s, on a log
  scale (so 2:1 and 1:2 are equally far from 1:1); ties go to the earlier bucket."""
  aspect = math.log(size[1] / size[0])
  return min(range(len(buckets)), key=lambda i: abs(math.log(buckets[i][1] / buckets[i][0])
                                                      - aspect))


def load_image(path: str) -> Image.Image:
  """An RGB image as it is displayed: EXIF orientation applied, transparency over white."""
  with Image.open(path) as image:
    image = ImageOps.exif_transpose(image)
    image.load()
  if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
    image = image.convert("RGBA")
    background = Image.new("RGBA", image.size, (255, 255, 255, 255))
    image = Image.alpha_composite(background, image)
  return image.convert("RGB")


def fit_to_bucket(image: Image.Image, bucket: tuple[int, int]) -> np.ndarray:
  """uint8 (height, width, 3): scaled to cover the bucket (Lanczos), centre-cropped."""
  height, width = bucket
  scale = max(width / image.width, height / image.height)
  w, h = max(width, round(image.width * scale)), max(height, round(image.height * scale))
  image = image.resize((w, h), Image.Resampling.LANCZOS)
  left, top = (w - width) // 2, (h - height) // 2
  return np.asarray(image.crop((left, top, left + width, top + height)), np.uint8)
