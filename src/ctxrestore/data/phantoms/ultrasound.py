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
from collections.abc import Sequence
from dataclasses import replace

import numpy as np

from ctxrestore.data.phantoms.base import PhantomSample, check_spatial_size
from ctxrestore.data.phantoms.ultrasound_physics import (
    _Fan,
    _geometry,
    _Plan,
    _render_plane,
    _sample_fan,
    _sample_sweep,
    _section,
)
from ctxrestore.data.phantoms.ultrasound_planes import (
    _PLANES,
    ULTRASOUND_STRUCTURES,
    _bone,
    _fluid,
    _Frame,
    _Structure,
)
from ctxrestore.errors import CtxRestoreError

__all__ = ["ULTRASOUND_CLASSES", "ULTRASOUND_STRUCTURES", "ultrasound_phantom"]

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

_MIN_SIZE = 32  # H and W; smaller images cannot show a cavum or a row of vertebrae


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
