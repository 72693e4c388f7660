"""The tf.data pipeline over HDF5 shards: every patch once per epoch, shapes, dtypes, binary masks, subsets."""

from __future__ import annotations

import os
from collections import Counter

import numpy as np
import pytest

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from test_shards import extract_all, load_shard, random_collection  # noqa: E402  (tests/ is on sys.path)

from mammoseg.model.dataset import ShardReader, make_dataset, read_provenance  # noqa: E402

tf = pytest.importorskip("tensorflow")


@pytest.fixture(scope="module")
def shard_set(tmp_path_factory):
    root = tmp_path_factory.mktemp("collection")
    manifest = random_collection(root, 9, seed=7)
    return extract_all(manifest, root / "patches", n_shards=3)


def _fingerprint(image: np.ndarray, mask: np.ndarray) -> bytes:
    return image.tobytes() + mask.tobytes()


def test_read_provenance_matches_shards(shard_set):
    prov = read_provenance(shard_set)
    total = 0
    for path in shard_set:
        images, _, shard_prov, _, _ = load_shard(path)
        mine = prov[prov.shard_path == str(path)]
        assert mine.row.tolist() == list(range(len(images)))
        assert mine.roi_id.tolist() == shard_prov.roi_id.tolist()
        total += len(images)
    assert len(prov) == total > 0


def test_every_patch_once_per_epoch_with_shapes_and_binary_masks(shard_set):
    expected = Counter()
    for path in shard_set:
        images, masks, _, _, _ = load_shard(path)
        for image, mask in zip(images, masks):
            expected[_fingerprint(image[..., None], mask[..., None].astype(np.float32))] += 1
    ds = make_dataset(shard_set, None, batch_size=4, shuffle=True, seed=1)
    orders = []
    for _ in range(2):
        seen = Counter()
        order = []
        for images, masks in ds:
            assert images.dtype == tf.float32 and masks.dtype == tf.float32
            assert images.shape[1:] == (16, 16, 1) and masks.shape[1:] == (16, 16, 1)
            assert 1 <= images.shape[0] <= 4
            m = masks.numpy()
            assert set(np.unique(m)) <= {0.0, 1.0}
            for image, mask in zip(images.numpy(), m):
                key = _fingerprint(image, mask)
                seen[key] += 1
                order.append(key)
        assert seen == expected
        orders.append(order)
    assert orders[0] != orders[1], "reshuffled every epoch"


def test_subset_rows_and_unshuffled_order(shard_set):
    prov = read_provenance(shard_set)
    subset = prov[prov.copy_index == 0]
    reader = ShardReader(shard_set)
    position = {str(p): k for k, p in enumerate(shard_set)}
    expected = [reader.read(position[s], r)[0] for s, r in zip(subset.shard_path, subset.row)]
    reader.close()
    got = np.concatenate([x.numpy() for x, _ in make_dataset(shard_set, subset, batch_size=3, shuffle=False)])
    assert got.shape == (len(subset), 16, 16, 1)
    np.testing.assert_array_equal(got, np.stack(expected))


def test_repeat_and_drop_remainder(shard_set):
    ds = make_dataset(shard_set, None, batch_size=5, repeat=True, drop_remainder=True)
    batches = list(ds.take(50))
    assert len(batches) == 50 and all(b[0].shape[0] == 5 for b in batches)


def test_bad_rows_raise(shard_set):
    prov = read_provenance(shard_set)
    with pytest.raises(ValueError, match="not in shard_paths"):
        make_dataset(shard_set[:1], prov, batch_size=2)
    with pytest.raises(ValueError, match="missing column"):
        make_dataset(shard_set, prov.drop(columns=["row"]), batch_size=2)


# --------------------------------------------------------------------------------------------------------------
# augmentation (train.augment): training batches only
# --------------------------------------------------------------------------------------------------------------
from mammoseg.config.schema import validate_config  # noqa: E402
from mammoseg.model.dataset import augment_batch, augments  # noqa: E402

OFF = validate_config({})["train"]["augment"]
ON = validate_config({"train": {"augment": {"flip": True, "rotate_deg": 20, "scale": 0.2, "contrast": 0.3,
                                            "gamma": 0.3}}})["train"]["augment"]


def _batches(ds) -> list[tuple[np.ndarray, np.ndarray]]:
    return [(x.numpy(), y.numpy()) for x, y in ds]


def _as_sorted_bytes(batches) -> list[bytes]:
    """Batches as a sorted list (shuffled pipelines deliver their batches in any order, each batch's content fixed)."""
    return sorted(x.tobytes() + y.tobytes() for x, y in batches)


def lesion_patch(side: int = 32) -> tuple[np.ndarray, np.ndarray]:
    """float32 (side, side, 1) image with a gradient background in [0, 0.4] and a bright square (1.0) off-centre
    at rows 6..17, cols 5..18 (min 0 and max 1, as extraction normalises patches); its mask, float32 {0, 1}."""
    rows = np.linspace(0.0, 0.4, side, dtype=np.float32)
    image = np.repeat(rows[:, None], side, axis=1)
    mask = np.zeros((side, side), np.float32)
    mask[6:18, 5:19] = 1.0
    image[mask == 1] = 1.0
    return image[..., None], mask[..., None]


def test_all_off_means_no_augmentation_step_bit_identical(shard_set):
    assert not augments(OFF) and augments(ON)
    plain = _batches(make_dataset(shard_set, None, batch_size=4, shuffle=False))
    off = _batches(make_dataset(shard_set, None, batch_size=4, shuffle=False, augment=OFF))
    assert len(plain) == len(off)
    for (x0, y0), (x1, y1) in zip(plain, off):
        assert x0.tobytes() == x1.tobytes() and y0.tobytes() == y1.tobytes()
    shuffled = [_as_sorted_bytes(_batches(make_dataset(shard_set, None, batch_size=4, seed=3, augment=a)))
                for a in (None, OFF)]
    assert shuffled[0] == shuffled[1]


def test_flips_move_image_and_mask_together_exactly():
    image, mask = lesion_patch()
    flips_only = {**OFF, "flip": True}
    images, masks = augment_batch(tf.constant(np.stack([image] * 16)), tf.constant(np.stack([mask] * 16)),
                                  tf.constant(11, tf.int64), flips_only, "window")
    variants = {"none": (image, mask), "lr": (image[:, ::-1], mask[:, ::-1]), "ud": (image[::-1], mask[::-1]),
                "both": (image[::-1, ::-1], mask[::-1, ::-1])}
    seen = set()
    for x, y in zip(images.numpy(), masks.numpy()):
        name = [k for k, (vx, vy) in variants.items() if np.array_equal(y, vy)]
        assert len(name) == 1
        np.testing.assert_array_equal(x, variants[name[0]][0])  # the image took the mask's flip
        seen.add(name[0])
    assert len(seen) >= 3  # 16 draws of 4 equally likely flips


def test_augmented_masks_stay_binary_and_on_the_bright_square():
    image, mask = lesion_patch()
    images, masks = augment_batch(tf.constant(np.stack([image] * 16)), tf.constant(np.stack([mask] * 16)),
                                  tf.constant(5, tf.int64), ON, "window")
    images, masks = images.numpy()[..., 0], masks.numpy()[..., 0]
    assert set(np.unique(masks)) <= {0.0, 1.0}
    assert images.min() >= 0.0 and images.max() <= 1.0
    assert len({m.tobytes() for m in masks}) == 16  # every sample drew its own transform
    for x, y in zip(images, masks):
        area = y.sum() / mask.sum()
        assert 0.55 <= area <= 1.6  # zoom 0.8..1.2 (area 0.64..1.44), nearest-neighbour rounding
        cut = 0.5 * (np.median(x[y == 0]) + np.median(x[y == 1]))
        bright = x >= cut
        assert (bright & (y == 1)).sum() / (bright | (y == 1)).sum() >= 0.8  # the mask sits on the square


def test_translation_moves_image_and_mask_together_within_the_range():
    image, mask = lesion_patch()  # the square's centre: row 11.5, column 11.5 of 32
    shifted_only = {**OFF, "translate": 0.125}  # up to 4 px: the square (rows 6..17) stays clear of the border
    assert augments(shifted_only)
    images, masks = augment_batch(tf.constant(np.stack([image] * 32)), tf.constant(np.stack([mask] * 32)),
                                  tf.constant(9, tf.int64), shifted_only, "window")
    moves = []
    for x, y in zip(images.numpy()[..., 0], masks.numpy()[..., 0]):
        assert set(np.unique(y)) <= {0.0, 1.0}
        assert abs(y.sum() - mask.sum()) <= 2 * 14 + 2 * 12  # a shifted rectangle: at most a row and a column
        rows, cols = np.nonzero(y)
        moves.append((rows.mean() - 11.5, cols.mean() - 11.5))
        bright = x >= 0.5 * (np.median(x[y == 0]) + np.median(x[y == 1]))
        assert (bright & (y == 1)).sum() / (bright | (y == 1)).sum() >= 0.8  # the image moved with the mask
    moves = np.array(moves)
    assert np.abs(moves).max() <= 4.0 + 0.5  # within ± translate × side (nearest neighbour: half a pixel)
    assert (np.abs(moves) >= 1.5).any(axis=0).all()  # rows and columns both moved, by their own draws
    assert np.std(moves[:, 0] - moves[:, 1]) > 0.5


def test_same_seed_same_batches_other_seed_or_epoch_other_batches(shard_set):
    def epochs(seed, n=1):
        ds = make_dataset(shard_set, None, batch_size=4, shuffle=True, seed=seed, augment=ON, normalise="window")
        return [_as_sorted_bytes(_batches(ds)) for _ in range(n)]

    first, second = epochs(7, n=2)
    assert epochs(7) == [first]
    assert first != second  # a new epoch draws new transforms
    assert epochs(8)[0] != first


def test_validation_batches_are_never_augmented(shard_set):
    from mammoseg.model.train import TrainingData, training_datasets

    prov = read_provenance(shard_set)
    train_rows, val_rows = prov.iloc[: len(prov) // 2], prov.iloc[len(prov) // 2:]
    data = TrainingData([str(p) for p in shard_set], train_rows, val_rows, 0, 0, "", "window")
    train_cfg = validate_config({"train": {"batch_size": 4, "augment": dict(ON)}})["train"]
    train_ds, val_ds = training_datasets(data, train_cfg, epochs_done=0)
    plain_val = _batches(make_dataset(shard_set, val_rows, batch_size=4, shuffle=False))
    for (x0, y0), (x1, y1) in zip(plain_val, _batches(val_ds), strict=True):
        np.testing.assert_array_equal(x0, x1)
        np.testing.assert_array_equal(y0, y1)
    stored = {x.tobytes() for x, _ in _batches(make_dataset(shard_set, train_rows, batch_size=1, shuffle=False))}
    trained = [x for batch, _ in _batches(train_ds) for x in batch]
    assert len(trained) == len(train_rows)
    assert sum(x.tobytes() not in stored for x in trained) >= len(trained) // 2  # training patches were changed


def test_image_normalised_patches_are_clipped_not_stretched_again():
    # a patch in the middle of its mammogram's range: under "window" augmentation stretches it to [0, 1] again
    # (as inference min-maxes every window); under "image" it must keep its place in the range
    image, mask = lesion_patch()
    dim = 0.2 + 0.4 * image  # values in [0.2, 0.6]
    flips_only = {**OFF, "flip": True}
    batch = tf.constant(np.stack([dim] * 8)), tf.constant(np.stack([mask] * 8))
    kept, _ = augment_batch(*batch, tf.constant(3, tf.int64), flips_only, "image")
    stretched, _ = augment_batch(*batch, tf.constant(3, tf.int64), flips_only, "window")
    assert np.isclose(kept.numpy().min(), 0.2) and np.isclose(kept.numpy().max(), 0.6)
    assert np.isclose(stretched.numpy().min(), 0.0) and np.isclose(stretched.numpy().max(), 1.0)
    bright, _ = augment_batch(*batch, tf.constant(3, tf.int64), {**OFF, "contrast": 0.9}, "image")
    assert bright.numpy().min() >= 0.0 and bright.numpy().max() <= 1.0  # photometric changes are clipped


def test_augmenting_needs_the_shards_normalisation(shard_set):
    from mammoseg.model.dataset import shards_normalisation

    assert shards_normalisation(shard_set) == "window"  # the fixture's shards: the paper's normalisation
    with pytest.raises(ValueError, match="normalisation"):
        make_dataset(shard_set, None, batch_size=4, augment=ON)


def test_shards_normalised_differently_are_refused(tmp_path):
    from mammoseg.errors import InputError
    from mammoseg.model.dataset import shards_normalisation

    manifest = random_collection(tmp_path, 4, seed=2)
    (window,) = extract_all(manifest, tmp_path / "w")
    (image,) = extract_all(manifest, tmp_path / "i", normalise="image")
    assert shards_normalisation([image]) == "image"
    with pytest.raises(InputError, match="normalised differently"):
        shards_normalisation([window, image])


def test_files_written_before_the_normalise_setting_count_as_window(tmp_path):
    import json

    import h5py

    from mammoseg.config.plan import build_plan, read_plan
    from mammoseg.config.schema import validate_config
    from mammoseg.data.manifest import read_manifest
    from mammoseg.model.dataset import shards_normalisation

    manifest = random_collection(tmp_path, 3, seed=4)
    (shard,) = extract_all(manifest, tmp_path / "s", normalise="image")
    with h5py.File(shard, "a") as h5:
        del h5.attrs["normalise"]  # as an older mammoseg wrote it: its patches were min-max normalised
    assert shards_normalisation([shard]) == "window"
    plan = build_plan(validate_config({"patches": {"normalise": "image"}})["patches"], "k", read_manifest(manifest))
    raw = plan.as_dict()
    del raw["normalise"]
    (tmp_path / "plan.json").write_text(json.dumps(raw))
    assert read_plan(tmp_path / "plan.json").normalise == "window"
