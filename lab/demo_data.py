"""A small, licence-clean, deterministic image-text dataset that `bicro-clean demo` generates itself.

Why: the demo must run on a fresh clone with no network and no workspace data. Downloaded or copied photos would
bring licences and a download; instead every picture is drawn here (PIL) and every caption written from the same
scene description, so the data is ours to ship and the same seed always gives the same bytes.

What it looks like: a captioned-photo dataset in miniature. Each scene is a landscape or a room (meadow, beach,
snow, night, desert, room: sky, horizon, ground texture, sun, clouds, trees, stars) with one to four objects of
one kind and colour (balls, boxes, tents, cars, flags on the ground; balloons and kites in the air), grouped on
the left, in the middle or on the right. Positions, sizes, shades, horizon, extras and pixel grain vary per
scene. Each scene gets `captions_per_image` different sentences (Flickr8k has five) built from varied templates
and synonyms; each names what an image tower sees (the kind of place, the objects' kind, colour and count,
sometimes their side and the weather) and never anything that is not drawn. So a clean pair is recognisable from
frozen ImageNet / sentence features, and a shuffled caption (the NCR noise protocol) names another scene.

Layout written (what `pipeline.make_shards` reads): ``images/scene_NNNNN.jpg`` (224x224 JPEG) and
``captions.csv`` with the columns ``image,caption``, plus a README.md saying where the data came from.
"""

from __future__ import annotations

import csv
import io
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

logger = logging.getLogger(__name__)

SIZE = 224  # the towers encoder's input side: no resize, no crop
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (210, 30, 35), "orange": (245, 135, 20), "yellow": (245, 215, 30), "green": (40, 160, 60),
    "blue": (35, 80, 215), "purple": (130, 45, 170), "pink": (245, 130, 185), "white": (245, 245, 245),
    "black": (25, 25, 28),
}
GROUND_OBJECTS = ("ball", "box", "tent", "car", "flag")
AIR_OBJECTS = ("balloon", "kite")
OBJECTS = GROUND_OBJECTS + AIR_OBJECTS
PLURAL = {"box": "boxes"}
BACKGROUNDS = ("meadow", "beach", "snow", "night", "desert", "room")
COUNT_WORDS = ("one", "two", "three", "four")
SIDES = ("left", "middle", "right")

# Where things are, per background: phrases for ground objects and for objects in the air.
GROUND_PLACES = {
    "meadow": ("on a green meadow", "in a grassy field", "on the grass in a park", "on a lawn"),
    "beach": ("on a sandy beach", "on the beach by the sea", "on the sand near the water", "at the seaside"),
    "snow": ("in the snow", "on a snowy field", "in a white winter landscape", "on snow-covered ground"),
    "night": ("at night", "in the dark under a night sky", "on the ground at night", "under the moon at night"),
    "desert": ("in the desert", "on the desert sand", "among sand dunes", "in a dry desert"),
    "room": ("on a wooden floor", "in a room", "indoors on the floor", "on the floorboards of a room"),
}
AIR_PLACES = {
    "meadow": ("above a green meadow", "over a grassy field", "in the sky over a park", "above a lawn"),
    "beach": ("above the beach", "over the sea and the sand", "in the sky over a beach", "above the seaside"),
    "snow": ("above a snowy field", "over the snow", "in a grey sky over a winter landscape", "above the snow"),
    "night": ("in the night sky", "against the dark night sky", "under the moon at night", "in the sky at night"),
    "desert": ("above the desert", "over sand dunes", "in the sky over the desert", "above a dry desert"),
    "room": ("in a room", "near the ceiling of a room", "indoors above a wooden floor", "inside a room"),
}
SHOWN = {"meadow": "a green meadow", "beach": "a sandy beach", "snow": "a snowy landscape",
         "night": "a dark night scene", "desert": "a sunny desert", "room": "an empty room"}
VERBS = {"ball": ("lie", "rest", "sit"), "box": ("stand", "sit", "are stacked"), "tent": ("stand", "are pitched"),
         "car": ("are parked", "stand", "wait"), "flag": ("stand", "wave"), "balloon": ("float", "drift", "hang"),
         "kite": ("fly", "soar", "hang")}
SINGULAR_VERBS = {"lie": "lies", "rest": "rests", "sit": "sits", "stand": "stands", "are stacked": "is placed",
                  "are pitched": "is pitched", "are parked": "is parked", "wait": "waits", "wave": "waves",
                  "float": "floats", "drift": "drifts", "hang": "hangs", "fly": "flies", "soar": "soars"}


@dataclass(frozen=True)
class Scene:
    """What one picture shows; its captions are written from this and nothing else."""

    background: str
    kind: str
    colour: str
    count: int
    side: str
    sun: bool


def _noun(kind: str, count: int) -> str:
    return kind if count == 1 else PLURAL.get(kind, kind + "s")


def _verb(kind: str, count: int, rng: np.random.Generator) -> str:
    verb = str(rng.choice(VERBS[kind]))
    return SINGULAR_VERBS[verb] if count == 1 else verb


def _side_phrase(scene: Scene, rng: np.random.Generator) -> str:
    if scene.side == "middle":
        return str(rng.choice(("in the middle", "in the centre of the picture")))
    return str(rng.choice((f"on the {scene.side}", f"on the {scene.side} side", f"to the {scene.side}")))


def caption(scene: Scene, rng: np.random.Generator) -> str:
    """One natural sentence about `scene`, template and synonyms drawn from `rng`."""
    places = AIR_PLACES if scene.kind in AIR_OBJECTS else GROUND_PLACES
    place = str(rng.choice(places[scene.background]))
    count, noun = scene.count, _noun(scene.kind, scene.count)
    few = ("an" if scene.colour[0] in "aeiou" else "a") if count == 1 else COUNT_WORDS[count - 1]
    things = f"{few} {scene.colour} {noun}"
    side = f" {_side_phrase(scene, rng)}" if rng.random() < 0.35 else ""
    sunny = " on a sunny day" if scene.sun and rng.random() < 0.5 else ""
    template = int(rng.integers(6))
    if template == 0:
        text = f"{things} {_verb(scene.kind, count, rng)} {place}{side}{sunny}"
    elif template == 1:
        text = f"there {'is' if count == 1 else 'are'} {things} {place}{side}"
    elif template == 2:
        text = f"a photo of {things} {place}{sunny}"
    elif template == 3 and count > 1:
        text = f"{few} {noun}, all of them {scene.colour}, {_verb(scene.kind, count, rng)} {place}"
    elif template == 4:
        text = f"{place}{side}, {things} {_verb(scene.kind, count, rng)}"
    else:
        text = f"{SHOWN[scene.background]} with {things}{side}"
    return text[0].upper() + text[1:] + "."


# ----------------------------------------------------------------------------------------------------- drawing


def _jitter(colour: tuple[int, int, int], rng: np.random.Generator, amount: int = 18) -> tuple[int, int, int]:
    values = np.clip(np.array(colour) + rng.integers(-amount, amount + 1, 3), 0, 255)
    return (int(values[0]), int(values[1]), int(values[2]))


def _shade(colour: tuple[int, int, int], factor: float) -> tuple[int, int, int]:
    return tuple(int(min(255, max(0, c * factor))) for c in colour)  # type: ignore[return-value]


def _vertical_gradient(draw: ImageDraw.ImageDraw, top: tuple[int, int, int], bottom: tuple[int, int, int],
                       y0: int, y1: int) -> None:
    for y in range(y0, y1):
        t = (y - y0) / max(1, y1 - y0 - 1)
        draw.line([(0, y), (SIZE, y)], fill=tuple(int(a + (b - a) * t) for a, b in zip(top, bottom)))


def _draw_background(draw: ImageDraw.ImageDraw, scene: Scene, horizon: int, rng: np.random.Generator) -> None:
    bg = scene.background
    sky = {"meadow": ((90, 150, 230), (185, 215, 245)), "beach": ((70, 140, 225), (190, 220, 245)),
           "snow": ((165, 170, 180), (215, 218, 225)), "night": ((8, 10, 40), (30, 35, 80)),
           "desert": ((235, 160, 80), (250, 215, 140)), "room": ((225, 210, 180), (240, 228, 200))}[bg]
    _vertical_gradient(draw, _jitter(sky[0], rng), _jitter(sky[1], rng), 0, horizon)
    ground = {"meadow": (60, 150, 55), "beach": (225, 200, 140), "snow": (240, 242, 248), "night": (25, 40, 30),
              "desert": (215, 165, 95), "room": (140, 90, 50)}[bg]
    base = _jitter(ground, rng)
    _vertical_gradient(draw, _shade(base, 0.85), _shade(base, 1.1), horizon, SIZE)
    if bg == "beach":  # a band of sea with white wave lines between sky and sand
        sea = int(horizon + 0.25 * (SIZE - horizon))
        draw.rectangle([0, horizon, SIZE, sea], fill=_jitter((30, 100, 170), rng))
        for _ in range(6):
            y = int(rng.integers(horizon + 2, max(horizon + 3, sea - 1)))
            x = int(rng.integers(0, SIZE - 30))
            draw.line([(x, y), (x + int(rng.integers(10, 30)), y)], fill=(235, 245, 250), width=1)
    if bg == "room":  # floorboards and a skirting board
        for x in range(-SIZE, SIZE, 22):
            draw.line([(SIZE // 2 + x // 3, horizon), (SIZE // 2 + x * 2, SIZE)], fill=_shade(base, 0.7), width=1)
        draw.rectangle([0, horizon - 4, SIZE, horizon], fill=(245, 245, 240))
    if bg == "desert":  # dune crests
        for k in range(3):
            y0 = horizon + 10 + k * (SIZE - horizon) // 3
            pts = [(x, y0 + 6 * np.sin(x / 25.0 + k + rng.random())) for x in range(0, SIZE + 8, 8)]
            draw.line(pts, fill=_shade(base, 0.8), width=2)
    if bg in ("meadow", "night"):  # grass blades
        for _ in range(90):
            x, y = int(rng.integers(0, SIZE)), int(rng.integers(horizon + 3, SIZE))
            draw.line([(x, y), (x + int(rng.integers(-2, 3)), y - 4)], fill=_shade(base, 0.7), width=1)
    if bg == "night":
        for _ in range(40):
            x, y = int(rng.integers(0, SIZE)), int(rng.integers(0, horizon))
            draw.point((x, y), fill=(255, 255, 230))
        mx, my = int(rng.integers(20, SIZE - 40)), int(rng.integers(10, max(11, horizon - 40)))
        draw.ellipse([mx, my, mx + 22, my + 22], fill=(245, 240, 200))
    if bg == "snow":
        for _ in range(60):
            x, y = int(rng.integers(0, SIZE)), int(rng.integers(0, SIZE))
            draw.ellipse([x, y, x + 2, y + 2], fill=(255, 255, 255))


def _draw_extras(draw: ImageDraw.ImageDraw, scene: Scene, horizon: int, rng: np.random.Generator) -> None:
    """Sun, clouds and trees: real context that the captions mention only sometimes (the sun) or never."""
    if scene.sun:
        x, y = int(rng.integers(10, SIZE - 45)), int(rng.integers(5, max(6, horizon // 3)))
        draw.ellipse([x, y, x + 32, y + 32], fill=(255, 230, 90))
    if scene.background in ("meadow", "beach", "snow") and rng.random() < 0.6:
        for _ in range(int(rng.integers(1, 4))):
            x, y = int(rng.integers(-10, SIZE - 30)), int(rng.integers(5, max(6, horizon - 30)))
            for dx, dy, r in ((0, 6, 10), (10, 0, 13), (24, 6, 10)):
                draw.ellipse([x + dx, y + dy, x + dx + 2 * r, y + dy + r], fill=(250, 250, 252))
    if scene.background in ("meadow", "snow") and rng.random() < 0.5:
        x = int(rng.integers(0, SIZE - 20))
        leaves = (40, 110, 45) if scene.background == "meadow" else (60, 90, 70)
        draw.rectangle([x + 7, horizon - 8, x + 11, horizon + 6], fill=(90, 60, 35))
        draw.polygon([(x, horizon - 6), (x + 9, horizon - 40), (x + 18, horizon - 6)], fill=leaves)


def _draw_object(draw: ImageDraw.ImageDraw, kind: str, colour: tuple[int, int, int], cx: int, cy: int, s: int,
                 rng: np.random.Generator) -> None:
    """One object of `kind` centred at (cx, cy), about `s` pixels across, with an outline and some shading."""
    dark, light, h = _shade(colour, 0.55), _shade(colour, 1.25), s // 2
    if kind == "ball":
        draw.ellipse([cx - h, cy + h - 3, cx + h, cy + h + 3], fill=(60, 60, 60))
        draw.ellipse([cx - h, cy - h, cx + h, cy + h], fill=colour, outline=dark, width=2)
        draw.ellipse([cx - h // 2, cy - h // 2, cx - h // 6, cy - h // 6], fill=light)
    elif kind == "box":
        draw.polygon([(cx - h, cy - h), (cx - h // 2, cy - h - h // 2), (cx + h + h // 2, cy - h - h // 2),
                      (cx + h, cy - h)], fill=light, outline=dark)
        draw.polygon([(cx + h, cy - h), (cx + h + h // 2, cy - h - h // 2), (cx + h + h // 2, cy + h // 2),
                      (cx + h, cy + h)], fill=dark)
        draw.rectangle([cx - h, cy - h, cx + h, cy + h], fill=colour, outline=dark, width=2)
    elif kind == "tent":
        draw.polygon([(cx - h - 4, cy + h), (cx, cy - h), (cx + h + 4, cy + h)], fill=colour, outline=dark)
        draw.polygon([(cx - h // 3, cy + h), (cx, cy), (cx + h // 3, cy + h)], fill=(30, 25, 20))
    elif kind == "car":
        draw.rectangle([cx - h, cy - h // 3, cx + h, cy + h // 3], fill=colour, outline=dark, width=2)
        draw.polygon([(cx - h // 2, cy - h // 3), (cx - h // 4, cy - h + 2), (cx + h // 3, cy - h + 2),
                      (cx + h // 2 + 2, cy - h // 3)], fill=colour, outline=dark)
        draw.rectangle([cx - h // 4 + 2, cy - h + 5, cx + h // 3 - 2, max(cy - h + 5, cy - h // 3 - 2)],
                       fill=(170, 210, 235))
        for wx in (cx - h // 2, cx + h // 2):
            draw.ellipse([wx - h // 4, cy + h // 6, wx + h // 4, cy + h // 6 + h // 2], fill=(20, 20, 20))
    elif kind == "flag":
        draw.line([(cx - h, cy - h), (cx - h, cy + h)], fill=(90, 90, 90), width=3)
        wave = int(rng.integers(-3, 4))
        draw.polygon([(cx - h, cy - h), (cx + h, cy - h + wave), (cx + h, cy + wave), (cx - h, cy)],
                     fill=colour, outline=dark)
    elif kind == "balloon":
        draw.line([(cx, cy + h), (cx + int(rng.integers(-6, 7)), cy + 2 * s)], fill=(70, 70, 70), width=1)
        draw.ellipse([cx - h + 3, cy - h, cx + h - 3, cy + h], fill=colour, outline=dark, width=2)
        draw.ellipse([cx - h // 2, cy - h // 2, cx - h // 6, cy], fill=light)
    else:  # kite
        draw.polygon([(cx, cy - h), (cx + h - 3, cy), (cx, cy + h + 4), (cx - h + 3, cy)], fill=colour, outline=dark)
        draw.line([(cx, cy - h), (cx, cy + h + 4)], fill=dark, width=1)
        draw.line([(cx - h + 3, cy), (cx + h - 3, cy)], fill=dark, width=1)
        tail = [(cx + 3 * np.sin(k), cy + h + 4 + 5 * k) for k in range(8)]
        draw.line(tail, fill=(60, 60, 60), width=1)


def _positions(scene: Scene, horizon: int, size: int, rng: np.random.Generator) -> list[tuple[int, int]]:
    """Centres of the objects: a group on the scene's side, in the air or on the ground, not overlapping much."""
    centre = {"left": SIZE * 0.27, "middle": SIZE * 0.5, "right": SIZE * 0.73}[scene.side]
    if scene.kind in AIR_OBJECTS:
        low, high = size // 2 + 6, max(size // 2 + 8, horizon - size)
    else:
        low, high = horizon + size // 2, SIZE - size // 2 - 4
    spread = size * 1.1
    xs = centre + spread * (np.arange(scene.count) - (scene.count - 1) / 2) + rng.uniform(-6, 6, scene.count)
    ys = rng.uniform(low, max(low + 1, high), scene.count)
    xs = np.clip(xs, size // 2 + 2, SIZE - size // 2 - 2)
    return [(int(x), int(y)) for x, y in zip(xs, ys)]


def draw_scene(scene: Scene, rng: np.random.Generator, quality: int = 90) -> bytes:
    """The JPEG bytes of `scene`; every varying detail comes from `rng`."""
    image = Image.new("RGB", (SIZE, SIZE))
    draw = ImageDraw.Draw(image)
    horizon = int(rng.integers(int(SIZE * 0.42), int(SIZE * 0.6)))
    _draw_background(draw, scene, horizon, rng)
    _draw_extras(draw, scene, horizon, rng)
    size = int(rng.integers(32, 48)) if scene.count <= 2 else int(rng.integers(26, 36))
    colour = _jitter(COLOURS[scene.colour], rng, 12)
    for cx, cy in _positions(scene, horizon, size, rng):
        _draw_object(draw, scene.kind, colour, cx, cy, size + int(rng.integers(-3, 4)), rng)
    pixels = np.asarray(image, dtype=np.int16) + rng.integers(-6, 7, (SIZE, SIZE, 1), dtype=np.int16)
    buffer = io.BytesIO()
    Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(buffer, format="JPEG", quality=quality)
    return buffer.getvalue()


def random_scene(rng: np.random.Generator) -> Scene:
    background = str(rng.choice(BACKGROUNDS))
    return Scene(background=background, kind=str(rng.choice(OBJECTS)), colour=str(rng.choice(list(COLOURS))),
                 count=int(rng.integers(1, 5)), side=str(rng.choice(SIDES)),
                 sun=background in ("meadow", "beach", "desert") and bool(rng.random() < 0.5))


def generate(out: str | Path, scenes: int = 1000, captions_per_image: int = 2, seed: int = 0) -> dict[str, int]:
    """Write ``out/images/scene_NNNNN.jpg``, ``out/captions.csv`` (image,caption) and ``out/README.md``.

    Scene i depends only on (seed, i): the same arguments always give the same bytes, and a larger `scenes`
    only adds scenes. Returns the counts written."""
    if scenes < 2 or captions_per_image < 1:
        raise ValueError("need at least 2 scenes and 1 caption per image")
    out = Path(out)
    (out / "images").mkdir(parents=True, exist_ok=True)
    rows: list[tuple[str, str]] = []
    for index in range(scenes):
        rng = np.random.default_rng([seed, index])
        scene = random_scene(rng)
        name = f"scene_{index:05d}.jpg"
        (out / "images" / name).write_bytes(draw_scene(scene, rng))
        texts: list[str] = []
        for _ in range(100 * captions_per_image):  # distinct sentences; the same one twice is no new caption
            text = caption(scene, rng)
            if text not in texts:
                texts.append(text)
            if len(texts) == captions_per_image:
                break
        rows.extend((name, text) for text in texts)
    with open(out / "captions.csv", "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle, lineterminator="\n")
        writer.writerow(("image", "caption"))
        writer.writerows(rows)
    (out / "README.md").write_text(
        "# bicro-clean demo scenes\n\nGenerated by `bicro_clean.lab.demo_data.generate` "
        f"(scenes={scenes}, captions_per_image={captions_per_image}, seed={seed}): drawn pictures and captions "
        "written from the same scene description. No photos, no licences; regenerate at will.\n")
    logger.info("demo data: %d scenes, %d captions in %s", scenes, len(rows), out)
    return {"images": scenes, "captions": len(rows)}
