"""Fetal ultrasound standard planes: the classification phantom (SonoNet task of Chen et al. 2019).

Chen et al. 2019 fine-tune on the detection of fetal standard scan planes (SonoNet, Baumgartner et
al. 2017). `ultrasound_phantom` draws one B-mode image whose label says which standard plane it
shows, or "background" for a non-standard view. A class is defined by WHICH structures are
visible and HOW they are arranged; pose (long axis within 60 degrees of horizontal, either way
round, maybe mirrored), position, scale, gain, speckle, depth and fan angle are random for every
class, so global brightness and size do not reveal it.

Classes (`ULTRASOUND_CLASSES`, index = label):
- background: a non-standard view. Zero to two anatomies of random classes with at least one
  key group dropped or scattered (a skull without midline, one kidney, one row of vertebrae,
  two of the three vessels...), plus loose key structures of other classes out of arrangement.
- head: skull ellipse (bright ring, shadowing), midline falx, dark cavum on the midline in the
  anterior third, two thalami. Keys: skull, midline, cavum.
- abdomen: round abdomen, dark stomach bubble on one side, umbilical vein (short curved dark
  tube) in front, spine (triangle of three bright ossification centres) behind. Keys: stomach,
  umbilical vein, spine.
- femur: thigh with a long, bright, slightly curved bone with dark epiphyses. Key: femur.
- spine (sagittal): two rows of bright dots converging towards the sacrum along a dark canal,
  under the skin line. Keys: each row.
- heart_4ch: chest with spine; a heart whose four dark chambers leave a bright cross (septum and
  atrioventricular plane). Key: the chambers.
- three_vessel: chest with spine; three dark circles of decreasing size on a line (pulmonary
  artery, aorta, vena cava). Keys: each vessel.
- kidneys: abdomen with spine; two ovals with a bright rim and a dark pelvis either side of the
  spine. Keys: each kidney.
- lips (coronal): face with nose and two dark nostrils, upper and lower lip bands around the dark
  mouth line. Keys: nose, lips.
Every image also draws context at random: amniotic fluid around the anatomy, placenta, cysts and
bright blobs, a free-floating umbilical cord (three small dark circles) and loose limb bones.

Physics, simulated in the beam's polar grid (depth x angle) and scan-converted to the image:
echo = |PSF * (reflectivity x complex Gaussian scatterers + specular reflection)|, i.e.
Rayleigh-like speckle correlated over the PSF, with edges blurred more laterally than axially
(and more with depth, as the beam spreads). Specular reflection from bone depends on the angle
of incidence. Bone attenuates (acoustic shadow behind it), fluid less than tissue (enhancement).
The time-gain compensation is imperfect (random residual depth gain); log compression has a
random dynamic range, and an automatic gain sets the mean inside the fan to a random level. At
less than 128 pixels, the coarser pixels average the speckle. The image is exactly 0 outside
the fan.

3D (spatial_size (D, H, W)): a thin sweep of D parallel planes around the standard plane, spaced
0.5-2 mm. Every structure is extended across the plane as an ellipsoid-like body with its own
half-thickness, elevation offset and tilt: neighbouring slices show the same structures, smaller
and slightly moved, until they leave. Speckle decorrelates with slice distance. The middle slice
D // 2 is exactly the 2D sample of the same (seed, index, H, W), hence the same class; the gain
set on it holds for the whole sweep.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

import numpy as np
from scipy import ndimage

from ctxrestore.data.phantoms.base import PhantomSample, check_spatial_size
from ctxrestore.errors import CtxRestoreError

ULTRASOUND_CLASSES: tuple[str, ...] = (
    "background",
    "head",
    "abdomen",
    "femur",
    "spine",
    "heart_4ch",
    "three_vessel",
    "kidneys",
    "lips",
)

# Mask ids of the visible structures; 0 is maternal tissue (and everything outside the fan).
ULTRASOUND_STRUCTURES: dict[str, int] = {
    # context, in any class
    "amniotic_fluid": 1,
    "placenta": 2,
    "blob": 3,
    "umbilical_cord": 4,
    "limb_bone": 5,
    # body outline
    "body": 6,
    "skin": 7,
    # head
    "skull": 8,
    "brain": 9,
    "midline": 10,
    "cavum": 11,
    "thalamus": 12,
    "choroid_plexus": 13,
    # trunk
    "stomach": 14,
    "umbilical_vein": 15,
    "vertebra": 16,
    "rib": 17,
    # femur
    "femur": 18,
    "epiphysis": 19,
    # sagittal spine
    "spinal_canal": 20,
    # chest
    "heart": 21,
    "heart_chamber": 22,
    "vessel": 23,
    # kidneys
    "kidney": 24,
    "renal_pelvis": 25,
    # face
    "lip": 26,
    "mouth": 27,
    "nose": 28,
    "nostril": 29,
}

_MIN_SIZE = 32  # H and W; smaller images cannot show a cavum or a row of vertebrae
_MIN_WIDTH = 0.6  # pixels: thinner lines would vanish between grid points
_REFERENCE = 0.5  # echo amplitude of maternal tissue; others are relative to it


@dataclass(frozen=True)
class _Structure:
    """One shape of constant echo, in pixels. 3D fields stay at their defaults in 2D.

    size: ellipse (a, b); ring (a, b, thickness); rod (half_length, half_width, sagitta);
    dots (radius,) with `points` (k, 2) local (u, v) offsets. `angle`: direction of local u.
    """

    kind: str
    name: str
    center: tuple[float, float]
    angle: float
    size: tuple[float, ...]
    echo: float
    specular: float = 0.0
    attenuation: float = 0.0
    points: np.ndarray | None = None
    group: str | None = None
    elevation: float = 1.0  # nominal half-thickness across the plane, in anatomy scales
    thickness: float = math.inf  # mm, set by the sweep
    offset: float = 0.0  # mm, elevation of the centre
    drift: tuple[float, float] = (0.0, 0.0)  # (row, col) pixels per mm of elevation


@dataclass(frozen=True)
class _Frame:
    """An anatomy's pose: normalised (u, v) -> pixels, scaled, rotated and maybe mirrored.

    The shape makers take positions and sizes in anatomy units and a `tissue`: an echo
    amplitude, or a dict of _Structure's echo, specular and attenuation.
    """

    row: float
    col: float
    angle: float
    scale: float
    mirror: float

    def point(self, u: float, v: float) -> tuple[float, float]:
        c, s, v = math.cos(self.angle), math.sin(self.angle), self.mirror * v
        return self.row + self.scale * (u * s + v * c), self.col + self.scale * (u * c - v * s)

    def child(self, at, angle: float = 0.0) -> _Frame:
        row, col = self.point(*at)
        return replace(self, row=row, col=col, angle=self.angle + self.mirror * angle)

    def _make(self, kind, name, at, size, tissue, angle, **options) -> _Structure:
        tissue = tissue if isinstance(tissue, dict) else {"echo": tissue}
        angle = self.angle + self.mirror * angle
        return _Structure(kind, name, self.point(*at), angle, size, **tissue, **options)

    def ellipse(self, name, at, axes, tissue, angle=0.0, **options) -> _Structure:
        size = tuple(max(axis * self.scale, _MIN_WIDTH) for axis in axes)
        return self._make("ellipse", name, at, size, tissue, angle, **options)

    def ring(self, name, at, axes, thickness, tissue, angle=0.0, **options) -> _Structure:
        size = (axes[0] * self.scale, axes[1] * self.scale, max(thickness * self.scale, _MIN_WIDTH))
        return self._make("ring", name, at, size, tissue, angle, **options)

    def rod(self, name, at, length, width, tissue, angle=0.0, sagitta=0.0, **options):
        size = (length * self.scale, max(width * self.scale, _MIN_WIDTH / 2 + 0.2))
        size += (self.mirror * sagitta * self.scale,)
        return self._make("rod", name, at, size, tissue, angle, **options)

    def dots(self, name, at, points, radius, tissue, angle=0.0, **options) -> _Structure:
        points = np.asarray(points, dtype=np.float32) * np.float32(self.scale)
        points[:, 1] *= self.mirror
        size = (max(radius * self.scale, _MIN_WIDTH),)
        return self._make("dots", name, at, size, tissue, angle, points=points, **options)


# ---- tissue classes, drawn per image ---------------------------------------------------------


def _soft(rng) -> dict:
    return {"echo": rng.uniform(0.4, 0.65)}


def _fluid(rng) -> dict:
    return {"echo": rng.uniform(0.02, 0.07), "attenuation": -0.01}


def _bone(rng) -> dict:
    return {
        "echo": rng.uniform(0.9, 1.5),
        "specular": rng.uniform(1.0, 3.0),
        "attenuation": rng.uniform(0.12, 0.3),
    }


# ---- standard planes: anatomy units, radius about 1 ------------------------------------------


def _spine_triangle(rng, frame: _Frame, u: float) -> list[_Structure]:
    """A transverse vertebra: three ossification centres, a key of several planes."""
    spread, radius = rng.uniform(0.08, 0.12), rng.uniform(0.04, 0.06)
    points = np.array([(0.0, 0.0), (0.12, spread), (0.12, -spread)]) + rng.normal(0, 0.01, (3, 2))
    return [frame.dots("vertebra", (u, 0), points, radius, _bone(rng), group="spine")]


def _trunk(rng, frame: _Frame, ribs: bool = True) -> list[_Structure]:
    """A transverse abdomen or chest: body, skin line and often a rib at each side."""
    axes, thickness = (1.0, rng.uniform(0.85, 1.0)), rng.uniform(0.02, 0.03)
    skin = {"echo": rng.uniform(0.7, 1.0), "specular": rng.uniform(0.2, 0.6)}
    parts = [
        frame.ellipse("body", (0, 0), axes, _soft(rng)),
        frame.ring("skin", (0, 0), axes, thickness, skin),
    ]
    for side in (-1.0, 1.0) if ribs and rng.random() < 0.7 else ():
        at, length = (rng.uniform(-0.3, 0.3), side * 0.93 * axes[1]), rng.uniform(0.12, 0.25)
        parts.append(frame.rod("rib", at, length, 0.03, _bone(rng), sagitta=-side * 0.03))
    return parts


def _head(rng, frame: _Frame) -> list[_Structure]:
    uniform = rng.uniform
    b, t, brain = uniform(0.72, 0.86), uniform(0.06, 0.1), uniform(0.2, 0.35)
    parts = [frame.ellipse("brain", (0, 0), (1 - t, b - t), brain)]
    u, v = uniform(-0.15, 0.05), uniform(0.1, 0.16)
    for side in (-1.0, 1.0):
        axes, echo = (uniform(0.12, 0.17), uniform(0.08, 0.11)), brain * uniform(0.55, 0.8)
        angle = side * uniform(0.2, 0.5)
        parts.append(frame.ellipse("thalamus", (u, side * v), axes, echo, angle, elevation=0.3))
    if rng.random() < 0.6:
        side = rng.choice([-1.0, 1.0])
        at, echo = (-uniform(0.5, 0.65), side * uniform(0.2, 0.3)), uniform(0.7, 1.0)
        parts.append(frame.ellipse("choroid_plexus", at, (0.15, 0.07), echo, side * 0.3))
    length, falx = (1 - t) * uniform(0.85, 0.98), {"echo": uniform(0.8, 1.2), "specular": 0.5}
    parts.append(frame.rod("midline", (0, 0), length, 0.012, falx, group="midline"))
    at, axes = (uniform(0.3, 0.42), 0), (uniform(0.14, 0.18), uniform(0.07, 0.09))
    parts.append(frame.ellipse("cavum", at, axes, _fluid(rng), group="cavum", elevation=0.2))
    return [*parts, frame.ring("skull", (0, 0), (1.0, b), t, _bone(rng), group="skull")]


def _abdomen(rng, frame: _Frame) -> list[_Structure]:
    uniform = rng.uniform
    parts = _trunk(rng, frame)
    at, axes = (uniform(0.0, 0.25), -uniform(0.3, 0.45)), (uniform(0.25, 0.35), uniform(0.17, 0.25))
    angle = uniform(-0.6, 0.6)
    stomach = frame.ellipse("stomach", at, axes, _fluid(rng), angle, group="stomach")
    at, length = (uniform(0.3, 0.45), uniform(-0.05, 0.15)), uniform(0.2, 0.3)
    angle, sagitta = uniform(-0.4, 0.4), uniform(0.03, 0.08)
    vein = frame.rod("umbilical_vein", at, length, 0.07, _fluid(rng), angle, sagitta=sagitta)
    vein = replace(vein, group="umbilical_vein", elevation=0.1)
    return [*parts, replace(stomach, elevation=0.3), vein, *_spine_triangle(rng, frame, -0.8)]


def _femur(rng, frame: _Frame) -> list[_Structure]:
    uniform = rng.uniform
    parts = [frame.ellipse("body", (0, 0), (uniform(1.1, 1.3), uniform(0.3, 0.42)), _soft(rng))]
    length, width, sagitta = uniform(0.75, 0.95), uniform(0.045, 0.07), uniform(-0.06, 0.06)
    for side in (-1.0, 1.0):
        at, echo = (side * (length + 0.07), 0), uniform(0.1, 0.2)
        parts.append(frame.ellipse("epiphysis", at, (0.09, 0.08), echo, group="femur"))
    bone = frame.rod("femur", (0, 0), length, width, _bone(rng), sagitta=sagitta, group="femur")
    return [*parts, replace(bone, elevation=0.1)]


def _spine(rng, frame: _Frame) -> list[_Structure]:
    """Sagittal spine: two rows of dots converging to the sacrum (+u), under the skin (+v)."""
    uniform = rng.uniform
    width, sagitta, skin = uniform(0.25, 0.35), uniform(-0.1, 0.1), uniform(0.7, 1.0)
    canal, dark = uniform(0.04, 0.06), uniform(0.1, 0.2)
    parts = [
        frame.rod("body", (0, 0), 1.1, width, _soft(rng), sagitta=sagitta),
        frame.rod("skin", (0, width), 1.1, 0.02, skin, sagitta=sagitta),
        frame.rod("spinal_canal", (0, 0), 1.0, canal, dark, sagitta=sagitta, elevation=0.1),
    ]
    count, half, taper = int(rng.integers(9, 13)), uniform(0.1, 0.14), uniform(0.3, 0.6)
    u = np.linspace(-1.0, 1.0, count)
    for side, grow in ((-1.0, uniform(1.0, 1.3)), (1.0, 1.0)):
        v = side * half * (1 - taper * (u + 1) / 2) + sagitta * (1 - u**2)
        points = np.stack([u, v], axis=1) + rng.normal(0, 0.01, (count, 2))
        radius, group = uniform(0.035, 0.05) * grow, f"row{int(side)}"
        row = frame.dots("vertebra", (0, 0), points, radius, _bone(rng), group=group)
        parts.append(replace(row, elevation=0.08))
    return parts


def _chest(rng, frame: _Frame) -> list[_Structure]:
    at = (-rng.uniform(0.52, 0.6), rng.uniform(0.1, 0.18))
    aorta = frame.ellipse("vessel", at, (0.06, 0.06), _fluid(rng), elevation=0.6)
    return [*_trunk(rng, frame), *_spine_triangle(rng, frame, -0.8), aorta]


def _heart_4ch(rng, frame: _Frame) -> list[_Structure]:
    uniform = rng.uniform
    a, b = uniform(0.42, 0.5), uniform(0.35, 0.42)
    heart = frame.child((uniform(0.05, 0.2), -uniform(0.1, 0.2)), uniform(0.6, 1.0))
    parts = [*_chest(rng, frame), heart.ellipse("heart", (0, 0), (a, b), uniform(0.6, 0.85))]
    blood, wall = _fluid(rng), uniform(0.04, 0.07)
    width = 0.42 * b - wall / 2
    # Ventricles towards the apex (+u), atria behind: the septum and the atrioventricular
    # plane left between them form the bright cross.
    for length, sign in ((0.32 * a, 1.0), (0.24 * a, -1.0)):
        for side in (-1.0, 1.0):
            at = (sign * (length + wall / 2), side * (width + wall / 2))
            axes = (length * uniform(0.9, 1.05), width * uniform(0.9, 1.05))
            chamber = heart.ellipse("heart_chamber", at, axes, blood, group="chambers")
            parts.append(replace(chamber, elevation=0.3))
    return parts


def _three_vessel(rng, frame: _Frame) -> list[_Structure]:
    """Pulmonary artery, aorta and superior vena cava, in a line and of decreasing size."""
    parts = _chest(rng, frame)
    line = frame.child((rng.uniform(0.05, 0.2), rng.uniform(-0.1, 0.1)), rng.uniform(2.0, 2.6))
    step, radius = rng.uniform(0.36, 0.42), rng.uniform(0.15, 0.19)
    for position, (group, fraction) in enumerate((("pa", 1.0), ("ao", 0.8), ("svc", 0.6))):
        r = radius * fraction * rng.uniform(0.9, 1.1)
        at = ((position - 1) * step + rng.normal(0, 0.02), rng.normal(0, 0.02))
        parts.append(line.ellipse("vessel", at, (r, r), _fluid(rng), group=group, elevation=0.6))
    return parts


def _kidneys(rng, frame: _Frame) -> list[_Structure]:
    uniform = rng.uniform
    parts = [*_trunk(rng, frame, ribs=False), *_spine_triangle(rng, frame, -0.75)]
    u, v = uniform(-0.55, -0.4), uniform(0.3, 0.4)
    for side in (-1.0, 1.0):
        kidney = frame.child((u + rng.normal(0, 0.03), side * v), side * uniform(0.2, 0.6))
        axes, rim = (uniform(0.26, 0.32), uniform(0.17, 0.22)), uniform(0.06, 0.08)
        inner, pelvis = (axes[0] - rim, axes[1] - rim), (0.4 * axes[0], 0.25 * axes[1])
        group, pelvic = f"kidney{int(side)}", {"group": f"kidney{int(side)}", "elevation": 0.2}
        parts += [
            kidney.ring("kidney", (0, 0), axes, rim, uniform(1.1, 1.5), group=group),
            kidney.ellipse("kidney", (0, 0), inner, uniform(0.15, 0.28), group=group),
            kidney.ellipse("renal_pelvis", (0, -side * 0.02), pelvis, _fluid(rng), **pelvic),
        ]
    return parts


def _lips(rng, frame: _Frame) -> list[_Structure]:
    """Coronal face: nose and nostrils (+u), upper lip, mouth, lower lip, chin (-u)."""
    uniform = rng.uniform
    axes, chin = (1.0, uniform(0.7, 0.85)), uniform(0.5, 0.75)
    u_nose, u_mouth, spread = uniform(0.45, 0.6), uniform(0.02, 0.1), uniform(0.12, 0.16)
    skin = {"echo": uniform(0.7, 1.0), "specular": uniform(0.2, 0.6)}
    parts = [
        frame.ellipse("body", (0, 0), axes, _soft(rng)),
        frame.ring("skin", (0, 0), axes, uniform(0.02, 0.03), skin),
        frame.ellipse("body", (-0.5, 0), (0.25, 0.35), chin),
    ]
    nose = (0.18, uniform(0.25, 0.32)), uniform(0.8, 1.1)
    nostrils = [(0, -spread), (0, spread)], uniform(0.06, 0.08), _fluid(rng)
    parts += [
        frame.ellipse("nose", (u_nose, 0), *nose, group="nose"),
        frame.dots("nostril", (u_nose - 0.02, 0), *nostrils, group="nose"),
    ]
    lip, bow, sideways = uniform(1.0, 1.4), uniform(0.02, 0.06), math.pi / 2
    shapes = [
        ("lip", u_mouth + 0.12, uniform(0.32, 0.42), uniform(0.08, 0.11), lip),
        ("lip", u_mouth - 0.12, uniform(0.28, 0.36), uniform(0.08, 0.11), lip),
        ("mouth", u_mouth, uniform(0.25, 0.32), uniform(0.035, 0.05), _fluid(rng)),
    ]
    for name, u, length, width, tissue in shapes:
        parts.append(
            frame.rod(name, (u, 0), length, width, tissue, sideways, sagitta=bow, group="lips")
        )
    return parts


_PLANES: dict[str, Callable[..., list[_Structure]]] = {
    "head": _head,
    "abdomen": _abdomen,
    "femur": _femur,
    "spine": _spine,
    "heart_4ch": _heart_4ch,
    "three_vessel": _three_vessel,
    "kidneys": _kidneys,
    "lips": _lips,
}


# ---- scan geometry ---------------------------------------------------------------------------


@dataclass(frozen=True)
class _Fan:
    """Sector field of view in pixels: apex (maybe above the image), radii, half angle (rad)."""

    apex_row: float
    apex_col: float
    min_radius: float
    max_radius: float
    half_angle: float

    def point(self, depth_fraction: float, angle_fraction: float) -> tuple[float, float]:
        radius = self.min_radius + depth_fraction * (self.max_radius - self.min_radius)
        angle = angle_fraction * self.half_angle
        return self.apex_row + radius * math.cos(angle), self.apex_col + radius * math.sin(angle)


def _sample_fan(rng, height: int, width: int) -> _Fan:
    min_radius = rng.uniform(0.05, 0.35) * height  # convex probe: the skin line is an arc
    apex_row = rng.uniform(0.0, 0.04) * height - min_radius
    max_radius = (height - 1 - apex_row) * rng.uniform(0.85, 1.0)
    # The fan may overhang the image sides a little, as on a cropped screen capture.
    widest = math.asin(min(1.0, 0.65 * width / max_radius))
    half_angle = min(rng.uniform(0.45, 0.8), widest)
    apex_col = (width - 1) / 2 + rng.uniform(-0.04, 0.04) * width
    return _Fan(apex_row, apex_col, min_radius, max_radius, half_angle)


@dataclass(frozen=True)
class _Geometry:
    """The beam's polar grid (radius x angle) in pixel coordinates, and the scan conversion.

    rows, cols: (n_radii, n_angles). beam_sin, beam_cos: (1, n_angles) beam directions.
    pixels: flat indices of the image pixels inside the fan; corner: flat polar index of the
    grid point before each of them, weights: its (radius, angle) bilinear weights; nearest:
    the flat polar index of the nearest grid point.
    """

    fan: _Fan
    shape: tuple[int, int]
    radial_step: float
    angular_step: float
    rows: np.ndarray
    cols: np.ndarray
    beam_sin: np.ndarray
    beam_cos: np.ndarray
    pixels: np.ndarray
    corner: np.ndarray
    weights: tuple[np.ndarray, np.ndarray]
    nearest: np.ndarray


def _geometry(fan: _Fan, height: int, width: int) -> _Geometry:
    radial_step = (fan.max_radius - fan.min_radius) / height
    num_angles = max(16, math.ceil(2 * fan.half_angle * 0.8 * fan.max_radius))
    angular_step = 2 * fan.half_angle / num_angles
    radii = fan.min_radius + (np.arange(height, dtype=np.float32)[:, None] + 0.5) * radial_step
    angles = -fan.half_angle + (np.arange(num_angles, dtype=np.float32)[None] + 0.5) * angular_step
    beam_sin, beam_cos = np.sin(angles), np.cos(angles)
    dy = np.arange(height, dtype=np.float32)[:, None] - np.float32(fan.apex_row)
    dx = np.arange(width, dtype=np.float32)[None] - np.float32(fan.apex_col)
    radius, angle = np.hypot(dy, dx), np.arctan2(dx, dy)
    inside = (radius >= fan.min_radius) & (radius <= fan.max_radius)
    inside &= np.abs(angle) <= fan.half_angle
    pixels = np.flatnonzero(inside)
    index_r = (radius.ravel()[pixels] - fan.min_radius) / radial_step - 0.5
    index_a = (angle.ravel()[pixels] + fan.half_angle) / angular_step - 0.5
    first_r = np.clip(np.floor(index_r), 0, height - 2).astype(np.intp)
    first_a = np.clip(np.floor(index_a), 0, num_angles - 2).astype(np.intp)
    weights = tuple(
        np.clip(index - first, 0, 1).astype(np.float32)
        for index, first in ((index_r, first_r), (index_a, first_a))
    )
    nearest = first_r + (weights[0] >= 0.5), first_a + (weights[1] >= 0.5)
    rows = np.float32(fan.apex_row) + radii * beam_cos
    cols = np.float32(fan.apex_col) + radii * beam_sin
    return _Geometry(
        fan,
        (height, width),
        radial_step,
        angular_step,
        rows,
        cols,
        beam_sin,
        beam_cos,
        pixels,
        first_r * num_angles + first_a,
        weights,
        nearest[0] * num_angles + nearest[1],
    )


def _scan_convert(geometry: _Geometry, polar: np.ndarray, linear: bool) -> np.ndarray:
    """(n_radii, n_angles) -> the values at `geometry.pixels`, bilinear or nearest."""
    flat = polar.ravel()
    if not linear:
        return flat[geometry.nearest]
    corner, step = geometry.corner, polar.shape[1]
    weight_r, weight_a = geometry.weights
    near = flat[corner] * (1 - weight_a) + flat[corner + 1] * weight_a
    far = flat[corner + step] * (1 - weight_a) + flat[corner + step + 1] * weight_a
    return near * (1 - weight_r) + far * weight_r


def _place(geometry: _Geometry, values: np.ndarray) -> np.ndarray:
    """Values at `geometry.pixels` -> (H, W), exactly 0 outside the fan."""
    image = np.zeros(geometry.shape[0] * geometry.shape[1], dtype=values.dtype)
    image[geometry.pixels] = values
    return image.reshape(geometry.shape)


def _block(geometry: _Geometry, center, radius: float) -> tuple[slice, slice] | None:
    """The polar-grid index box holding a disc (pixels), or None when it misses the fan."""
    fan, (num_radii, num_angles) = geometry.fan, geometry.rows.shape
    dy, dx = center[0] - fan.apex_row, center[1] - fan.apex_col
    distance = math.hypot(dy, dx)
    first = math.floor((distance - radius - fan.min_radius) / geometry.radial_step - 0.5)
    last = math.ceil((distance + radius - fan.min_radius) / geometry.radial_step + 0.5)
    if radius < distance:
        spread = math.asin(radius / distance)
        angle = math.atan2(dx, dy) + fan.half_angle
        left = math.floor((angle - spread) / geometry.angular_step - 0.5)
        right = math.ceil((angle + spread) / geometry.angular_step + 0.5)
    else:
        left, right = 0, num_angles
    first, left = max(first, 0), max(left, 0)
    last, right = min(last, num_radii), min(right, num_angles)
    if first >= last or left >= right:
        return None
    return slice(first, last), slice(left, right)


# ---- per-image context and the background class ----------------------------------------------


def _anatomy_frame(rng, fan: _Fan, height: int, width: int) -> _Frame:
    depth, angle = rng.uniform(0.38, 0.62), rng.uniform(-0.35, 0.35)
    row, col = fan.point(depth, angle)
    radius = fan.min_radius + depth * (fan.max_radius - fan.min_radius)
    room = min(
        radius - fan.min_radius,
        fan.max_radius - radius,
        col,
        width - 1 - col,
        radius * math.sin(fan.half_angle * (1 - abs(angle))),
    )
    scale = min(rng.uniform(0.25, 0.36) * min(height, width), 1.25 * room)
    # Sonographers show a plane with its long axis across the screen, give or take 60 degrees;
    # either end may point left, and the fetus may lie either way up (mirror).
    angle = rng.uniform(-math.pi / 3, math.pi / 3) + math.pi * rng.integers(2)
    return _Frame(row, col, angle, scale, rng.choice([-1.0, 1.0]))


def _loose_frame(rng, fan: _Fan, scale: float) -> _Frame:
    row, col = fan.point(rng.uniform(0.1, 0.9), rng.uniform(-0.8, 0.8))
    return _Frame(row, col, rng.uniform(0, 2 * math.pi), scale * rng.uniform(0.8, 1.2), 1.0)


def _context(rng, fan: _Fan, anatomy: _Frame) -> list[_Structure]:
    """Maternal tissue blobs, placenta, amniotic fluid, cord and limbs: drawn for every class."""
    uniform, parts = rng.uniform, []
    for _ in range(int(rng.integers(0, 3))):
        echo = uniform(0.03, 0.2) if rng.random() < 0.5 else uniform(0.7, 1.0)
        blob = _loose_frame(rng, fan, anatomy.scale)
        axes = (uniform(0.1, 0.4), uniform(0.1, 0.3))
        parts.append(blob.ellipse("blob", (0, 0), axes, echo, elevation=0.3))
    if rng.random() < 0.5:  # along the uterine wall near the probe: across the beam
        wall = replace(_loose_frame(rng, fan, anatomy.scale), angle=uniform(-0.4, 0.4))
        wall = replace(wall, row=fan.point(uniform(0.02, 0.3), 0)[0])
        length, width, echo = uniform(1.0, 2.0), uniform(0.2, 0.4), uniform(0.7, 0.95)
        sagitta = uniform(-0.2, 0.2)
        parts.append(wall.rod("placenta", (0, 0), length, width, echo, sagitta=sagitta))
    if rng.random() < 0.7:
        at, axes = rng.normal(0, 0.15, 2), (uniform(1.1, 1.5), uniform(0.9, 1.3))
        angle = uniform(0, math.pi)
        parts.append(anatomy.ellipse("amniotic_fluid", at, axes, _fluid(rng), angle))
    if rng.random() < 0.3:
        cord, vessels = _loose_frame(rng, fan, anatomy.scale), [(-0.05, -0.05), (-0.05, 0.05)]
        parts += [
            cord.ellipse("umbilical_cord", (0, 0), (0.14, 0.14), uniform(0.4, 0.6)),
            cord.dots(
                "umbilical_cord", (0, 0), [*vessels, (0.06, 0)], uniform(0.03, 0.045), _fluid(rng)
            ),
        ]
    for _ in range(int(rng.choice(3, p=[0.7, 0.2, 0.1]))):
        limb = _loose_frame(rng, fan, anatomy.scale)
        length, width, sagitta = uniform(0.2, 0.55), uniform(0.03, 0.06), uniform(-0.04, 0.04)
        bone = limb.rod("limb_bone", (0, 0), length, width, _bone(rng), sagitta=sagitta)
        parts.append(replace(bone, elevation=0.1))
    return parts


def _break(rng, plane: list[_Structure], scale: float) -> list[_Structure]:
    """Drop or scatter at least one key group, so the plane is no longer standard.

    Scattering moves each structure of the group on its own, so that a group which holds an
    arrangement itself (the four chambers, the lips) loses it too.
    """
    groups = sorted({part.group for part in plane if part.group})
    broken = [group for group in groups if rng.random() < 0.7]
    broken = broken or [groups[int(rng.integers(len(groups)))]]
    kept = [part for part in plane if part.group not in broken]
    for group in broken:
        if rng.random() < 0.6:
            continue
        for part in (part for part in plane if part.group == group):
            direction, distance = rng.uniform(0, 2 * math.pi), scale * rng.uniform(0.5, 1.0)
            row, col = part.center
            row, col = row + distance * math.sin(direction), col + distance * math.cos(direction)
            kept.append(replace(part, center=(row, col)))
    return kept


def _background(rng, fan: _Fan, anatomy: _Frame) -> tuple[list[_Structure], list[str]]:
    """A non-standard view: broken planes and key structures of other planes, out of place."""
    parts, notes, names = [], [], list(_PLANES)
    for number in range(int(rng.choice(3, p=[0.15, 0.6, 0.25]))):
        frame = anatomy if number == 0 else _loose_frame(rng, fan, anatomy.scale)
        name = names[int(rng.integers(len(names)))]
        parts += _break(rng, _PLANES[name](rng, frame), anatomy.scale)
        notes.append(f"broken {name}")
    for _ in range(int(rng.choice(3, p=[0.5, 0.35, 0.15]))):
        name = names[int(rng.integers(len(names)))]
        plane = _PLANES[name](rng, _loose_frame(rng, fan, anatomy.scale))
        groups = sorted({part.group for part in plane if part.group})
        group = groups[int(rng.integers(len(groups)))]
        parts += [part for part in plane if part.group == group]
        notes.append(f"{group} of {name}")
    return parts, notes


# ---- plan: every random choice of one image --------------------------------------------------


@dataclass(frozen=True)
class _Plan:
    label: int
    fan: _Fan
    pixel_spacing: float  # mm
    scale: float  # anatomy radius, pixels
    structures: tuple[_Structure, ...]
    psf: tuple[float, float]  # Gaussian sigma (axial, lateral at mid-depth), pixels
    coherence: float  # fraction of coherent scattering: 0 = fully developed speckle
    level: float  # mean display value inside the fan
    dynamic_range: float  # natural-log units from black to white
    depth_gain: float  # residual gain error: exp(-depth_gain * relative depth)
    incidence: tuple[float, float]  # specular floor and power of |cos(incidence)|
    texture: np.ndarray  # (4, 3): amplitude, radial and angular frequency, phase of 3 waves
    layers: tuple[float, float, float]  # near-field layering: amplitude, frequency, phase
    notes: tuple[str, ...]


def _sample_plan(rng, height: int, width: int, label: int) -> _Plan:
    fan = _sample_fan(rng, height, width)
    relative = height / 128
    psf = (max(rng.uniform(0.35, 0.6) * relative, 0.25), max(rng.uniform(0.7, 1.4) * relative, 0.4))
    acquisition = {
        "pixel_spacing": rng.uniform(0.45, 0.9) / relative,
        "psf": psf,
        "coherence": rng.uniform(0.1, 0.6),
        "level": rng.uniform(0.18, 0.38),
        "dynamic_range": rng.uniform(3.0, 5.5),
        "depth_gain": rng.uniform(-0.3, 1.3),
        "incidence": (rng.uniform(0.15, 0.4), rng.uniform(1.5, 4.0)),
        "texture": np.stack(
            [
                np.full(3, rng.uniform(0.1, 0.35)),
                rng.uniform(0.3, 2.0, 3),
                rng.uniform(-2.0, 2.0, 3),
                rng.uniform(0, 2 * math.pi, 3),
            ]
        ),
        "layers": (rng.uniform(0.2, 0.5), rng.uniform(4, 10), rng.uniform(0, 2 * math.pi)),
    }
    anatomy = _anatomy_frame(rng, fan, height, width)
    structures = _context(rng, fan, anatomy)
    if label == 0:
        parts, notes = _background(rng, fan, anatomy)
    else:
        parts, notes = _PLANES[ULTRASOUND_CLASSES[label]](rng, anatomy), []
    return _Plan(
        label,
        fan,
        scale=anatomy.scale,
        structures=tuple(structures + parts),
        notes=tuple(notes),
        **acquisition,
    )


# ---- rendering: deterministic, no random draws -----------------------------------------------


def _reach(part: _Structure) -> float:
    """Radius (pixels) of a disc around the centre that holds the whole shape."""
    if part.kind == "rod":
        return part.size[0] + part.size[1] + abs(part.size[2])
    if part.kind == "dots":
        return float(np.abs(part.points).sum(axis=1).max()) + part.size[0]
    return max(part.size[:2])


def _occupancy(part: _Structure, rows, cols, beam_sin, beam_cos):
    """Boolean mask of the shape on a block of the polar grid, and |cos(incidence)| or None."""
    cos_a, sin_a = math.cos(part.angle), math.sin(part.angle)
    dx, dy = cols - np.float32(part.center[1]), rows - np.float32(part.center[0])
    u, v = dx * cos_a + dy * sin_a, dy * cos_a - dx * sin_a
    beam_u, beam_v = beam_sin * cos_a + beam_cos * sin_a, beam_cos * cos_a - beam_sin * sin_a
    if part.kind == "ellipse":
        a, b = part.size
        return (u / a) ** 2 + (v / b) ** 2 <= 1.0, None
    if part.kind == "ring":
        a, b, thickness = part.size
        inside = (u / a) ** 2 + (v / b) ** 2 <= 1.0
        if thickness < min(a, b):
            inside &= (u / (a - thickness)) ** 2 + (v / (b - thickness)) ** 2 > 1.0
        normal_u, normal_v = u / a**2, v / b**2
        incidence = np.abs(normal_u * beam_u + normal_v * beam_v)
        return inside, incidence / np.sqrt(normal_u**2 + normal_v**2 + 1e-12)
    if part.kind == "rod":
        length, width, sagitta = part.size
        along = np.clip(u, -length, length)
        across = v - sagitta * (1.0 - (along / length) ** 2)
        slope = -2.0 * sagitta * along / length**2  # of the centre line: normal (-slope, 1)
        incidence = np.abs(beam_v - slope * beam_u) / np.sqrt(slope**2 + 1.0)
        return (u - along) ** 2 + across**2 <= width**2, incidence
    offsets_u = u[..., None] - part.points[:, 0]
    offsets_v = v[..., None] - part.points[:, 1]
    return (offsets_u**2 + offsets_v**2).min(axis=-1) <= part.size[0] ** 2, None


def _paint(plan: _Plan, geometry: _Geometry, structures) -> tuple[np.ndarray, ...]:
    """Polar maps of diffuse echo, specular echo, excess attenuation and structure ids."""
    shape = geometry.rows.shape
    echo = _tissue(plan, shape)
    specular = np.zeros(shape, dtype=np.float32)
    attenuation = np.zeros(shape, dtype=np.float32)
    labels = np.zeros(shape, dtype=np.uint8)
    floor, power = plan.incidence
    for part in structures:
        block = _block(geometry, part.center, _reach(part))
        if block is None:
            continue
        beam = (geometry.beam_sin[:, block[1]], geometry.beam_cos[:, block[1]])
        inside, incidence = _occupancy(part, geometry.rows[block], geometry.cols[block], *beam)
        if not inside.any():
            continue
        echo[block][inside] = part.echo
        attenuation[block][inside] = part.attenuation
        labels[block][inside] = ULTRASOUND_STRUCTURES[part.name]
        if part.specular:
            factor = 1.0 if incidence is None else floor + (1 - floor) * incidence[inside] ** power
            specular[block][inside] = part.specular * factor
    return echo, specular, attenuation, labels


def _tissue(plan: _Plan, shape: tuple[int, int]) -> np.ndarray:
    """Maternal tissue echo: smooth random texture and near-field layers of the abdominal wall."""
    radial = (np.arange(shape[0], dtype=np.float32)[:, None] + 0.5) / shape[0]
    angular = (np.arange(shape[1], dtype=np.float32)[None] + 0.5) / shape[1]
    field = np.zeros(shape, dtype=np.float32)
    for amplitude, f_radial, f_angular, phase in plan.texture.T:
        field += np.float32(amplitude) * np.cos(
            np.float32(2 * math.pi * f_radial) * radial
            + np.float32(2 * math.pi * f_angular) * angular
            + np.float32(phase)
        )
    amplitude, frequency, phase = plan.layers
    layers = 1 + amplitude * np.cos(2 * math.pi * frequency * radial + phase) * np.exp(
        -radial / 0.15
    )
    return (_REFERENCE * np.exp(field) * layers).astype(np.float32)


def _gaussian_norm(sigma: float) -> float:
    """L2 norm of scipy's truncated 1D Gaussian kernel: the factor by which it shrinks noise."""
    x = np.arange(-math.ceil(4 * sigma), math.ceil(4 * sigma) + 1)
    kernel = np.exp(-0.5 * (x / sigma) ** 2)
    return float(np.linalg.norm(kernel / kernel.sum()))


def _automatic_gain(values: np.ndarray, level: float) -> float:
    """The offset g with mean(clip(values + g, 0, 1)) = level: a few Newton steps."""
    gain = level - float(np.median(values))
    for _ in range(6):
        shifted = values + np.float32(gain)
        error = float(np.clip(shifted, 0.0, 1.0).mean()) - level
        slope = max(float(((shifted > 0) & (shifted < 1)).mean()), 0.05)
        gain -= error / slope
    return gain


def _render_plane(plan: _Plan, geometry: _Geometry, structures, noise: np.ndarray, gain=None):
    """One B-mode plane: (H, W) float32 in [0, 1], 0 outside the fan; (H, W) uint8 structure ids.

    noise: (2, n_radii, n_angles) standard normal, the real and imaginary scatterer amplitudes.
    gain: display offset; None sets it as an automatic gain would, so that the mean inside the
    fan is `plan.level` (then brightness tells nothing of the content). Returns it as well.
    """
    echo, specular, attenuation, labels = _paint(plan, geometry, structures)
    height = geometry.shape[0]
    step = geometry.radial_step * 128 / height  # attenuation is per pixel of a 128-pixel image
    transmission = np.exp(-(np.cumsum(attenuation, axis=0) - attenuation / 2) * np.float32(step))
    relative_depth = (np.arange(echo.shape[0], dtype=np.float32)[:, None] + 0.5) / echo.shape[0]
    transmission *= np.exp(np.float32(-plan.depth_gain) * relative_depth)
    axial = plan.psf[0] / geometry.radial_step
    middle = (geometry.fan.min_radius + geometry.fan.max_radius) / 2
    lateral = plan.psf[1] / (geometry.angular_step * middle)
    scale = math.sqrt((1 - plan.coherence) / 2) / (_gaussian_norm(axial) * _gaussian_norm(lateral))
    real = echo * (np.float32(scale) * noise[0] + np.float32(math.sqrt(plan.coherence))) + specular
    imaginary = echo * np.float32(scale) * noise[1]
    envelope = np.hypot(
        ndimage.gaussian_filter(real * transmission, (axial, lateral)),
        ndimage.gaussian_filter(imaginary * transmission, (axial, lateral)),
    )
    display = np.log(envelope + np.float32(1e-4)) / np.float32(plan.dynamic_range)
    if height < 128:  # coarse pixels integrate the finer speckle of the same field of view
        display = ndimage.gaussian_filter(display, min(0.4 * (128 / height - 1), 1.0))
    values = _scan_convert(geometry, display, linear=True)
    gain = _automatic_gain(values, plan.level) if gain is None else gain
    image = _place(geometry, np.clip(values + np.float32(gain), 0.0, 1.0))
    return image, _place(geometry, _scan_convert(geometry, labels, linear=False)), gain


# ---- 3D sweep --------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Sweep:
    slice_spacing: float  # mm
    structures: tuple[_Structure, ...]
    noises: tuple[np.ndarray, ...]


def _sample_sweep(rng, plan: _Plan, num_slices: int, middle_noise: np.ndarray) -> _Sweep:
    """Give each structure a thickness, elevation and tilt; draw speckle correlated in slices."""
    slice_spacing = rng.uniform(0.5, 2.0)
    scale_mm = plan.scale * plan.pixel_spacing
    tilt = rng.uniform(-0.25, 0.25, 2)  # shared: the probe's tilt, tan of up to 14 degrees
    structures = []
    for part in plan.structures:
        thickness = max(part.elevation * scale_mm * rng.uniform(0.7, 1.4), 0.3)
        drift = (tilt + rng.normal(0, 0.08, 2)) / plan.pixel_spacing
        structures.append(
            replace(
                part,
                thickness=thickness,
                drift=tuple(drift.tolist()),
                offset=thickness * rng.uniform(-0.5, 0.5),
            )
        )
    correlation = math.exp(-slice_spacing / rng.uniform(0.5, 1.5))
    middle = num_slices // 2
    noises: list[np.ndarray] = [middle_noise] * num_slices
    for index in [*range(middle + 1, num_slices), *range(middle - 1, -1, -1)]:
        previous = noises[index - 1] if index > middle else noises[index + 1]
        fresh = rng.standard_normal(middle_noise.shape, dtype=np.float32)
        noises[index] = (
            np.float32(correlation) * previous + np.float32(math.sqrt(1 - correlation**2)) * fresh
        )
    return _Sweep(slice_spacing, tuple(structures), tuple(noises))


def _section(structures, elevation: float) -> list[_Structure]:
    """The structures cut by the plane at `elevation` (mm, not 0): smaller and moved, or gone."""
    cut = []
    for part in structures:
        rest = 1 - ((elevation - part.offset) / part.thickness) ** 2
        if rest <= 0:
            continue
        factor = math.sqrt(rest / (1 - (part.offset / part.thickness) ** 2))
        if part.kind == "rod":
            size = (part.size[0] * (0.5 + 0.5 * factor), part.size[1] * factor, part.size[2])
        elif part.kind == "ring":
            size = (part.size[0] * factor, part.size[1] * factor, part.size[2])
        else:
            size = tuple(extent * factor for extent in part.size)
        if min(size[:2]) < 0.3:
            continue
        center = (
            part.center[0] + part.drift[0] * elevation,
            part.center[1] + part.drift[1] * elevation,
        )
        cut.append(replace(part, center=center, size=size))
    return cut


# ---- public ----------------------------------------------------------------------------------


def _check_options(index: int, seed: int, spatial_size: Sequence[int]) -> tuple[int, ...]:
    size = check_spatial_size("ultrasound", spatial_size, minimum=1)
    if min(size[-2:]) < _MIN_SIZE:
        raise CtxRestoreError(
            f"ultrasound phantom: spatial_size {size} is too small; the image axes (H, W) must "
            f"be >= {_MIN_SIZE} to show the structures, got {size[-2:]}"
        )
    if index < 0 or seed < 0:
        raise CtxRestoreError(
            f"ultrasound phantom: index {index} and seed {seed} must both be >= 0"
        )
    return size


def ultrasound_phantom(
    index: int, *, seed: int = 0, spatial_size: Sequence[int] = (128, 128)
) -> PhantomSample:
    """One fetal ultrasound image of class `index % len(ULTRASOUND_CLASSES)` (module docstring).

    spatial_size: (H, W) for one plane, or (D, H, W) for a sweep of D parallel planes whose
    slice D // 2 equals the 2D sample of the same (seed, index). Returns a PhantomSample with
    image (1, *spatial_size) float32 in [0, 1] (0 outside the fan), label, mask (*spatial_size)
    uint8 of `ULTRASOUND_STRUCTURES` ids, spacing in mm ((dz, dy, dx) in 3D) and meta: class
    name, fan geometry in pixels (apex_row, apex_col, min_radius, max_radius, half_angle in rad),
    anatomy scale in pixels and, for background, which broken parts it shows.
    Depends only on (seed, index, spatial_size), drawn from np.random.default_rng([seed, index]).
    """
    size = _check_options(index, seed, spatial_size)
    height, width = size[-2:]
    label = index % len(ULTRASOUND_CLASSES)
    rng = np.random.default_rng([seed, index])
    plan = _sample_plan(rng, height, width, label)
    geometry = _geometry(plan.fan, height, width)
    noise = rng.standard_normal((2, *geometry.rows.shape), dtype=np.float32)
    meta = {
        "class_name": ULTRASOUND_CLASSES[label],
        "fan": dict(vars(plan.fan)),
        "anatomy_scale": plan.scale,
        "parts": list(plan.notes),
    }
    spacing = (plan.pixel_spacing, plan.pixel_spacing)
    if len(size) == 2:
        image, mask, _ = _render_plane(plan, geometry, plan.structures, noise)
        return PhantomSample(image[None], spacing, ("ultrasound",), label, mask, meta=meta)
    sweep = _sample_sweep(rng, plan, size[0], noise)
    image = np.empty((1, *size), dtype=np.float32)
    mask = np.empty(size, dtype=np.uint8)
    # The gain is set once, on the middle plane, as the sonographer did before the sweep.
    middle = size[0] // 2
    image[0, middle], mask[middle], gain = _render_plane(plan, geometry, plan.structures, noise)
    for slice_index, slice_noise in enumerate(sweep.noises):
        if slice_index != middle:
            elevation = (slice_index - middle) * sweep.slice_spacing
            structures = _section(sweep.structures, elevation)
            image[0, slice_index], mask[slice_index], _ = _render_plane(
                plan, geometry, structures, slice_noise, gain
            )
    meta["slice_spacing"] = sweep.slice_spacing
    return PhantomSample(
        image, (sweep.slice_spacing, *spacing), ("ultrasound",), label, mask, meta=meta
    )
