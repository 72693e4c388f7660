"""benchmarks/ensemble.py: the mean of several trainings' out-of-fold maps, laid out as the workflow's."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def ensemble():
    sys.path.insert(0, str(REPO / "benchmarks"))
    spec = importlib.util.spec_from_file_location("bench_ensemble", REPO / "benchmarks" / "ensemble.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _member(root: Path, maps: dict[str, np.ndarray]) -> Path:
    from mammoseg.inference.predict import save_prediction

    chunk = root / "oof" / "chunk-0"
    chunk.mkdir(parents=True)
    for image_id, prob in maps.items():
        save_prediction(prob, chunk / f"{image_id}.prob.npz", {"image_id": image_id, "member": root.name})
    (chunk / "predictions.csv").write_text("image_id,status\n" + "".join(f"{i},predicted\n" for i in maps))
    return root / "oof"


def test_mean_maps_is_the_rounded_pixel_mean_of_every_member(ensemble, tmp_path):
    rng = np.random.default_rng(0)
    a = {k: rng.integers(0, 256, (5, 7), dtype=np.uint8) for k in ("I1", "I2")}
    b = {k: rng.integers(0, 256, (5, 7), dtype=np.uint8) for k in ("I1", "I2")}
    out = tmp_path / "ens"
    assert ensemble.mean_maps([_member(tmp_path / "s0", a), _member(tmp_path / "s1", b)], out) == 2
    from mammoseg.inference.predict import load_prediction

    for image_id in a:
        prob, meta = load_prediction(out / "chunk-0" / f"{image_id}.prob.npz")
        # Python's round() rounds halves to the even neighbour, as numpy's rint does
        expected = [[round((int(x) + int(y)) / 2) for x, y in zip(row_a, row_b)]
                    for row_a, row_b in zip(a[image_id], b[image_id])]
        assert prob.tolist() == expected
        assert meta["image_id"] == image_id and len(meta["ensemble"]) == 2
    assert (out / "chunk-0" / "predictions.csv").read_text().startswith("image_id,status\nI1,predicted")


def test_a_member_without_an_image_is_named(ensemble, tmp_path):
    full = {k: np.zeros((3, 3), np.uint8) for k in ("I1", "I2")}
    first, second = _member(tmp_path / "s0", full), _member(tmp_path / "s1", {"I1": full["I1"]})
    with pytest.raises(SystemExit, match="I2.prob.npz is missing"):
        ensemble.mean_maps([first, second], tmp_path / "ens")
    assert not (tmp_path / "ens" / "chunk-0").exists()  # nothing half-written


def test_member_config_merges_one_members_settings(ensemble):
    base = {"train": {"epochs": 40, "seed": 0}, "model": {"filters": 16}}
    member = {"train": {"seed": 3, "jit_compile": True}}
    assert ensemble.member_config(base, member) == {"train": {"epochs": 40, "seed": 3, "jit_compile": True},
                                                    "model": {"filters": 16}}
    assert base["train"] == {"epochs": 40, "seed": 0}
    assert ensemble.member_label(member) == "{train: {jit_compile: true, seed: 3}}"


def test_one_member_is_no_ensemble(ensemble, tmp_path):
    with pytest.raises(SystemExit) as exit_info:
        ensemble.main(["--work", str(tmp_path), "--seeds", "1", "--member", "{train: {seed: 1}}"])
    assert exit_info.value.code == 2
