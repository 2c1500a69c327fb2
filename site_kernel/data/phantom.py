"""An abdominal phantom with liver lesions, defined in world millimetres so any scanner grid can sample it.

The anatomy is a set of ellipsoids in RAS+ coordinates (x to the patient's right, y anterior, z superior): body
wall with subcutaneous fat, muscle, a liver on the patient's right, spleen, aorta, spine, bowel loops, liver
vessels, benign cysts and lesions. Each scanner (:mod:`site_kernel.data.scanners`) samples it on its own grid,
spacing and orientation, which a voxel-grid generator such as MONAI's ``create_test_image_3d`` cannot express.

Lesions are not separable by intensity: their core is only mildly darker than liver and overlaps muscle, bowel
and spleen; their enhancing rim overlaps liver and vessels. What marks a lesion is context (inside the liver),
shape (a round blob with a rim) and texture (mottled core), while cysts are darker, smooth and rimless and bowel
loops are mottled but outside the liver.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

AIR, FAT, MUSCLE, LIVER, SPLEEN, BOWEL, AORTA, CORTEX, MARROW, VESSEL, CYST, CORE, RIM = range(13)

#: Half the height of the slab every scanner images, centred on z = 0; lesions are placed within it.
SLAB_HALF_MM = 8.0
#: Mean tissue values in the portal venous phase: CT in HU, MR as fat-suppressed T1-weighted gradient echo signal
#: in [0, 1] (the usual liver MR protocol; fat and marrow are dark, cortical bone gives no signal).
CT_HU = np.array([-1000, -100, 45, 105, 95, 20, 170, 700, 220, 160, 5, 40, 140], dtype=np.float32)
MR_SIGNAL = np.array([0.02, 0.12, 0.30, 0.55, 0.50, 0.35, 0.85, 0.05, 0.22, 0.80, 0.08, 0.28, 0.70], dtype=np.float32)
#: Texture amplitude as a fraction of the liver-to-muscle contrast: mottled lesion cores and bowel.
TEXTURE = np.array([0, 0.05, 0.1, 0.08, 0.08, 0.9, 0, 0, 0.2, 0, 0.02, 0.25, 0.1], dtype=np.float32)


@dataclass(frozen=True)
class Ellipsoid:
    """An ellipsoid in RAS+ mm, rotated by ``angle`` radians about the z axis."""

    centre: tuple[float, float, float]
    radii: tuple[float, float, float]
    angle: float = 0.0

    def inside(self, grid: np.ndarray, shrink: float = 0.0) -> np.ndarray:
        """Boolean mask of grid points ([..., 3] mm) inside; ``shrink`` mm is taken off every radius."""
        d = grid - np.asarray(self.centre, dtype=np.float32)
        c, s = np.cos(self.angle), np.sin(self.angle)
        u = c * d[..., 0] + s * d[..., 1]
        v = -s * d[..., 0] + c * d[..., 1]
        rx, ry, rz = (max(r - shrink, 1e-3) for r in self.radii)
        return (u / rx) ** 2 + (v / ry) ** 2 + (d[..., 2] / rz) ** 2 <= 1.0


@dataclass(frozen=True)
class Anatomy:
    """One patient: every structure of the phantom, and the lesions (lists of lobes) that make the label."""

    body: Ellipsoid
    fat_mm: float
    liver: Ellipsoid
    spleen: Ellipsoid
    aorta: Ellipsoid
    spine: Ellipsoid
    bowel: list[Ellipsoid] = field(default_factory=list)
    vessels: list[Ellipsoid] = field(default_factory=list)
    cysts: list[Ellipsoid] = field(default_factory=list)
    lesions: list[list[Ellipsoid]] = field(default_factory=list)
    rim_mm: float = 2.5


def _column(x: float, y: float, r: float) -> Ellipsoid:
    return Ellipsoid((x, y, 0.0), (r, r, 1e4))


def sample_anatomy(
    rng: np.random.Generator,
    *,
    lesion_radius: tuple[float, float],
    prevalence: float,
    max_lesions: int = 2,
    slab_half_mm: float = SLAB_HALF_MM,
) -> Anatomy:
    """Draw one patient. ``prevalence`` is the chance of at least one lesion; radii are in mm. Lesions, cysts and
    vessels lie within ``slab_half_mm`` of z = 0: the thin slab of the 2D demo, or most of a volume's extent."""
    u = rng.uniform
    body = Ellipsoid((u(-4, 4), u(-4, 4), 0.0), (u(78, 94), u(58, 72), 1e4), u(-0.05, 0.05))
    liver = Ellipsoid((u(34, 48), u(-2, 14), u(-15, 15)), (u(34, 44), u(30, 40), u(60, 90)), u(-0.35, 0.35))
    spleen = Ellipsoid((u(-58, -44), u(-22, -8), u(-10, 10)), (u(14, 20), u(22, 30), 60.0), u(0.2, 0.6))
    aorta = _column(u(-12, -6), u(-30, -24), u(8, 10))
    spine = _column(u(-2, 2), u(-50, -44), u(12, 14))
    bowel = [
        Ellipsoid((u(-45, -5), u(10, 45), u(-20, 20)), (u(7, 13), u(6, 11), u(8, 20)), u(0, np.pi))
        for _ in range(int(rng.integers(3, 7)))
    ]
    vessels = [_vessel(rng, liver, slab_half_mm) for _ in range(int(rng.integers(3, 7)))]
    cysts = [_blob(rng, liver, (4.0, 8.0), slab_half_mm) for _ in range(int(rng.random() < 0.4))]
    n_lesions = int(rng.integers(1, max_lesions + 1)) if rng.random() < prevalence else 0
    lesions = []
    for _ in range(n_lesions):
        lobe = _blob(rng, liver, lesion_radius, slab_half_mm)
        lobes = [lobe]
        if rng.random() < 0.5:  # lobulated lesions: a second, overlapping lobe
            offset = rng.normal(0, 0.5, 3) * np.asarray(lobe.radii)
            radii = tuple(float(r) * u(0.6, 0.9) for r in lobe.radii)
            lobes.append(Ellipsoid(tuple(float(c) for c in np.asarray(lobe.centre) + offset), radii, lobe.angle))
        lesions.append(lobes)
    return Anatomy(body, u(6, 13), liver, spleen, aorta, spine, bowel, vessels, cysts, lesions, u(3.0, 4.5))


def _point_in(
    rng: np.random.Generator, organ: Ellipsoid, depth: float, slab_half_mm: float
) -> tuple[float, float, float]:
    """A point inside ``organ``'s cross-section at most ``depth`` of the way to its surface, within the slab.

    Scanners image a slab centred on z = 0 (see :mod:`site_kernel.data.scanners`); the liver spans it.
    """
    while True:
        p = rng.uniform(-1, 1, 2)
        if np.sum(p**2) <= 1:
            break
    c, s = np.cos(organ.angle), np.sin(organ.angle)
    local = p * depth * np.asarray(organ.radii[:2])
    x = organ.centre[0] + c * local[0] - s * local[1]
    y = organ.centre[1] + s * local[0] + c * local[1]
    return (float(x), float(y), float(rng.uniform(-slab_half_mm, slab_half_mm)))


def _blob(rng: np.random.Generator, organ: Ellipsoid, radius: tuple[float, float], slab_half_mm: float) -> Ellipsoid:
    r = rng.uniform(*radius)
    radii = (r * rng.uniform(0.8, 1.2), r * rng.uniform(0.8, 1.2), r * rng.uniform(0.7, 1.1))
    return Ellipsoid(_point_in(rng, organ, 0.6, slab_half_mm), radii, float(rng.uniform(0, np.pi)))


def _vessel(rng: np.random.Generator, organ: Ellipsoid, slab_half_mm: float) -> Ellipsoid:
    r = rng.uniform(1.5, 3.5)
    centre = _point_in(rng, organ, 0.8, slab_half_mm)
    return Ellipsoid(centre, (r, r * rng.uniform(1, 2.5), 40.0), float(rng.uniform(0, np.pi)))


def render(anatomy: Anatomy, affine: np.ndarray, shape: tuple[int, int, int]) -> tuple[np.ndarray, np.ndarray]:
    """Tissue code per voxel of the grid ``affine``/``shape`` and the lesion label (0/1), painted outside in."""
    grid = world_grid(affine, shape)
    inverse = np.linalg.inv(affine)

    def inside(shape_: Ellipsoid, shrink: float = 0.0) -> np.ndarray:
        # Test only the voxels in the index-space box around the ellipsoid: most structures are small.
        mask = np.zeros(shape, dtype=bool)
        rxy = max(shape_.radii[:2])
        reach = (rxy, rxy, min(shape_.radii[2], 1e3))
        bounds = [[c - r, c + r] for c, r in zip(shape_.centre, reach, strict=True)]
        corners = np.array(np.meshgrid(*bounds, indexing="ij")).reshape(3, -1)
        index = inverse[:3, :3] @ corners + inverse[:3, 3:4]
        lo = np.clip(np.floor(index.min(axis=1)).astype(int), 0, shape)
        hi = np.clip(np.ceil(index.max(axis=1)).astype(int) + 1, 0, shape)
        box = tuple(slice(a, b) for a, b in zip(lo, hi, strict=True))
        mask[box] = shape_.inside(grid[box], shrink)
        return mask

    tissue = np.full(shape, AIR, dtype=np.int8)
    body = inside(anatomy.body)
    tissue[body] = FAT
    tissue[inside(anatomy.body, shrink=anatomy.fat_mm)] = MUSCLE
    for loop in anatomy.bowel:
        tissue[inside(loop) & body] = BOWEL
    tissue[inside(anatomy.spleen) & body] = SPLEEN
    tissue[inside(anatomy.aorta)] = AORTA
    tissue[inside(anatomy.spine)] = CORTEX
    tissue[inside(anatomy.spine, shrink=2.5)] = MARROW
    liver = inside(anatomy.liver) & body
    tissue[liver] = LIVER
    for vessel in anatomy.vessels:
        tissue[inside(vessel) & liver] = VESSEL
    for cyst in anatomy.cysts:
        tissue[inside(cyst) & liver] = CYST
    label = np.zeros(shape, dtype=np.uint8)
    for lobes in anatomy.lesions:
        whole = np.zeros_like(liver)
        core = np.zeros_like(liver)
        for lobe in lobes:
            whole |= inside(lobe)
            core |= inside(lobe, shrink=anatomy.rim_mm)
        whole &= liver
        tissue[whole] = RIM
        tissue[core & liver] = CORE
        label[whole] = 1
    return tissue, label


def world_grid(affine: np.ndarray, shape: tuple[int, int, int]) -> np.ndarray:
    """RAS+ mm coordinates of every voxel centre of a grid, as float32 [X, Y, Z, 3]."""
    index = np.stack(np.meshgrid(*(np.arange(n) for n in shape), indexing="ij"), axis=-1).astype(np.float64)
    return (index @ affine[:3, :3].T + affine[:3, 3]).astype(np.float32)
