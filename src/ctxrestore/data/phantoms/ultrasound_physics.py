"""Fetal ultrasound phantom: rendering a plan into B-mode planes and a 3D sweep.

Everything random is drawn into a `_Plan` (and a `_Sweep`) first; rendering is deterministic.
Fan and polar-grid geometry, tissue painting, speckle, attenuation and shadowing, PSF blur,
log compression, automatic gain and scan conversion. The physics is described in
`ctxrestore.data.phantoms.ultrasound`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import numpy as np
from scipy import ndimage

from ctxrestore.data.phantoms.ultrasound_planes import ULTRASOUND_STRUCTURES, _Structure

_REFERENCE = 0.5  # echo amplitude of maternal tissue; others are relative to it


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


# ---- plan: every random choice of one image, as rendering reads it ---------------------------


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
