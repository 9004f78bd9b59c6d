"""The bundled rendered scenes (mtljax.data.scenes, the ``scenes`` builder).

Every geometric check is made against a computation of its own, in float64,
from the scene's parameters: the camera's projection matrix ``K [R^T | -R^T c]``
(Hartley and Zisserman's notation), back-projection of the depth map, the
outline conic of a sphere (``C* = P Q* P^T``, H&Z result 8.9), the convex
hull of a box's projected corners (scipy), and finite differences. No jax:
nothing here compiles.
"""

import glob
import os

import numpy as np
import pytest
import tensorflow_datasets as tfds
from scipy import spatial

from mtljax.data import builders
from mtljax.data import scenes
from mtljax.data import split_parts
from mtljax.data import tfds_access

H, W = 48, 60


@pytest.fixture(scope="module")
def random_scenes():
  sc = scenes.sample_scenes(np.random.default_rng(7), 8)
  return sc, scenes.render(sc, H, W)


def _camera_points_to_world(sc, pts):
  """Camera-frame (OpenCV) points [B, H, W, 3] to world: ``c + R x``."""
  return sc.cam_pos[:, None, None, :] + np.einsum("bij,bhwj->bhwi", sc.cam_rot, pts)


def _world_normals_to_output(sc, n):
  """World normals [B, H, W, 3] to the data set's camera convention (x right,
  y up, z towards the camera), written out: R^T n, then (x, -y, -z)."""
  cv = np.einsum("bji,bhwj->bhwi", sc.cam_rot, n)
  return np.stack([cv[..., 0], -cv[..., 1], -cv[..., 2]], -1)


def _fd_normals(depth):
  """Normals of the back-projected depth by central differences, oriented
  towards the camera, in the output convention: [B, H-2, W-2, 3]."""
  p = scenes.backproject(depth)
  du = p[:, 1:-1, 2:] - p[:, 1:-1, :-2]
  dv = p[:, 2:, 1:-1] - p[:, :-2, 1:-1]
  n = np.cross(dv, du)  # (u right, v down: dv x du points at the camera)
  n /= np.linalg.norm(n, axis=-1, keepdims=True)
  return n * np.array([1.0, -1.0, -1.0])


def _interior(surface):
  """[B, H-2, W-2]: the pixel and its 8 neighbours see the same surface."""
  c = surface[:, 1:-1, 1:-1]
  h, w = surface.shape[1:]
  same = np.ones(c.shape, bool)
  for dy in (-1, 0, 1):
    for dx in (-1, 0, 1):
      same &= surface[:, 1 + dy:h - 1 + dy, 1 + dx:w - 1 + dx] == c
  return same


def _curved(surface):
  side = (surface >= scenes.CYLINDER_BASE) & ((surface - scenes.CYLINDER_BASE) % 2 == 0)
  return ((surface >= scenes.SPHERE_BASE) & (surface < scenes.CYLINDER_BASE)) | side


def _angle_deg(a, b):
  return np.degrees(np.arccos(np.clip(np.sum(a * b, -1), -1.0, 1.0)))


# ---------------------------------------------------------------------------
# Normals
# ---------------------------------------------------------------------------


def test_normals_are_unit_and_match_finite_differences_on_planar_faces(random_scenes):
  """Away from edges (the pixel's 3x3 neighbourhood sees one surface) the
  finite-difference normal of the back-projected depth on a plane (room,
  box faces, cylinder tops) is exact up to rounding: within 1e-5 degrees."""
  _, r = random_scenes
  np.testing.assert_allclose(np.linalg.norm(r["normal"], axis=-1), 1.0, atol=1e-12)
  fd = _fd_normals(r["depth"])
  inner = _interior(r["surface"])
  planar = inner & ~_curved(r["surface"][:, 1:-1, 1:-1])
  assert planar.sum() > 0.5 * planar.size
  err = _angle_deg(fd, r["normal"][:, 1:-1, 1:-1])[planar]
  assert err.max() < 1e-5


def test_normals_on_curved_faces_are_the_limit_of_finite_differences(random_scenes):
  """On spheres and cylinder sides central differences are second-order
  accurate: at the same points (the centres of the pixels interior at 48x60
  are pixel centres at 144x180, 3x finer), the median angle between the
  finite-difference normal and the renderer's falls at least 6x (9x for a
  second-order error, 3x for a first-order one; measured 9.4x) and the finer
  one is small (measured 0.056 degrees)."""
  sc, coarse = random_scenes
  sc, coarse = sc.take(slice(0, 4)), {k: v[:4] for k, v in coarse.items()}  # (time)
  fine = scenes.render(sc, 3 * H, 3 * W)
  err = []
  for r, step in ((coarse, 1), (fine, 3)):
    e = _angle_deg(_fd_normals(r["depth"]), r["normal"][:, 1:-1, 1:-1])  # pixel (v+1, u+1)
    # coarse pixel (v, u) is fine pixel (3v + 1, 3u + 1): fd index 3v, 3u
    err.append(e[:, 0::3, 0::3] if step == 3 else e)
  err[1] = err[1][:, 1:H - 1, 1:W - 1]  # coarse pixels 1..H-2 (those with an fd value)
  s = coarse["surface"]
  mask = _interior(s) & _curved(s[:, 1:-1, 1:-1])
  assert mask.sum() > 300
  np.testing.assert_array_equal(fine["surface"][:, 4:-4:3, 4:-4:3][mask], s[:, 1:-1, 1:-1][mask])
  med = [np.median(e[mask]) for e in err]
  assert med[0] / med[1] > 6.0 and med[1] < 0.1, med


def test_normal_convention_x_right_y_up_z_towards_the_camera():
  """A level camera looking along +z: the far wall faces the camera (0, 0, 1),
  the floor is (0, 1, 0), the wall on the image's right faces left (-1, 0, 0)."""
  sc = scenes.sample_scenes(np.random.default_rng(0), 1)
  off = np.zeros_like(sc.box_on)
  sc = sc.replace(room=np.array([[2.0, 3.0, 4.0]]), cam_pos=np.array([[0.0, 1.5, 0.0]]),
                  cam_rot=scenes.camera_rotation(np.zeros(1), np.zeros(1), np.zeros(1)),
                  box_on=off, sphere_on=np.zeros_like(sc.sphere_on),
                  cyl_on=np.zeros_like(sc.cyl_on))
  r = scenes.render(sc, 16, 20)
  lab, n, d = r["label"][0], r["normal"][0], r["depth"][0, ..., 0]
  np.testing.assert_allclose(n[8, 10], [0, 0, 1], atol=1e-12)  # the centre: far wall
  np.testing.assert_allclose(d[8, 10], 4.0, rtol=1e-12)  # its depth: the wall's z
  assert lab[8, 10] == scenes.WALL and lab[15, 10] == scenes.FLOOR
  np.testing.assert_allclose(n[15, 10], [0, 1, 0], atol=1e-12)
  assert lab[0, 10] == scenes.CEILING
  np.testing.assert_allclose(n[0, 10], [0, -1, 0], atol=1e-12)
  np.testing.assert_allclose(n[8, 19], [-1, 0, 0], atol=1e-12)
  np.testing.assert_allclose(n[8, 0], [1, 0, 0], atol=1e-12)
  np.testing.assert_allclose(scenes.convert_normals(n[15, 10], "opencv"), [0, -1, 0])
  np.testing.assert_allclose(scenes.convert_normals(n[8, 10], "opencv"), [0, 0, -1])
  np.testing.assert_allclose(scenes.convert_normals(n[15, 10], "2d3ds"), [0, -1, 0])
  np.testing.assert_allclose(scenes.convert_normals(n[8, 10], "2d3ds"), [0, 0, 1])
  with pytest.raises(ValueError, match="^convert_normals: to must be one of"):
    scenes.convert_normals(n, "nyu")


# ---------------------------------------------------------------------------
# Segmentation: the projection of the primitives
# ---------------------------------------------------------------------------


def _projection(sc, h, w):
  """[B, 3, 4] ``K [R^T | -R^T c]`` with pixel (v, u)'s centre at (u + 0.5, v + 0.5)."""
  fx, fy, cx, cy = scenes.intrinsics(h, w)
  k = np.array([[fx, 0, cx], [0, fy, cy], [0, 0, 1.0]])
  rt = np.swapaxes(sc.cam_rot, 1, 2)
  return k @ np.concatenate([rt, -rt @ sc.cam_pos[:, :, None]], -1)


def _pixels(h, w):
  v, u = np.mgrid[0:h, 0:w] + 0.5
  return np.stack([u, v, np.ones_like(u)], -1)  # [H, W, 3]


def _alone(sc, kind):
  """Scenes with only slot 0 of ``kind`` present, 2.5 m in front of the camera
  on the floor, in a room too large for the walls to touch it."""
  n = len(sc)
  fwd = sc.cam_rot[:, :, 2].copy()
  fwd[:, 1] = 0.0
  fwd /= np.linalg.norm(fwd, axis=-1, keepdims=True)
  xz = (sc.cam_pos + 2.5 * fwd)[:, [0, 2]]
  kw = dict(room=np.tile([[8.0, 4.0, 8.0]], (n, 1)),
            box_on=np.zeros_like(sc.box_on), sphere_on=np.zeros_like(sc.sphere_on),
            cyl_on=np.zeros_like(sc.cyl_on))
  if kind == "sphere":
    kw["sphere_on"] = kw["sphere_on"].copy()
    kw["sphere_on"][:, 0] = True
    c = sc.sphere_center.copy()
    c[:, 0] = np.stack([xz[:, 0], sc.sphere_radius[:, 0] + 0.05, xz[:, 1]], -1)  # floating
    kw["sphere_center"] = c
  else:
    kw["box_on"] = kw["box_on"].copy()
    kw["box_on"][:, 0] = True
    c = sc.box_center.copy()
    c[:, 0, 0], c[:, 0, 2] = xz[:, 0], xz[:, 1]
    kw["box_center"] = c
  return sc.replace(**kw)


def test_sphere_silhouette_is_the_outline_conic_of_its_projection():
  """Pixels labelled ``sphere`` are exactly those whose centre is inside the
  image conic ``C = (P Q* P^T)^-1`` of the sphere's quadric ``Q``, but for
  pixel centres on the conic itself (to rounding)."""
  sc = _alone(scenes.sample_scenes(np.random.default_rng(11), 6), "sphere")
  r = scenes.render(sc, H, W)
  proj, x = _projection(sc, H, W), _pixels(H, W)
  for b in range(len(sc)):
    s, rad = sc.sphere_center[b, 0], sc.sphere_radius[b, 0]
    q = np.block([[np.eye(3), -s[:, None]], [-s[None, :], np.array([[s @ s - rad**2]])]])
    conic = np.linalg.inv(proj[b] @ np.linalg.inv(q) @ proj[b].T)
    f = np.einsum("hwi,ij,hwj->hw", x, conic, x)
    centre = proj[b] @ np.append(s, 1.0)
    centre /= centre[2]
    inside = np.sign(f) == np.sign(centre @ conic @ centre)
    mask = r["label"][b] == scenes.SPHERE
    assert 10 < mask.sum() < mask.size  # on screen, not filling it
    sure = np.abs(f) > 1e-9 * np.abs(f).max()
    np.testing.assert_array_equal(mask[sure], inside[sure])


def test_box_silhouette_is_the_convex_hull_of_its_projected_corners():
  sc = _alone(scenes.sample_scenes(np.random.default_rng(12), 6), "box")
  r = scenes.render(sc, H, W)
  proj, x = _projection(sc, H, W), _pixels(H, W)[..., :2]
  signs = np.array(np.meshgrid([-1, 1], [-1, 1], [-1, 1])).reshape(3, 8).T
  for b in range(len(sc)):
    c, s = np.cos(sc.box_yaw[b, 0]), np.sin(sc.box_yaw[b, 0])
    rot = np.array([[c, 0, s], [0, 1, 0], [-s, 0, c]])
    corners = sc.box_center[b, 0] + (signs * sc.box_half[b, 0]) @ rot.T
    img = np.c_[corners, np.ones(8)] @ proj[b].T
    assert np.all(img[:, 2] > 0)  # every corner in front of the camera
    hull = spatial.ConvexHull(img[:, :2] / img[:, 2:])
    dist = x @ hull.equations[:, :2].T + hull.equations[:, 2]  # [H, W, faces]
    inside = np.all(dist <= 0, -1)
    mask = np.isin(r["label"][b], (scenes.CUBE, scenes.SLAB))
    assert 10 < mask.sum() < mask.size
    sure = np.min(np.abs(dist), -1) > 1e-6
    np.testing.assert_array_equal(mask[sure], inside[sure])


def test_every_pixel_back_projects_onto_a_primitive_of_its_class_with_its_normal(
    random_scenes):
  """Each pixel's depth, back-projected with the camera, lands (to 1e-9 m) on
  a surface of a primitive present in the scene whose class is the pixel's
  label, and the normal there (from the primitive's equation, turned into the
  camera frame) is the pixel's normal."""
  sc, r = random_scenes
  p = _camera_points_to_world(sc, scenes.backproject(r["depth"]))  # [B, H, W, 3]
  lab = r["label"]
  best = np.full(lab.shape, np.inf)  # distance to the nearest surface of the class
  normal = np.zeros(p.shape)
  def offer(dist, n, cls):
    nonlocal best, normal
    take = (lab == cls) & (dist < best)
    best = np.where(take, dist, best)
    normal = np.where(take[..., None], n, normal)
  a, c, bdepth = (sc.room[:, i][:, None, None] for i in range(3))
  y = p[..., 1]
  e = np.eye(3)
  offer(np.abs(y), np.broadcast_to(e[1], p.shape), scenes.FLOOR)
  offer(np.abs(y - c), np.broadcast_to(-e[1], p.shape), scenes.CEILING)
  for axis, half in ((0, a), (2, bdepth)):
    for sgn in (-1, 1):
      offer(np.abs(p[..., axis] - sgn * half), np.broadcast_to(-sgn * e[axis], p.shape),
            scenes.WALL)
  for k in range(scenes.SPHERE_SLOTS):
    rel = p - sc.sphere_center[:, None, None, k]
    rad = sc.sphere_radius[:, None, None, k]
    dist = np.abs(np.linalg.norm(rel, axis=-1) - rad)
    offer(np.where(sc.sphere_on[:, None, None, k], dist, np.inf), rel / rad[..., None],
          scenes.SPHERE)
  for k in range(scenes.CYLINDER_SLOTS):
    on = sc.cyl_on[:, None, None, k]
    rx = p[..., 0] - sc.cyl_xz[:, None, None, k, 0]
    rz = p[..., 2] - sc.cyl_xz[:, None, None, k, 1]
    rad, h = sc.cyl_radius[:, None, None, k], sc.cyl_height[:, None, None, k]
    rho = np.hypot(rx, rz)
    side = np.where((y >= -1e-9) & (y <= h + 1e-9), np.abs(rho - rad), np.inf)
    top = np.where(rho <= rad + 1e-9, np.abs(y - h), np.inf)
    side_n = np.stack([rx / rad, np.zeros_like(rx), rz / rad], -1)
    offer(np.where(on, side, np.inf), side_n, scenes.CYLINDER)
    offer(np.where(on, top, np.inf), np.broadcast_to(e[1], p.shape), scenes.CYLINDER)
  for k in range(scenes.BOX_SLOTS):
    cy, sy = np.cos(sc.box_yaw[:, k]), np.sin(sc.box_yaw[:, k])
    rot = np.zeros((len(sc), 3, 3))
    rot[:, 0, 0], rot[:, 0, 2], rot[:, 1, 1], rot[:, 2, 0], rot[:, 2, 2] = cy, sy, 1, -sy, cy
    q = np.einsum("bji,bhwj->bhwi", rot, p - sc.box_center[:, None, None, k])  # R^T (p - c)
    half = np.broadcast_to(sc.box_half[:, None, None, k], q.shape)
    face = np.argmax(np.abs(q) / half, -1)[..., None]  # the face plane nearest p
    dist = np.abs(np.take_along_axis(np.abs(q) - half, face, -1)[..., 0])
    face = face[..., 0]
    nl = np.eye(3)[face] * np.sign(np.take_along_axis(q, face[..., None], -1))
    n = np.einsum("bij,bhwj->bhwi", rot, nl)
    cls = sc.box_class[:, None, None, k]
    for want in (scenes.CUBE, scenes.SLAB):
      offer(np.where(sc.box_on[:, None, None, k] & (cls == want), dist, np.inf), n, want)
  assert set(np.unique(lab)) >= {scenes.FLOOR, scenes.WALL, scenes.CUBE, scenes.SLAB,
                                 scenes.SPHERE, scenes.CYLINDER}
  assert best.max() < 1e-9, np.unravel_index(best.argmax(), best.shape)
  np.testing.assert_allclose(_world_normals_to_output(sc, normal), r["normal"], atol=1e-9)


def test_a_pixels_colour_says_little_about_its_class():
  """Albedos are drawn alike for every class: a classifier that reads one
  pixel's colour (the majority class of its 8x8x8 RGB bin, fitted on 24
  images) is at most 10 points better than the majority class on 24 others."""
  a = scenes.render_split(1, 1, 48, 32, 40)
  q = np.minimum((a["image"] * 8).astype(np.int64), 7)
  code = ((q[..., 0] * 8 + q[..., 1]) * 8 + q[..., 2]).reshape(2, -1)
  lab = a["label"].reshape(2, -1)
  table = np.zeros((512, scenes.NUM_CLASSES))
  np.add.at(table, (code[0], lab[0]), 1)
  colour_acc = np.mean(table.argmax(1)[code[1]] == lab[1])
  majority_acc = np.mean(lab[1] == np.bincount(lab[0]).argmax())
  assert colour_acc < majority_acc + 0.1, (colour_acc, majority_acc)


def _inside_each_object(sc, x):
  """[slots, B, N] bool: world points ``x`` [B, N, 3] strictly inside each
  object slot's primitive (False where the slot is empty), from each
  primitive's inequality written out."""
  out = []
  for k in range(scenes.SPHERE_SLOTS):
    r2 = np.sum((x - sc.sphere_center[:, None, k]) ** 2, -1)
    out.append(sc.sphere_on[:, None, k] & (r2 < sc.sphere_radius[:, None, k] ** 2))
  for k in range(scenes.CYLINDER_SLOTS):
    r2 = (x[..., 0] - sc.cyl_xz[:, None, k, 0]) ** 2 + (x[..., 2] - sc.cyl_xz[:, None, k, 1]) ** 2
    out.append(sc.cyl_on[:, None, k] & (r2 < sc.cyl_radius[:, None, k] ** 2)
               & (x[..., 1] > 0) & (x[..., 1] < sc.cyl_height[:, None, k]))
  for k in range(scenes.BOX_SLOTS):
    rel = x - sc.box_center[:, None, k]
    c, s = np.cos(sc.box_yaw[:, None, k]), np.sin(sc.box_yaw[:, None, k])
    q = np.stack([c * rel[..., 0] - s * rel[..., 2], rel[..., 1],
                  s * rel[..., 0] + c * rel[..., 2]], -1)  # R_y(yaw)^T rel
    out.append(sc.box_on[:, None, k] & np.all(np.abs(q) < sc.box_half[:, None, k], -1))
  return np.stack(out)


def test_nothing_lies_between_the_camera_and_the_surface_a_pixel_sees(random_scenes):
  """Occlusion: 60 points evenly spaced on the segment from the camera to
  each pixel's back-projected point (up to 1 % short of it; every other row
  and column) are inside no object. The check has teeth: the same rays,
  followed 4x as far (past the room, outside which there are no objects),
  pass through two objects or more for over 1 % of the pixels, so the nearer
  one has to hide the other."""
  sc, r = random_scenes
  n = len(sc)
  p = _camera_points_to_world(sc, scenes.backproject(r["depth"]))[:, ::2, ::2]  # (time)
  p = p.reshape(n, -1, 1, 3)
  o = sc.cam_pos[:, None, None, :]
  for frac, check in ((np.linspace(0.0, 0.99, 60), "before"),
                      (np.linspace(0.0, 4.0, 120), "through")):
    pts = o + frac[:, None] * (p - o)  # [B, P, S, 3]
    inside = _inside_each_object(sc, pts.reshape(n, -1, 3)).reshape(
        (-1,) + pts.shape[:-1])  # [slots, B, P, S]
    if check == "before":
      assert not inside.any(), np.argwhere(inside)[:5]
    else:
      crossed = inside.any(-1).sum(0)  # objects each pixel's ray passes through
      assert np.mean(crossed >= 2) > 0.01, np.mean(crossed >= 2)


# ---------------------------------------------------------------------------
# Determinism, missing pixels, the builder
# ---------------------------------------------------------------------------


def test_same_config_gives_the_same_bytes_and_another_seed_other_scenes():
  a = scenes.make_scenes(3, 20, 4, 12, 16)  # 20 > CHUNK: two noise streams
  b = scenes.make_scenes(3, 20, 4, 12, 16)
  c = scenes.make_scenes(4, 20, 4, 12, 16)
  for split in ("train", "test"):
    for key in ("image", "label", "depth", "normal"):
      assert a[split][key].tobytes() == b[split][key].tobytes()
      assert a[split][key].dtype == {"label": np.int32}.get(key, np.float32)
    assert not np.array_equal(a[split]["depth"], c[split]["depth"])
  assert not np.array_equal(a["train"]["depth"][:4], a["test"]["depth"])
  assert a["train"]["image"].min() >= 0.0 and a["train"]["image"].max() <= 1.0


def test_missing_pixels_are_seeded_blobs_of_the_asked_fraction():
  """Each target loses its own cells; the fraction of missing 4x4 cells is
  binomial(cells, f): within 4 standard deviations."""
  f = 0.2
  clean = scenes.render_split(5, 1, 40, 24, 32)
  holed = scenes.render_split(5, 1, 40, 24, 32, depth_missing=f, normal_missing=f,
                              label_missing=f)
  np.testing.assert_array_equal(clean["image"], holed["image"])
  masks = {"depth": holed["depth"][..., 0] == 0.0,
           "normal": np.all(holed["normal"] == 0.0, -1),
           "label": holed["label"] == -1}
  cells = 40 * (24 // 4) * (32 // 4)
  for key, m in masks.items():
    cell = m[:, ::4, ::4]
    assert np.array_equal(np.repeat(np.repeat(cell, 4, 1), 4, 2), m)  # whole 4x4 blobs
    assert abs(cell.sum() - f * cells) < 4 * np.sqrt(cells * f * (1 - f)), key
    np.testing.assert_array_equal(holed[key][~m], clean[key][~m])
  assert not np.array_equal(masks["depth"], masks["label"])
  assert not np.array_equal(masks["depth"], masks["normal"])


def test_builder_writes_array_record_files_read_back_by_the_data_source(tmp_path):
  config = "h8_w12_n5_m3_s2_dmiss0.3"
  features, sources = tfds_access.open_sources("scenes", data_dir=str(tmp_path),
                                               builder_config=config)
  assert glob.glob(os.path.join(str(tmp_path), "scenes", config, "*", "*.array_record*"))
  want = scenes.make_scenes(2, 5, 3, 8, 12, depth_missing=0.3)
  shapes = {"image": ((8, 12, 3), np.float32), "label": ((8, 12), np.int32),
            "depth": ((8, 12, 1), np.float32), "normal": ((8, 12, 3), np.float32)}
  assert {k: (tuple(features[k].shape), np.dtype(features[k].np_dtype))
          for k in shapes} == shapes
  for split, n in (("train", 5), ("test", 3)):
    records = [sources[split][i] for i in range(len(sources[split]))]
    assert len(records) == n
    # TFDS stores records in its own order: match them by image.
    order = [int(np.flatnonzero([np.array_equal(rec["image"], im)
                                 for im in want[split]["image"]])[0]) for rec in records]
    assert sorted(order) == list(range(n))
    for rec, i in zip(records, order):
      for key, (shape, dtype) in shapes.items():
        assert rec[key].shape == shape and rec[key].dtype == dtype
        assert rec[key].tobytes() == want[split][key][i].tobytes()


@pytest.mark.parametrize("name, match", [
    ("h64_w80", r"unknown builder config 'h64_w80'; use 'quick' .*'full' .*"
                r"'h\{H\}_w\{W\}_n\{TRAIN\}_m\{TEST\}_s\{SEED\}\[_dmiss\{F\}\]"),
    ("h64_w80_n10_m5_s0_dmiss1.5", r"the missing fraction dmiss must be in \[0, 1\), got 1.5"),
    ("h2_w80_n10_m5_s0", "images must be at least 4x4 pixels, got 2x80"),
    ("h8_w8_n10_m5_s0_lmiss0.1_dmiss0.1", "unknown builder config"),  # order is fixed
])
def test_bad_builder_config_is_one_line_naming_the_allowed_forms(name, match):
  with pytest.raises(ValueError, match=f"^scenes: {match}") as e:
    tfds_access.check_name("scenes", name)
  assert "\n" not in str(e.value)


def test_the_size_bound_covers_a_serialised_record():
  """The bound the parts of a large split are sized by (32 bytes per pixel
  plus 256) is at least the size of a record as TFDS serialises it, and at
  most 256 bytes more."""
  from tensorflow_datasets.core import example_serializer
  builder = builders.Scenes(config=builders.Scenes.config_from_name("h12_w16_n1_m1_s0"),
                            data_dir="/nonexistent")
  features = builder.info.features
  ex = {k: v[0] for k, v in scenes.render_split(0, 1, 1, 12, 16, label_missing=0.5).items()}
  size = len(example_serializer.ExampleSerializer(features.get_serialized_info())
             .serialize_example(features.encode_example(ex)))
  bound = split_parts.raw_record_bytes(features)
  assert bound == 32 * 12 * 16 + 256
  assert size <= bound < size + 256, (size, bound)


def test_iter_split_ranges_are_cuts_of_the_whole_split():
  """Scenes start..stop-1 (across chunk boundaries: CHUNK = 16) are bitwise
  the whole split's, so a split written in parts holds the same scenes."""
  whole = scenes.render_split(3, 1, 37, 8, 12, depth_missing=0.3, label_missing=0.2)
  for start, stop in ((0, 10), (10, 20), (20, 37), (16, 32), (5, 6), (36, 37)):
    chunks = list(scenes.iter_split(3, 1, 37, 8, 12, depth_missing=0.3, label_missing=0.2,
                                    start=start, stop=stop))
    for key, x in whole.items():
      if key == "surface":
        continue
      assert np.concatenate([c[key] for c in chunks]).tobytes() == x[start:stop].tobytes()
  with pytest.raises(ValueError, match="start=5, stop=40 is not a range of 0..37"):
    next(scenes.iter_split(3, 1, 37, 8, 12, start=5, stop=40))


def test_a_split_over_the_part_size_is_written_in_parts_of_consecutive_scenes(
    tmp_path, monkeypatch):
  """With parts of 3 records, a 37-scene train split is written as 13 parts
  of scenes 0-2, 3-5, ..., 36 (each in TFDS's hashed order, as a split of one
  part is; 13 parts: part10 sorts before part2 as text) merged into one split
  of 13 shards; the 3-scene test split is one part. Every record is bitwise
  the scene rendered whole."""
  config = "h8_w12_n37_m3_s3_dmiss0.3_lmiss0.2"
  monkeypatch.setattr(split_parts, "PART_BYTES", 3 * (32 * 8 * 12 + 256))
  _, sources = tfds_access.open_sources("scenes", data_dir=str(tmp_path),
                                        builder_config=config)
  builder = builders.Scenes(config=builders.Scenes.config_from_name(config),
                            data_dir=str(tmp_path))
  assert {s: list(i.shard_lengths) for s, i in builder.info.splits.items()} == {
      "train": [3] * 12 + [1], "test": [3]}
  want = scenes.make_scenes(3, 37, 3, 8, 12, depth_missing=0.3, label_missing=0.2)
  _check_parts(sources["train"], want["train"], [(lo, min(lo + 3, 37)) for lo in range(0, 37, 3)])
  _check_parts(sources["test"], want["test"], ((0, 3),))


def _check_parts(src, want, ranges):
  """Records ``src`` are, range by range, a permutation of the scenes of each
  range, every record bitwise ``want``'s scene."""
  images = [im.tobytes() for im in want["image"]]
  order = [images.index(src[i]["image"].tobytes()) for i in range(len(src))]
  at = 0
  for lo, hi in ranges:
    assert sorted(order[at:at + hi - lo]) == list(range(lo, hi))
    at += hi - lo
  assert at == len(src) == len(images)
  for i, j in enumerate(order):
    for key in ("label", "depth", "normal"):
      assert src[i][key].tobytes() == want[key][j].tobytes()


def test_parts_that_tfds_writes_as_several_shards_are_merged_in_order(tmp_path, monkeypatch):
  """TFDS may write a part as several shards (by size; here asked for 2 per
  split): the merged split's shards are the parts' shards in order."""
  monkeypatch.setattr(split_parts, "PART_BYTES", 4 * (32 * 4 * 4 + 256))
  config = builders.Scenes.config_from_name("h4_w4_n10_m3_s0")
  make = lambda: builders.Scenes(config=config, data_dir=str(tmp_path),
                                 file_format="array_record")
  make().download_and_prepare(download_config=tfds.download.DownloadConfig(num_shards=2))
  builder = make()
  assert {s: list(i.shard_lengths) for s, i in builder.info.splits.items()} == {
      "train": [2, 2, 2, 2, 1, 1], "test": [2, 1]}
  want = scenes.make_scenes(0, 10, 3, 4, 4)
  _check_parts(builder.as_data_source("train"), want["train"], ((0, 4), (4, 8), (8, 10)))
  _check_parts(builder.as_data_source("test"), want["test"], ((0, 3),))


def test_named_configs_and_an_empty_split():
  quick = builders.Scenes.config_from_name("quick")
  assert builders.Scenes.config_from_name("") is quick
  assert (quick.height, quick.width, quick.num_train, quick.num_test) == (64, 80, 2000, 500)
  full = builders.Scenes.config_from_name("full")
  assert (full.height, full.width, full.num_train, full.num_test) == (128, 160, 3000, 1000)
  versions = {c: str(builders.Scenes(config=builders.Scenes.config_from_name(c),
                                    data_dir="/nonexistent").version)
              for c in ("quick", "full", "h8_w8_n1_m1_s0")}
  assert versions == {"quick": "1.0.0", "full": "1.1.0", "h8_w8_n1_m1_s0": "1.0.0"}
  big = builders.Scenes.config_from_name("h288_w384_n795_m654_s0")  # (over 1000 MiB: parts)
  assert (big.num_train, big.num_test) == (795, 654)
  for config in builders.Scenes.BUILDER_CONFIGS:  # (the names with values are checked)
    assert builders.Scenes.config_from_name(
        f"h{config.height}_w{config.width}_n{config.num_train}_m{config.num_test}_s0")
  c = builders.Scenes.config_from_name("h16_w24_n7_m3_s9_nmiss0.25_lmiss0.5")
  assert (c.height, c.width, c.num_train, c.num_test, c.seed) == (16, 24, 7, 3, 9)
  assert (c.depth_missing, c.normal_missing, c.label_missing) == (0.0, 0.25, 0.5)
  with pytest.raises(ValueError, match="split 'test' has no examples"):
    tfds_access.check_name("scenes", "h16_w24_n7_m0_s9")


@pytest.mark.slow
def test_quick_variant_statistics():
  """The quick variant: every class in both splits, objects in most images,
  depths of a room, image intensities spread over [0, 1]."""
  c = builders.Scenes.config_from_name("quick")
  data = scenes.make_scenes(c.seed, c.num_train, c.num_test, c.height, c.width)
  for a in data.values():
    lab = a["label"]
    frac = np.bincount(lab.ravel(), minlength=scenes.NUM_CLASSES) / lab.size
    shown = np.array([(lab == k).any((1, 2)).mean() for k in range(scenes.NUM_CLASSES)])
    assert frac[scenes.FLOOR] > 0.2 and frac[scenes.WALL] > 0.3
    assert np.all(frac[scenes.CUBE:] > 0.02), frac
    assert np.all(shown[scenes.CUBE:] > 0.5), shown
    assert shown[scenes.CEILING] > 0.05
    d = a["depth"]
    assert d.min() > 0.5 and d.max() < 8.0
    assert 0.3 < a["image"].mean() < 0.5 and a["image"].std() > 0.15
