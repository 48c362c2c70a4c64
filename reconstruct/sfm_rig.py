"""Rig-mode additions to structure from motion (``reconstruct.sfm``): a stills take with a rig file.

Kept apart from ``sfm.py`` so that the photo-folder path there can change
independently; ``run_sfm`` calls these only for a capture take.

* ``RIG_PEAK_THRESHOLD``: the SIFT peak threshold used on a capture take
  (lower than the photo default: the studio's subject and shadows are faint
  texture; measured on ``virtual-ring-24``, it is the single change that
  helped most).
* ``adjust_with_rig_priors``: a last bundle adjustment in which every camera's
  position is also pulled towards the rig file's nominal position, with a
  standard deviation of what a rig file's positions are good to
  (``SfmOptions.rig_prior_m``, 3 cm by default: bodies get nudged). The
  model is first moved into the rig frame by the same robust similarity fit
  as ``run_sfm``'s; a camera that lands farther than the rig tolerance from
  its nominal position (a false registration) gets no prior, so the check
  after it still finds and leaves it out. The prior's loss is robust
  (Cauchy at about 3 sigma), so one badly placed body does not bend the rest.
"""

from __future__ import annotations

import numpy as np

#: SIFT peak threshold on a capture take (SfmOptions.peak_threshold stays the photo-folder default)
RIG_PEAK_THRESHOLD = 0.002


def robust_rig_fit(src: np.ndarray, dst: np.ndarray, tolerance_m: float):
    """Similarity ``dst ~ s R src + t`` fitted without the points it leaves farther than
    ``max(tolerance_m, 4 x median residual)``; returns (s, R, t, residuals [N], inliers [N] bool)."""
    from reconstruct.sfm import umeyama

    inl = np.ones(len(src), dtype=bool)
    for _ in range(10):
        s, R, t = umeyama(src[inl], dst[inl])
        res = np.linalg.norm((s * (R @ src.T)).T + t - dst, axis=1)
        new = res <= max(tolerance_m, 4 * float(np.median(res[inl])))
        if new.sum() < 3 or np.array_equal(new, inl):
            break
        inl = new
    return s, R, t, res, inl


def adjust_with_rig_priors(rec, camera_of: dict[int, str], nominal: dict[str, np.ndarray], sigma_m: float,
                           tolerance_m: float, threads: int) -> dict | None:
    """Bundle adjustment of a (collapsed) model with position priors from the rig file's nominal camera
    centres (metres, standard deviation ``sigma_m``); moves the model into the rig frame. Returns what was
    done (cameras with a prior, those without) or None when fewer than 3 cameras have a nominal position."""
    import pycolmap

    iids = [i for i in sorted(rec.images) if rec.images[i].has_pose and camera_of[i] in nominal]
    if len(iids) < 3:
        return None
    src = np.array([rec.images[i].projection_center() for i in iids])
    dst = np.array([nominal[camera_of[i]] for i in iids])
    s, R, t, _res, inl = robust_rig_fit(src, dst, tolerance_m)
    rec.transform(pycolmap.Sim3d(s, pycolmap.Rotation3d(R), t))
    priors = []
    for i, ok in zip(iids, inl):
        if not ok:
            continue
        p = pycolmap.PosePrior()
        p.corr_data_id = rec.images[i].data_id
        p.position = np.asarray(nominal[camera_of[i]], dtype=np.float64)
        p.position_covariance = np.eye(3) * sigma_m ** 2
        p.coordinate_system = pycolmap.PosePriorCoordinateSystem.CARTESIAN
        priors.append(p)
    from reconstruct.sfm import ba_config, ba_options

    bo = ba_options(threads)  # poses and points, Cauchy at 0.5 px
    config = ba_config(rec)
    po = pycolmap.PosePriorBundleAdjustmentOptions()
    po.ceres.prior_position_loss_function_type = pycolmap.LossFunctionType.CAUCHY
    pycolmap.create_pose_prior_bundle_adjuster(bo, po, config, priors, rec).solve()
    return {"sigma_m": sigma_m, "cameras": len(priors),
            "without_prior": [camera_of[i] for i, ok in zip(iids, inl) if not ok]}


def complete_tracks(rec, db_path, threads: int, rounds: int = 3, max_error_px: float = 4.0) -> int:
    """Triangulate what the incremental mapper left out, then adjust and filter, on the mapper's model.

    COLMAP's mapper does not triangulate two-view tracks (a feature matched in
    exactly one other image); in the studio that is most backdrop and floor
    features (a shadow seen by two cameras in one lighting step), the points
    that spread over the image. Here every registered image is triangulated
    again with them, tracks are completed and merged, and ``rounds`` global
    adjustments (poses and points, intrinsics fixed) each followed by
    completing tracks and filtering points over ``max_error_px``. Returns the
    number of points added.
    """
    import pycolmap

    if rec is None or rec.num_reg_frames() == 0:
        return 0
    n0 = rec.num_points3D()
    with pycolmap.Database.open(str(db_path)) as db:
        cache = pycolmap.DatabaseCache.create(db, pycolmap.DatabaseCacheOptions())
    mapper = pycolmap.IncrementalMapper(cache)
    mapper.begin_reconstruction(rec)
    to = pycolmap.IncrementalTriangulatorOptions()
    to.ignore_two_view_tracks = False
    mo = pycolmap.IncrementalMapperOptions()
    mo.filter_max_reproj_error = max_error_px
    mo.num_threads = threads
    for iid in sorted(rec.images):
        if rec.images[iid].has_pose:
            mapper.triangulate_image(to, iid)
    mapper.complete_and_merge_tracks(to)
    mapper.retriangulate(to)
    bo = pycolmap.BundleAdjustmentOptions(refine_focal_length=False, refine_extra_params=False,
                                          refine_principal_point=False, refine_sensor_from_rig=False,
                                          print_summary=False)
    bo.ceres.solver_options.num_threads = threads
    for _ in range(rounds):
        mapper.adjust_global_bundle(mo, bo)
        mapper.complete_and_merge_tracks(to)
        mapper.filter_points(mo)
    mapper.end_reconstruction(False)
    return rec.num_points3D() - n0
