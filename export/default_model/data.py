"""Synthetic captioned scenes for the built-in default model: numpy + Pillow only, seeded, deterministic.

A scene is a 128x128 RGB image of one or two flat-coloured shapes on a flat background:

* shapes: circle, square, triangle, star, diamond, cross (upright; no rotation);
* colours: a fixed palette of 10 RGB values (``PALETTE``: red, orange, yellow, green, blue, purple,
  pink, brown, white, black). The background is drawn from the same palette and never equals an
  object's colour; the closest pair of palette colours is ~100 apart in RGB;
* sizes: small (half-extent 12-15 px) and large (23-28 px);
* positions: left, right, top, bottom, centre. A single object sits at one of the five (its bbox
  centre within 6 px of (32|64|96, 32|64|96)); two objects sit as a left/right or top/bottom pair
  with at least 4 px between their boxes.

Rendering is 4x supersampled and box-filtered down (anti-aliased, crisp edges). Captions come from a
few templates ("a small green triangle above a red circle", "a red circle on the left and a blue star
on the right", "a large red circle in the centre on a blue background", "a blue background with a
red star at the top", ...). For one object the size, position and background are each stated with
probability 3/4; for two objects the relation is always stated (it is what places them) and the size
and background as before. Every stated word is true of the image.

Held-out split (compositional generalization). A scene is held out (``is_held_out``) when any of its
objects has one of the reserved (colour, shape) combinations ``HELD_OUT_COLOUR_SHAPE``

    red star, orange diamond, yellow cross, green triangle, blue square, purple circle

or one of the reserved (shape, position) combinations ``HELD_OUT_SHAPE_POSITION``

    circle bottom, square top, triangle right, star left, diamond centre, cross bottom

Every shape, colour and position still appears in training, each reserved colour with five other
shapes and each shape in four positions; only the pairings are unseen. ``sample_scene(rng,
allow="train")`` never yields a held-out scene, ``allow="held_out"`` yields only held-out scenes, and
``held_out_prompts(n, seed)`` gives fully specified captions (size, position, background stated) of
held-out scenes for evaluation. The README's example prompt "a red circle on a blue background" is a
training combination.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Literal, NamedTuple, Sequence

import numpy as np
from PIL import Image, ImageDraw

SIZE = 128  # image side in pixels
SUPERSAMPLE = 4

PALETTE: dict[str, tuple[int, int, int]] = {
    "red": (220, 20, 30),
    "orange": (245, 125, 0),
    "yellow": (255, 225, 0),
    "green": (20, 160, 40),
    "blue": (20, 60, 220),
    "purple": (130, 40, 170),
    "pink": (255, 130, 200),
    "brown": (120, 70, 20),
    "white": (250, 250, 250),
    "black": (10, 10, 10),
}
COLOURS: tuple[str, ...] = tuple(PALETTE)
SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "star", "diamond", "cross")
SIZES: tuple[str, ...] = ("small", "large")
POSITIONS: tuple[str, ...] = ("left", "right", "top", "bottom", "centre")

SIZE_RANGE = {"small": (12.0, 15.0), "large": (23.0, 28.0)}  # half-extent r in pixels (128 px image)
SIZE_THRESHOLD = 36.0  # a bbox's longer side below this (at 128 px) reads as small, above as large
POSITION_CENTRES = {
    "left": (32.0, 64.0),
    "right": (96.0, 64.0),
    "top": (64.0, 32.0),
    "bottom": (64.0, 96.0),
    "centre": (64.0, 64.0),
}
JITTER = 6.0  # max offset of a bbox centre from its position's centre, per axis
MARGIN = 2.0  # objects stay this far inside the image
GAP = 4.0  # min distance between the boxes of two objects

HELD_OUT_COLOUR_SHAPE: frozenset[tuple[str, str]] = frozenset(
    {
        ("red", "star"),
        ("orange", "diamond"),
        ("yellow", "cross"),
        ("green", "triangle"),
        ("blue", "square"),
        ("purple", "circle"),
    }
)
HELD_OUT_SHAPE_POSITION: frozenset[tuple[str, str]] = frozenset(
    {
        ("circle", "bottom"),
        ("square", "top"),
        ("triangle", "right"),
        ("star", "left"),
        ("diamond", "centre"),
        ("cross", "bottom"),
    }
)

DEFAULT_PROMPT = "a red circle on a blue background"


# --- geometry ---------------------------------------------------------------------------------


def _star(points: int = 5, inner: float = 0.42) -> list[tuple[float, float]]:
    out = []
    for k in range(2 * points):
        a = -math.pi / 2 + k * math.pi / points
        rad = 1.0 if k % 2 == 0 else inner
        out.append((rad * math.cos(a), rad * math.sin(a)))
    return out


def _centre_unit(poly: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """Shift a polygon so its bounding box is centred on the origin (bbox centre = placement)."""
    xs, ys = [p[0] for p in poly], [p[1] for p in poly]
    cx, cy = (min(xs) + max(xs)) / 2, (min(ys) + max(ys)) / 2
    return [(x - cx, y - cy) for x, y in poly]


_T = 0.32  # cross arm half-width
_E = 0.9  # cross / square half-extent
UNIT_SHAPES: dict[str, list[tuple[float, float]] | None] = {
    "circle": None,  # an ellipse of radius 1
    "square": [(-_E, -_E), (_E, -_E), (_E, _E), (-_E, _E)],
    "triangle": _centre_unit([(0.0, -1.0), (1.0, 0.8), (-1.0, 0.8)]),
    "star": _centre_unit(_star()),
    "diamond": [(0.0, -1.0), (0.75, 0.0), (0.0, 1.0), (-0.75, 0.0)],
    "cross": [
        (-_T, -_E), (_T, -_E), (_T, -_T), (_E, -_T), (_E, _T), (_T, _T),
        (_T, _E), (-_T, _E), (-_T, _T), (-_E, _T), (-_E, -_T), (-_T, -_T),
    ],
}


def unit_extent(shape: str) -> tuple[float, float]:
    """Half width and half height of a shape drawn with r = 1."""
    poly = UNIT_SHAPES[shape]
    if poly is None:
        return 1.0, 1.0
    return max(abs(x) for x, _ in poly), max(abs(y) for _, y in poly)


# --- scenes -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class SceneObject:
    shape: str
    colour: str
    size: str  # "small" | "large"
    position: str  # one of POSITIONS
    centre: tuple[float, float]  # bbox centre (x, y) in pixels of a SIZE x SIZE image
    r: float  # scale: the unit shape is multiplied by r

    @property
    def bbox(self) -> tuple[float, float, float, float]:
        """(x0, y0, x1, y1) in pixels."""
        hw, hh = unit_extent(self.shape)
        x, y = self.centre
        return (x - hw * self.r, y - hh * self.r, x + hw * self.r, y + hh * self.r)


@dataclass(frozen=True)
class Scene:
    objects: tuple[SceneObject, ...]
    background: str

    @property
    def relation(self) -> str | None:
        """For two objects: "horizontal" (left/right pair) or "vertical" (top/bottom pair)."""
        if len(self.objects) < 2:
            return None
        return "horizontal" if {o.position for o in self.objects} == {"left", "right"} else "vertical"


def object_held_out(colour: str, shape: str, position: str) -> bool:
    return (colour, shape) in HELD_OUT_COLOUR_SHAPE or (shape, position) in HELD_OUT_SHAPE_POSITION


def is_held_out(scene: Scene) -> bool:
    """True when any object has a reserved (colour, shape) or (shape, position) combination."""
    return any(object_held_out(o.colour, o.shape, o.position) for o in scene.objects)


def _choice(rng: np.random.Generator, seq: Sequence):
    return seq[int(rng.integers(len(seq)))]


def _place(rng: np.random.Generator, shape: str, size: str, position: str, colour: str) -> SceneObject:
    lo, hi = SIZE_RANGE[size]
    r = float(rng.uniform(lo, hi))
    hw, hh = unit_extent(shape)
    bx, by = POSITION_CENTRES[position]
    x = bx + float(rng.uniform(-JITTER, JITTER))
    y = by + float(rng.uniform(-JITTER, JITTER))
    x = min(max(x, MARGIN + hw * r), SIZE - MARGIN - hw * r)
    y = min(max(y, MARGIN + hh * r), SIZE - MARGIN - hh * r)
    return SceneObject(shape, colour, size, position, (round(x, 2), round(y, 2)), round(r, 2))


def _apart(a: SceneObject, b: SceneObject) -> bool:
    ax0, ay0, ax1, ay1 = a.bbox
    bx0, by0, bx1, by1 = b.bbox
    return ax1 + GAP <= bx0 or bx1 + GAP <= ax0 or ay1 + GAP <= by0 or by1 + GAP <= ay0


def sample_scene(
    rng: np.random.Generator,
    allow: Literal["train", "held_out", "all"] = "train",
    n_objects: int | None = None,
) -> Scene:
    """Draw a random scene. ``allow``: "train" never yields a held-out scene, "held_out" only held-out
    scenes, "all" either. ``n_objects`` 1 or 2 (default: either, with equal probability)."""
    if allow not in ("train", "held_out", "all"):
        raise ValueError(f"allow must be 'train', 'held_out' or 'all', not {allow!r}")
    for _ in range(10_000):
        n = n_objects if n_objects is not None else 1 + int(rng.integers(2))
        if n == 1:
            positions = [_choice(rng, POSITIONS)]
        elif n == 2:
            positions = list(_choice(rng, (("left", "right"), ("top", "bottom"))))
            if rng.integers(2):
                positions.reverse()
        else:
            raise ValueError("n_objects must be 1 or 2")
        objs = []
        for pos in positions:
            objs.append(_place(rng, _choice(rng, SHAPES), _choice(rng, SIZES), pos, _choice(rng, COLOURS)))
        if n == 2 and ((objs[0].colour, objs[0].shape) == (objs[1].colour, objs[1].shape) or not _apart(*objs)):
            continue
        used = {o.colour for o in objs}
        background = _choice(rng, [c for c in COLOURS if c not in used])
        scene = Scene(tuple(objs), background)
        held = is_held_out(scene)
        if allow == "all" or held == (allow == "held_out"):
            return scene
    raise RuntimeError("could not sample a scene")  # pragma: no cover


# --- rendering --------------------------------------------------------------------------------


def render(scene: Scene, size: int = SIZE) -> np.ndarray:
    """The scene as a uint8 (size, size, 3) RGB array (4x supersampled, box-filtered)."""
    s = size / SIZE * SUPERSAMPLE
    big = size * SUPERSAMPLE
    img = Image.new("RGB", (big, big), PALETTE[scene.background])
    draw = ImageDraw.Draw(img)
    for o in scene.objects:
        cx, cy = o.centre[0] * s, o.centre[1] * s
        r = o.r * s
        fill = PALETTE[o.colour]
        poly = UNIT_SHAPES[o.shape]
        if poly is None:
            draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
        else:
            draw.polygon([(cx + x * r, cy + y * r) for x, y in poly], fill=fill)
    return np.asarray(img.resize((size, size), Image.BOX), dtype=np.uint8)


# --- captions ---------------------------------------------------------------------------------

_ABSOLUTE = {
    "left": ("on the left",),
    "right": ("on the right",),
    "top": ("at the top",),
    "bottom": ("at the bottom",),
    "centre": ("in the centre", "in the center", "in the middle"),
}


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def _noun_phrase(o: SceneObject, with_size: bool) -> str:
    words = ([o.size] if with_size else []) + [o.colour, o.shape]
    return f"{_article(words[0])} {' '.join(words)}"


def caption(scene: Scene, rng: np.random.Generator) -> str:
    """A caption of ``scene`` from a few templates; every stated attribute is true of the image."""
    objs = scene.objects
    nps = [_noun_phrase(o, bool(rng.random() < 0.75)) for o in objs]
    if len(objs) == 1:
        pos = " " + _choice(rng, _ABSOLUTE[objs[0].position]) if rng.random() < 0.75 else ""
        body = nps[0] + pos
    else:
        a, b = objs
        na, nb = nps
        if rng.integers(2):  # mention the other one first
            a, b, na, nb = b, a, nb, na
        if scene.relation == "horizontal":
            forms = [
                f"{na} to the {a.position} of {nb}",
                f"{na} {_ABSOLUTE[a.position][0]} and {nb} {_ABSOLUTE[b.position][0]}",
            ]
        else:
            rel = "above" if a.position == "top" else "below"
            forms = [f"{na} {rel} {nb}", f"{na} {_ABSOLUTE[a.position][0]} and {nb} {_ABSOLUTE[b.position][0]}"]
        body = _choice(rng, forms)
    if rng.random() >= 0.75:
        return body
    bg = scene.background
    return _choice(
        rng,
        [
            f"{body} on {_article(bg)} {bg} background",
            f"{body} against {_article(bg)} {bg} background",
            f"{body}, {bg} background",
            f"{_article(bg)} {bg} background with {body}",
        ],
    )


def full_caption(scene: Scene) -> str:
    """The fully specified caption (every size, position and the background stated)."""
    objs = scene.objects
    nps = [_noun_phrase(o, True) for o in objs]
    if len(objs) == 1:
        body = f"{nps[0]} {_ABSOLUTE[objs[0].position][0]}"
    elif scene.relation == "horizontal":
        body = f"{nps[0]} to the {objs[0].position} of {nps[1]}"
    else:
        body = f"{nps[0]} {'above' if objs[0].position == 'top' else 'below'} {nps[1]}"
    bg = scene.background
    return f"{body} on {_article(bg)} {bg} background"


def held_out_prompts(n: int, seed: int = 0) -> list[str]:
    """``n`` fully specified captions of held-out scenes (deterministic for a seed)."""
    return [full_caption(s) for s in held_out_scenes(n, seed)]


def held_out_scenes(n: int, seed: int = 0) -> list[Scene]:
    rng = np.random.default_rng([seed, 0x4E1D])
    return [sample_scene(rng, allow="held_out") for _ in range(n)]


def train_dist_prompts(n: int, seed: int = 0) -> list[str]:
    """``n`` fully specified captions of fresh training-distribution scenes (not the training set's)."""
    rng = np.random.default_rng([seed, 0x7A1])
    return [full_caption(sample_scene(rng, allow="train")) for _ in range(n)]


# --- prompt parsing ---------------------------------------------------------------------------


class ObjectIntent(NamedTuple):
    colour: str | None
    shape: str | None
    size: str | None  # None when the prompt does not say
    position: str | None  # None when the prompt does not say


@dataclass(frozen=True)
class Intent:
    objects: tuple[ObjectIntent, ...]
    background: str | None = None


_SIZE_WORDS = {"small": "small", "tiny": "small", "little": "small", "large": "large", "big": "large"}
_SHAPE_WORDS = {s: s for s in SHAPES} | {"circles": "circle", "disc": "circle", "disk": "circle", "plus": "cross"}
_COLOUR_WORDS = {c: c for c in COLOURS} | {"grey": "gray", "violet": "purple"}
_COLOUR_WORDS = {k: v for k, v in _COLOUR_WORDS.items() if v in PALETTE}
_CENTRE_WORDS = {"centre", "center", "middle"}


def parse_prompt(text: str) -> Intent:
    """Read a prompt into its objects, (colour, shape, size, position) each (None where not
    stated), and its background colour (None where not stated). Understands the caption templates
    of this module: "[size] colour shape", "on the left/right", "at the top/bottom", "in the
    centre/center/middle", "X above/below Y", "X to the left/right of Y", "... on a C background",
    "a C background with ..."."""
    tokens = re.findall(r"[a-z]+", text.lower())
    objects: list[dict] = []
    spans: list[tuple[int, int]] = []
    background = None
    for i, tok in enumerate(tokens):
        if tok not in _COLOUR_WORDS or i + 1 >= len(tokens):
            continue
        nxt = tokens[i + 1]
        if nxt == "background":
            background = _COLOUR_WORDS[tok]
        elif nxt in _SHAPE_WORDS:
            size = _SIZE_WORDS.get(tokens[i - 1]) if i > 0 else None
            objects.append(dict(colour=_COLOUR_WORDS[tok], shape=_SHAPE_WORDS[nxt], size=size, position=None))
            spans.append((i, i + 2))
    for k, (_, end) in enumerate(spans):
        stop = spans[k + 1][0] if k + 1 < len(spans) else len(tokens)
        seg = tokens[end:stop]
        nxt_obj = objects[k + 1] if k + 1 < len(objects) else None
        relational = None
        if "above" in seg:
            relational = ("top", "bottom")
        elif "below" in seg or "under" in seg or "beneath" in seg:
            relational = ("bottom", "top")
        else:
            for j, w in enumerate(seg[:-1]):
                if w in ("left", "right") and seg[j + 1] == "of":
                    relational = (w, "right" if w == "left" else "left")
                    break
        if relational is not None and nxt_obj is not None:
            objects[k]["position"] = relational[0]
            if nxt_obj["position"] is None:
                nxt_obj["position"] = relational[1]
            continue
        for w in seg:
            if w in ("left", "right", "top", "bottom"):
                objects[k]["position"] = w
                break
            if w in _CENTRE_WORDS:
                objects[k]["position"] = "centre"
                break
    return Intent(tuple(ObjectIntent(**o) for o in objects), background)


def scene_intent(scene: Scene) -> Intent:
    """The fully specified intent of a scene (what ``parse_prompt(full_caption(scene))`` gives)."""
    return Intent(tuple(ObjectIntent(o.colour, o.shape, o.size, o.position) for o in scene.objects), scene.background)


# --- datasets ---------------------------------------------------------------------------------


def make_dataset(
    n: int, seed: int = 0, allow: Literal["train", "held_out", "all"] = "train", size: int = SIZE
) -> tuple[np.ndarray, list[str], list[Scene]]:
    """``n`` (image, caption, scene) triples: images uint8 (n, size, size, 3). Deterministic for a
    seed; the i-th triple depends only on (seed, i), so datasets of different n share a prefix."""
    images = np.empty((n, size, size, 3), np.uint8)
    captions, scenes = [], []
    for i in range(n):
        rng = np.random.default_rng([seed, i])
        scene = sample_scene(rng, allow=allow)
        images[i] = render(scene, size)
        captions.append(caption(scene, rng))
        scenes.append(scene)
    return images, captions, scenes
