"""The plan: every number derived from the configuration and the training data, computed once (after nnU-Net).

``plan.json`` is written by the ``plan`` rule beside the patch shards and is an input of extraction, training and
prediction: they take the window size, the downscale factor and the network's input size from it instead of
recomputing them from the configuration, so these decisions are made in one place (:func:`patch_geometry`).
It depends only on the ``patches`` settings and the *training* manifest, so a change to the test split or to
training settings never re-extracts patches.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, Mapping, Sequence

from mammoseg import __version__
from mammoseg.data.manifest import read_manifest
from mammoseg.errors import InputError
from mammoseg.io.atomic import write_json_atomic

__all__ = ["PatchGeometry", "patch_geometry", "Plan", "build_plan", "read_plan", "run_plan"]


@dataclass(frozen=True)
class PatchGeometry:
    """Window and network-input sizes (pixels).

    Attributes
    ----------
    window_px : side of a training patch / inference window in full-resolution pixels, ``2**n``
    downscale : integer block-mean factor between the window and the network input
    input_px : side of the network input, ``window_px // downscale``
    normalise : ``patches.normalise``, how a window becomes the network's input
        (:func:`mammoseg.patches.geometry.intensity_range_for`): ``"window"`` (the paper) or ``"image"``
    """

    window_px: int
    downscale: int
    input_px: int
    normalise: str


def patch_geometry(patches: Mapping[str, Any]) -> PatchGeometry:
    """What the network sees under the ``patches`` config section: the one place ``2**n // downscale`` is
    computed."""
    window = 2 ** int(patches["n"])
    downscale = int(patches["downscale"])
    if window % downscale:
        raise InputError(f"patches.downscale = {downscale} does not divide the window side 2**{patches['n']} = "
                         f"{window} px")
    return PatchGeometry(window_px=window, downscale=downscale, input_px=window // downscale,
                         normalise=str(patches["normalise"]))


@dataclass(frozen=True)
class Plan:
    """What extraction, training and prediction do with the data (sizes in pixels, counts of the training split).

    Attributes
    ----------
    patches_key : the stage key the plan belongs to (``results/patches/<key>/``)
    n : the window's exponent, ``window_px = 2**n``
    window_px, downscale, input_px, normalise : see :class:`PatchGeometry`
    n_shifted, max_shift, n_negative, n_normal, negative_min_mean, seed, n_shards : the ``patches`` settings
    train_images, train_normal_images, train_rois, train_patients : counts of the restructured training manifest
        (images include the normal ones)
    expected_patches : what extraction will make: ``rois × (1 + n_shifted) + lesion images × n_negative + normal
        images × n_normal`` (fewer if ROIs are skipped or too few lesion-free windows are found)
    smallest_train_image_px : (rows, cols), or None for an empty manifest
    window_fits_every_train_image : False when some ROIs will be skipped as ``patch_larger_than_image``
    mammoseg_version : the version that wrote the plan
    """

    patches_key: str
    n: int
    window_px: int
    downscale: int
    input_px: int
    normalise: str
    n_shifted: int
    max_shift: float
    n_negative: int
    n_normal: int
    negative_min_mean: float
    seed: int
    n_shards: int
    train_images: int
    train_normal_images: int
    train_rois: int
    train_patients: int
    expected_patches: int
    smallest_train_image_px: tuple[int, int] | None
    window_fits_every_train_image: bool
    mammoseg_version: str

    @property
    def geometry(self) -> PatchGeometry:
        return PatchGeometry(self.window_px, self.downscale, self.input_px, self.normalise)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    def write(self, path: str | Path) -> None:
        write_json_atomic(path, self.as_dict())


def build_plan(patches: Mapping[str, Any], patches_key: str, train_rows: Sequence[Mapping[str, str]]) -> Plan:
    """The plan of a ``patches`` config section for the rows of a restructured training manifest (one per ROI)."""
    geometry = patch_geometry(patches)
    images = {row["image_id"]: row for row in train_rows}
    lesions = [row for row in train_rows if row["roi_id"]]
    normal = len(images) - len({row["image_id"] for row in lesions})
    sizes = [(int(row["image_rows"]), int(row["image_cols"])) for row in images.values()]
    smallest = (min(r for r, _ in sizes), min(c for _, c in sizes)) if sizes else None
    return Plan(
        patches_key=patches_key, n=int(patches["n"]), **asdict(geometry), n_shifted=int(patches["n_shifted"]),
        max_shift=float(patches["max_shift"]), n_negative=int(patches["n_negative"]),
        n_normal=int(patches["n_normal"]), negative_min_mean=float(patches["negative_min_mean"]),
        seed=int(patches["seed"]), n_shards=int(patches["n_shards"]), train_images=len(images),
        train_normal_images=normal, train_rois=len(lesions),
        train_patients=len({row["patient_id"] for row in train_rows}),
        expected_patches=(len(lesions) * (1 + int(patches["n_shifted"])) + (len(images) - normal)
                          * int(patches["n_negative"]) + normal * int(patches["n_normal"])),
        smallest_train_image_px=smallest,
        window_fits_every_train_image=bool(smallest is None or geometry.window_px <= min(smallest)),
        mammoseg_version=__version__,
    )


def read_plan(path: str | Path) -> Plan:
    """Load ``plan.json``; a missing, unreadable or foreign file is an :class:`InputError` naming it."""
    path = Path(path)
    try:
        raw = json.loads(path.read_text())
        raw.setdefault("normalise", "window")  # a plan written before patches.normalise: the paper's min-max
        known = {f.name for f in fields(Plan)}
        missing = known - set(raw)
        if missing:
            raise ValueError(f"missing field(s) {sorted(missing)}")
        if raw["smallest_train_image_px"] is not None:
            raw["smallest_train_image_px"] = tuple(raw["smallest_train_image_px"])
        return Plan(**{k: raw[k] for k in known})
    except (OSError, ValueError, TypeError) as exc:
        raise InputError(f"{path}: not a mammoseg plan.json: {exc}") from None


def run_plan(patches: Mapping[str, Any], patches_key: str, train_manifest: str | Path,
             out_plan: str | Path) -> Plan:  # fmt: skip
    """Stage entry: the plan of the ``patches`` settings for the training manifest, written as ``plan.json``."""
    plan = build_plan(patches, patches_key, read_manifest(train_manifest))
    plan.write(out_plan)
    print(f"plan {patches_key}: {plan.window_px} px windows -> {plan.input_px} px network input; "
          f"~{plan.expected_patches} training patches from {plan.train_rois} ROIs in {plan.train_images} images"
          + ("" if plan.window_fits_every_train_image else
             f"; WARNING: the window is larger than the smallest training image {plan.smallest_train_image_px}"))
    return plan
