"""Synthetic radiology phantoms with ground truth, and SLAKE-style questions about them.

Three kinds of grayscale image, drawn with numpy from seeded random shapes:

- ``x-ray``: a posteroanterior chest radiograph (lungs dark, mediastinum, heart, spine, ribs,
  clavicles and diaphragm bright); nodules are bright round opacities in the lung fields.
- ``ct``: an axial chest CT slice in a lung window, at an upper level (trachea, great vessels)
  or a lower level (heart, descending aorta). Nodules are soft-tissue spots in the black lungs.
- ``mri``: an axial brain MRI slice with FLAIR-like contrast (dark ventricles, brighter grey
  than white matter); lesions are bright round spots in a hemisphere.

Images follow the radiological convention: the patient's left is on the right of the image, and
anterior is at the top of axial slices. Every image is a pure function of ``(seed, split, index)``,
so a split can be regenerated in part or in full and always gives the same pixels and answers.

    from hscr.demo.phantoms import generate_split, all_questions
    phantoms = generate_split("train", 100, seed=0)
    for qa in all_questions(phantoms[0]):
        print(qa.question, "->", qa.answer)
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass

import numpy as np
from PIL import Image
from scipy import ndimage

MODALITIES = ("x-ray", "ct", "mri")
SPLITS = ("train", "test")

# Lesion radius at the model's 64-pixel input: small ones still cover a 5-pixel disc there.
LESION_RADIUS_AT_64 = {"small": 2.6, "large": 4.2}

# Share of images with 0, 1, 2 and 3 lesions.
COUNT_PROBABILITIES = (0.45, 0.3, 0.15, 0.1)

COUNT_WORDS = ("zero", "one", "two", "three")

# Bump this when the drawing or the question templates change, so cached demo builds are redone.
GENERATOR_VERSION = 1


@dataclass(frozen=True)
class Lesion:
    """One lesion: the patient's side, the region (lobe) and its centre and radius in pixels."""

    side: str          # "left" or "right" of the patient
    region: str        # "upper"/"lower" lobe in the chest, "frontal"/"occipital" lobe in the brain
    x: float
    y: float
    radius: float


@dataclass
class Phantom:
    """A rendered phantom with the attributes its questions are answered from."""

    split: str
    index: int
    modality: str                  # x-ray, ct, mri
    organ: str                     # lung or brain
    body_part: str                 # chest or head
    size: str                      # lesion size class: small or large (also drawn for normal images)
    lesions: list[Lesion]
    pixels: np.ndarray             # (S, S) uint8
    level: str | None = None       # CT slice level: upper or lower chest

    @property
    def count(self) -> int:
        return len(self.lesions)

    @property
    def has_lesion(self) -> bool:
        return bool(self.lesions)

    @property
    def name(self) -> str:
        return f"phantom-{self.split}-{self.index:05d}"

    def image(self) -> Image.Image:
        return Image.fromarray(self.pixels, mode="L")

    def attributes(self) -> dict:
        """Return the ground truth as plain JSON-ready values."""
        return {
            "modality": self.modality,
            "organ": self.organ,
            "body_part": self.body_part,
            "count": self.count,
            "size": self.size if self.lesions else None,
            "level": self.level,
            "lesions": [
                {"side": l.side, "region": l.region, "x": round(l.x, 1), "y": round(l.y, 1), "radius": round(l.radius, 1)}
                for l in self.lesions
            ],
        }


@dataclass(frozen=True)
class QA:
    """A question with its short answer.

    ``family`` names the template; ``local`` is True when the answer depends on lesions (small
    image regions) rather than on the whole image's look (modality, organ).
    """

    question: str
    answer: str
    answer_type: str       # closed or open
    family: str
    local: bool


# -- drawing primitives --------------------------------------------------------------------------


class _Canvas:
    """Coordinate grids of a square image, with soft-edged shape masks.

    Each shape is evaluated only inside its bounding box, which keeps drawing a phantom at a
    few milliseconds.
    """

    def __init__(self, size: int):
        self.size = size
        coords = np.arange(size, dtype=np.float32) + 0.5
        self.yy, self.xx = np.meshgrid(coords, coords, indexing="ij")  # (S, S) each

    def _box(self, x0: float, y0: float, x1: float, y1: float) -> tuple[slice, slice]:
        low = lambda v: int(np.clip(np.floor(v), 0, self.size))
        high = lambda v: int(np.clip(np.ceil(v) + 1, 0, self.size))
        return slice(low(y0), high(y1)), slice(low(x0), high(x1))

    def ellipse(self, cx, cy, rx, ry, angle=0.0, edge=1.0) -> np.ndarray:
        """Soft mask of an ellipse (1 inside, 0 outside, a smooth edge about ``edge`` pixels wide)."""
        mask = np.zeros(self.xx.shape, dtype=np.float32)
        reach = max(rx, ry) + 2 * edge
        box = self._box(cx - reach, cy - reach, cx + reach, cy + reach)
        dx, dy = self.xx[box] - cx, self.yy[box] - cy
        if angle:
            cos, sin = np.cos(angle), np.sin(angle)
            dx, dy = dx * cos + dy * sin, -dx * sin + dy * cos
        # Distance to the boundary, approximately in pixels.
        radial = np.sqrt((dx / rx) ** 2 + (dy / ry) ** 2)
        signed = (radial - 1.0) * min(rx, ry)
        mask[box] = _smoothstep(-signed / edge)
        return mask

    def band(self, points: np.ndarray, width: float, edge=1.0) -> np.ndarray:
        """Soft mask of a polyline ``(K, 2)`` of (x, y) points drawn ``width`` pixels wide."""
        mask = np.zeros(self.xx.shape, dtype=np.float32)
        reach = width / 2 + 2 * edge
        box = self._box(points[:, 0].min() - reach, points[:, 1].min() - reach,
                        points[:, 0].max() + reach, points[:, 1].max() + reach)
        xx, yy = self.xx[box], self.yy[box]
        best = np.full(xx.shape, np.inf, dtype=np.float32)
        for (x0, y0), (x1, y1) in zip(points[:-1], points[1:]):
            vx, vy = x1 - x0, y1 - y0
            length2 = vx * vx + vy * vy + 1e-9
            t = np.clip(((xx - x0) * vx + (yy - y0) * vy) / length2, 0.0, 1.0)
            best = np.minimum(best, np.hypot(xx - (x0 + t * vx), yy - (y0 + t * vy)))
        mask[box] = _smoothstep((width / 2 - best) / edge)
        return mask


def _smoothstep(value: np.ndarray) -> np.ndarray:
    t = np.clip(value * 0.5 + 0.5, 0.0, 1.0)
    return t * t * (3.0 - 2.0 * t)


def _blend(image: np.ndarray, mask: np.ndarray, value: float) -> np.ndarray:
    return image * (1.0 - mask) + value * mask


def _finish(image: np.ndarray, rng: np.random.Generator, blur: float, noise: float) -> np.ndarray:
    """Blur like an imaging system, add quantum noise, and convert to 8 bits."""
    image = ndimage.gaussian_filter(image, blur)
    image = image + rng.normal(0.0, noise, image.shape)
    return (np.clip(image, 0.0, 1.0) * 255.0).round().astype(np.uint8)


def _texture(rng: np.random.Generator, size: int, scale: float) -> np.ndarray:
    """Smooth random texture with zero mean and unit spread."""
    field_ = ndimage.gaussian_filter(rng.normal(0.0, 1.0, (size, size)), scale)
    return field_ / (field_.std() + 1e-9)


def _image_x(side: str, cx: float, offset: float) -> float:
    """Image column of a point ``offset`` pixels toward the patient's ``side`` of ``cx``."""
    # Radiological convention: the patient's left is on the image's right.
    return cx + offset if side == "left" else cx - offset


# -- lesion placement ------------------------------------------------------------------------------


def _place_lesions(
    rng: np.random.Generator,
    count: int,
    radius: float,
    allowed: np.ndarray,
    locate,
) -> list[Lesion]:
    """Draw ``count`` non-overlapping lesion centres where ``allowed`` (a bool mask) is True.

    ``locate(x, y)`` returns the (side, region) of a centre.
    """
    # Keep the whole lesion inside the allowed area.
    inner = ndimage.binary_erosion(allowed, iterations=max(1, int(np.ceil(radius))))
    ys, xs = np.nonzero(inner)
    lesions: list[Lesion] = []
    for _ in range(200):
        if len(lesions) == count or len(xs) == 0:
            break
        pick = int(rng.integers(len(xs)))
        x, y = float(xs[pick]) + 0.5, float(ys[pick]) + 0.5
        if any(np.hypot(x - l.x, y - l.y) < 3.0 * radius for l in lesions):
            continue
        side, region = locate(x, y)
        lesions.append(Lesion(side=side, region=region, x=x, y=y, radius=radius))
    return lesions


def _draw_lesions(canvas: _Canvas, image: np.ndarray, lesions: list[Lesion], value: float, edge: float) -> np.ndarray:
    for lesion in lesions:
        mask = canvas.ellipse(lesion.x, lesion.y, lesion.radius, lesion.radius * 0.95, edge=edge)
        image = _blend(image, mask, value)
    return image


# -- chest X-ray -----------------------------------------------------------------------------------


def _render_xray(rng: np.random.Generator, size: int, count: int, radius: float):
    c = _Canvas(size)
    s = size / 128.0  # drawing sizes below are given for a 128-pixel image
    cx = size / 2 + rng.normal(0, 1.5) * s

    # Air outside the body is black, and the soft tissue of the trunk, neck and shoulders grey.
    image = np.full((size, size), 0.03, dtype=np.float32)
    trunk = c.ellipse(cx, size * 0.64, 62 * s * rng.uniform(0.95, 1.05), 62 * s, edge=3 * s)
    shoulders = c.ellipse(cx, size * 0.2, 70 * s, 18 * s, edge=4 * s)
    neck = c.ellipse(cx, size * 0.05, 13 * s, 16 * s, edge=2 * s)
    image = _blend(image, np.maximum(np.maximum(trunk, shoulders), neck), 0.52 + rng.uniform(-0.04, 0.04))

    # Lung fields, tapering at the apices, with a domed base (the diaphragm).
    lung_w, lung_h = 21 * s * rng.uniform(0.93, 1.07), 38 * s * rng.uniform(0.93, 1.07)
    lung_y = size * 0.5
    lungs = np.zeros_like(image)
    for side in ("right", "left"):
        lx = _image_x(side, cx, 25 * s)
        tilt = 0.12 if side == "left" else -0.12
        lungs = np.maximum(lungs, c.ellipse(lx, lung_y, lung_w, lung_h, angle=tilt, edge=2 * s))
    image = _blend(image, lungs, 0.1 + rng.uniform(-0.02, 0.02))

    # Vascular markings fan out from the hila, fading toward the periphery.
    vessels = np.clip(_texture(rng, size, 1.0 * s), 0, None)
    hilum_dist = np.minimum(np.hypot(c.xx - _image_x("right", cx, 13 * s), c.yy - lung_y),
                            np.hypot(c.xx - _image_x("left", cx, 13 * s), c.yy - lung_y))
    image = image + lungs * 0.06 * vessels * np.exp(-hilum_dist / (18 * s))

    # Posterior ribs: thin arcs from the spine, up and then down toward the chest wall.
    ribs = np.zeros_like(image)
    for k in range(9):
        y0 = size * 0.17 + k * 8.5 * s + rng.normal(0, 0.5) * s
        for side in ("right", "left"):
            t = np.linspace(0, 1, 9)
            xs_ = np.array([_image_x(side, cx, (4 + 44 * v) * s) for v in t])
            ys_ = y0 - 5 * s * np.sin(t * np.pi * 0.6) + 12 * s * t ** 2
            ribs = np.maximum(ribs, c.band(np.stack([xs_, ys_], axis=1), 2.2 * s, edge=1 * s))
    image = image + 0.07 * ribs * np.maximum(lungs, 0.5)

    # Clavicles, the spine, the mediastinum and the heart bulging to the patient's left.
    for side in ("right", "left"):
        pts = np.array([[_image_x(side, cx, 5 * s), size * 0.21], [_image_x(side, cx, 24 * s), size * 0.17],
                        [_image_x(side, cx, 44 * s), size * 0.18]])
        image = _blend(image, c.band(pts, 3.6 * s, edge=1 * s) * 0.85, 0.75)
    image = _blend(image, c.ellipse(cx, size * 0.55, 5.5 * s, 72 * s, edge=1.5 * s), 0.6)
    image = _blend(image, c.ellipse(cx, size * 0.4, 7.5 * s, 24 * s, edge=1.5 * s), 0.64)
    image = _blend(image, c.ellipse(cx, size * 0.2, 2.2 * s, 14 * s, edge=1 * s), 0.3)      # trachea
    heart_w = 20 * s * rng.uniform(0.9, 1.12)
    heart = c.ellipse(_image_x("left", cx, 7 * s), size * 0.69, heart_w, 15 * s, angle=-0.35, edge=2 * s)
    image = _blend(image, heart, 0.7)
    dome = size * 0.84 + 5 * s * np.cos((c.xx - cx) / (24 * s))
    abdomen = _smoothstep((c.yy - dome) / (2 * s)) * trunk
    image = _blend(image, abdomen, 0.63)

    # Nodules: bright round opacities, placed inside the lung fields above the diaphragm.
    allowed = (lungs > 0.95) & (heart < 0.05) & (abdomen < 0.05)

    def locate(x, y):
        side = "left" if x > cx else "right"
        return side, ("upper" if y < lung_y else "lower")

    lesions = _place_lesions(rng, count, radius, allowed, locate)
    image = _draw_lesions(c, image, lesions, 0.6, edge=1.2 * s)
    image = image + 0.02 * _texture(rng, size, 3 * s)
    return _finish(image, rng, blur=0.5 * s, noise=0.015), lesions


# -- chest CT --------------------------------------------------------------------------------------


def _render_ct(rng: np.random.Generator, size: int, count: int, radius: float, level: str):
    c = _Canvas(size)
    s = size / 128.0
    cx, cy = size / 2 + rng.normal(0, 1.0) * s, size * 0.5
    body_w, body_h = 58 * s * rng.uniform(0.95, 1.05), 40 * s * rng.uniform(0.95, 1.05)

    # Lung window: air black, fat and muscle near white, bone white.
    image = np.zeros((size, size), dtype=np.float32)
    table = c.band(np.array([[cx - 50 * s, cy + body_h + 9 * s], [cx, cy + body_h + 12 * s],
                             [cx + 50 * s, cy + body_h + 9 * s]]), 2.5 * s, edge=1 * s)
    image = _blend(image, table, 0.45)
    body = c.ellipse(cx, cy, body_w, body_h, edge=1.2 * s)
    image = _blend(image, body, 0.78)
    muscle = c.ellipse(cx, cy + 2 * s, body_w - 5 * s, body_h - 5 * s, edge=1.5 * s)
    image = _blend(image, muscle, 0.86)

    # Lungs: two black fields with a thin grey vascular pattern, split by the mediastinum.
    lung_rx = (20 if level == "lower" else 17) * s * rng.uniform(0.94, 1.06)
    lung_ry = (28 if level == "lower" else 25) * s * rng.uniform(0.94, 1.06)
    lungs = np.zeros_like(image)
    for side in ("right", "left"):
        lx = _image_x(side, cx, 24 * s)
        lungs = np.maximum(lungs, c.ellipse(lx, cy - 1 * s, lung_rx, lung_ry, angle=(-0.25 if side == "left" else 0.25), edge=1 * s))
    image = _blend(image, lungs, 0.05)
    vessels = np.clip(_texture(rng, size, 0.9 * s) - 1.3, 0, None)
    image = image + lungs * 0.35 * vessels

    # Mediastinum: at the upper level the trachea and great vessels, at the lower the heart.
    if level == "upper":
        image = _blend(image, c.ellipse(cx, cy - 6 * s, 9 * s, 16 * s, edge=1.5 * s), 0.84)
        image = _blend(image, c.ellipse(cx, cy - 8 * s, 4 * s, 4 * s, edge=0.8 * s), 0.03)   # trachea
        image = _blend(image, c.ellipse(_image_x("left", cx, 6 * s), cy - 14 * s, 4.5 * s, 4.5 * s, edge=1 * s), 0.9)
        image = _blend(image, c.ellipse(_image_x("right", cx, 7 * s), cy - 15 * s, 3.5 * s, 3.5 * s, edge=1 * s), 0.9)
        heart = np.zeros_like(image)
    else:
        heart = c.ellipse(_image_x("left", cx, 7 * s), cy - 10 * s, 18 * s, 14 * s, angle=0.45, edge=1.5 * s)
        image = _blend(image, heart, 0.88)
        image = _blend(image, c.ellipse(_image_x("left", cx, 6 * s), cy + 18 * s, 4.5 * s, 4.5 * s, edge=1 * s), 0.92)

    # Vertebra, spinal canal and the posterior ribs.
    image = _blend(image, c.ellipse(cx, cy + 23 * s, 7.5 * s, 6.5 * s, edge=1 * s), 0.98)
    image = _blend(image, c.ellipse(cx, cy + 32 * s, 3 * s, 3 * s, edge=0.8 * s), 0.8)
    image = _blend(image, c.ellipse(cx, cy + 34 * s, 6 * s, 2 * s, edge=0.8 * s), 0.98)
    for k in range(5):
        angle = np.pi * (0.15 + 0.17 * k)
        for sign in (-1, 1):
            rx_ = cx + sign * np.cos(angle) * (body_w - 5 * s)
            ry_ = cy + np.sin(angle) * (body_h - 4 * s) * (1 if k < 4 else 0.6)
            image = _blend(image, c.ellipse(rx_, ry_, 2.6 * s, 2.0 * s, edge=0.8 * s), 0.97)
    image = _blend(image, c.ellipse(cx, cy - body_h + 6 * s, 4 * s, 2.5 * s, edge=0.8 * s), 0.97)  # sternum

    allowed = (lungs > 0.95) & (heart < 0.05)

    def locate(x, y):
        return ("left" if x > cx else "right"), level

    lesions = _place_lesions(rng, count, radius, allowed, locate)
    image = _draw_lesions(c, image, lesions, 0.8, edge=0.9 * s)
    return _finish(image, rng, blur=0.45 * s, noise=0.02), lesions


# -- brain MRI -------------------------------------------------------------------------------------


def _render_mri(rng: np.random.Generator, size: int, count: int, radius: float):
    c = _Canvas(size)
    s = size / 128.0
    cx, cy = size / 2 + rng.normal(0, 1.0) * s, size / 2 + rng.normal(0, 1.0) * s
    head_rx, head_ry = 44 * s * rng.uniform(0.95, 1.04), 54 * s * rng.uniform(0.95, 1.04)
    angle = rng.normal(0, 0.04)

    # Scalp fat is bright, cortical bone dark, a thin dark CSF rim lies around the brain.
    image = np.zeros((size, size), dtype=np.float32)
    image = _blend(image, c.ellipse(cx, cy, head_rx, head_ry, angle, edge=1 * s), 0.75)
    image = _blend(image, c.ellipse(cx, cy, head_rx - 2.5 * s, head_ry - 2.5 * s, angle, edge=0.8 * s), 0.04)
    image = _blend(image, c.ellipse(cx, cy, head_rx - 4.5 * s, head_ry - 4.5 * s, angle, edge=0.8 * s), 0.12)
    brain = c.ellipse(cx, cy, head_rx - 6 * s, head_ry - 6 * s, angle, edge=0.8 * s)
    image = _blend(image, brain, 0.58)                        # cortex (grey matter)

    # White matter is darker than the cortex; its edge and the sulci follow a random gyral field.
    gyri = _texture(rng, size, 2.5 * s)
    depth = 1.0 - c.ellipse(cx, cy, head_rx - 6 * s, head_ry - 6 * s, angle, edge=8 * s)
    sulci = _smoothstep((0.25 - np.abs(gyri)) / 0.12) * (depth > 0.05) * (depth < 0.5)
    image = _blend(image, sulci * brain, 0.2)
    white = c.ellipse(cx, cy, head_rx - 17 * s, head_ry - 17 * s, angle, edge=3 * s)
    white = np.clip(white + 0.6 * gyri * (white > 0.02) * (white < 0.98), 0, 1)
    image = _blend(image, white * brain, 0.36)

    # Interhemispheric fissure and the lateral ventricles (CSF is dark with FLAIR-like contrast).
    fissure = np.maximum(c.band(np.array([[cx, cy - head_ry + 6 * s], [cx, cy - 20 * s]]), 1.6 * s, edge=0.6 * s),
                         c.band(np.array([[cx, cy + 22 * s], [cx, cy + head_ry - 6 * s]]), 1.6 * s, edge=0.6 * s))
    image = _blend(image, fissure * brain, 0.1)
    vent_w = 3.6 * s * rng.uniform(0.85, 1.3)
    for side in ("right", "left"):
        horn = c.ellipse(_image_x(side, cx, 5.5 * s), cy - 8 * s, vent_w, 12 * s, angle=(0.3 if side == "right" else -0.3), edge=0.8 * s)
        image = _blend(image, horn, 0.08)
        trigone = c.ellipse(_image_x(side, cx, 7 * s), cy + 10 * s, vent_w * 0.8, 9 * s, angle=(-0.25 if side == "right" else 0.25), edge=0.8 * s)
        image = _blend(image, trigone, 0.08)

    # Lesions sit in the frontal or occipital white matter, away from the ventricles.
    core = c.ellipse(cx, cy, head_rx - 12 * s, head_ry - 12 * s, angle) > 0.95
    middle = np.abs(c.yy - cy) < 16 * s
    allowed = core & ~middle & (np.abs(c.xx - cx) > 5 * s + radius)

    def locate(x, y):
        return ("left" if x > cx else "right"), ("frontal" if y < cy else "occipital")

    lesions = _place_lesions(rng, count, radius, allowed, locate)
    image = _draw_lesions(c, image, lesions, 0.92, edge=1.0 * s)
    image = image * (1.0 + 0.06 * _texture(rng, size, 10 * s))  # coil shading
    return _finish(image, rng, blur=0.4 * s, noise=0.02), lesions


# -- phantoms --------------------------------------------------------------------------------------


def _rng(seed: int, split: str, index: int) -> np.random.Generator:
    # crc32 instead of hash(): Python salts str hashes per process.
    return np.random.default_rng([seed, zlib.crc32(split.encode("utf-8")), index])


def make_phantom(split: str, index: int, seed: int = 0, size: int = 128) -> Phantom:
    """Draw the phantom ``index`` of ``split``; the same arguments always give the same phantom."""
    if split not in SPLITS:
        raise ValueError(f"invalid split {split!r}: expected one of {', '.join(SPLITS)}")
    if size < 64:
        raise ValueError(f"invalid size {size}: phantoms need at least 64 pixels")
    rng = _rng(seed, split, index)
    modality = MODALITIES[int(rng.integers(len(MODALITIES)))]
    wanted = int(rng.choice(len(COUNT_PROBABILITIES), p=COUNT_PROBABILITIES))
    size_class = "small" if rng.random() < 0.5 else "large"
    radius = LESION_RADIUS_AT_64[size_class] * size / 64.0 * rng.uniform(0.92, 1.08)
    level = None
    if modality == "x-ray":
        pixels, lesions = _render_xray(rng, size, wanted, radius)
    elif modality == "ct":
        level = "upper" if rng.random() < 0.5 else "lower"
        pixels, lesions = _render_ct(rng, size, wanted, radius, level)
    else:
        pixels, lesions = _render_mri(rng, size, wanted, radius)
    organ, body_part = ("brain", "head") if modality == "mri" else ("lung", "chest")
    return Phantom(split=split, index=index, modality=modality, organ=organ, body_part=body_part,
                   size=size_class, lesions=lesions, pixels=pixels, level=level)


def generate_split(split: str, num_images: int, seed: int = 0, size: int = 128, start: int = 0) -> list[Phantom]:
    """Draw phantoms ``start .. start + num_images - 1`` of ``split``."""
    return [make_phantom(split, index, seed, size) for index in range(start, start + num_images)]


# -- questions -------------------------------------------------------------------------------------

_MODALITY_QUESTION = {"x-ray": "Is this an X-ray?", "ct": "Is this a CT scan?", "mri": "Is this an MRI?"}
_MODALITY_NAME = {"x-ray": "an X-ray", "ct": "a CT scan", "mri": "an MRI"}


def _yes_no(value: bool) -> str:
    return "yes" if value else "no"


def _side_place(phantom: Phantom, side: str) -> str:
    return f"the {side} lung" if phantom.organ == "lung" else f"the {side} hemisphere"


def _regions(phantom: Phantom) -> tuple[str, str]:
    return ("upper", "lower") if phantom.organ == "lung" else ("frontal", "occipital")


def all_questions(phantom: Phantom) -> list[QA]:
    """Every question the templates ask about ``phantom``, with answers from its attributes.

    Location questions are asked only where they have one answer: ``Where is the lesion?`` for a
    single lesion, the left-or-right choice when all lesions are on one side.
    """
    qas: list[QA] = []

    def add(question: str, answer: str, answer_type: str, family: str, local: bool) -> None:
        qas.append(QA(question, answer, answer_type, family, local))

    # Global cues: modality, organ, body part.
    for modality in MODALITIES:
        add(_MODALITY_QUESTION[modality], _yes_no(phantom.modality == modality), "closed", "modality_yes_no", False)
    for other in MODALITIES:
        if other != phantom.modality:
            first, second = sorted([phantom.modality, other], key=MODALITIES.index)
            add(f"Is this {_MODALITY_NAME[first]} or {_MODALITY_NAME[second]}?", phantom.modality, "closed",
                "modality_choice", False)
    add("What modality is this image?", phantom.modality, "open", "modality", False)
    add("What imaging modality was used?", phantom.modality, "open", "modality", False)
    for organ in ("lung", "brain"):
        add(f"Does this image show the {organ}?", _yes_no(phantom.organ == organ), "closed", "organ_yes_no", False)
    add("Which organ is shown?", phantom.organ, "open", "organ", False)
    add("Which part of the body is this?", phantom.body_part, "open", "body_part", False)

    # Local cues: lesion presence, count, side, lobe and size.
    add("Is there a lesion in this image?", _yes_no(phantom.has_lesion), "closed", "presence", True)
    add("Does this image look normal?", _yes_no(not phantom.has_lesion), "closed", "normal", True)
    add("Are there multiple lesions?", _yes_no(phantom.count > 1), "closed", "multiple", True)
    add("How many lesions are there?", COUNT_WORDS[phantom.count], "open", "count", True)
    abnormality = ("nodule" if phantom.organ == "lung" else "tumor") if phantom.has_lesion else "none"
    add("What abnormality is seen?", abnormality, "open", "abnormality", True)
    sides = {l.side for l in phantom.lesions}
    for side in ("left", "right"):
        add(f"Is there a lesion in {_side_place(phantom, side)}?", _yes_no(side in sides), "closed", "side_yes_no", True)
    if phantom.has_lesion:
        regions = {l.region for l in phantom.lesions}
        for region in _regions(phantom):
            add(f"Is there a lesion in the {region} lobe?", _yes_no(region in regions), "closed", "region_yes_no", True)
        add("Which side is the lesion on?", "both" if len(sides) == 2 else next(iter(sides)), "open", "side", True)
        add("What size is the lesion?", phantom.size, "open", "size", True)
        if len(sides) == 1:
            organ_place = "lung" if phantom.organ == "lung" else "hemisphere"
            add(f"Is the lesion in the left or the right {organ_place}?", next(iter(sides)), "closed", "side_choice", True)
    if phantom.count == 1:
        lesion = phantom.lesions[0]
        add("Where is the lesion located?", f"{lesion.side} {lesion.region} lobe", "open", "location", True)
    return qas


# Questions per image in the stored demo dataset: two about the whole image, four about lesions.
STORED_GLOBAL = 2
STORED_LOCAL = 4


def stored_questions(phantom: Phantom, seed: int = 0) -> list[QA]:
    """A fixed selection of :func:`all_questions` for the demo dataset, one template family once."""
    rng = np.random.default_rng([seed, zlib.crc32(phantom.split.encode("utf-8")), phantom.index, 7])
    chosen: list[QA] = []
    for local, wanted in ((False, STORED_GLOBAL), (True, STORED_LOCAL)):
        by_family: dict[str, list[QA]] = {}
        for qa in all_questions(phantom):
            if qa.local == local:
                by_family.setdefault(qa.family, []).append(qa)
        families = sorted(by_family)
        picks = rng.permutation(len(families))[:wanted]
        for pick in sorted(picks):
            options = by_family[families[pick]]
            chosen.append(options[int(rng.integers(len(options)))])
    return chosen


def question_corpus() -> list[str]:
    """Every question and answer text the templates can produce, for building a vocabulary."""
    texts: set[str] = set()
    lesion_sets = [[], [Lesion("left", "upper", 0, 0, 1)], [Lesion("right", "lower", 0, 0, 1), Lesion("left", "upper", 0, 0, 1)]]
    for modality in MODALITIES:
        organ, body_part = ("brain", "head") if modality == "mri" else ("lung", "chest")
        regions = ("frontal", "occipital") if organ == "brain" else ("upper", "lower")
        for lesions in lesion_sets + [[Lesion(side, region, 0, 0, 1)] for side in ("left", "right") for region in regions]:
            for count in range(len(COUNT_WORDS)):
                for size_class in LESION_RADIUS_AT_64:
                    padded = (lesions * 3)[:count] if lesions else []
                    phantom = Phantom("train", 0, modality, organ, body_part, size_class, padded, np.zeros((1, 1), np.uint8))
                    for qa in all_questions(phantom):
                        texts.add(qa.question)
                        texts.add(qa.answer)
    return sorted(texts)
