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
