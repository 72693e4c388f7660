"""The Snakemake HTML report of a finished tiny run renders in a real browser and holds the promised results.

`snakemake --report report.html` writes one self-contained HTML file (a zip only when the target ends in .zip):
a JavaScript app with every result embedded as a data URI. The test
1. runs the tiny workflow and renders the report;
2. reads the embedded result index (``var results = {...}``) and checks it against the run's own files: training
   curves, the FROC plot, the table pages (summary with CPM and intervals, FROC points, per image, lesions,
   candidates, training history, the resolved configuration, the comparison of experiments), the patch grid, and
   one overlay per test image (ids from the test manifest) with its legend;
3. opens the report in headless Chromium (Debian's ``chromium``; installed with apt-get when missing and root,
   else the test skips) and checks that the JavaScript rendered the navigation with the categories
   (``--dump-dom``) and that a screenshot is not blank; and renders each embedded table page in Chromium and
   finds its table, with the figures of the run's own CSV files, in the rendered DOM.
"""

from __future__ import annotations

import base64
import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from tinyrun import failure, snakemake

pytestmark = [pytest.mark.workflow, pytest.mark.slow]

# The categories the rules give their report() outputs (workflow/rules/*.smk).
CATEGORIES = ("0. Tables", "1. Data", "2. Patches", "3. Training", "4. Metrics", "5. Overlays")
CHROMIUM_FLAGS = (
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
    # let the report's JavaScript run to completion before dumping or capturing
    "--virtual-time-budget=15000",
)


def find_chromium() -> str:
    """Path of a Chromium binary; installs Debian's `chromium` if missing and possible, else skips the test."""
    for name in ("chromium", "chromium-browser", "google-chrome"):
        if shutil.which(name):
            return shutil.which(name)
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        pytest.skip("no chromium, and cannot install it (needs root and apt-get)")
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    install = ["apt-get", "install", "-y", "-q", "--no-install-recommends", "chromium"]
    result = subprocess.run(install, capture_output=True, text=True, env=env, timeout=900)
    if result.returncode != 0:
        subprocess.run(["apt-get", "update", "-q"], capture_output=True, env=env, timeout=600)
        result = subprocess.run(install, capture_output=True, text=True, env=env, timeout=900)
    if result.returncode != 0 or not shutil.which("chromium"):
        pytest.skip(f"apt-get install chromium failed: {result.stderr.strip()[-300:]}")
    return shutil.which("chromium")


def chromium(binary: str, profile_dir: Path, *args: str) -> subprocess.CompletedProcess:
    """Headless Chromium with a fresh profile; no network, no sandbox (root in a container)."""
    command = ["timeout", "-k", "5", "120", binary, *CHROMIUM_FLAGS, f"--user-data-dir={profile_dir}", *args]
    return subprocess.run(command, capture_output=True, timeout=180)


def embedded_json(html: str, name: str) -> dict:
    """The JSON object the report template embeds as ``<script id="NAME"> var NAME = {...}; </script>``."""
    match = re.search(rf'<script id="{name}">\s*var {name} = (.*?);\s*</script>', html, flags=re.S)
    assert match is not None, f"report has no embedded '{name}' object"
    return json.loads(match.group(1))


def visible_text(dom: str) -> str:
    """The text of an HTML document without scripts and styles, whitespace collapsed."""
    dom = re.sub(r"<(script|style)\b.*?</\1>", " ", dom, flags=re.S | re.I)
    return re.sub(r"\s+", " ", re.sub(r"<[^>]+>", " ", dom))


def data_uri_bytes(uri: str) -> bytes:
    assert uri.startswith("data:"), uri[:40]
    return base64.b64decode(uri.split(",", 1)[1])


@pytest.fixture(scope="module")
def report(tiny_run):
    """The session's finished tiny run (conftest.py) and its report: (workdir, report path, html text)."""
    workdir, _, _ = tiny_run
    path = workdir / "report.html"
    made = snakemake(workdir, "--report", str(path), timeout=300)
    assert made.returncode == 0, f"--report failed:\n{failure(made)}"
    return workdir, path, path.read_text()


def run_folders(workdir: Path) -> dict[str, Path]:
    from mammoseg.config.keys import stage_keys
    from mammoseg.config.resolve import resolve_config

    keys = stage_keys(resolve_config([workdir / "config.yaml"]))
    results = workdir / "results"
    return {"data": results / "restructured" / keys.data, "models": results / "models" / keys.model,
            "experiment": results / "experiments" / keys.experiment, "patches": results / "patches" / keys.patches}


PAGES = ("test-summary", "test-froc", "test-per_image", "test-lesions", "test-candidates", "training-fold-0",
         "configuration", "experiments")


def test_report_embeds_every_promised_result(report):
    workdir, _, html = report
    where = run_folders(workdir)
    results = embedded_json(html, "results")

    def entry_for(path: Path) -> dict:
        (entry,) = [e for p, e in results.items() if (workdir / p).resolve() == path.resolve()]
        return entry

    # training curves, FROC plot, patch grid and the summary tables, each with its label
    assert entry_for(where["models"] / "fold-0" / "curves.png")["labels"].get("figure") == "training curves"
    assert entry_for(where["experiment"] / "test" / "froc.png")["labels"].get("figure") == "FROC"
    assert entry_for(where["patches"] / "patches.png")["labels"].get("figure") == "patches"
    pages = {e["labels"].get("page"): e for e in results.values() if "page" in e["labels"]}
    assert set(PAGES) <= set(pages), sorted(pages)
    for name in PAGES:
        assert data_uri_bytes(pages[name]["data_uri"]) == (where["experiment"] / "report" / f"{name}.html").read_bytes()

    # one overlay per test image, each embedded with its own bytes, each with its legend band
    test_ids = set(pd.read_csv(where["data"] / "test" / "manifest.csv")["image_id"])
    overlays = {e["labels"].get("image"): e for e in results.values() if "image" in e["labels"]}
    assert set(overlays) == test_ids
    from io import BytesIO

    from PIL import Image

    for image_id, entry in overlays.items():
        png = data_uri_bytes(entry["data_uri"])
        (on_disk,) = (where["experiment"] / "test").glob(f"chunk-*/{image_id}.overlay.png")
        assert png == on_disk.read_bytes(), image_id
        pixels = np.asarray(Image.open(BytesIO(png)).convert("RGB"))
        band = pixels[-12:].reshape(-1, 3)
        assert (band == (0, 255, 0)).all(axis=1).any() and (band == (255, 0, 0)).all(axis=1).any(), image_id


def test_report_categories_are_the_rules(report):
    _, _, html = report
    categories = embedded_json(html, "categories")
    assert set(CATEGORIES) <= set(categories), sorted(categories)


def test_report_renders_in_headless_chromium(report, tmp_path):
    workdir, path, html = report
    binary = find_chromium()

    # before JavaScript runs the page says only "Loading ..."; the categories appear once the app has rendered
    static_text = visible_text(html)
    dumped = chromium(binary, tmp_path / "profile-dom", "--dump-dom", path.as_uri())
    assert dumped.returncode == 0, dumped.stderr.decode(errors="replace")[-2000:]
    rendered = visible_text(dumped.stdout.decode(errors="replace"))
    assert len(rendered) > len(static_text) + 100, rendered[:500]
    for category in CATEGORIES:
        assert category in rendered and category not in static_text, category

    # a screenshot of the rendered page is not a blank canvas
    shot = tmp_path / "report.png"
    captured = chromium(binary, tmp_path / "profile-shot", "--window-size=1280,900", f"--screenshot={shot}",
                        path.as_uri())
    assert captured.returncode == 0 and shot.is_file(), captured.stderr.decode(errors="replace")[-2000:]
    from PIL import Image

    pixels = np.asarray(Image.open(shot).convert("L"), dtype=np.float32)
    assert pixels.shape == (900, 1280)
    assert pixels.std() > 5.0, "screenshot is (nearly) uniform: nothing rendered"


def test_table_pages_render_their_tables_in_headless_chromium(report, tmp_path):
    """Each table page embedded in the report, rendered by Chromium, holds a table with the run's own figures."""
    workdir, _, html = report
    binary = find_chromium()
    where = run_folders(workdir)
    pages = {e["labels"]["page"]: e for e in embedded_json(html, "results").values() if "page" in e["labels"]}
    summary = pd.read_csv(where["experiment"] / "test" / "summary.csv")
    per_image = pd.read_csv(where["experiment"] / "test" / "per_image.csv")
    expected = {
        "test-summary": ["cpm", "tpr_at_1_fppi", "ci_low", *summary["metric"].head(5)],
        "test-per_image": list(per_image["image_id"]),
        "training-fold-0": ["val_dice", "learning_rate"],
        "configuration": ["patches:", "infer:"],
        "experiments": [where["experiment"].name, "CPM"],
    }
    for name, words in expected.items():
        page = tmp_path / f"{name}.html"
        page.write_bytes(data_uri_bytes(pages[name]["data_uri"]))
        dumped = chromium(binary, tmp_path / f"profile-{name}", "--dump-dom", page.as_uri())
        dom = dumped.stdout.decode(errors="replace")
        assert dumped.returncode == 0 and ("<table" in dom or "<pre>" in dom), name
        text = visible_text(dom)
        for word in words:
            assert str(word) in text, (name, word)


def test_a_studies_run_s_report_embeds_its_findings(tiny_run, tmp_path):
    """With studies.root, the report of that configuration holds the studies' findings table, their summary (with
    the warning of a model trained on the synthetic demo) and the overlay of each study."""
    from mammoseg.studies import studies_set

    workdir, _, _ = tiny_run
    where = run_folders(workdir)
    manifest = pd.read_csv(where["data"] / "test" / "manifest.csv", dtype=str, keep_default_na=False)
    studies = tmp_path / "studies"
    studies.mkdir()
    first = manifest.iloc[0]
    shutil.copy((where["data"] / "test" / first["image_path"]).resolve(), studies / "scan.dcm")
    with_studies = ("--config", f"studies={{root: '{studies}'}}")
    done = snakemake(workdir, *with_studies)
    assert done.returncode == 0, failure(done)
    path = tmp_path / "report.html"
    made = snakemake(workdir, "--report", str(path), *with_studies, timeout=300)
    assert made.returncode == 0, f"--report failed:\n{failure(made)}"
    embedded = {(workdir / p).resolve(): e for p, e in embedded_json(path.read_text(), "results").items()}
    folder = where["experiment"] / studies_set(studies)
    (overlay,) = folder.glob(f"chunk-*/{first['image_id']}.overlay.png")
    for result in (folder / "findings.csv", folder / "summary.txt", overlay):
        assert data_uri_bytes(embedded[result.resolve()]["data_uri"]) == result.read_bytes(), result.name
    summary = (folder / "summary.txt").read_text()
    assert f"new studies of {studies}" in summary and "warning: this model was trained on the synthetic" in summary
