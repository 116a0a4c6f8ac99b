"""Brain MR phantom for the BraTS 2017 task of Chen et al. 2019 (Sec. 4.3): a glioma in four
co-registered sequences (T1, T1ce, T2, FLAIR) of a skull-stripped head, with BraTS labels.

Each sample draws ONE 3D head model from `np.random.default_rng([seed, index])` and
evaluates it at world points (mm): on a (D, H, W) grid for a 3D volume, or on one axial
plane for a 2D slice. A 2D sample is therefore the 3D model cut by a plane, with the same
tissues, contrasts, bias field and labels. The head model is drawn before anything that
depends on the view, so a 2D and a 3D sample of the same (seed, index) share their head.

The model, in head units (1 unit = `scale` mm, the brain's left-right semi-axis):
- brain: a deformed ellipsoid, skull-stripped as in BraTS (exactly 0 outside the brain);
- cortex: a grey-matter ribbon with sulci (CSF) along the zero set of a random field,
  an interhemispheric fissure, white matter below, deep grey nuclei, lateral and third
  ventricles (CSF) of random size, T1ce-bright vessels in sulci and choroid plexus, and
  white-matter hyperintensities (periventricular caps, spots; FLAIR-bright, not tumour);
- glioma: an irregular core (smoothly deformed radius) in one hemisphere (rarely across the
  midline), displacing the tissue around it and effacing nearby sulci. High grade (70%):
  an enhancing rim (label 4, patchy) around a necrotic core (label 1, absent in 20%); low
  grade: a non-enhancing core (label 1). Finger-like peritumoural oedema (label 2) around
  the core, spreading in white matter, sparing CSF and mostly the cortex, fading out at
  its edge; a shell of it always surrounds the core, except in CSF (BraTS nesting).

Contrasts (intensities per tissue and sequence, jittered per sample) follow real MR:
T1 WM > GM > CSF with a hypo-intense tumour; T1ce as T1 with a bright enhancing rim and
vessels; T2 CSF and oedema bright, WM < GM; FLAIR as T2 with CSF suppressed. They are set so
that each single channel confuses a tumour compartment with normal tissue or another
compartment (oedema ~ GM in T1/T1ce, oedema ~ GM/CSF partial volume in T2, enhancing ~ WM
and vessels in T1ce, enhancing ~ necrosis outside T1ce, necrosis ~ CSF except in FLAIR,
non-enhancing tumour ~ oedema) and only the combination separates them. Heterogeneous
tumour texture, FLAIR-bright lesions that are not tumour, a strong smooth multiplicative
bias field per channel (exp of a cubic polynomial), a per-channel scale and offset, a
partial-volume blur and Rician noise make the task hard for few labels.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from ctxrestore.data.phantoms.base import PhantomSample, check_spatial_size
from ctxrestore.errors import CtxRestoreError

BRAIN_CHANNELS = ("T1", "T1ce", "T2", "FLAIR")
BRATS_LABELS = {0: "background", 1: "necrotic_core", 2: "oedema", 4: "enhancing_tumour"}
BRATS_REGIONS = {"whole_tumour": (1, 2, 4), "tumour_core": (1, 4), "enhancing_tumour": (4,)}

# Tissue classes: rows of the contrast table.
_CSF, _GM, _WM, _DEEP_GM, _VESSEL, _LESION = range(6)  # normal brain
_NECROSIS, _NON_ENHANCING, _ENHANCING, _OEDEMA = range(6, 10)  # glioma
_TUMOUR_LABEL = {_NECROSIS: 1, _NON_ENHANCING: 1, _ENHANCING: 4}
# Mean intensity per tissue (rows) and sequence (columns T1, T1ce, T2, FLAIR), WM T1 ~ 0.9.
_CONTRAST = np.array(
    [
        [0.30, 0.30, 1.00, 0.18],  # CSF: dark in T1, bright in T2, suppressed in FLAIR
        [0.68, 0.70, 0.64, 0.64],  # grey matter
        [0.90, 0.88, 0.46, 0.50],  # white matter
        [0.76, 0.77, 0.56, 0.57],  # deep grey nuclei
        [0.45, 1.05, 0.45, 0.40],  # vessels / choroid plexus: bright only in T1ce
        [0.78, 0.77, 0.70, 0.80],  # white-matter hyperintensities (not tumour): ~oedema
        [0.40, 0.42, 0.88, 0.62],  # necrosis: fluid-like, partly suppressed in FLAIR
        [0.55, 0.57, 0.84, 0.78],  # non-enhancing tumour
        [0.50, 1.08, 0.78, 0.70],  # enhancing tumour: ~necrosis except bright T1ce
        [0.62, 0.64, 0.80, 0.86],  # oedema: ~GM in T1/T1ce, bright in T2 and FLAIR
    ],
    dtype=np.float32,
)
_CHUNK = 1 << 18  # points per block when evaluating plane waves (bounds memory in 3D)
# Exponents (x, y, z) of the monomials of degree 1 to 3: the log bias field is a polynomial
# (as in TorchIO's RandomBiasField).
_MONOMIALS = [(a, b, d - a - b) for d in (1, 2, 3) for a in range(d + 1) for b in range(d + 1 - a)]
_MIN_SIZE = 16


@dataclass(frozen=True)
class _Waves:
    """A smooth random field f(p) = sqrt(2/K) sum_k cos(k . p + phase_k), unit variance.

    vectors: (K, 3) wave vectors in radians per head unit; phases: (K,).
    """

    vectors: np.ndarray
    phases: np.ndarray

    def __call__(self, points: np.ndarray) -> np.ndarray:
        """points: (3, M) float32 -> (M,) float32."""
        out = np.empty(points.shape[1], dtype=np.float32)
        weight = np.float32(np.sqrt(2.0 / len(self.phases)))
        for start in range(0, points.shape[1], _CHUNK):
            block = self.vectors @ points[:, start : start + _CHUNK]
            block += self.phases[:, None]
            out[start : start + _CHUNK] = np.cos(block, out=block).sum(axis=0) * weight
        return out


def _draw_waves(rng: np.random.Generator, *specs: tuple[int, float]) -> list[_Waves]:
    """One `_Waves` per (count, frequency): uniformly random directions, lengths of
    frequency * [0.7, 1.3], uniform phases. One draw for all of them (it is per sample)."""
    counts, frequencies = zip(*specs)
    cosine, azimuth, length, phase = rng.random((4, sum(counts)))
    cosine, azimuth = 2.0 * cosine - 1.0, 2.0 * np.pi * azimuth
    sine = np.sqrt(1.0 - cosine * cosine)
    directions = np.stack([sine * np.cos(azimuth), sine * np.sin(azimuth), cosine], axis=1)
    vectors = directions * (np.repeat(frequencies, counts) * (0.7 + 0.6 * length))[:, None]
    vectors, phase = vectors.astype(np.float32), (2.0 * np.pi * phase).astype(np.float32)
    bounds = itertools.pairwise(np.cumsum((0, *counts)).tolist())
    return [_Waves(vectors[start:stop], phase[start:stop]) for start, stop in bounds]


def _rotation(yaw: float, pitch: float, roll: float) -> np.ndarray:
    """Rotation about z (in-plane), then x, then y; angles in radians. (3, 3)."""
    cz, sz, cx, sx, cy, sy = (f(a) for a in (yaw, pitch, roll) for f in (math.cos, math.sin))
    about_z = np.array([[cz, -sz, 0.0], [sz, cz, 0.0], [0.0, 0.0, 1.0]])
    about_x = np.array([[1.0, 0.0, 0.0], [0.0, cx, -sx], [0.0, sx, cx]])
    about_y = np.array([[cy, 0.0, sy], [0.0, 1.0, 0.0], [-sy, 0.0, cy]])
    return about_z @ about_x @ about_y


@dataclass(frozen=True)
class _Tumour:
    """A glioma in head units: centre (3,), core and oedema radii, compartments."""

    centre: np.ndarray
    core_radius: float
    oedema_radius: float
    necrosis_fraction: float  # of the core radius; 0 = no necrosis
    enhancing: bool
    patchiness: float  # threshold on a unit field: higher = less non-enhancing tumour
    mass_effect: float
    core_waves: _Waves
    oedema_waves: _Waves
    finger_waves: _Waves
    necrosis_waves: _Waves
    patch_waves: _Waves
    texture_waves: _Waves
    texture_strength: np.ndarray  # (4,) heterogeneity per channel


@dataclass(frozen=True)
class _Head:
    """Everything one sample's anatomy and scanner look like; independent of the view."""

    scale: float  # mm per head unit
    semi_axes: np.ndarray  # (3,) brain semi-axes, head units (x left-right, y AP, z SI)
    rotation: np.ndarray  # (3, 3) head -> world
    translation: np.ndarray  # (3,) mm
    shape_waves: _Waves
    fold_waves: _Waves
    sulcal_waves: _Waves
    vessel_waves: _Waves
    texture_waves: _Waves
    ventricle_size: float
    tumour: _Tumour
    lesion_waves: _Waves
    lesion_load: float  # 0..1: white-matter hyperintensities (small-vessel disease)
    contrast: np.ndarray  # (10 tissues, 4 channels)
    channel_scale: np.ndarray  # (4,)
    channel_offset: np.ndarray  # (4,)
    bias: np.ndarray  # (4, 19) log-bias coefficients per channel and monomial
    noise: float  # Rician sigma, relative to the channel scale (white matter ~0.9)
    blur_mm: float  # partial-volume blur (Gaussian sigma)


def _draw_tumour(rng: np.random.Generator, semi_axes: np.ndarray) -> _Tumour:
    high_grade = rng.random() < 0.7
    side = rng.choice([-1.0, 1.0])
    across_midline = rng.random() < 0.1
    offset = rng.uniform(-0.1, 0.1) if across_midline else side * rng.uniform(0.18, 0.62)
    position = np.array([offset, rng.uniform(-0.6, 0.6), rng.uniform(-0.4, 0.5)])
    # Keep the centre inside 75% of the brain (a clamp, not a rejection loop).
    position *= min(1.0, 0.75 / np.linalg.norm(position))
    core_radius = rng.uniform(0.08, 0.3)
    spread = rng.uniform(1.4, 2.6) if high_grade else rng.uniform(1.2, 1.9)
    oedema_radius = min(core_radius * spread, 0.65)
    has_necrosis = high_grade and rng.random() < 0.8
    core, oedema, finger, necrosis, patch, texture = _draw_waves(
        rng,
        (8, 2.5 / core_radius),
        (8, 3.0 / oedema_radius),
        (8, 9.0 / oedema_radius),
        (6, 3.0 / core_radius),
        (6, 5.0 / core_radius),
        (12, 30.0),
    )
    return _Tumour(
        centre=(position * semi_axes).astype(np.float32),
        core_radius=core_radius,
        oedema_radius=oedema_radius,
        necrosis_fraction=rng.uniform(0.45, 0.8) if has_necrosis else 0.0,
        enhancing=high_grade,
        patchiness=rng.uniform(-0.2, 1.2),
        mass_effect=rng.uniform(0.1, 0.45),
        core_waves=core,
        oedema_waves=oedema,
        finger_waves=finger,
        necrosis_waves=necrosis,
        patch_waves=patch,
        texture_waves=texture,
        texture_strength=rng.uniform(0.06, 0.2, 4).astype(np.float32),
    )


def _draw_contrast(rng: np.random.Generator) -> np.ndarray:
    """(10, 4) contrast table: the mean table jittered per tissue and channel."""
    jitter = np.ones_like(_CONTRAST)
    jitter[:_NECROSIS] = np.exp(rng.normal(0.0, 0.07, (_NECROSIS, 4)))
    jitter[_NECROSIS:] = np.exp(rng.normal(0.0, 0.1, (len(_CONTRAST) - _NECROSIS, 4)))
    return (_CONTRAST * jitter).astype(np.float32)


def _draw_head(rng: np.random.Generator) -> _Head:
    semi_axes = np.array([1.0, rng.uniform(1.12, 1.3), rng.uniform(0.82, 0.95)])
    rotation = _rotation(*np.deg2rad(rng.uniform(-1, 1, 3) * [15.0, 8.0, 5.0]))
    shape, fold, sulcal, vessel, texture, lesion = _draw_waves(
        rng, (6, 2.0), (12, 24.0), (4, 4.0), (6, 14.0), (6, 12.0), (8, 12.0)
    )
    return _Head(
        scale=rng.uniform(60.0, 72.0),
        semi_axes=semi_axes.astype(np.float32),
        rotation=rotation.astype(np.float32),
        translation=np.array([*rng.uniform(-8.0, 8.0, 2), 0.0], dtype=np.float32),
        shape_waves=shape,
        fold_waves=fold,
        sulcal_waves=sulcal,
        vessel_waves=vessel,
        texture_waves=texture,
        ventricle_size=rng.uniform(0.7, 1.5),
        tumour=_draw_tumour(rng, semi_axes),
        lesion_waves=lesion,
        lesion_load=rng.uniform(0.0, 1.0),
        contrast=_draw_contrast(rng),
        channel_scale=rng.uniform(0.5, 2.0, 4).astype(np.float32),
        channel_offset=rng.uniform(0.0, 0.1, 4).astype(np.float32),
        # Log bias with a standard deviation of ~0.08-0.22 over the brain (x0.65-1.55 at 2 sd).
        bias=(rng.standard_normal((4, 19)) * rng.uniform(0.08, 0.2, (4, 1))).astype(np.float32),
        noise=rng.uniform(0.03, 0.09),
        blur_mm=rng.uniform(0.6, 1.2),
    )


def _to_head(head: _Head, world: np.ndarray) -> np.ndarray:
    """World points (3, N) in mm -> head units (3, N) float32."""
    shifted = world - head.translation[:, None]
    return (head.rotation.T @ shifted) / np.float32(head.scale)


def _brain_radius(head: _Head, points: np.ndarray) -> np.ndarray:
    """Normalised radius of the deformed brain ellipsoid: < 1 inside. (M,)

    The deformation factor lies in [1 - 0.05 sqrt(12), 1 + 0.05 sqrt(12)] (6 waves), so
    points beyond radius 1.21 stay outside and are not deformed.
    """
    radius = np.sqrt(((points / head.semi_axes[:, None]) ** 2).sum(axis=0))
    near = np.flatnonzero(radius < 1.21)
    radius[near] *= 1.0 + np.float32(0.05) * head.shape_waves(points[:, near])
    return radius


def _normal_tissue(head: _Head, points: np.ndarray, depth: np.ndarray) -> np.ndarray:
    """Tissue class of normal anatomy at head points (3, M) of depth (1 - radius). (M,)"""
    x, y, z = points
    # The folding field varies ~3x slower along the depth than across it, so that its zero
    # set (the sulci) runs from the surface inwards, as real sulci do.
    radius = np.float32(1.0) - depth
    fold = np.abs(head.fold_waves(points * ((0.7 + 0.3 * radius) / radius)))
    sulcal_depth = np.float32(0.22) + np.float32(0.07) * head.sulcal_waves(points)
    tissue = np.full(points.shape[1], _WM, dtype=np.int64)
    tissue[(depth < sulcal_depth + 0.06) & (fold < 1.0)] = _GM
    tissue[depth < 0.06] = _GM
    # Sulci narrow towards the tumour, effaced by its swelling.
    offset = points - head.tumour.centre[:, None]
    swelling = np.exp((offset**2).sum(axis=0) / np.float32(-2.0 * head.tumour.oedema_radius**2))
    sulcus = (depth < sulcal_depth) & (fold < 0.2 * (1.0 - swelling))
    # Interhemispheric fissure, down to the corpus callosum except at the poles.
    fissure = (z > 0.12) | (np.abs(y) > 0.62)
    midline = np.abs(x - np.float32(0.3) * (sulcal_depth - np.float32(0.22)))
    tissue[fissure & (midline < 0.07)] = _GM
    size = np.float32(head.ventricle_size)
    side = np.abs(x)
    for centre, semi in (
        ((0.11, -0.12, -0.02), (0.09, 0.14, 0.1)),
        ((0.27, 0.05, 0.0), (0.06, 0.17, 0.13)),
    ):
        form = ((side - centre[0]) / semi[0]) ** 2 + ((y - centre[1]) / semi[1]) ** 2
        tissue[form + ((z - centre[2]) / semi[2]) ** 2 < 1.0] = _DEEP_GM
    bend = np.float32(0.09) * size + np.float32(0.25) * (y + np.float32(0.05)) ** 2
    width = np.float32(0.055) * size * (1.0 + np.float32(0.5) * np.clip(y, 0.0, None))
    lateral = ((side - bend) / width) ** 2 + (y / np.float32(0.4)) ** 2
    lateral += ((z - np.float32(0.12)) / (np.float32(0.12) * size)) ** 2
    third = (side < 0.015 * size) & (np.abs(y + 0.1) < 0.15) & (np.abs(z + 0.08) < 0.12)
    ventricle = (lateral < 1.0) | third
    choroid = ((side - 0.2) / 0.05) ** 2 + ((y + 0.3) / 0.08) ** 2 + ((z - 0.12) / 0.05) ** 2
    vessel = np.zeros_like(sulcus)
    vessel[sulcus] = np.abs(head.vessel_waves(points[:, sulcus])) < 0.12
    # White-matter hyperintensities, bright in T2/FLAIR like oedema but not tumour:
    # periventricular caps and punctate spots, more of both in some heads than in others.
    load = np.float32(head.lesion_load)
    caps = (lateral < (1.0 + 1.2 * load) ** 2) & (np.abs(y) > 0.2)
    spots = head.lesion_waves(points) > 2.7 - 0.9 * load
    tissue[(tissue == _WM) & (caps | spots)] = _LESION
    tissue[sulcus | (fissure & (midline < 0.015)) | ventricle] = _CSF
    tissue[(sulcus & vessel) | (ventricle & (choroid < 1.0))] = _VESSEL
    return tissue


def _displace(tumour: _Tumour, points: np.ndarray) -> np.ndarray:
    """Mass effect: the anatomy seen at p comes from a point nearer the tumour centre."""
    offset = points - tumour.centre[:, None]
    sigma2 = np.float32(2.0 * (1.3 * tumour.core_radius) ** 2)
    pull = np.float32(tumour.mass_effect) * np.exp(-(offset**2).sum(axis=0) / sigma2)
    return points - offset * pull


def _smoothstep(value: np.ndarray, start: float, stop: float) -> np.ndarray:
    t = np.clip((value - np.float32(start)) / np.float32(stop - start), 0.0, 1.0)
    return t * t * (3.0 - 2.0 * t)


def _deform(field: np.ndarray, amplitude: float) -> np.ndarray:
    """A radius factor exp(amplitude * field), the field softly saturated at +-2.5."""
    return np.exp(np.float32(2.5 * amplitude) * np.tanh(field / np.float32(2.5)))


def _tumour_tissue(
    tumour: _Tumour, points: np.ndarray, tissue: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Glioma compartments at head points (3, M) over normal `tissue` (M,), which is updated.

    Returns the BraTS labels (M,) uint8 and the oedema weight (M,) in [0, 1].
    """
    labels = np.zeros(points.shape[1], dtype=np.uint8)
    weight = np.zeros(points.shape[1], dtype=np.float32)
    distance = np.sqrt(((points - tumour.centre[:, None]) ** 2).sum(axis=0))
    # Radii are deformed by exp(a * field), fields saturated at +-2.5: the lesion stays within
    # `largest` of the centre, and only the points there are evaluated.
    largest = max(
        tumour.oedema_radius * np.exp(0.3 * 2.5),
        1.4 * tumour.core_radius * np.exp(0.25 * 2.5) + 0.06,
    )
    near = np.flatnonzero(distance < 1.1 * largest)
    if near.size == 0:
        return labels, weight
    inner, radius = points[:, near], distance[near]
    core_extent = tumour.core_radius * _deform(tumour.core_waves(inner), 0.25)
    core = radius / core_extent
    fingers = tumour.oedema_waves(inner) + np.float32(0.6) * tumour.finger_waves(inner)
    spread = radius / (tumour.oedema_radius * _deform(fingers, 0.3))
    base = tissue[near]
    # Oedema spreads in white matter, less in cortex, not in CSF; it fades out at its edge.
    # A shell of it (0.25 core radii + 3 mm thick) surrounds the core except in fluid.
    shell = np.float32(0.9) * radius / (np.float32(1.25) * core_extent + np.float32(0.05))
    reach = np.minimum(spread * np.where(base == _GM, 1.35, 1.0), shell)
    fluid = (base == _CSF) | (base == _VESSEL)
    soft = np.where(fluid, 0.0, 1.0 - _smoothstep(reach, 0.75, 1.05))
    compartment = np.where(reach < 0.9, _OEDEMA, base)
    compartment[fluid] = base[fluid]
    inside = core < 1.0
    if tumour.enhancing:
        patches = tumour.patch_waves(inner) > tumour.patchiness
        compartment[inside] = np.where(patches[inside], _NON_ENHANCING, _ENHANCING)
    else:
        compartment[inside] = _NON_ENHANCING
    if tumour.necrosis_fraction > 0:
        scaled = tumour.necrosis_fraction * _deform(tumour.necrosis_waves(inner), 0.2)
        compartment[(core < 0.88) & (radius < tumour.core_radius * scaled)] = _NECROSIS
    soft[inside] = 0.0
    tumour_labels = np.zeros(near.size, dtype=np.uint8)
    tumour_labels[compartment == _OEDEMA] = 2
    for kind, label in _TUMOUR_LABEL.items():
        tumour_labels[compartment == kind] = label
    tissue[near] = np.where(compartment == _OEDEMA, base, compartment)
    labels[near], weight[near] = tumour_labels, soft
    return labels, weight


def _intensities(
    head: _Head, points: np.ndarray, depth: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Noise-free channels (M, 4) and BraTS labels (M,) at head points (3, M) in the brain."""
    tumour = head.tumour
    displaced = _displace(tumour, points)
    tissue = _normal_tissue(head, displaced, depth)
    labels, oedema = _tumour_tissue(tumour, points, tissue)
    values = head.contrast[tissue]
    values += oedema[:, None] * (head.contrast[_OEDEMA] - values)
    values *= (1.0 + np.float32(0.04) * head.texture_waves(displaced))[:, None]
    # Tumour heterogeneity: full in the core, fading out with the oedema.
    strength = np.where((labels == 1) | (labels == 4), np.float32(1.0), oedema)
    lesion = np.flatnonzero(strength)
    if lesion.size:
        texture = tumour.texture_waves(points[:, lesion]) * strength[lesion]
        values[lesion] *= 1.0 + texture[:, None] * tumour.texture_strength
    values = values * head.channel_scale + head.channel_offset
    values *= np.exp(_monomials(points).T @ head.bias.T)
    return values, labels


def _monomials(points: np.ndarray) -> np.ndarray:
    """The `_MONOMIALS` of head points (3, M): (19, M) float32."""
    powers = [[np.ones_like(axis), axis, axis * axis] for axis in points]
    for axis_powers in powers:
        axis_powers.append(axis_powers[2] * axis_powers[1])
    return np.stack([powers[0][a] * powers[1][b] * powers[2][c] for a, b, c in _MONOMIALS])


def _blur(image: np.ndarray, sigmas: Sequence[float]) -> None:
    """Gaussian blur in place of image (C, *spatial), sigma in voxels per spatial axis, zero
    outside: passes of the 3-tap kernel (w, 1 - 2w, w), of variance 2w <= 0.5 each."""
    for axis, sigma in enumerate(sigmas, start=1):
        passes = int(np.ceil(sigma * sigma / 0.5))
        if passes == 0:
            continue
        weight = np.float32(sigma * sigma / (2 * passes))
        before = (slice(None),) * axis
        for _ in range(passes):
            shifted = np.zeros_like(image)
            shifted[(*before, slice(1, None))] = image[(*before, slice(None, -1))]
            shifted[(*before, slice(None, -1))] += image[(*before, slice(1, None))]
            image *= 1 - 2 * weight
            image += weight * shifted


def _render(
    head: _Head, world: np.ndarray, size: tuple[int, ...], blur: Sequence[float], rng
) -> tuple[np.ndarray, np.ndarray]:
    """Image (4, *size) float32 and mask (*size) uint8 of the head at world points (3, N).

    blur: the partial-volume Gaussian sigma in voxels per spatial axis. `rng` draws only the
    Rician noise.
    """
    points = _to_head(head, world)
    radius = _brain_radius(head, points)
    inside = np.flatnonzero(radius < 1.0)
    values, labels = _intensities(head, points[:, inside], 1.0 - radius[inside])
    image = np.zeros((4, radius.size), dtype=np.float32)
    image[:, inside] = values.T
    image = image.reshape(4, *size)
    _blur(image, blur)
    flat = image.reshape(4, -1)
    sigma = (np.float32(head.noise) * head.channel_scale)[:, None]
    real = flat[:, inside] + sigma * rng.standard_normal((4, inside.size), dtype=np.float32)
    imaginary = sigma * rng.standard_normal((4, inside.size), dtype=np.float32)
    flat[:] = 0.0
    # Rician magnitude; the floor keeps the brain > 0, so it is told apart from background.
    flat[:, inside] = np.maximum(np.sqrt(real * real + imaginary * imaginary), 1e-4)
    mask = np.zeros(radius.size, dtype=np.uint8)
    mask[inside] = labels
    return image, mask.reshape(size)


def _view(rng: np.random.Generator, head: _Head, size: tuple[int, ...]) -> tuple:
    """World points (3, N) mm of the sampled grid, spacing per axis, and the slice level.

    2D: one axial plane, within the oedema's reach of the tumour centre 80% of the time,
    else anywhere in the inner 80% of the brain's height. 3D: a slab of D slices covering
    the brain with a random slice spacing.
    """
    pixel = rng.uniform(210.0, 250.0) / max(size[-2:])
    rows = -(np.arange(size[-2], dtype=np.float32) - (size[-2] - 1) / 2) * pixel
    columns = (np.arange(size[-1], dtype=np.float32) - (size[-1] - 1) / 2) * pixel
    brain_height = head.semi_axes[2] * head.scale
    if len(size) == 2:
        tumour_z = (head.rotation @ head.tumour.centre)[2] * head.scale + head.translation[2]
        if rng.random() < 0.8:
            level = tumour_z + rng.uniform(-0.8, 0.8) * head.tumour.oedema_radius * head.scale
        else:
            level = rng.uniform(-0.8, 0.8) * brain_height
        levels = np.array([level], dtype=np.float32)
        spacing = (pixel, pixel)
    else:
        thickness = rng.uniform(0.9, 1.25) * 2.0 * brain_height / size[0]
        centre = rng.uniform(-5.0, 5.0)
        levels = centre + (np.arange(size[0], dtype=np.float32) - (size[0] - 1) / 2) * thickness
        spacing = (thickness, pixel, pixel)
    grid = np.meshgrid(columns, rows, levels.astype(np.float32), indexing="ij")
    world = np.stack([axis.transpose(2, 1, 0).reshape(-1) for axis in grid])
    return world, tuple(float(s) for s in spacing), levels


def brain_phantom(
    index: int, *, seed: int = 0, spatial_size: Sequence[int] = (128, 128)
) -> PhantomSample:
    """One BraTS-like sample: image (4, *spatial_size) float32 in `BRAIN_CHANNELS` order and
    mask (*spatial_size) uint8 with `BRATS_LABELS` values {0, 1, 2, 4}.

    spatial_size: (H, W) for one axial slice, (D, H, W) for a volume (axis 0 inferior to
    superior, rows anterior to posterior, columns from the patient's right to left, as in a
    radiological view). spacing: mm per axis (random field of view; random slice spacing in
    3D). The brain is skull-stripped: the image is exactly 0 outside it and > 0 inside it in
    every channel. A 2D slice passes near the tumour 80% of the time. meta holds the model's
    grade ("HGG"/"LGG"), whether its tumour has necrosis / enhancement (a slice may miss
    them), and the axial level(s) in mm. Depends only on (seed, index).
    """
    size = check_spatial_size("brain", spatial_size, minimum=_MIN_SIZE)
    if index < 0 or seed < 0:
        raise CtxRestoreError(f"brain phantom: index {index} and seed {seed} must both be >= 0")
    rng = np.random.default_rng([seed, index])
    head = _draw_head(rng)  # first, so 2D and 3D samples of (seed, index) share the head
    world, spacing, levels = _view(rng, head, size)
    blur = [head.blur_mm / s for s in spacing]
    image, mask = _render(head, world, size, blur, rng)
    tumour = head.tumour
    meta = {
        "grade": "HGG" if tumour.enhancing else "LGG",
        "necrosis": tumour.necrosis_fraction > 0,
        "enhancing": tumour.enhancing,
        "levels_mm": tuple(float(z) for z in levels),
    }
    return PhantomSample(
        image=image, spacing=spacing, channel_names=BRAIN_CHANNELS, mask=mask, meta=meta
    )
