"""Rule index_studies: the mammograms of studies.root as a manifest of images without ROI (new studies)."""

from pathlib import Path

from mammoseg.data.restructure import run_index_studies
from mammoseg.jobs import logged_job

with logged_job(snakemake) as console:
    summary = run_index_studies(snakemake.config, Path(snakemake.output.manifest).parent, threads=snakemake.threads)
    console.show(summary["text"])
