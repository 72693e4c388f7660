"""The measurements behind ``make bench`` (benchmarks/run.py): each function times or sizes one thing and returns
its raw numbers; run.py turns them into table rows. Nothing in the ``mammoseg`` package imports this module.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import pydicom

from mammoseg.config import validate_config
from mammoseg.data.layouts import detect_layout, find_case_root, index_tree, list_files
from mammoseg.data.manifest import read_manifest
from mammoseg.inference.predict import make_predictor
from mammoseg.inference.sliding import (
    _pad_to_window,
    _skip_reason,
    breast_side,
    paper_crop_box,
    paper_windows,
)
from mammoseg.io.dicom import header_record
from mammoseg.model.dataset import ShardReader, make_dataset, read_provenance
from mammoseg.model.train import build_model, configure_runtime
from mammoseg.patches.geometry import preprocess_window
from mammoseg.patches.shards import extract_shard


# ---- from mammoseg.data.layouts -------------------------------------------------------------------------------
def benchmark_indexing(root: str | Path, *, collection_prefix: str | None = None, repeats: int = 3) -> dict:
    """Header-indexing rate of :func:`index_tree` against bare ``pydicom.dcmread(stop_before_pixels=True)``.

    Over the same files (layouts A-C), ``repeats`` rounds, the order of the contenders alternating; the best time
    of each counts, so that a cold file cache or a busy machine penalises neither. Contenders: ``bare`` (a
    dcmread loop over a file list it gets for free), ``records`` (:func:`mammoseg.io.dicom.header_record` over the
    same list: parse, value extraction, truncation check) and ``index`` (:func:`index_tree` end to end: walking the
    tree, records, DataFrame).

    Returns
    -------
    dict : ``n_files``; ``bare_s``, ``records_s``, ``index_s`` (seconds, best of ``repeats``);
    ``bare_files_per_s``, ``index_files_per_s``; ``ratio`` (index rate / bare rate: the goal is >= 0.8) and
    ``ratio_records`` (records rate / bare rate: the per-file cost alone).
    """
    root = Path(root)
    case_root = find_case_root(root)
    if case_root is None:
        raise ValueError(f"{root}: benchmark_indexing needs a DICOM tree (layouts A-C)")
    layout = detect_layout(root)
    paths = [path for path, _top in list_files(case_root, collection_prefix)]
    if not paths:
        raise ValueError(f"{case_root}: no files to index")

    def bare() -> None:
        for path in paths:
            try:
                pydicom.dcmread(path, stop_before_pixels=True)
            except Exception:  # noqa: BLE001 - bad files cost what they cost in every contender
                pass

    def records() -> None:
        for path in paths:
            header_record(path)

    def index() -> None:
        index_tree(root, layout=layout, collection_prefix=collection_prefix)

    contenders = {"bare": bare, "records": records, "index": index}
    best = {name: float("inf") for name in contenders}
    for round_number in range(max(1, repeats)):
        names = list(contenders)
        for name in names if round_number % 2 == 0 else names[::-1]:
            start = time.perf_counter()
            contenders[name]()
            best[name] = min(best[name], time.perf_counter() - start)
    n = len(paths)
    return {
        "n_files": n, "bare_s": best["bare"], "records_s": best["records"], "index_s": best["index"],
        "bare_files_per_s": n / best["bare"], "index_files_per_s": n / best["index"],
        "ratio": best["bare"] / best["index"], "ratio_records": best["bare"] / best["records"],
    }  # fmt: skip


# ---- from mammoseg.patches.shards -----------------------------------------------------------------------------
def _decode_only(path: Path) -> None:
    import pydicom

    pydicom.dcmread(str(path)).pixel_array  # noqa: B018 - decoding is the point


def benchmark_extraction(manifest_csv: str | Path, out_dir: str | Path, *, n: int = 8, downscale: int = 4,
                         n_shifted: int = 4, max_shift: float = 0.25, seed: int = 0, compression: str | None = "lzf",
                         image_compression: str | None = None, repeats: int = 5) -> dict[str, Any]:
    """Extraction time against the bare DICOM decode time of the same files (all in this process, one shard).

    Four timings over the same files, in ``repeats`` rounds whose order rotates (so that neither a cold cache nor
    a busy moment favours one contender):

    * ``decode_s``: ``pydicom.dcmread(path).pixel_array`` for every image and mask file (the floor);
    * ``stored_s``: :func:`mammoseg.io.dicom.read_stored_pixels` for the same files: the stored values as every
      reader gets them (pydicom's decode from the open file, after the header checks and the size limits);
    * ``read_s``: the contract's readers, :func:`mammoseg.io.dicom.read_mammogram` per image and
      :func:`mammoseg.io.masks.read_mask` per mask (adds the modality-LUT check and the mask binarisation);
    * ``extract_s``: :func:`extract_shard` end to end (reads + geometry + pre-processing + HDF5 writes + fsync).

    The ratio is the median over rounds of extract / decode within the round: a round's contenders run back to
    back in the same state of the machine and of the allocator (on this VM, a process whose heap has just been
    warmed by large frees decodes small files up to twice as fast as one that faults in fresh pages, and that
    state changes between rounds). Best-of-rounds times are reported too.

    Returns
    -------
    dict with ``decode_s``, ``stored_s``, ``read_s``, ``extract_s`` (best round, seconds), ``ratio`` (median
    per-round extract / decode; goal <= 1.3), ``ratio_best`` (best extract / best decode), ``ratio_vs_readers``
    (extract / read: the cost of extraction beyond the shared readers), ``n_files``,
    ``n_images``, ``n_rois``, ``n_patches``, ``n_skipped``, ``shard_bytes``, ``compression``,
    ``image_compression``, ``rounds`` (every round's seconds per contender).
    """
    from mammoseg.io.dicom import read_mammogram, read_stored_pixels
    from mammoseg.io.masks import read_mask

    rows = read_manifest(manifest_csv)
    base = Path(manifest_csv).resolve().parent
    images = sorted({base / row["image_path"] for row in rows})
    masks = sorted({base / row["mask_path"] for row in rows})
    out = Path(out_dir) / "benchmark-shard.h5"
    result: dict[str, Any] = {}

    def decode() -> None:
        for path in [*images, *masks]:
            _decode_only(path)

    def stored() -> None:
        for path in [*images, *masks]:
            read_stored_pixels(path)

    def readers() -> None:
        for path in images:
            read_mammogram(path)
        for path in masks:
            read_mask(path)

    def extract() -> None:
        result.update(extract_shard(manifest_csv, out, shard_index=0, n_shards=1, n=n, downscale=downscale,
                                    n_shifted=n_shifted, max_shift=max_shift, seed=seed, compression=compression,
                                    image_compression=image_compression))

    contenders = {"decode": decode, "stored": stored, "read": readers, "extract": extract}
    names = list(contenders)
    rounds: dict[str, list[float]] = {name: [] for name in names}
    for k in range(max(1, repeats)):
        for name in names[k % len(names):] + names[: k % len(names)]:
            start = time.perf_counter()
            contenders[name]()
            rounds[name].append(time.perf_counter() - start)
    best = {name: min(times) for name, times in rounds.items()}
    paired = [e / d for e, d in zip(rounds["extract"], rounds["decode"])]
    return {
        "decode_s": round(best["decode"], 4), "stored_s": round(best["stored"], 4), "read_s": round(best["read"], 4),
        "extract_s": round(best["extract"], 4), "ratio": round(float(np.median(paired)), 3),
        "ratio_best": round(best["extract"] / best["decode"], 3),
        "ratio_vs_readers": round(best["extract"] / best["read"], 3),
        "n_files": len(images) + len(masks), "n_images": result["n_images"], "n_rois": result["n_rois"],
        "n_patches": result["n_patches"], "n_skipped": result["n_skipped"], "shard_bytes": out.stat().st_size,
        "compression": compression or "none", "image_compression": image_compression or "none",
        "rounds": {k: [round(t, 4) for t in v] for k, v in rounds.items()},
    }


def benchmark_extraction_memory(manifest_csv: str | Path, out_path: str | Path, **params: Any) -> dict[str, Any]:
    """Peak resident memory of one extraction, measured in a fresh Python process (Linux ``/proc``).

    ``params`` are :func:`extract_shard` keywords (defaults: n=8, downscale=4, n_shifted=4, max_shift=0.25, seed=0).
    After the imports the process resets its peak-RSS mark (``/proc/self/clear_refs`` = 5), so ``added_mib`` is
    the peak reached during extraction minus the resident size before it: flat in the number of cases when
    memory holds one image at a time.

    Returns
    -------
    dict with ``baseline_mib`` (RSS after imports), ``peak_mib`` (peak RSS during extraction), ``added_mib``,
    ``n_images``, ``n_rois``, ``n_patches``, ``seconds``.
    """
    import json
    import subprocess
    import sys

    kwargs = {"n": 8, "downscale": 4, "n_shifted": 4, "max_shift": 0.25, "seed": 0, **params,
              "shard_index": 0, "n_shards": 1}
    code = (
        "import json, sys\n"
        "import h5py, pandas, pydicom, numpy\n"
        "from mammoseg.patches.shards import extract_shard\n"
        # imported before the baseline, as extraction needs them
        "import mammoseg.io.dicom, mammoseg.io.masks  # noqa: F401\n"
        "def status(key):\n"
        "    for line in open('/proc/self/status'):\n"
        "        if line.startswith(key + ':'):\n"
        "            return int(line.split()[1]) / 1024\n"
        "open('/proc/self/clear_refs', 'w').write('5')\n"
        "base = status('VmRSS')\n"
        "r = extract_shard(sys.argv[1], sys.argv[2], **json.loads(sys.argv[3]))\n"
        "print(json.dumps({'baseline_mib': base, 'peak_mib': status('VmHWM'), 'n_patches': r['n_patches'],"
        " 'n_rois': r['n_rois'], 'n_images': r['n_images'], 'seconds': r['seconds']}))\n"
    )
    proc = subprocess.run([sys.executable, "-c", code, str(manifest_csv), str(out_path), json.dumps(kwargs)],
                          capture_output=True, text=True, check=False)
    if proc.returncode:
        raise RuntimeError(f"memory benchmark failed for {manifest_csv}: {proc.stderr.strip()[-2000:]}")
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    out["added_mib"] = round(out["peak_mib"] - out["baseline_mib"], 1)
    out["baseline_mib"], out["peak_mib"] = round(out["baseline_mib"], 1), round(out["peak_mib"], 1)
    return out


# ---- from mammoseg.model.dataset ------------------------------------------------------------------------------
def benchmark_read_rate(shard_paths: Sequence[str | Path], *, batch_size: int = 32, max_patches: int = 5000,
                        through_tf: bool = True) -> float:
    """Patches per second read from the shards (one shuffled pass, at most ``max_patches`` patches).

    ``through_tf=True`` times :func:`make_dataset` end to end (what training sees); ``False`` times bare
    :class:`ShardReader` reads in random order in one thread (the HDF5 + lzf floor).
    """
    rows = read_provenance(shard_paths)
    if rows.empty:
        raise ValueError("the shards hold no patches to read")
    rows = rows.sample(n=min(len(rows), max_patches), random_state=0)
    if not through_tf:
        reader = ShardReader(shard_paths)
        position = {str(p): k for k, p in enumerate(shard_paths)}
        start = time.perf_counter()
        for path, row in zip(rows["shard_path"], rows["row"]):
            reader.read(position[path], row)
        seconds = time.perf_counter() - start
        reader.close()
        return len(rows) / seconds
    ds = make_dataset(shard_paths, rows, batch_size, shuffle=True, seed=0)
    count = 0
    start = time.perf_counter()
    for images, _ in ds:
        count += int(images.shape[0])
    return count / (time.perf_counter() - start)


# ---- from mammoseg.model.train --------------------------------------------------------------------------------
def benchmark_training(model_cfg: dict[str, Any], input_size: int, batch_size: int, steps: int, *,
                       loss: str = "bce_dice", warmup: int = 1, seed: int = 0) -> dict[str, Any]:
    """Training throughput of a configured U-Net on random data (no disk I/O).

    Returns
    -------
    dict with ``samples_per_s``, ``seconds_per_batch`` (mean of ``steps`` timed steps after ``warmup`` untimed
    ones, which include graph tracing), ``parameters``, ``device``, ``mixed_precision``, and the inputs.
    """
    import keras

    from mammoseg.model.losses import get_loss
    from mammoseg.model.unet import parameter_counts

    runtime = configure_runtime(validate_config({"train": {"seed": seed, "mixed_precision": "auto"}})["train"])
    rng = np.random.default_rng(seed)
    images = rng.random((batch_size, input_size, input_size, 1), dtype=np.float32)
    masks = (rng.random((batch_size, input_size, input_size, 1)) > 0.9).astype(np.float32)
    with runtime.strategy.scope():
        model = build_model(model_cfg, input_size, get_loss(loss), 1e-3)
    for _ in range(max(1, warmup)):
        model.train_on_batch(images, masks)
    started = time.perf_counter()
    for _ in range(steps):
        model.train_on_batch(images, masks)
    seconds = (time.perf_counter() - started) / max(1, steps)
    result = {
        "model": {k: model_cfg.get(k) for k in ("depth", "filters", "batch_norm", "max_filters") if k in model_cfg},
        "input_size": input_size, "batch_size": batch_size, "steps": steps,
        "seconds_per_batch": seconds, "samples_per_s": batch_size / seconds,
        "parameters": parameter_counts(model), "device": runtime.device,
        "mixed_precision": runtime.mixed_precision,
    }
    keras.mixed_precision.set_global_policy("float32")
    return result


# ---- from mammoseg.inference.sliding --------------------------------------------------------------------------
def benchmark_inference(model, image: np.ndarray, window: int | None = None, downscale: int = 4,
                        strip_fraction: float = 0.1, min_mean: float = 0.1, batch_size: int = 16,
                        repeats: int = 1) -> dict:
    """The paper's per-window ``model.predict`` loop against the batched ``tf.function`` path, same windows.

    Parameters
    ----------
    model : Keras model with input (s, s, 1); image : raw full image (rows, cols)
    window : full-resolution window (default: s × downscale)

    Returns
    -------
    dict with ``windows``, ``loop_seconds``, ``batched_seconds``, ``loop_windows_per_s``,
    ``batched_windows_per_s``, ``speedup`` and ``max_abs_diff`` between the two paths' probabilities.
    The batched predictor is warmed up (traced) before timing, as ``model.predict`` builds its own function on
    its first call, which is also warmed up.
    """
    s = int(model.input_shape[1])
    window = window or s * downscale
    image = np.asarray(image, dtype=np.float32)
    side = breast_side(image, strip_fraction)
    work, _ = _pad_to_window(image, window, side)
    box = paper_crop_box(work.shape, window, side)
    level = min_mean * float(image.max())
    corners = [(r, c) for r, c in paper_windows(box, window)
               if not _skip_reason(work[r : r + window, c : c + window], level)]
    if not corners:
        raise ValueError("no window passes the skip rules; nothing to benchmark")
    inputs = np.stack([preprocess_window(work[r : r + window, c : c + window], downscale) for r, c in corners])
    predictor = make_predictor([model], batch_size)
    predictor(inputs[:1])  # trace once
    model.predict(inputs[:1, ..., None], verbose=0)  # let Keras build its predict function
    start = time.perf_counter()
    for _ in range(repeats):
        loop = np.stack([model.predict(x[None, ..., None], verbose=0)[0, ..., 0] for x in inputs])
    loop_seconds = (time.perf_counter() - start) / repeats
    start = time.perf_counter()
    for _ in range(repeats):
        batched = predictor(inputs)
    batched_seconds = (time.perf_counter() - start) / repeats
    n = len(inputs)
    return {
        "windows": n, "window": window, "downscale": downscale, "batch_size": batch_size,
        "loop_seconds": loop_seconds, "batched_seconds": batched_seconds,
        "loop_windows_per_s": n / loop_seconds, "batched_windows_per_s": n / batched_seconds,
        "speedup": loop_seconds / batched_seconds,
        "max_abs_diff": float(np.max(np.abs(loop - batched))),
    }


def measure_peak_rss(config: dict, model_path: str | Path, image_path: str | Path, out_dir: str | Path,
                     timeout_s: float = 1200) -> dict:
    """Run :func:`mammoseg.inference.predict.run_predict_files` on one image in a fresh Python process and report
    its peak resident memory.

    The child reports the high-water mark of its own address space (``VmHWM`` in ``/proc/self/status``), so
    TensorFlow, the model and the image are all included and nothing from this process is counted. Not
    ``ru_maxrss``: Linux keeps that across fork and exec, so a child of a large parent reports the parent's size.

    Returns
    -------
    dict with ``peak_rss_mib``, ``peak_rss_gib``, ``seconds`` (wall time of the child) and the child's metadata.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    payload = json.dumps({"config": config, "model": str(model_path), "image": str(image_path),
                          "out": str(out_dir / "rss")})
    script = (
        "import json, resource, sys\n"
        "from pathlib import Path\n"
        "from mammoseg.config import validate_config\n"
        "from mammoseg.inference.predict import load_prediction, run_predict_files\n"
        "a = json.loads(sys.argv[1])\n"
        "rows = run_predict_files([a['image']], [a['model']], a['out'], config=validate_config(a['config']))\n"
        "meta = load_prediction(Path(a['out']) / (rows[0]['image_id'] + '.prob.npz'))[1]\n"
        "hwm = [l for l in open('/proc/self/status') if l.startswith('VmHWM:')]\n"
        "kib = int(hwm[0].split()[1]) if hwm else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
        "print('RSS_JSON=' + json.dumps({'maxrss_kib': kib, 'meta': meta}, default=str))\n"
    )
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", script, payload], capture_output=True, text=True,
                          timeout=timeout_s, env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"})
    seconds = time.perf_counter() - start
    if done.returncode != 0:
        raise RuntimeError(f"inference subprocess failed ({done.returncode}):\n{done.stderr[-4000:]}")
    line = [out for out in done.stdout.splitlines() if out.startswith("RSS_JSON=")][-1]
    report = json.loads(line[len("RSS_JSON="):])
    kib = int(report["maxrss_kib"])
    return {"peak_rss_mib": kib / 1024, "peak_rss_gib": kib / 1024**2, "seconds": seconds, "meta": report["meta"]}
