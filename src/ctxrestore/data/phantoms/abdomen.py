"""Abdominal CT phantom: axial slices (2D) or volumes (3D) of one random 3D body, in HU.

Stands in for the abdominal CT scans of the multi-organ localisation experiment of Chen et al.
2019 (context restoration): every sample has an organ mask and the box of each organ in view.

One sample is one random body, drawn as a plan (`sample_anatomy`: a torso with organs as
smooth, randomly deformed ellipsoids in millimetres), seen by one random acquisition
(`sample_view`: in-plane pose, pixel spacing, slice heights). `render_anatomy` evaluates the
body at the pixel centres of every slice with no randomness, and `acquire` adds CT noise and a
smooth bias field. A 2D sample is the same body evaluated on one axial plane at a random height,
through the same code as a 3D volume of D planes, so some organs are absent from some slices
(no kidney at the liver dome, no liver below its tip).

Coordinates: the body frame is x towards the patient's left, y towards the back, z towards the
head, in mm: the package's (z, y, x) LPS array convention (data/nifti.py). Images are shown in
the radiological convention (viewed from the feet): row 0 is anterior, column 0 is the
patient's right, so the liver lies on the image left and the spleen and left kidney on the
image right; laterality is never flipped. In 3D, axis 0 runs from the feet to the head (z
ascends). The organ ids are ABDOMEN_LABELS.

Tissue values follow one contrast phase (CONTRAST_PHASES). "unenhanced" (non-contrast CT, the
`abdomen` phantom) is hard on purpose: liver, spleen, kidneys, aorta, muscle and bowel share
soft tissue HU, so organs are told apart by position and shape, not intensity.
"portal_venous" (`abdomen_contrast`: the usual diagnostic abdominal CT, about 70 s after an
iodine injection) lifts the enhancing tissues apart: liver < spleen < aorta < kidneys. The
phase changes tissue HU only: one (seed, index) is the same body, view, noise and mask in both.
In both, the noise is strong and correlated, a smooth bias shifts HU across the body, and pose,
body size, fat, organ size, shape and height vary widely.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

import numpy as np
from scipy import ndimage

from ctxrestore.data.phantoms.base import PhantomSample, check_spatial_size, mask_box
from ctxrestore.errors import CtxRestoreError

ABDOMEN_LABELS: dict[int, str] = {
    1: "liver",
    2: "spleen",
    3: "kidney_left",
    4: "kidney_right",
    5: "aorta",
}
ABDOMEN_ORGANS: tuple[str, ...] = tuple(ABDOMEN_LABELS.values())

# Renderer tissues with their unenhanced HU range (drawn once per sample). Organ tissues map
# to mask ids.
_UNENHANCED_HU = {
    "air": (-1000, -1000),
    "subcutaneous_fat": (-120, -85),
    "muscle": (35, 55),
    "visceral_fat": (-120, -80),
    "bowel_wall": (35, 60),
    "bowel_content": (15, 60),
    "gas": (-950, -750),
    "lung": (-880, -800),
    "heart": (35, 50),
    "liver": (52, 65),
    "spleen": (44, 55),
    "kidney_left": (28, 40),
    "kidney_right": (28, 40),
    "gallbladder": (0, 20),
    "blood": (35, 48),
    "aorta": (35, 48),
    "cancellous_bone": (200, 320),
    "cortical_bone": (500, 900),
    "disc": (70, 100),
    "csf": (5, 20),
}
# Portal venous phase: the tissues that take up iodine, the rest as unenhanced. Typical
# values of diagnostic CT: the kidneys' nephrographic parenchyma brightest, blood pools next.
_PORTAL_VENOUS_HU = _UNENHANCED_HU | {
    "muscle": (50, 65),
    "bowel_wall": (70, 110),
    "heart": (140, 175),
    "liver": (90, 115),
    "spleen": (110, 135),
    "kidney_left": (165, 215),
    "kidney_right": (165, 215),
    "blood": (140, 175),
    "aorta": (140, 175),
}
_HU_OF_PHASE = {"unenhanced": _UNENHANCED_HU, "portal_venous": _PORTAL_VENOUS_HU}
CONTRAST_PHASES: tuple[str, ...] = tuple(_HU_OF_PHASE)
_TISSUES = tuple(_UNENHANCED_HU)
_T = {name: np.uint8(i) for i, name in enumerate(_TISSUES)}
_MASK_OF_TISSUE = np.array(
    [next((k for k, v in ABDOMEN_LABELS.items() if v == name), 0) for name in _TISSUES], np.uint8
)
_Z_RANGE = (-70.0, 160.0)  # nominal slice heights (mm) from below the kidneys to the liver dome
_WAVES = 4  # deformation waves per organ


@dataclasses.dataclass(frozen=True)
class Blob:
    """A deformed ellipsoid: points p with |q| + sum_k a_k sin(w_k . q + phase_k) < 1, where
    q = rotation^T (p - center) / semi_axes. All lengths in mm, float32."""

    center: np.ndarray  # (3,) x, y, z
    semi_axes: np.ndarray  # (3,)
    rotation: np.ndarray  # (3, 3), columns: the blob's axes in the body frame
    waves: np.ndarray  # (K, 3)
    phases: np.ndarray  # (K,)
    amplitudes: np.ndarray  # (K,)

    @property
    def radius(self) -> float:
        return float(self.semi_axes.max() * (1.0 + self.amplitudes.sum()))

    def inside(self, x: np.ndarray, y: np.ndarray, z: np.ndarray) -> np.ndarray:
        """Boolean of the broadcast shape of x, y (h, w) and z (d, 1, 1); elementwise only."""
        d = (x - self.center[0], y - self.center[1], z - self.center[2])
        m = self.rotation / self.semi_axes  # column i: axis i of the blob, in 1 / mm
        q = [m[0, i] * d[0] + m[1, i] * d[1] + m[2, i] * d[2] for i in range(3)]
        f = np.sqrt(q[0] * q[0] + q[1] * q[1] + q[2] * q[2])
        for w, phase, amplitude in zip(self.waves, self.phases, self.amplitudes):
            if amplitude > 0:
                f += amplitude * np.sin(w[0] * q[0] + w[1] * q[1] + w[2] * q[2] + phase)
        return f < 1.0


@dataclasses.dataclass(frozen=True)
class AbdomenAnatomy:
    """One random body (the plan): torso layers, organs and the spine, in mm, body frame."""

    body: np.ndarray  # skin semi-axes: lateral, anterior, posterior; z gradient
    fat: np.ndarray  # subcutaneous fat thickness: lateral, anterior, posterior
    muscle: float  # abdominal wall thickness
    outline: np.ndarray  # (3, 2) outline harmonics 2..4: amplitude, phase
    # vertebral body y at z = 0, dy/dz, semi-axes x, y; segment; disc phase, rib phase, rib z
    spine: np.ndarray
    aorta: np.ndarray  # x, y offset from the spine, radius, bifurcation z
    organs: tuple[tuple[str, Blob, Blob | None], ...]  # painting order: tissue, blob, carve
    bowel: np.ndarray  # (K, 5): wave vector (3), phase, which field (0 loops, 1 content)
    bowel_levels: np.ndarray  # loop threshold, wall width, gas threshold, content mottle HU
    z_range: tuple[float, float]  # heights a slice is drawn from
    hu: np.ndarray  # (len(_TISSUES),) HU of every tissue


@dataclasses.dataclass(frozen=True)
class AbdomenView:
    """One acquisition (the plan): which planes, at which pose and pixel spacing."""

    z: np.ndarray  # (D,) slice heights, mm, ascending
    shape: tuple[int, int]  # (H, W)
    pixel_spacing: float  # mm, square pixels
    angle: float  # in-plane rotation of the body, radians
    offset: tuple[float, float]  # body centre in the image: (column, row) mm from the middle
    slice_spacing: float = 0.0  # mm between planes (3D); 0 for one plane

    def body_coordinates(self) -> tuple[np.ndarray, np.ndarray]:
        """x, y (H, W) float32: body-frame mm at every pixel centre."""
        height, width = self.shape
        u = (np.arange(width, dtype=np.float32) - (width - 1) / 2) * self.pixel_spacing
        v = (np.arange(height, dtype=np.float32) - (height - 1) / 2) * self.pixel_spacing
        u, v = u[None, :] - self.offset[0], v[:, None] - self.offset[1]
        cos, sin = np.float32(np.cos(self.angle)), np.float32(np.sin(self.angle))
        return cos * u + sin * v, -sin * u + cos * v

    def window(
        self, center: Sequence[float], radius: float, all_slices: bool = False
    ) -> tuple[slice, ...] | None:
        """Slices (d, h, w) of the pixels within `radius` mm of a body-frame point (in-plane
        only with `all_slices`), or None where no pixel is."""
        near = np.arange(len(self.z))
        if not all_slices:
            near = np.flatnonzero(np.abs(self.z - center[2]) <= radius)
        if near.size == 0:
            return None
        cos, sin = np.cos(self.angle), np.sin(self.angle)
        u = cos * center[0] - sin * center[1] + self.offset[0]
        v = sin * center[0] + cos * center[1] + self.offset[1]
        spans = []
        for position, size in ((v, self.shape[0]), (u, self.shape[1])):
            middle = position / self.pixel_spacing + (size - 1) / 2
            reach = radius / self.pixel_spacing + 1
            first, last = max(0, int(middle - reach)), min(size, int(middle + reach) + 2)
            if first >= last:
                return None
            spans.append(slice(first, last))
        return slice(near[0], near[-1] + 1), *spans


def _rotation(angles_deg: Sequence[float]) -> np.ndarray:
    """Rz @ Ry @ Rx for angles (z, y, x) in degrees."""
    radians = [math.radians(float(t)) for t in angles_deg]
    (ca, cb, cc), (sa, sb, sc) = map(math.cos, radians), map(math.sin, radians)
    return np.array(
        [
            [ca * cb, ca * sb * sc - sa * cc, ca * sb * cc + sa * sc],
            [sa * cb, sa * sb * sc + ca * cc, sa * sb * cc - ca * sc],
            [-sb, cb * sc, cb * cc],
        ],
        np.float32,
    )


def _blob(rng, center, semi_axes, angles_deg, deform: float = 0.05) -> Blob:
    """A blob rotated by `angles_deg` (z, y, x), with `_WAVES` waves of amplitude <= deform."""
    directions = rng.standard_normal((_WAVES, 3))
    directions /= np.linalg.norm(directions, axis=1, keepdims=True)
    uniform = rng.random((_WAVES, 3))
    return Blob(
        center=np.asarray(center, np.float32),
        semi_axes=np.asarray(semi_axes, np.float32),
        rotation=_rotation(angles_deg),
        waves=(directions * (1.5 + 2 * uniform[:, :1])).astype(np.float32),
        phases=(2 * np.pi * uniform[:, 1]).astype(np.float32),
        amplitudes=(deform * uniform[:, 2]).astype(np.float32),
    )


def _organs(rng, sx: float, sy: float, sz: float, shift: float, y_spine: float):
    """The organ blobs in painting order (later wins), with jittered pose, size and shape."""

    def jitter(x, y, z, ax, ay, az, angle_z, angle_y=0.0, angle_x=0.0, deform=0.06, spread=1.0):
        normal = rng.standard_normal(10)
        center = np.array([x * sx, y, z * sz + shift]) + normal[:3] * [8, 6, 10] * spread
        size = np.array([ax * sx, ay * sy, az * sz]) * np.exp(normal[3:6] * 0.12 + normal[6] * 0.1)
        angles = np.array([angle_z, angle_y, angle_x]) + normal[7:] * [10, 6, 6]
        return _blob(rng, center, size, angles, deform)

    ys = y_spine
    dome = 150.0 + rng.normal(0, 10)
    liver_right = jitter(-70, -5 * sy, dome - 80, 76, 76, 80, -20)
    liver_left = jitter(12, -48 * sy, dome - 55, 62, 32, 45, 10, deform=0.08)
    spleen = jitter(88, ys - 8, 65, 26, 55, 48, 35)
    kidneys = []
    for side, x, z, tilt in (("left", 66, 5, -12), ("right", -66, -12, 12)):
        kidney = jitter(x, ys + 2, z, 26, 24, 52, -30 * np.sign(x), tilt, deform=0.04)
        hilum = kidney.center + np.array([-np.sign(x) * 22 * sx, -8 * sy, 0])
        carve = _blob(rng, hilum, [12, 10, 20], [0, 0, 0], 0.0)
        capsule = dataclasses.replace(kidney, semi_axes=kidney.semi_axes + 6)  # perirenal fat
        kidneys += [("visceral_fat", capsule, None), (f"kidney_{side}", kidney, carve)]
    spleen_hilum = spleen.center + np.array([-28 * sx, -18 * sy, 0])
    return (
        ("stomach", jitter(48, -35 * sy, dome - 45, 50, 42, 50, 20, deform=0.08), None),
        ("lung", jitter(85, 10 * sy, dome + 55, 70, 85, 95, 0, spread=0.5), None),
        ("lung", jitter(-85, 10 * sy, dome + 50, 70, 85, 95, 0, spread=0.5), None),
        ("heart", jitter(8, -30 * sy, dome + 75, 75, 60, 65, 20, spread=0.5), None),
        ("liver", liver_right, None),
        ("liver", liver_left, None),
        ("gallbladder", jitter(-35, -40 * sy, dome - 120, 14, 18, 32, 30, 20), None),
        ("spleen", spleen, _blob(rng, spleen_hilum, [22, 30, 32], [35, 0, 0], 0.0)),
        *kidneys,
    )


def sample_anatomy(rng: np.random.Generator, phase: str = "unenhanced") -> AbdomenAnatomy:
    """Draw one body: size, fat, spine, vessels, organ blobs, bowel texture and the tissue HU
    of contrast `phase`. The phase changes no draw, only the ranges the HU are drawn from."""
    if phase not in _HU_OF_PHASE:
        raise CtxRestoreError(
            f"abdomen phantom: unknown contrast phase '{phase}'; known: {list(CONTRAST_PHASES)}"
        )
    body = np.array([rng.uniform(135, 195), rng.uniform(85, 135), rng.uniform(85, 115), 0.0])
    body[3] = rng.uniform(-0.04, 0.04)  # relative change of the girth per 100 mm of z
    fat = rng.uniform([5, 5, 5], [45, 50, 30])
    muscle = rng.uniform(6, 14)
    inner = body[:3] - fat - muscle
    sx, sy, sz = inner[0] / 130, (inner[1] + inner[2]) / 160, rng.uniform(0.85, 1.15)
    shift = rng.normal(0, 10)
    y_spine = inner[2] - 62 * sy
    spine = np.array(
        [
            y_spine,
            rng.uniform(-0.05, 0.1),  # dy/dz: lordosis, or a tilted table
            22 * sx**0.5,
            17 * sy**0.5,
            32 * sz,  # vertebra + disc height
            rng.uniform(0, 1),  # where the discs are
            rng.uniform(0, 1),  # where the ribs are
            -15 * sz + shift,  # lowest rib at the back
        ]
    )
    aorta = np.array([rng.uniform(5, 18), -(spine[3] + 13), rng.uniform(9, 14), -110 * sz])
    directions = rng.standard_normal((16, 3))
    directions /= np.linalg.norm(directions, axis=1, keepdims=True)
    bowel = np.column_stack(
        [
            directions * (2 * np.pi / rng.uniform(35, 60)),
            rng.uniform(0, 2 * np.pi, 16),
            np.repeat([0, 1], 8),
        ]
    )
    bowel[8:, :3] *= 2.0  # the content mottle is twice as fine as the loops
    hu = np.array([rng.uniform(*_HU_OF_PHASE[phase][name]) for name in _TISSUES])
    hu[1:] += rng.uniform(-8, 8)  # calibration offset of the scanner
    return AbdomenAnatomy(
        body=body.astype(np.float32),
        fat=fat.astype(np.float32),
        muscle=float(muscle),
        outline=np.column_stack([rng.uniform(0, 0.04, 3), rng.uniform(0, 2 * np.pi, 3)]),
        spine=spine.astype(np.float32),
        aorta=aorta.astype(np.float32),
        organs=_organs(rng, sx, sy, sz, shift, y_spine),
        bowel=bowel.astype(np.float32),
        bowel_levels=np.array(
            [rng.uniform(-0.6, 0.3), rng.uniform(0.15, 0.35), rng.uniform(1.2, 2.2), 25.0],
            np.float32,
        ),
        z_range=(_Z_RANGE[0] * sz + shift, _Z_RANGE[1] * sz + shift),
        hu=hu.astype(np.float32),
    )


def sample_view(
    rng: np.random.Generator, anatomy: AbdomenAnatomy, size: tuple[int, ...]
) -> AbdomenView:
    """Draw the acquisition: pose, field of view, and the heights of the len(size) == 3 planes
    (1.5-5 mm apart) or of the one plane of a 2D sample."""
    height, width = size[-2:]
    fill = rng.uniform(0.55, 0.95)  # fraction of the image the body spans
    lateral, front_back = anatomy.body[0], (anatomy.body[1] + anatomy.body[2]) / 2
    spacing = float(max(2 * lateral / (fill * width), 2 * front_back / (fill * height)))
    offset = rng.uniform(-0.08, 0.08, 2) * (width * spacing, height * spacing)
    angle = float(np.deg2rad(rng.uniform(-20, 20)))
    middle = rng.uniform(*anatomy.z_range)
    if len(size) == 3:
        slice_spacing = rng.uniform(1.5, 5.0)
        z = middle + (np.arange(size[0]) - (size[0] - 1) / 2) * slice_spacing
    else:
        slice_spacing, z = 0.0, np.array([middle])
    return AbdomenView(
        z=z.astype(np.float32),
        shape=(height, width),
        pixel_spacing=spacing,
        angle=angle,
        offset=(float(offset[0]), float(offset[1])),
        slice_spacing=float(slice_spacing),
    )


def _torso(anatomy: AbdomenAnatomy, x, y, z, tissue: np.ndarray) -> tuple[np.ndarray, ...]:
    """Paint skin/fat, the muscle wall and the cavity; return the normalised skin radius
    (D, H, W), the wall band and the cavity. The three outlines share one deformed shape."""
    angle = np.arctan2(y, x)
    outline = np.ones_like(x)
    for harmonic, (amplitude, phase) in enumerate(anatomy.outline, start=2):
        outline += np.float32(amplitude) * np.cos(harmonic * angle + np.float32(phase))
    scale = (1 + anatomy.body[3] * np.clip(z / 100, -2, 2)) * outline  # (D, H, W)
    scale *= scale
    front, back = np.minimum(y, 0) ** 2, np.maximum(y, 0) ** 2

    def radius2(semi):  # squared normalised radius of an ellipse with two posterior halves
        return x * x / semi[0] ** 2 + front / semi[1] ** 2 + back / semi[2] ** 2

    skin = np.sqrt(radius2(anatomy.body[:3]) / scale)
    inner_fat = radius2(anatomy.body[:3] - anatomy.fat) < scale
    cavity = radius2(anatomy.body[:3] - anatomy.fat - anatomy.muscle) < scale
    tissue[skin < 1] = _T["subcutaneous_fat"]
    tissue[inner_fat] = _T["muscle"]
    tissue[cavity] = _T["visceral_fat"]
    return skin, inner_fat & ~cavity, cavity


def _bowel(anatomy: AbdomenAnatomy, x, y, z, tissue, cavity) -> np.ndarray:
    """Paint bowel loops (wall, content, gas, mesenteric fat) in front of the retroperitoneum;
    return the content mottle (D, H, W) in HU. Loops are level sets of random plane waves in
    the body frame, so a plane cuts them as a 3D texture would be cut."""
    inner_lateral = anatomy.body[0] - anatomy.fat[0] - anatomy.muscle
    y_spine = anatomy.spine[0] + anatomy.spine[1] * z
    limit = y_spine - 25 + 35 * (x / inner_lateral) ** 2 + 0.8 * np.maximum(-60 - z, 0)
    zone = cavity & (y < limit)
    shape = tissue.shape
    points = [np.broadcast_to(c, shape)[zone] for c in (x, y, z)]
    fields = [np.zeros(points[0].shape, np.float32) for _ in range(2)]
    for wx, wy, wz, phase, which in anatomy.bowel:
        fields[int(which)] += np.cos(wx * points[0] + wy * points[1] + wz * points[2] + phase)
    loops, content = fields[0] * 0.5, fields[1] * 0.5  # sum of 8 cosines: unit variance
    threshold, wall_width, gas_level, mottle = anatomy.bowel_levels
    lumen = loops > threshold
    values = np.where(loops > threshold - wall_width, _T["bowel_wall"], _T["visceral_fat"])
    values[lumen] = _T["bowel_content"]
    values[lumen & (content > gas_level)] = _T["gas"]
    tissue[zone] = values
    texture = np.zeros(shape, np.float32)
    texture[zone] = mottle * content
    return texture


def _organs_paint(anatomy: AbdomenAnatomy, view: AbdomenView, x, y, z, tissue, cavity) -> None:
    """Paint the organ blobs in order, each evaluated only on the pixels near it."""
    for name, blob, carve in anatomy.organs:
        window = view.window(blob.center, blob.radius)
        if window is None:
            continue
        d, h, w = window
        xs, ys, zs = x[h, w], y[h, w], z[d]
        inside = blob.inside(xs, ys, zs) & cavity[window]
        if carve is not None:
            inside &= ~carve.inside(xs, ys, zs)
        region = tissue[window]
        if name == "stomach":  # content, with gas in front (the patient lies supine)
            gas = np.broadcast_to(ys < blob.center[1] - 0.5 * blob.semi_axes[1], inside.shape)
            region[inside] = _T["bowel_content"]
            region[inside & gas] = _T["gas"]
        else:
            region[inside] = _T[name]


def _spine_and_vessels(anatomy: AbdomenAnatomy, view: AbdomenView, x, y, z, tissue) -> None:
    """Paint back muscles, psoas, aorta (iliac arteries below its bifurcation), vena cava and
    the vertebral column (body, discs, canal, arch), near the spine only."""
    y0, slope, vx, vy, segment, disc_phase = anatomy.spine[:6]
    reach = 110 + abs(float(slope)) * float(np.ptp(view.z))
    middle = float(view.z.mean())
    window = view.window((0.0, float(y0 + slope * middle), middle), reach, all_slices=True)
    if window is None:
        return
    region, xs, zs = tissue[window], x[window[1:]], z
    dy = y[window[1:]] - (y0 + slope * zs)
    body = region != _T["air"]  # (D, h, w)
    ax = np.abs(xs)
    phase = (zs / segment + disc_phase) % 1
    arch = (phase > 0.35) & (phase < 0.85)
    psoas = np.clip(6 + 0.25 * (30 - zs), 1e-3, 24)  # radius: from T12 down, growing
    paint = [  # (tissue, where), later wins; all within the body
        ("muscle", ((ax - 35) / 28) ** 2 + ((dy - vy - 40) / 26) ** 2 < 1),  # erector spinae
        ("muscle", ((ax - vx - 0.8 * psoas) / psoas) ** 2 + (dy / (0.85 * psoas)) ** 2 < 1),
    ]
    a_x, a_dy, a_r, bifurcation = anatomy.aorta
    ivc = ((xs + 20 + vx / 2) / (1.1 * a_r)) ** 2 + ((dy + vy + 8) / (0.8 * a_r)) ** 2 < 1
    paint.append(("blood", ivc))
    above = zs > bifurcation
    aorta = (xs - a_x) ** 2 + (dy - a_dy) ** 2 < a_r**2
    paint.append(("aorta", aorta & above))
    spread = 0.35 * (bifurcation - zs)
    iliac = (ax - spread) ** 2 + (dy - a_dy) ** 2 < (0.7 * a_r) ** 2
    paint.append(("blood", iliac & ~above))
    vertebra = (xs / vx) ** 2 + (dy / vy) ** 2
    paint += [
        ("cortical_bone", vertebra < 1),
        ("cancellous_bone", (xs / (vx - 3)) ** 2 + (dy / (vy - 3)) ** 2 < 1),
        ("disc", (vertebra < 1) & (phase < 0.25)),
    ]
    canal = xs**2 + (dy - vy - 10) ** 2
    paint += [
        ("cortical_bone", arch & (canal < 15**2) & (dy > vy)),
        ("cortical_bone", arch & ((xs / 5) ** 2 + ((dy - vy - 38) / 16) ** 2 < 1)),
        ("cortical_bone", arch & (((ax - 30) / 14) ** 2 + ((dy - vy - 8) / 5) ** 2 < 1)),
        ("csf", canal < 9**2),
    ]
    for name, where in paint:
        region[body & where] = _T[name]


def _ribs(anatomy: AbdomenAnatomy, x, y, z, tissue, wall) -> None:
    """Rib sections in the wall: bands that descend from the back to the front."""
    wall = wall & (z > anatomy.spine[7])  # no rib below the lowest one
    if not wall.any():
        return
    xs, ys = (np.broadcast_to(c, wall.shape)[wall] for c in (x, y))
    zs = np.broadcast_to(z, wall.shape)[wall]
    from_back = np.abs(np.arctan2(xs, ys))  # 0 at the spine, pi at the front
    rib_phase, lowest = anatomy.spine[6:8]
    ribs = ((zs + 45 * from_back) / 28 + rib_phase) % 1 < 0.25
    ribs &= (from_back > 0.5) & (from_back < 2.6) & (zs > lowest + 50 * from_back / np.pi)
    region = tissue[wall]
    region[ribs] = _T["cancellous_bone"]
    tissue[wall] = region


def render_anatomy(
    anatomy: AbdomenAnatomy, view: AbdomenView
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The body seen by the view, without noise: tissue (D, H, W) uint8 (indices of
    `_TISSUES`), hu (D, H, W) float32 and the skin radius (D, H, W) (< 1 inside the body).

    Deterministic and elementwise in the body coordinates of each pixel centre, so a plane
    gives the same tissues alone as within a volume."""
    x, y = view.body_coordinates()
    z = view.z.astype(np.float32)[:, None, None]
    tissue = np.zeros((len(view.z), *view.shape), np.uint8)
    skin, wall, cavity = _torso(anatomy, x, y, z, tissue)
    texture = _bowel(anatomy, x, y, z, tissue, cavity)
    _organs_paint(anatomy, view, x, y, z, tissue, cavity)
    _spine_and_vessels(anatomy, view, x, y, z, tissue)
    _ribs(anatomy, x, y, z, tissue, wall)
    hu = anatomy.hu[tissue]
    content = tissue == _T["bowel_content"]
    hu[content] += texture[content]
    return tissue, hu, skin


def acquire(
    rng: np.random.Generator, hu: np.ndarray, skin: np.ndarray, view: AbdomenView
) -> np.ndarray:
    """CT image (D, H, W) float32: hu plus a smooth bias inside the body (a linear and a
    quadratic trend and beam-hardening cupping) and in-plane correlated Gaussian noise of
    15-40 HU, clipped to [-1024, 3071]."""
    sigma, correlation = rng.uniform(15, 40), rng.uniform(0.5, 1.2)
    noise = rng.standard_normal(hu.shape, dtype=np.float32)
    ndimage.gaussian_filter(noise, (0, correlation, correlation), output=noise, truncate=3.0)
    taps = np.arange(-int(3 * correlation + 0.5), int(3 * correlation + 0.5) + 1)
    weights = np.exp(-(taps**2) / (2 * correlation**2))
    noise *= np.float32(sigma * np.sum(weights) ** 2 / np.sum(weights**2))  # unit std first
    height, width = view.shape
    u = np.linspace(-1, 1, width, dtype=np.float32)[None, :]
    v = np.linspace(-1, 1, height, dtype=np.float32)[:, None]
    linear, quadratic = rng.uniform(-30, 30, 2), rng.uniform(-20, 20, 3)
    cupping = rng.uniform(0, 50)
    bias = linear[0] * u + linear[1] * v + quadratic[0] * u * u + quadratic[1] * v * v
    bias = (bias + quadratic[2] * u * v).astype(np.float32)
    # Cupping: the centre reads low, the rim high; zero on average over the body's area.
    bias = np.where(skin < 1, bias - np.float32(cupping) * (0.5 - skin * skin), 0)
    noise += hu
    noise += bias
    return np.clip(noise, -1024, 3071, out=noise)


def abdomen_phantom(
    index: int,
    *,
    seed: int = 0,
    spatial_size: Sequence[int] = (128, 128),
    phase: str = "unenhanced",
) -> PhantomSample:
    """One abdominal CT sample: an axial slice (spatial_size (H, W)) or a volume of axial
    slices ((D, H, W), axis 0 from the feet to the head) of one random body.

    image: (1, *spatial) float32 in HU; mask: (*spatial) uint8 with the ids of
    `ABDOMEN_LABELS`; boxes: per organ of `ABDOMEN_ORGANS`, `mask_box` of its mask or None
    when it is out of view; spacing: (row, column) or (slice, row, column) in mm. Depends only
    on (seed, index), drawn from `np.random.default_rng([seed, index])`, and on the contrast
    `phase` (CONTRAST_PHASES), which changes tissue HU only.
    """
    size = check_spatial_size("abdomen", spatial_size)
    if index < 0 or seed < 0:
        raise CtxRestoreError(f"abdomen phantom: index {index} and seed {seed} must both be >= 0")
    rng = np.random.default_rng([seed, index])
    anatomy = sample_anatomy(rng, phase)
    view = sample_view(rng, anatomy, size)
    tissue, hu, skin = render_anatomy(anatomy, view)
    image = acquire(rng, hu, skin, view)
    mask = _MASK_OF_TISSUE[tissue]
    spacing = (view.pixel_spacing,) * 2
    if len(size) == 2:
        image, mask = image[0], mask[0]
    else:
        spacing = (view.slice_spacing, *spacing)
    return PhantomSample(
        image=image[None],
        spacing=tuple(float(s) for s in spacing),
        channel_names=("CT",),
        mask=mask,
        boxes={name: mask_box(mask == i) for i, name in ABDOMEN_LABELS.items()},
        meta={
            "z_mm": view.z.tolist(),
            "angle_deg": float(np.rad2deg(view.angle)),
            "phase": phase,
        },
    )
