"""Security and privacy: no unsafe deserialisation, sanitised names, no identifying header values in outputs.

* The package never unpickles, ``eval``s or ``exec``s: checked on its syntax tree (comments and docstrings may
  mention the words), and every Keras ``load_model`` call passes ``safe_mode=True``; a ``.keras`` file that
  carries Python code (a ``Lambda`` layer) is refused with an error naming the file.
* Header values never become paths unsanitised: a DICOM whose PatientID is ``../../etc/x`` + NUL stays inside
  the output folder.
* Derived artefacts carry case ids only: a tree whose DICOMs carry a patient name, birth date, institution,
  address, MRN, accession number and physician is run through restructure, extract, patch manifest,
  fingerprint, predict and evaluate (+ the whole tiny workflow in the ``slow`` test), and every file written under
  ``results/`` is searched for those values: raw bytes, HDF5 attributes and string datasets, NPZ arrays,
  PNG text chunks, zip members. The restructured ``images/`` and ``masks/`` are links to (or copies of) the source
  DICOMs and so carry the source headers by design; they are excluded and documented in docs/reliability.md.
"""

from __future__ import annotations

import ast
import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pandas as pd
import pydicom
import pytest

from mammoseg.io.names import safe_name

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "src" / "mammoseg"

IDENTIFYING = {
    "PatientName": "DOE^JANE",
    "PatientBirthDate": "19700101",
    "InstitutionName": "General Hospital",
    "InstitutionAddress": "1 Main Street Springfield",
    "OtherPatientIDs": "MRN-0042731",
    "AccessionNumber": "ACC99887766",
    "ReferringPhysicianName": "WHO^DOCTOR",
    "PatientAddress": "42 Elm Road Shelbyville",
}
#: what must not appear; the DICOM name separator also in its display forms
NEEDLES = sorted({*IDENTIFYING.values(), "DOE JANE", "JANE DOE", "Jane Doe", "1970-01-01", "WHO DOCTOR"})


# --- no unsafe deserialisation ---------------------------------------------------------------------------------


def package_trees() -> list[tuple[Path, ast.AST]]:
    return [(path, ast.parse(path.read_text(), str(path))) for path in sorted(PACKAGE.rglob("*.py"))]


def call_name(node: ast.Call) -> str:
    func = node.func
    parts = []
    while isinstance(func, ast.Attribute):
        parts.append(func.attr)
        func = func.value
    if isinstance(func, ast.Name):
        parts.append(func.id)
    return ".".join(reversed(parts))


UNSAFE_MODULES = {"pickle", "cPickle", "dill", "shelve", "marshal", "cloudpickle", "joblib"}


def test_package_has_no_pickle_eval_exec_or_unsafe_flags():
    problems = []
    for path, tree in package_trees():
        for node in ast.walk(tree):
            where = f"{path.relative_to(REPO)}:{getattr(node, 'lineno', '?')}"
            if isinstance(node, ast.Import):
                problems += [f"{where} imports {a.name}" for a in node.names if a.name.split(".")[0] in UNSAFE_MODULES]
            elif isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] in UNSAFE_MODULES:
                problems.append(f"{where} imports from {node.module}")
            elif isinstance(node, ast.Call):
                name = call_name(node)
                if name in ("eval", "exec", "compile", "__import__") or name.split(".")[-1] in ("loads", "load") \
                        and name.split(".")[0] in UNSAFE_MODULES:
                    problems.append(f"{where} calls {name}")
                if name == "yaml.load" or name.endswith("yaml.unsafe_load") or name.endswith("torch.load"):
                    problems.append(f"{where} calls {name} (use yaml.safe_load)")
                for keyword in node.keywords:
                    value = keyword.value
                    constant = value.value if isinstance(value, ast.Constant) else None
                    if keyword.arg == "allow_pickle" and constant is not False:
                        problems.append(f"{where} {name}(allow_pickle={ast.unparse(value)})")
                    if keyword.arg == "safe_mode" and constant is not True:
                        problems.append(f"{where} {name}(safe_mode={ast.unparse(value)})")
                    if keyword.arg == "shell" and constant is not False:
                        problems.append(f"{where} {name}(shell={ast.unparse(value)})")
                if name.endswith("load_model"):
                    safe = [k for k in node.keywords if k.arg == "safe_mode"]
                    if name.startswith("keras") and not safe:
                        problems.append(f"{where} {name} without an explicit safe_mode=True")
                if name.endswith("np.load") or name == "numpy.load":
                    if not any(k.arg == "allow_pickle" for k in node.keywords):
                        problems.append(f"{where} np.load without allow_pickle=False")
    assert not problems, "\n".join(problems)


def test_text_grep_agrees_no_unsafe_tokens_outside_comments():
    """The brief's grep, on code only (comments and docstrings stripped by tokenising)."""
    import tokenize

    banned = ("pickle.", "import pickle", "eval(", "exec(", "allow_pickle=True", "safe_mode=False")
    found = []
    for path in sorted(PACKAGE.rglob("*.py")):
        with open(path, "rb") as handle:
            tokens = [t for t in tokenize.tokenize(handle.readline)
                      if t.type not in (tokenize.COMMENT, tokenize.STRING, tokenize.NL, tokenize.NEWLINE,
                                        tokenize.ENCODING, tokenize.INDENT, tokenize.DEDENT)]
        code = " ".join(t.string for t in tokens).replace(" ( ", "(").replace(" . ", ".").replace(" = ", "=")
        code = code.replace(" (", "(").replace(" .", ".").replace(". ", ".")
        found += [f"{path.name}: {word}" for word in banned if word in code]
    assert not found, found


def test_keras_model_with_python_code_is_refused(tmp_path):
    keras = pytest.importorskip("keras")
    from mammoseg.errors import InputError
    from mammoseg.inference.predict import load_model

    inputs = keras.Input((8, 8, 1))
    outputs = keras.layers.Lambda(lambda x: x * 2.0)(inputs)  # arbitrary Python: serialised as bytecode
    path = tmp_path / "evil.keras"
    keras.Model(inputs, outputs).save(path)
    with pytest.raises(InputError) as caught:
        load_model(path)
    assert str(path) in str(caught.value)
    assert "safe_mode" in str(caught.value) or "unsafe" in str(caught.value).lower()


# --- sanitised names ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("value", ["../../etc/x\x00", "/etc/passwd", "..", ".hidden", "a/../../b", "x\x00y",
                                   "C:\\Windows\\x", "Mass-Training_P_0001/../../LEFT_CC", "é/ü\n\t", "." * 300])
def test_safe_name_never_escapes(value):
    try:
        name = safe_name(value)
    except ValueError as exc:
        assert repr(value)[:20] in str(exc) or "no usable file name" in str(exc)
        return
    assert "/" not in name and "\\" not in name and "\x00" not in name and ".." not in name
    assert not name.startswith(".") and name not in ("", ".", "..") and len(name) <= 120
    assert (Path("/base") / name).resolve().parent == Path("/base")


def rewrite_headers(tree: Path, **values: str) -> int:
    """Set ``values`` on every DICOM under ``tree`` (pixel data untouched); returns the number of files."""
    files = sorted(tree.rglob("*.dcm"))
    for path in files:
        ds = pydicom.dcmread(path)
        for key, value in values.items():
            setattr(ds, key, value)
        ds.save_as(path)
    return len(files)


@pytest.fixture(scope="module")
def source_tree(tmp_path_factory) -> Path:
    from mammoseg.data.synth import generate_dataset

    root = tmp_path_factory.mktemp("privacy-src")
    generate_dataset(root, n_train=6, n_test=3, rows=256, cols=160, seed=1, quirks=False)
    return root


def test_traversal_patient_id_stays_inside_output(source_tree, tmp_path):
    from mammoseg.data.restructure import restructure_collection

    tree = tmp_path / "src"
    shutil.copytree(source_tree, tree)
    assert rewrite_headers(tree / "CBIS-DDSM", PatientID="../../etc/x\x00") > 0
    out = tmp_path / "deep" / "out"
    before = set(tmp_path.rglob("*"))
    summary = restructure_collection(tree, out, abnormality="mass", split="train", progress=False)
    written = set(tmp_path.rglob("*")) - before
    assert written and all(out in p.parents or p == out or p in out.parents for p in written), written
    assert not (tmp_path / "etc").exists() and not (tmp_path / "deep" / "etc").exists()
    manifest = pd.read_csv(out / "manifest.csv", dtype=str, keep_default_na=False)
    skipped = pd.read_csv(out / "skipped.csv", dtype=str, keep_default_na=False)
    # the folder names still identify the cases, so they are kept under safe ids
    assert summary["kept"] > 0
    for identifier in [*manifest["image_id"], *manifest["roi_id"]]:
        assert safe_name(identifier) == identifier
    for table in (manifest, skipped):
        for column in table.columns:
            assert not table[column].str.contains("\x00", regex=False).any(), column
    for relative in [*manifest["image_path"], *manifest["mask_path"]]:
        assert (out / relative).resolve(strict=False).parent.parent == out.resolve() or out in (out / relative).parents


# --- no identifying values in derived artefacts ---------------------------------------------------------------------


def texts_of(path: Path) -> list[str]:
    """Every piece of text a reader of ``path`` could see: raw bytes plus decoded structured content."""
    data = path.read_bytes()
    texts = [data.decode("latin-1"), data.decode("utf-16-le", errors="ignore")]
    suffix = path.suffix.lower()
    if suffix in (".h5", ".hdf5"):
        import h5py

        def visit(name, obj):
            texts.extend(f"{k}={v!r}" for k, v in obj.attrs.items())
            if isinstance(obj, h5py.Dataset) and obj.dtype.kind in "OSU":
                texts.extend(v.decode() if isinstance(v, bytes) else str(v) for v in obj[()].ravel())

        with h5py.File(path, "r") as h5:
            texts.extend(f"{k}={v!r}" for k, v in h5.attrs.items())
            h5.visititems(visit)
    if suffix == ".png":
        from PIL import Image

        with Image.open(path) as image:
            texts.extend(f"{k}={v}" for k, v in image.info.items())
            texts.extend(f"{k}={v}" for k, v in getattr(image, "text", {}).items())
    if zipfile.is_zipfile(path):  # .npz, .keras
        with zipfile.ZipFile(path) as archive:
            for member in archive.namelist():
                texts.append(member)
                texts.append(archive.read(member).decode("latin-1"))
    if suffix == ".npz":
        with np.load(path, allow_pickle=False) as arrays:
            for key in arrays.files:
                value = arrays[key]
                if value.dtype.kind in "US":
                    texts.extend(map(str, value.ravel()))
    return texts


def leaks(results: Path) -> tuple[list[str], int]:
    """(files with an identifying value, number of files checked) under ``results``, source DICOMs excluded."""
    found, checked = [], 0
    for path in sorted(results.rglob("*")):
        relative = path.relative_to(results)
        if path.is_symlink() or not path.is_file():
            continue
        if relative.parts[:1] == ("restructured",) and relative.parts[-2:-1] in (("images",), ("masks",)):
            continue  # the source DICOMs themselves (links or copies), see the module docstring
        if relative.parts[:1] == ("synth",):
            continue  # the synthetic source tree, when the workflow generates it
        checked += 1
        joined = "\n".join(texts_of(path))
        found += [f"{relative}: {needle!r}" for needle in NEEDLES if needle in joined]
    return found, checked


@pytest.fixture(scope="module")
def identified_tree(source_tree, tmp_path_factory) -> Path:
    tree = tmp_path_factory.mktemp("identified")
    shutil.copytree(source_tree, tree, dirs_exist_ok=True)
    assert rewrite_headers(tree / "CBIS-DDSM", **IDENTIFYING) > 0
    first = next((tree / "CBIS-DDSM").rglob("*.dcm"))
    assert pydicom.dcmread(first).PatientName == IDENTIFYING["PatientName"]  # the values really are in the input
    return tree


def test_leak_check_finds_planted_values(tmp_path):
    """The checker itself: each container kind with a planted value is caught."""
    import h5py
    from PIL import Image, PngImagePlugin

    (tmp_path / "a.csv").write_text("x\nDOE^JANE\n")
    with h5py.File(tmp_path / "b.h5", "w") as h5:
        h5.attrs["who"] = "General Hospital"
        h5.create_dataset("s", data=np.array(["19700101"], dtype=object), dtype=h5py.string_dtype())
    info = PngImagePlugin.PngInfo()
    info.add_text("Comment", "MRN-0042731", zip=True)  # compressed zTXt: invisible to a byte grep
    Image.new("L", (4, 4)).save(tmp_path / "c.png", pnginfo=info)
    np.savez_compressed(tmp_path / "d.npz", meta=np.array(json.dumps({"name": "WHO^DOCTOR"})))
    found, checked = leaks(tmp_path)
    assert checked == 4
    assert {f.split(":")[0] for f in found} == {"a.csv", "b.h5", "c.png", "d.npz"}, found


def test_derived_artefacts_carry_no_identifying_values(identified_tree, tmp_path):
    pytest.importorskip("tensorflow")
    from mammoseg.config import validate_config
    from mammoseg.config.fingerprint import run_fingerprint
    from mammoseg.config.plan import run_plan
    from mammoseg.data.restructure import restructure_collection
    from mammoseg.evaluation.evaluate import run_evaluate_chunk
    from mammoseg.evaluation.summary import run_summarise
    from mammoseg.inference.predict import run_predict_chunk
    from mammoseg.model.unet import build_unet
    from mammoseg.patches.shards import run_extract, run_patch_manifest

    results = tmp_path / "results"
    config = validate_config({"patches": {"n": 6, "downscale": 2, "n_shards": 1, "n_shifted": 1},
                              "model": {"name": "p", "depth": 2, "filters": 4}, "infer": {"chunk_size": 100},
                              "evaluate": {"bootstrap": 20}})
    manifests = {}
    for split in ("train", "test"):
        out = results / "restructured" / "mass" / split
        restructure_collection(identified_tree, out, abnormality="mass", split=split, link="copy", progress=False)
        manifests[split] = out / "manifest.csv"
    patches = results / "patches" / "mass"
    run_plan(config["patches"], "mass-key", manifests["train"], patches / "plan.json")
    run_extract(patches / "plan.json", manifests["train"], patches / "shard-0.h5", 0)
    run_patch_manifest(patches / "plan.json", [patches / "shard-0.h5"], patches / "patches.csv",
                       patches / "skipped.csv", patches / "patches.png")
    run_fingerprint([manifests["train"], manifests["test"]], results / "restructured/fingerprint.json")
    model = results / "models" / "p" / "fold-0" / "best.keras"
    model.parent.mkdir(parents=True)
    build_unet((32, 32, 1), depth=2, filters=4).save(model)
    predictions = results / "predictions" / "p" / "test" / "chunk-0"
    run_predict_chunk(patches / "plan.json", manifests["test"], [str(model)], predictions, image_set="test", chunk=0,
                      config=config)
    evaluated = results / "experiments" / "p" / "test" / "chunk-0"
    run_evaluate_chunk(predictions, manifests["test"], evaluated, chunk=0, config=config, image_set="test")
    run_summarise([evaluated], evaluated.parent, experiment="p", image_set="test", config=config)
    # the copies do carry the source headers (documented): proves the values reached the pipeline
    copied = next((results / "restructured/mass/test/images").glob("*.dcm"))
    assert str(pydicom.dcmread(copied).PatientName) == IDENTIFYING["PatientName"]
    found, checked = leaks(results)
    assert checked >= 10, checked
    assert not found, "\n".join(found)


@pytest.mark.slow
@pytest.mark.workflow
def test_tiny_workflow_outputs_carry_no_identifying_values(identified_tree, tmp_path):
    import yaml

    config = yaml.safe_load((REPO / "tests" / "data" / "tiny.yaml").read_text())
    config["data"] = {"source": "cbis", "root": str(identified_tree), "abnormality": "mass"}
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(config))
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
               OMP_NUM_THREADS="2", TF_CPP_MIN_LOG_LEVEL="2")
    done = subprocess.run(
        [sys.executable, "-m", "snakemake", "--snakefile", str(REPO / "Snakefile"), "--directory", str(tmp_path),
         "--configfile", str(tmp_path / "config.yaml"), "--workflow-profile", "none", "--cores", "2",
         "--resources", "gpu=1"], capture_output=True, text=True, timeout=1500, env=env)
    assert done.returncode == 0, done.stderr[-5000:]
    found, checked = leaks(tmp_path / "results")
    assert checked >= 20, checked
    assert not found, "\n".join(found)
