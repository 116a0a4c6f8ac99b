"""Fetal ultrasound phantom: the structures and the standard planes they are arranged in.

A plane builder takes an RNG and an anatomy `_Frame` (pose) and returns the `_Structure`s of
one standard plane, in pixels; `ultrasound` places them in the fan and `ultrasound_physics`
renders them. Mask ids of every structure are `ULTRASOUND_STRUCTURES`.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, replace

import numpy as np

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

_MIN_WIDTH = 0.6  # pixels: thinner lines would vanish between grid points


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
