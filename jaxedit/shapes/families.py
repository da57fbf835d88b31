"""Abstract instruction families: instructions that need reasoning to decompose.

Each family turns a scene into (instruction, ground-truth ordered plan of atomic edits,
checklist). The checklist is written from the family's meaning, not from the plan, so
"the plan reaches a scene that passes the checklist" is a real check. Families marked
`held_out` never appear in training; each family's `eval_phrasings` are kept out of
training too.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, NamedTuple, Sequence

import numpy as np

from jaxedit.shapes import checklist as cl
from jaxedit.shapes.edits import Add, Edit, Move, Recolor, Remove, Swap, plan_task, run_plan
from jaxedit.shapes.world import COLOURS, COOL, SHAPES, WARM, Obj, Scene

WARM_OF = {"green": "yellow", "blue": "orange", "purple": "red"}
COOL_OF = {"red": "purple", "orange": "blue", "yellow": "green"}
NUMBER_WORDS = {1: "one", 2: "two", 3: "three"}

# direction -> (row step, column step)
STEPS = {"left": (0, -1), "right": (0, 1), "up": (-1, 0), "down": (1, 0)}


class Solution(NamedTuple):
  slots: dict[str, str]  # fills the phrasing template
  plan: list[Edit]
  items: list  # checklist items, without the total count
  total: int  # number of objects in the expected scene


@dataclasses.dataclass(frozen=True)
class Family:
  name: str
  held_out: bool
  phrasings: tuple[str, ...]
  eval_phrasings: tuple[str, ...]
  solve: Callable[[np.random.Generator, Scene], Solution | None]


@dataclasses.dataclass(frozen=True)
class Task:
  family: str
  held_out_family: bool
  instruction: str
  plan: tuple[Edit, ...]
  checklist: cl.Checklist
  expected: Scene

  @property
  def task(self) -> str:
    return plan_task(self.plan)


def _choice(rng: np.random.Generator, seq: Sequence):
  return seq[int(rng.integers(len(seq)))]


def _pick_class(rng, scene: Scene):
  """A class of objects named by shape or by colour: (singular, plural, predicate)."""
  if rng.random() < 0.5:
    shape = _choice(rng, [o.shape for o in scene.objects])
    return shape, shape + "s", lambda o: o.shape == shape, cl.CountIs(0, shape=shape)
  colour = _choice(rng, [o.colour for o in scene.objects])
  return (f"{colour} shape", f"{colour} shapes", lambda o: o.colour == colour,
          cl.CountIs(0, colour=colour))


def _extreme(scene: Scene, direction: str) -> Obj | None:
  """The unique object furthest in `direction`, or None if it is a tie."""
  dr, dc = STEPS[direction]
  key = lambda o: o.cell[0] * dr + o.cell[1] * dc
  best = max(key(o) for o in scene.objects)
  top = [o for o in scene.objects if key(o) == best]
  return top[0] if len(top) == 1 else None


EXTREME_WORD = {"left": "leftmost", "right": "rightmost", "up": "topmost", "down": "bottommost"}
OPPOSITE = {"left": "right", "right": "left", "up": "down", "down": "up"}
EDGE_WORD = {"left": "left", "right": "right", "up": "top", "down": "bottom"}


def _recolor_theme(mapping: dict[str, str], allowed: tuple[str, ...]):
  def solve(rng, scene):
    targets = [o for o in scene.objects if o.colour in mapping]
    if not targets:
      return None
    plan = [Recolor(o.cell, mapping[o.colour]) for o in targets]
    items = [cl.HasObject(o.cell, o.shape, allowed) for o in targets]
    items += cl.pinned(scene, [o.cell for o in scene.objects if o.colour not in mapping])
    return Solution({}, plan, items, len(scene))
  return solve


def _remove_class(rng, scene):
  thing, things, match, none_left = _pick_class(rng, scene)
  targets = [o for o in scene.objects if match(o)]
  rest = [o.cell for o in scene.objects if not match(o)]
  plan = [Remove(o.cell) for o in targets]
  return Solution({"thing": thing, "things": things}, plan,
                  [none_left] + cl.pinned(scene, rest), len(rest))


def _keep_only(rng, scene):
  thing, things, match, _ = _pick_class(rng, scene)
  keep = [o.cell for o in scene.objects if match(o)]
  drop = [o for o in scene.objects if not match(o)]
  if not drop:
    return None
  return Solution({"thing": thing, "things": things}, [Remove(o.cell) for o in drop],
                  cl.pinned(scene, keep), len(keep))


def _recolor_class(rng, scene):
  thing, things, match, _ = _pick_class(rng, scene)
  colour = _choice(rng, COLOURS)
  targets = [o for o in scene.objects if match(o)]
  if all(o.colour == colour for o in targets):
    return None
  plan = [Recolor(o.cell, colour) for o in targets if o.colour != colour]
  items = [cl.HasObject(o.cell, o.shape, (colour,)) for o in targets]
  items += cl.pinned(scene, [o.cell for o in scene.objects if not match(o)])
  return Solution({"thing": thing, "things": things, "colour": colour}, plan, items, len(scene))


def _count(rng, scene):
  shape = _choice(rng, SHAPES)
  n = int(rng.integers(1, 4))
  have = [o for o in scene.objects if o.shape == shape]
  empty = scene.empty_cells()
  if len(have) == n or n - len(have) > len(empty):
    return None
  if len(have) < n:
    colour = have[0].colour if have else COLOURS[0]
    plan = [Add(cell, shape, colour) for cell in empty[:n - len(have)]]
  else:
    plan = [Remove(o.cell) for o in have[n:]]
  others = [o.cell for o in scene.objects if o.shape != shape]
  items = [cl.CountIs(n, shape=shape)] + cl.pinned(scene, others)
  noun = shape if n == 1 else shape + "s"
  return Solution({"n": NUMBER_WORDS[n], "shape_n": noun, "shapes": shape + "s"}, plan, items,
                  len(others) + n)


def _move_extreme(rng, scene):
  side = _choice(rng, list(STEPS))  # the object furthest towards `side` goes to the far edge
  obj = _extreme(scene, side)
  if obj is None:
    return None
  far = OPPOSITE[side]
  g = scene.grid_size - 1
  r, c = obj.cell
  to = {"left": (r, 0), "right": (r, g), "up": (0, c), "down": (g, c)}[far]
  if to == obj.cell or scene.at(to) is not None:
    return None
  items = [cl.HasObject(to, obj.shape, (obj.colour,)), cl.IsEmpty(obj.cell)]
  items += cl.pinned(scene, [o.cell for o in scene.objects if o != obj])
  slots = {"which": EXTREME_WORD[side], "edge": EDGE_WORD[far],
           "line": "row" if far in ("left", "right") else "column"}
  return Solution(slots, [Move(obj.cell, to)], items, len(scene))


def _swap_extremes(rng, scene):
  side = _choice(rng, ["left", "up"])
  a, b = _extreme(scene, side), _extreme(scene, OPPOSITE[side])
  if a is None or b is None or a == b or (a.shape, a.colour) == (b.shape, b.colour):
    return None
  items = [cl.HasObject(b.cell, a.shape, (a.colour,)), cl.HasObject(a.cell, b.shape, (b.colour,))]
  items += cl.pinned(scene, [o.cell for o in scene.objects if o not in (a, b)])
  slots = {"a": EXTREME_WORD[side], "b": EXTREME_WORD[OPPOSITE[side]]}
  return Solution(slots, [Swap(a.cell, b.cell)], items, len(scene))


def _shift_all(rng, scene):
  direction = _choice(rng, list(STEPS))
  dr, dc = STEPS[direction]
  g = scene.grid_size
  moved = [(o, (o.cell[0] + dr, o.cell[1] + dc)) for o in scene.objects]
  if any(not (0 <= r < g and 0 <= c < g) for _, (r, c) in moved):
    return None
  # Move the objects nearest the destination edge first, so every target cell is free.
  moved.sort(key=lambda m: -(m[0].cell[0] * dr + m[0].cell[1] * dc))
  plan = [Move(o.cell, to) for o, to in moved]
  items = [cl.HasObject(to, o.shape, (o.colour,)) for o, to in moved]
  return Solution({"dir": direction}, plan, items, len(scene))


def _mirror(rng, scene):
  g = scene.grid_size
  mirrored = Scene(g, [Obj((o.cell[0], g - 1 - o.cell[1]), o.shape, o.colour)
                       for o in scene.objects])
  if mirrored == scene:
    return None
  plan = []
  for r in range(g):
    for c in range(g // 2):
      a, b = scene.at((r, c)), scene.at((r, g - 1 - c))
      if a and b and (a.shape, a.colour) != (b.shape, b.colour):
        plan.append(Swap(a.cell, b.cell))
      elif a and not b:
        plan.append(Move(a.cell, (r, g - 1 - c)))
      elif b and not a:
        plan.append(Move(b.cell, (r, c)))
  return Solution({}, plan, cl.pinned(mirrored), len(scene))


RELATIONS = {"down": "directly below", "up": "directly above",
             "left": "immediately to the left of", "right": "immediately to the right of"}


def _neighbour_recolor(rng, scene):
  anchor = _choice(rng, scene.objects)
  direction = _choice(rng, list(STEPS))
  dr, dc = STEPS[direction]
  other = scene.at((anchor.cell[0] + dr, anchor.cell[1] + dc))
  if other is None:
    return None
  colour = _choice(rng, [c for c in COLOURS if c != other.colour])
  items = [cl.HasObject(other.cell, other.shape, (colour,))]
  items += cl.pinned(scene, [o.cell for o in scene.objects if o != other])
  slots = {"rel": RELATIONS[direction], "ref": scene.refer(anchor.cell)[len("the "):],
           "colour": colour}
  return Solution(slots, [Recolor(other.cell, colour)], items, len(scene))


FAMILIES = {f.name: f for f in [
    Family("warm_up", False,
           ("make every cool-coloured shape warm", "turn each cool colour into a warm one",
            "give all the cool shapes warm colours"),
           ("warm up the scene so that no cool colours remain",
            "recolour every green, blue or purple shape with a warm colour"),
           _recolor_theme(WARM_OF, WARM)),
    Family("remove_class", False,
           ("remove all the {things}", "get rid of every {thing}",
            "delete each {thing} from the picture"),
           ("take away all of the {things}", "the scene should contain no {things}"),
           _remove_class),
    Family("recolor_class", False,
           ("make all the {things} {colour}", "paint every {thing} {colour}",
            "turn each {thing} {colour}"),
           ("every {thing} should end up {colour}", "colour all of the {things} {colour}"),
           _recolor_class),
    Family("count", False,
           ("make there be exactly {n} {shape_n}", "change the scene so it has exactly {n} {shape_n}",
            "add or remove {shapes} until there are exactly {n}"),
           ("the picture should contain precisely {n} {shape_n}",
            "i want exactly {n} {shape_n} in the scene"),
           _count),
    Family("move_extreme", False,
           ("move the {which} shape to the {edge} edge",
            "put the {which} shape at the {edge} end of its {line}",
            "slide the {which} shape all the way to the {edge}"),
           ("the {which} shape should sit at the {edge} edge",
            "take the {which} shape over to the {edge} edge of its {line}"),
           _move_extreme),
    Family("swap_extremes", False,
           ("swap the {a} and {b} shapes", "exchange the positions of the {a} and the {b} shapes",
            "let the {a} and {b} shapes trade places"),
           ("the {a} and {b} shapes should switch places",
            "put the {a} shape where the {b} one is and vice versa"),
           _swap_extremes),
    Family("shift_all", False,
           ("shift every shape one cell {dir}", "move all the shapes one step {dir}",
            "nudge the whole scene one cell {dir}"),
           ("each shape should move one cell {dir}", "slide everything over by one cell, {dir}"),
           _shift_all),
    Family("neighbour_recolor", False,
           ("make the shape {rel} the {ref} {colour}", "paint the shape {rel} the {ref} {colour}",
            "the shape {rel} the {ref} should become {colour}"),
           ("recolour whatever shape is {rel} the {ref} to {colour}",
            "change the colour of the shape {rel} the {ref} to {colour}"),
           _neighbour_recolor),
    Family("cool_down", True,
           ("make every warm-coloured shape cool", "turn each warm colour into a cool one",
            "give all the warm shapes cool colours"),
           ("cool down the scene so that no warm colours remain",
            "recolour every red, orange or yellow shape with a cool colour"),
           _recolor_theme(COOL_OF, COOL)),
    Family("mirror", True,
           ("mirror the scene left to right", "flip the picture horizontally",
            "reflect every shape across the vertical middle line"),
           ("turn the scene into its left-right mirror image",
            "swap the left and right halves of the picture as in a mirror"),
           _mirror),
    Family("keep_only", True,
           ("remove every shape except the {things}", "keep only the {things} and delete the rest",
            "get rid of everything that is not a {thing}"),
           ("leave the {things} and take away all other shapes",
            "only the {things} should remain"),
           _keep_only),
]}

TRAIN_FAMILIES = tuple(n for n, f in FAMILIES.items() if not f.held_out)
HELD_OUT_FAMILIES = tuple(n for n, f in FAMILIES.items() if f.held_out)


def make_task(family: Family, rng: np.random.Generator, scene: Scene,
              eval_phrasing: bool) -> Task | None:
  """A task of `family` on `scene`, or None where the family does not apply to it."""
  if not scene.objects:
    return None
  solution = family.solve(rng, scene)
  if solution is None or not solution.plan:
    return None
  phrasings = family.eval_phrasings if eval_phrasing else family.phrasings
  instruction = _choice(rng, phrasings).format(**solution.slots)
  expected = run_plan(scene, solution.plan)[-1]
  return Task(family.name, family.held_out, instruction, tuple(solution.plan),
              cl.build(solution.items, solution.total), expected)
