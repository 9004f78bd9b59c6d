"""Rendered indoor scenes: a NYUv2-like dense data set, exact by construction.

No network reaches NYUv2 here, so the bundled ``scenes`` data set (the TFDS
builder :class:`mtljax.data.builders.Scenes`) renders rooms procedurally,
deterministically from a seed, with per-pixel ground truth that is exact
because it is computed analytically, not estimated: every pixel's ray is
intersected with every primitive in closed form (vectorised numpy over images
and pixels; a loop only over the few primitive *slots*).

**Scene.** A room is the inside of an axis-aligned box ``x in [-a, a]``,
``y in [0, c]`` (``y`` up, the floor at ``y = 0``), ``z in [-b, b]``: floor,
four walls and a ceiling. On the floor stand up to 3 boxes (rotated about the
vertical), 2 spheres and 2 vertical capped cylinders (each slot present with
probability 0.6, at least one object per scene), placed 1.2-4.5 m ahead of
the camera and at most 0.45 times that to the side (about the field of view),
then moved inside the room; objects may intersect and occlude each other.
Rooms are 4-7 m wide and deep, 2.5-3.2 m high.
A pinhole camera stands 0.3-1.0 m in front of the wall ``z = -b`` at height
1.3-1.8 m (above every object), turned by a yaw of up to 35 degrees, pitched
down 10-30 degrees and rolled by up to 4 degrees.

**Classes** (:data:`CLASS_NAMES`, 7): ``floor``, ``wall``, ``ceiling``,
``cube`` (a box of roughly equal sides), ``slab`` (a wide, low box, table-like),
``sphere``, ``cylinder``. No pixel is unlabelled unless ``label_missing`` asks
for ignored pixels (label -1).

**Camera.** Intrinsics are shared by all images of a configuration, scaled from
NYUv2's Kinect (``f = 518.86`` pixels at 640 columns, a horizontal field of view
of about 63 degrees): ``fx = fy = 0.8107 W``, ``cx = W / 2``, ``cy = H / 2``
(:func:`intrinsics`). Pixel ``(v, u)`` (row, column) is the ray through its
centre: in the camera frame ``d = ((u + 0.5 - cx) / fx, (v + 0.5 - cy) / fy, 1)``
with the OpenCV axes (x right, y down, z forward). The world ray is ``o + t R d``
(``R``: camera to world, ``o``: the camera centre). Because ``d_z = 1``, the ray
parameter ``t`` of the nearest hit *is* the depth along the optical axis.

**Intersections** (``t > 0``, nearest wins):

* room: the exit of the ray from the room box, per axis
  ``t_i = (bound_i - o_i) / d_i`` with the bound on the side ``d_i`` points to;
  ``t = min_i t_i``; the axis that attains it says floor/ceiling/wall;
* sphere ``|p - s| = r``: ``|d|^2 t^2 + 2 d.(o - s) t + |o - s|^2 - r^2 = 0``,
  the smaller root; normal ``(p - s) / r``;
* cylinder (axis vertical through ``(x0, z0)``, radius ``r``, height ``h``): the
  side is the quadric in ``x, z`` alone, valid where ``0 <= y <= h``; the top
  cap is the plane ``y = h`` inside the disc (the camera is above every object,
  so the bottom is never seen); normals ``((x - x0) / r, 0, (z - z0) / r)`` and
  ``(0, 1, 0)``;
* box (centre, half extents ``e``, yaw ``psi`` about ``y``): the slab method in
  the box's frame ``q = R_y(psi)^T (p - centre)``: ``t_near = max_i min(t1_i,
  t2_i)``, hit if ``t_near <= t_far``; the entered face is on the axis attaining
  ``t_near``, its outward normal ``-sign(d_i) e_i`` turned back by ``R_y(psi)``.

**Ground truth per pixel**, for the nearest hit: ``label`` (int32 class id),
``depth`` (float32 ``[H, W, 1]``, metres along the optical axis), ``normal``
(float32 ``[H, W, 3]``, unit, camera frame, the side facing the camera).

**Normal convention.** Normals are written in the camera frame with **x right,
y up, z towards the camera** (right-handed; a wall facing the camera is
``(0, 0, 1)``, the floor seen by a level camera ``(0, 1, 0)``): the OpenCV
frame's normal ``(nx, ny, nz)`` is written as ``(nx, -ny, -nz)``. The x axis
is image-horizontal as in the preprocessed NYUv2 files that MTAN, LibMTL and
Nash-MTL read (MTAN's ``create_dataset.py`` negates channel 0 when it flips an
image horizontally), so the flip augmentation is the same for both. The sign
of NYUv2's y and z channels (Eigen and Fergus's precomputed normals) could not
be checked against the files here (no network): the authors of 2D-3D-Semantics
describe NYU Depth's normal images as x right, y down, z towards the camera;
:func:`convert_normals` converts to that and to OpenCV's frame. Angular errors,
the normals metrics, do not change when prediction and target are converted
alike.

**Image.** Lambertian shading from a point light near the ceiling plus ambient,
``albedo * texture * (0.25 + 0.75 min(1, 2 max(0, n.l) / (1 + 0.08 |p - light|^2)))``
plus i.i.d. Gaussian noise (std 0.02), clipped to ``[0, 1]``. No shadows.
Albedos of all surfaces, room and objects, come from one colour distribution
(hue uniform, saturation 0.15-0.75, value 0.45-0.95), so a pixel's colour says
nothing about its class; each class has its own texture (floor planks, wall
stripes, a faint ceiling ripple, cube checkers, slab wood grain, sphere
segments, cylinder rings; :func:`_texture`), so segmentation needs context.

**Missing pixels** (optional, seeded): ``depth_missing``, ``normal_missing``,
``label_missing`` (each a fraction in ``[0, 1)``) drop that target on blobs of
4x4-pixel cells, each cell dropped with that probability, independently per
target: depth 0, normal ``(0, 0, 0)``, label -1 there, the conventions of the
preprocessed NYUv2 files (and of :mod:`mtljax.tasks`' dense kinds).

**Interface** (what the builder and the dense pipeline call):

* :func:`make_scenes` ``(seed, num_train, num_test, height, width, *,
  depth_missing=0., normal_missing=0., label_missing=0.)`` -> ``{"train": {...},
  "test": {...}}``, each ``{"image" [N, H, W, 3] float32 in [0, 1], "label"
  [N, H, W] int32, "depth" [N, H, W, 1] float32, "normal" [N, H, W, 3]
  float32}``, the layout of the preprocessed NYUv2 ``.npy`` files.
* :func:`sample_scenes` ``(rng, n)`` -> :class:`Scenes` and :func:`render`
  ``(scenes, height, width, noise_rng=None)`` -> the arrays above plus
  ``surface`` (which face of which primitive each pixel sees; for tests), in
  float64 before the cast.
* :func:`iter_split` (one split, or scenes ``start..stop-1`` of it,
  :data:`CHUNK` images at a time; what the builder writes, a part of a large
  split at a time) and :func:`render_split` (the same, concatenated).
* :data:`CLASS_NAMES`, :data:`NUM_CLASSES`, :func:`intrinsics`,
  :func:`backproject`, :func:`convert_normals`.

Rendering costs about 6-9 s of one core per 2,500 images at 64x80 (float64;
the ray casting is 60 % of it).
"""

from __future__ import annotations

import dataclasses

import numpy as np

CLASS_NAMES = ("floor", "wall", "ceiling", "cube", "slab", "sphere", "cylinder")
NUM_CLASSES = len(CLASS_NAMES)
FLOOR, WALL, CEILING, CUBE, SLAB, SPHERE, CYLINDER = range(NUM_CLASSES)

BOX_SLOTS, SPHERE_SLOTS, CYLINDER_SLOTS = 3, 2, 2
# Surface ids (:func:`render`'s ``surface``): room 0-5 (floor, ceiling, walls
# x = -a, x = a, z = -b, z = b); box k's face 2 i + (outward normal along +e_i)
# is 6 + 6 k + that; sphere k is 24 + k; cylinder k is 26 + 2 k (side) or
# 27 + 2 k (top).
ROOM_SURFACES = 6
BOX_BASE = ROOM_SURFACES
SPHERE_BASE = BOX_BASE + 6 * BOX_SLOTS
CYLINDER_BASE = SPHERE_BASE + SPHERE_SLOTS
NUM_SURFACES = CYLINDER_BASE + 2 * CYLINDER_SLOTS

FOCAL_PER_WIDTH = 518.8579 / 640.0  # NYUv2's Kinect RGB camera
PIXEL_NOISE = 0.02
AMBIENT = 0.25
HOLE_CELL = 4  # missing pixels come in blobs of HOLE_CELL x HOLE_CELL cells
CHUNK = 16  # images rendered at a time (fixes the pixel noise's stream)
_EPS = 1e-9
P_OBJECT = 0.6  # each object slot is filled with this probability


@dataclasses.dataclass(frozen=True)
class Scenes:
  """A batch of ``B`` scenes as arrays (world frame: y up, floor at y = 0).

  Attributes:
    room: [B, 3] half width ``a`` (x), height ``c`` (y), half depth ``b`` (z).
    cam_pos: [B, 3] camera centre.
    cam_rot: [B, 3, 3] camera-to-world rotation; its columns are the camera's
      x (right), y (down), z (forward) axes in world coordinates.
    light: [B, 3] point light position.
    room_albedo: [B, 3, 3] RGB albedo of floor, walls, ceiling.
    box_on, box_class, box_center, box_half, box_yaw, box_albedo: [B, 3] bool,
      [B, 3] int (CUBE or SLAB), [B, 3, 3], [B, 3, 3] half extents, [B, 3]
      radians about y, [B, 3, 3].
    sphere_on, sphere_center, sphere_radius, sphere_albedo: [B, 2], [B, 2, 3],
      [B, 2], [B, 2, 3].
    cyl_on, cyl_xz, cyl_radius, cyl_height, cyl_albedo: [B, 2], [B, 2, 2] axis
      position, [B, 2], [B, 2], [B, 2, 3].
    texture_key: [B] int64, varies the textures' phases per scene.
  """

  room: np.ndarray
  cam_pos: np.ndarray
  cam_rot: np.ndarray
  light: np.ndarray
  room_albedo: np.ndarray
  box_on: np.ndarray
  box_class: np.ndarray
  box_center: np.ndarray
  box_half: np.ndarray
  box_yaw: np.ndarray
  box_albedo: np.ndarray
  sphere_on: np.ndarray
  sphere_center: np.ndarray
  sphere_radius: np.ndarray
  sphere_albedo: np.ndarray
  cyl_on: np.ndarray
  cyl_xz: np.ndarray
  cyl_radius: np.ndarray
  cyl_height: np.ndarray
  cyl_albedo: np.ndarray
  texture_key: np.ndarray

  def __len__(self) -> int:
    return len(self.room)

  def take(self, idx) -> "Scenes":
    """The scenes ``idx`` (a slice or index array) of the batch."""
    return Scenes(**{f.name: getattr(self, f.name)[idx] for f in dataclasses.fields(self)})

  def replace(self, **kw) -> "Scenes":
    return dataclasses.replace(self, **kw)


def intrinsics(height: int, width: int) -> tuple[float, float, float, float]:
  """``(fx, fy, cx, cy)`` in pixels: NYUv2's focal length per column, square
  pixels, the principal point at the image centre."""
  f = FOCAL_PER_WIDTH * width
  return f, f, width / 2.0, height / 2.0


def pixel_rays(height: int, width: int) -> np.ndarray:
  """[H * W, 3] camera-frame (OpenCV axes) ray directions through the pixel
  centres, row-major, with z = 1 (so the ray parameter is the depth)."""
  fx, fy, cx, cy = intrinsics(height, width)
  v, u = np.mgrid[0:height, 0:width].astype(np.float64)
  d = np.stack([(u + 0.5 - cx) / fx, (v + 0.5 - cy) / fy, np.ones_like(u)], -1)
  return d.reshape(-1, 3)


def backproject(depth: np.ndarray) -> np.ndarray:
  """``[..., H, W, 3]`` camera-frame (OpenCV axes) points of a depth map
  ``[..., H, W]`` or ``[..., H, W, 1]``: ``depth * K^-1 (u + 0.5, v + 0.5, 1)``."""
  depth = np.asarray(depth, np.float64)
  if depth.shape[-1] == 1 and depth.ndim >= 3:
    depth = depth[..., 0]
  h, w = depth.shape[-2:]
  return depth[..., None] * pixel_rays(h, w).reshape(h, w, 3)


NORMAL_CONVENTIONS = {
    "scenes": (1.0, 1.0, 1.0),  # x right, y up, z towards the camera (this data set)
    "opencv": (1.0, -1.0, -1.0),  # x right, y down, z forward (away from the camera)
    "2d3ds": (1.0, -1.0, 1.0),  # x right, y down, z towards the camera
}


def convert_normals(normal: np.ndarray, to: str = "opencv") -> np.ndarray:
  """Normals ``[..., 3]`` from this data set's convention (x right, y up, z
  towards the camera) to another of :data:`NORMAL_CONVENTIONS`: ``"opencv"``
  (x right, y down, z forward) or ``"2d3ds"`` (x right, y down, z towards the
  camera: how the 2D-3D-Semantics authors describe NYU Depth's normal images;
  a left-handed frame). Each is a sign flip per axis, its own inverse; missing
  (all-zero) normals stay zero."""
  if to not in NORMAL_CONVENTIONS:
    raise ValueError(f"convert_normals: to must be one of {sorted(NORMAL_CONVENTIONS)}, "
                     f"got {to!r}.")
  normal = np.asarray(normal)
  return normal * np.asarray(NORMAL_CONVENTIONS[to], normal.dtype)


# ----------------------------------------------------------------------------
# Sampling scenes.
# ----------------------------------------------------------------------------


def _hsv_to_rgb(h, s, v):
  """Vectorised HSV (each in [0, 1]) to RGB, ``[..., 3]``."""
  n = np.array([5.0, 3.0, 1.0])
  k = (n + h[..., None] * 6.0) % 6.0
  return v[..., None] - v[..., None] * s[..., None] * np.clip(np.minimum(k, 4.0 - k), 0.0, 1.0)


def _albedo(rng, shape):
  return _hsv_to_rgb(rng.uniform(0.0, 1.0, shape), rng.uniform(0.15, 0.75, shape),
                     rng.uniform(0.45, 0.95, shape))


def camera_rotation(yaw, pitch, roll) -> np.ndarray:
  """[..., 3, 3] camera-to-world rotations: the camera looks along world +z
  turned by ``yaw`` about +y (towards +x for yaw > 0), then down by ``pitch``,
  then rolled by ``roll`` about its optical axis; columns right, down, forward."""
  cy, sy, cp, sp = np.cos(yaw), np.sin(yaw), np.cos(pitch), np.sin(pitch)
  fwd = np.stack([sy * cp, -sp, cy * cp], -1)
  right = np.stack([-cy, np.zeros_like(cy), sy], -1)  # fwd x (0, 1, 0), normalised
  down = np.cross(fwd, right)
  cr, sr = np.cos(roll)[..., None], np.sin(roll)[..., None]
  right, down = cr * right + sr * down, -sr * right + cr * down
  return np.stack([right, down, fwd], -1)


def sample_scenes(rng: np.random.Generator, n: int) -> Scenes:
  """``n`` random scenes (the distribution of the module docstring)."""
  room = np.stack([rng.uniform(2.0, 3.5, n), rng.uniform(2.5, 3.2, n),
                   rng.uniform(2.0, 3.5, n)], -1)
  a, c, b = room[:, 0], room[:, 1], room[:, 2]
  cam_pos = np.stack([rng.uniform(-0.5, 0.5, n) * a, rng.uniform(1.3, 1.8, n),
                      -b + rng.uniform(0.3, 1.0, n)], -1)
  cam_rot = camera_rotation(np.radians(rng.uniform(-35, 35, n)),
                            np.radians(rng.uniform(10, 30, n)),
                            np.radians(rng.uniform(-4, 4, n)))
  light = np.stack([rng.uniform(-0.8, 0.8, n) * a, c - 0.2,
                    rng.uniform(-0.8, 0.8, n) * b], -1)
  room_albedo = _albedo(rng, (n, 3))

  fwd = cam_rot[:, [0, 2], 2]
  fwd = fwd / np.linalg.norm(fwd, axis=-1, keepdims=True)  # the view on the floor

  def place(k, margin):
    """[n, k, 2] floor positions (x, z): 1.2-4.5 m ahead of the camera, at most
    0.45 times that to the side (about the field of view), then moved inside
    the room ``margin`` [n, k] from every wall."""
    ahead = rng.uniform(1.2, 4.5, (n, k))
    side = rng.uniform(-0.45, 0.45, (n, k)) * ahead
    x = cam_pos[:, None, 0] + ahead * fwd[:, None, 0] + side * fwd[:, None, 1]
    z = cam_pos[:, None, 2] + ahead * fwd[:, None, 1] - side * fwd[:, None, 0]
    lim_x, lim_z = a[:, None] - margin, b[:, None] - margin
    return np.stack([np.clip(x, -lim_x, lim_x), np.clip(z, -lim_z, lim_z)], -1)

  box_class = np.where(rng.random((n, BOX_SLOTS)) < 0.5, CUBE, SLAB)
  side = rng.uniform(0.18, 0.4, (n, BOX_SLOTS))[..., None] * rng.uniform(
      0.85, 1.15, (n, BOX_SLOTS, 3))
  slab = np.stack([rng.uniform(0.4, 0.8, (n, BOX_SLOTS)), rng.uniform(0.15, 0.4, (n, BOX_SLOTS)),
                   rng.uniform(0.3, 0.5, (n, BOX_SLOTS))], -1)
  box_half = np.where((box_class == CUBE)[..., None], side, slab)
  xz = place(BOX_SLOTS, np.linalg.norm(box_half[..., [0, 2]], axis=-1))
  box_center = np.stack([xz[..., 0], box_half[..., 1], xz[..., 1]], -1)
  sphere_radius = rng.uniform(0.15, 0.45, (n, SPHERE_SLOTS))
  xz = place(SPHERE_SLOTS, sphere_radius)
  sphere_center = np.stack([xz[..., 0], sphere_radius, xz[..., 1]], -1)
  cyl_radius = rng.uniform(0.1, 0.35, (n, CYLINDER_SLOTS))
  cyl_height = rng.uniform(0.4, 1.2, (n, CYLINDER_SLOTS))
  on = rng.random((n, BOX_SLOTS + SPHERE_SLOTS + CYLINDER_SLOTS)) < P_OBJECT
  empty = ~on.any(1)
  on[empty, rng.integers(0, on.shape[1], n)[empty]] = True  # at least one object
  return Scenes(
      room=room, cam_pos=cam_pos, cam_rot=cam_rot, light=light, room_albedo=room_albedo,
      box_on=on[:, :BOX_SLOTS], box_class=box_class, box_center=box_center,
      box_half=box_half, box_yaw=rng.uniform(0.0, np.pi / 2, (n, BOX_SLOTS)),
      box_albedo=_albedo(rng, (n, BOX_SLOTS)),
      sphere_on=on[:, BOX_SLOTS:BOX_SLOTS + SPHERE_SLOTS], sphere_center=sphere_center,
      sphere_radius=sphere_radius, sphere_albedo=_albedo(rng, (n, SPHERE_SLOTS)),
      cyl_on=on[:, BOX_SLOTS + SPHERE_SLOTS:], cyl_xz=place(CYLINDER_SLOTS, cyl_radius),
      cyl_radius=cyl_radius, cyl_height=cyl_height,
      cyl_albedo=_albedo(rng, (n, CYLINDER_SLOTS)),
      texture_key=rng.integers(0, 2**31, n))


# ----------------------------------------------------------------------------
# Ray casting.
# ----------------------------------------------------------------------------


def _closer(best_t, best_s, t, s):
  """Keeps the nearer of (best_t, best_s) and the candidates (t [B, P], s)."""
  nearer = t < best_t
  return np.where(nearer, t, best_t), np.where(nearer, s, best_s)


def _cast(sc: Scenes, d: np.ndarray):
  """Nearest hit of the rays ``o + t d`` (``d`` [B, P, 3] world): ``(t, surface)``
  each [B, P]."""
  o = sc.cam_pos[:, None, :]  # [B, 1, 3]
  with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
    # Room: exit of the box, per axis the bound d points to.
    lo = np.stack([-sc.room[:, 0], np.zeros(len(sc)), -sc.room[:, 2]], -1)[:, None]
    hi = sc.room[:, None, :]
    safe = np.where(d == 0.0, 1e-300, d)
    t_axis = (np.where(d > 0, hi, lo) - o) / safe  # [B, P, 3]
    axis = np.argmin(t_axis, -1)
    t = np.take_along_axis(t_axis, axis[..., None], -1)[..., 0]
    pos = np.take_along_axis(d, axis[..., None], -1)[..., 0] > 0
    # axis 0: walls 2 (x = -a), 3 (x = a); 1: floor 0, ceiling 1; 2: walls 4, 5.
    surface = np.where(axis == 1, pos.astype(np.int64), 2 * axis + 2 * (axis == 0) + pos)

    # Spheres [B, K, P].
    oc = o[:, None, 0, :] - sc.sphere_center  # [B, K, 3]
    bq = np.einsum("bpi,bki->bkp", d, oc)
    aq = np.einsum("bpi,bpi->bp", d, d)[:, None]
    cq = (np.einsum("bki,bki->bk", oc, oc) - sc.sphere_radius**2)[..., None]
    disc = bq * bq - aq * cq
    ts = (-bq - np.sqrt(np.maximum(disc, 0.0))) / aq
    ok = sc.sphere_on[..., None] & (disc >= 0) & (ts > _EPS)
    ts = np.where(ok, ts, np.inf)
    k = np.argmin(ts, 1)
    t, surface = _closer(t, surface, np.min(ts, 1), SPHERE_BASE + k)

    # Cylinders: side (quadric in x, z) and top cap.
    ocx = o[:, None, 0, 0] - sc.cyl_xz[..., 0]  # [B, K]
    ocz = o[:, None, 0, 2] - sc.cyl_xz[..., 1]
    dx, dy, dz = d[:, None, :, 0], d[:, None, :, 1], d[:, None, :, 2]  # [B, 1, P]
    aq = dx * dx + dz * dz
    bq = dx * ocx[..., None] + dz * ocz[..., None]
    cq = (ocx**2 + ocz**2 - sc.cyl_radius**2)[..., None]
    disc = bq * bq - aq * cq
    tside = (-bq - np.sqrt(np.maximum(disc, 0.0))) / np.where(aq == 0, 1e-300, aq)
    y = o[:, None, :, 1] + tside * dy
    h = sc.cyl_height[..., None]
    ok_side = (disc >= 0) & (tside > _EPS) & (y >= 0) & (y <= h)
    ttop = (h - o[:, None, :, 1]) / np.where(dy == 0, 1e-300, dy)
    rx = ocx[..., None] + ttop * dx
    rz = ocz[..., None] + ttop * dz
    ok_top = (ttop > _EPS) & (rx * rx + rz * rz <= sc.cyl_radius[..., None] ** 2)
    on = sc.cyl_on[..., None]
    tside = np.where(on & ok_side, tside, np.inf)
    ttop = np.where(on & ok_top, ttop, np.inf)
    tc = np.minimum(tside, ttop)  # [B, K, P]
    k = np.argmin(tc, 1)
    top = np.take_along_axis(ttop < tside, k[:, None], 1)[:, 0]
    t, surface = _closer(t, surface, np.min(tc, 1), CYLINDER_BASE + 2 * k + top)

    # Boxes: slab method in each box's frame, one axis at a time.
    c, s = np.cos(sc.box_yaw)[..., None], np.sin(sc.box_yaw)[..., None]  # [B, K, 1]
    rel = o[:, None, 0, :] - sc.box_center  # [B, K, 3]
    cb, sb = c[..., 0], s[..., 0]
    ol = (cb * rel[..., 0] - sb * rel[..., 2], rel[..., 1],
          sb * rel[..., 0] + cb * rel[..., 2])  # R_y(yaw)^T (o - centre), each [B, K]
    dl = (c * dx - s * dz, dy, s * dx + c * dz)  # R_y(yaw)^T d: [B, K, P] ([B, 1, P])
    tnear = tfar = face_axis = face_neg = None
    for i in range(3):
      di = np.where(dl[i] == 0.0, 1e-300, dl[i])
      e, oi = sc.box_half[..., i, None], ol[i][..., None]
      t1, t2 = (-e - oi) / di, (e - oi) / di
      lo, hi = np.minimum(t1, t2), np.maximum(t1, t2)
      if i == 0:
        tnear, tfar = lo, hi
        face_axis = np.zeros(lo.shape, np.int64)
        face_neg = di < 0
      else:
        later = lo > tnear
        tnear, tfar = np.where(later, lo, tnear), np.minimum(tfar, hi)
        face_axis = np.where(later, i, face_axis)
        face_neg = np.where(later, di < 0, face_neg)
    ok = sc.box_on[..., None] & (tnear <= tfar) & (tnear > _EPS)
    tb = np.where(ok, tnear, np.inf)  # [B, K, P]
    k = np.argmin(tb, 1)
    axis = np.take_along_axis(face_axis, k[:, None], 1)[:, 0]
    neg = np.take_along_axis(np.broadcast_to(face_neg, tb.shape), k[:, None], 1)[:, 0]
    face = 2 * axis + neg  # outward normal along +e_i when d_i < 0
    t, surface = _closer(t, surface, np.min(tb, 1), BOX_BASE + 6 * k + face)
  return t, surface


def _surface_fields(sc: Scenes, b: np.ndarray, p: np.ndarray, surface: np.ndarray):
  """At the hit points ``p`` [N, 3] of pixels of images ``b`` [N] that see
  ``surface`` [N]: world normals [N, 3], classes [N], albedos [N, 3], texture
  coordinates [N, 3] (in the primitive's frame) and whether on a cylinder's
  top [N]; each primitive kind is computed on its own pixels only."""
  n = len(surface)
  normal = np.zeros((n, 3))
  cls = np.zeros(n, np.int64)
  albedo = np.zeros((n, 3))
  local = p.copy()
  top = np.zeros(n, bool)
  # Room: surface 0 floor (+y), 1 ceiling (-y), 2 / 3 walls x = -a / a (+x / -x),
  # 4 / 5 walls z = -b / b (+z / -z).
  m = np.flatnonzero(surface < ROOM_SURFACES)
  s = surface[m]
  axis = np.where(s < 2, 1, np.where(s < 4, 0, 2))
  normal[m, axis] = np.where(s % 2 == 0, 1.0, -1.0)
  cls[m] = np.where(s == 0, FLOOR, np.where(s == 1, CEILING, WALL))
  albedo[m] = sc.room_albedo[b[m], np.where(s == 0, 0, np.where(s == 1, 2, 1))]
  # Boxes: face 2 i + 1 has outward normal +e_i, face 2 i has -e_i (box frame).
  m = np.flatnonzero((surface >= BOX_BASE) & (surface < SPHERE_BASE))
  bm, k, face = b[m], (surface[m] - BOX_BASE) // 6, (surface[m] - BOX_BASE) % 6
  c, sn = np.cos(sc.box_yaw[bm, k]), np.sin(sc.box_yaw[bm, k])
  nl = np.zeros((len(m), 3))
  nl[np.arange(len(m)), face // 2] = np.where(face % 2 == 1, 1.0, -1.0)
  normal[m] = np.stack([c * nl[:, 0] + sn * nl[:, 2], nl[:, 1],
                        -sn * nl[:, 0] + c * nl[:, 2]], -1)  # R_y(yaw) nl
  rel = p[m] - sc.box_center[bm, k]
  local[m] = np.stack([c * rel[:, 0] - sn * rel[:, 2], rel[:, 1],
                       sn * rel[:, 0] + c * rel[:, 2]], -1)  # R_y(yaw)^T rel
  cls[m] = sc.box_class[bm, k]
  albedo[m] = sc.box_albedo[bm, k]
  # Spheres.
  m = np.flatnonzero((surface >= SPHERE_BASE) & (surface < CYLINDER_BASE))
  bm, k = b[m], surface[m] - SPHERE_BASE
  rel = p[m] - sc.sphere_center[bm, k]
  normal[m] = rel / sc.sphere_radius[bm, k][:, None]
  local[m] = rel
  cls[m] = SPHERE
  albedo[m] = sc.sphere_albedo[bm, k]
  # Cylinders: side 26 + 2 k, top 27 + 2 k.
  m = np.flatnonzero(surface >= CYLINDER_BASE)
  bm, k, on_top = b[m], (surface[m] - CYLINDER_BASE) // 2, (surface[m] - CYLINDER_BASE) % 2 == 1
  xz = sc.cyl_xz[bm, k]
  rel = np.stack([p[m, 0] - xz[:, 0], p[m, 1], p[m, 2] - xz[:, 1]], -1)
  side = rel * np.array([1.0, 0.0, 1.0]) / sc.cyl_radius[bm, k][:, None]
  normal[m] = np.where(on_top[:, None], np.array([0.0, 1.0, 0.0]), side)
  local[m] = rel
  top[m] = on_top
  cls[m] = CYLINDER
  albedo[m] = sc.cyl_albedo[bm, k]
  return normal, cls, albedo, local, top


def _hash01(i: np.ndarray, key: np.ndarray) -> np.ndarray:
  """A deterministic pseudo-random value in [0, 1) per integer ``i`` and ``key``."""
  x = (i.astype(np.int64) * 73856093 + key.astype(np.int64) * 19349663) & 0xFFFFFFFF
  x = (x ^ (x >> 13)) * 1274126177 & 0xFFFFFFFF
  return ((x ^ (x >> 16)) & 0xFFFF) / 65536.0


def _texture(cls, local, p, surface, cyl_top, key):
  """A per-class multiplicative texture in about [0.6, 1.2], per pixel [N]
  (each class's pattern computed on its own pixels): floor planks 0.22 m wide
  of random brightness with a fine grain; walls vertical stripes 0.3 m apart;
  the ceiling a faint ripple; cubes a 0.2 m checkerboard; slabs a wavy wood
  grain; spheres six alternating segments; cylinders rings 0.12 m apart."""
  tau = 2.0 * np.pi
  out = np.ones(len(cls))

  def at(c):
    m = np.flatnonzero(cls == c)
    return m, local[m], p[m], surface[m], key[m]

  m, _, q, _, k = at(FLOOR)
  plank = np.floor(q[:, 0] / 0.22)
  out[m] = 0.8 + 0.3 * _hash01(plank, k) + 0.04 * np.sin(tau * q[:, 2] / 0.07 + 5.0 * plank)
  m, _, q, s, k = at(WALL)
  along = np.where(s < 4, q[:, 2], q[:, 0])  # walls x = -a, a run along z
  out[m] = 1.0 + 0.1 * np.sign(np.sin(tau * along / 0.3 + tau * _hash01(s, k)))
  m, _, q, s, k = at(CEILING)
  out[m] = 1.0 + 0.04 * np.sin(tau * q[:, 0] / 1.3 + tau * _hash01(s, k))
  m, loc, _, _, _ = at(CUBE)
  out[m] = np.where(np.floor(loc / 0.2).sum(-1) % 2 == 0, 1.1, 0.75)
  m, loc, _, _, _ = at(SLAB)
  out[m] = 1.0 + 0.15 * np.sin(tau * loc[:, 0] / 0.05 + 3.0 * np.sin(tau * loc[:, 2] / 0.4))
  m, loc, _, s, k = at(SPHERE)
  seg = np.floor((np.arctan2(loc[:, 2], loc[:, 0]) + tau * _hash01(s, k)) / (np.pi / 3))
  out[m] = np.where(seg % 2 == 0, 1.1, 0.7)
  m, loc, _, _, _ = at(CYLINDER)
  coord = np.where(cyl_top[m], np.hypot(loc[:, 0], loc[:, 2]), loc[:, 1])
  out[m] = 1.0 + 0.2 * np.sign(np.sin(tau * coord / 0.12))
  return out


def render(scenes: Scenes, height: int, width: int,
           noise_rng: np.random.Generator | None = None) -> dict[str, np.ndarray]:
  """Ray-casts ``scenes`` at ``height x width``, float64.

  Returns ``image`` [B, H, W, 3] (in [0, 1]; ``noise_rng`` None: no pixel
  noise), ``label`` [B, H, W] int32, ``depth`` [B, H, W, 1], ``normal``
  [B, H, W, 3] (the module's convention), ``surface`` [B, H, W] (the surface
  id each pixel sees, see :data:`NUM_SURFACES`).
  """
  b = len(scenes)
  d = np.einsum("bij,pj->bpi", scenes.cam_rot, pixel_rays(height, width))  # [B, P, 3]
  t, surface = _cast(scenes, d)
  p = (scenes.cam_pos[:, None, :] + t[..., None] * d).reshape(-1, 3)  # [N = B P, 3]
  bidx = np.repeat(np.arange(b), height * width)
  surface = surface.reshape(-1)
  normal, cls, albedo, local, cyl_top = _surface_fields(scenes, bidx, p, surface)
  tex = _texture(cls, local, p, surface, cyl_top, scenes.texture_key[bidx])
  to_light = scenes.light[bidx] - p
  dist2 = np.einsum("ni,ni->n", to_light, to_light)
  lambert = np.maximum(np.einsum("ni,ni->n", normal, to_light), 0.0) / np.sqrt(dist2)
  shade = AMBIENT + (1.0 - AMBIENT) * np.minimum(1.0, 2.0 * lambert / (1.0 + 0.08 * dist2))
  image = albedo * (tex * shade)[..., None]
  if noise_rng is not None:
    image = image + PIXEL_NOISE * noise_rng.standard_normal(image.shape)
  normal = normal.reshape(b, -1, 3)
  n_cv = np.einsum("bji,bpj->bpi", scenes.cam_rot, normal)  # R^T n: OpenCV camera frame
  shape = (b, height, width)
  return {"image": np.clip(image, 0.0, 1.0).reshape(shape + (3,)),
          "label": cls.astype(np.int32).reshape(shape),
          "depth": t.reshape(shape + (1,)),
          "normal": (n_cv * np.array([1.0, -1.0, -1.0])).reshape(shape + (3,)),
          "surface": surface.reshape(shape)}


# ----------------------------------------------------------------------------
# Data set.
# ----------------------------------------------------------------------------


def hole_mask(rng: np.random.Generator, n: int, height: int, width: int,
              fraction: float) -> np.ndarray:
  """[n, H, W] bool, True where missing: cells of HOLE_CELL x HOLE_CELL pixels,
  each missing with probability ``fraction``."""
  if not 0.0 <= fraction < 1.0:
    raise ValueError(f"scenes: a missing fraction must be in [0, 1), got {fraction}.")
  gh, gw = -(-height // HOLE_CELL), -(-width // HOLE_CELL)
  cells = rng.random((n, gh, gw)) < fraction
  return np.repeat(np.repeat(cells, HOLE_CELL, 1), HOLE_CELL, 2)[:, :height, :width]


def iter_split(seed: int, stream: int, n: int, height: int, width: int, *,
               depth_missing: float = 0.0, normal_missing: float = 0.0,
               label_missing: float = 0.0, start: int = 0, stop: int | None = None):
  """The ``n`` scenes of one split, :data:`CHUNK` at a time (so that a large
  split is never held in memory whole): yields dicts of record arrays
  (``image``, ``label``, ``depth``, ``normal``; leading axis <= CHUNK) cast to
  the record dtypes. The scenes come from RNG stream ``[seed, stream, 0]``;
  chunk ``i``'s pixel noise from ``[seed, stream, 1, i]`` and its missing
  cells from ``[seed, stream, 2, j, i]`` (``j``: depth 0, normal 1, label 2).

  ``start``, ``stop``: only scenes ``start..stop-1`` of the split (the
  chunks that hold them, rendered whole and cut), bitwise the same as in the
  whole split: a part of a large split (:mod:`mtljax.data.split_parts`)."""
  for fraction in (depth_missing, normal_missing, label_missing):
    if not 0.0 <= fraction < 1.0:
      raise ValueError(f"scenes: a missing fraction must be in [0, 1), got {fraction}.")
  stop = n if stop is None else stop
  if not 0 <= start <= stop <= n:
    raise ValueError(f"scenes: start={start}, stop={stop} is not a range of 0..{n}.")
  scenes = sample_scenes(np.random.default_rng([seed, stream, 0]), n)
  for i in range(start // CHUNK, -(-stop // CHUNK)):
    lo = i * CHUNK
    cut = slice(max(start - lo, 0), min(stop - lo, CHUNK))
    part = render(scenes.take(slice(lo, lo + CHUNK)), height, width,
                  noise_rng=np.random.default_rng([seed, stream, 1, i]))
    out = {"image": part["image"].astype(np.float32), "label": part["label"],
           "depth": part["depth"].astype(np.float32),
           "normal": part["normal"].astype(np.float32)}
    # (unit in float64; renormalised after the cast so that |n| = 1 to float32)
    out["normal"] /= np.linalg.norm(out["normal"], axis=-1, keepdims=True)
    m = len(out["label"])
    for j, (fraction, key, fill) in enumerate(((depth_missing, "depth", 0.0),
                                              (normal_missing, "normal", 0.0),
                                              (label_missing, "label", -1))):
      if fraction:
        holes = hole_mask(np.random.default_rng([seed, stream, 2, j, i]), m, height, width,
                          fraction)
        out[key][holes] = fill
    if cut != slice(0, m):
      out = {k: v[cut] for k, v in out.items()}
    yield out


def render_split(seed: int, stream: int, n: int, height: int, width: int,
                 **missing) -> dict[str, np.ndarray]:
  """:func:`iter_split`'s chunks of one split, concatenated."""
  empty = {"image": np.zeros((0, height, width, 3), np.float32),
           "label": np.zeros((0, height, width), np.int32),
           "depth": np.zeros((0, height, width, 1), np.float32),
           "normal": np.zeros((0, height, width, 3), np.float32)}
  parts = [empty] + list(iter_split(seed, stream, n, height, width, **missing))
  return {k: np.concatenate([p[k] for p in parts]) for k in empty}


def make_scenes(seed: int, num_train: int, num_test: int, height: int, width: int, *,
                depth_missing: float = 0.0, normal_missing: float = 0.0,
                label_missing: float = 0.0) -> dict[str, dict[str, np.ndarray]]:
  """Both splits of the ``scenes`` data set (train: RNG stream 1, test: 2; the
  scenes of one split do not depend on the other split's size)."""
  if height < 4 or width < 4:
    raise ValueError(f"scenes: images must be at least 4x4 pixels, got {height}x{width}.")
  kw = dict(depth_missing=depth_missing, normal_missing=normal_missing,
            label_missing=label_missing)
  return {split: render_split(seed, stream, n, height, width, **kw)
          for split, stream, n in split_streams(num_train, num_test)}


def split_streams(num_train: int, num_test: int):
  """``(split, RNG stream, size)`` of the two splits."""
  return (("train", 1, num_train), ("test", 2, num_test))
