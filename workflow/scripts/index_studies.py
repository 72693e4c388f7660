"""Rule index_studies: the mammograms of studies.root as a manifest of images without ROI (new studies)."""

from pathlib import Path

from mammoseg.data.restructure import run_index_studies
from mammoseg.jobs import logged_job

# The guard matters: full images are decoded in worker processes (forkserver), which import this file
# as their main module, where ``snakemake`` does not exist.
if __name__ == "__main__":
    with logged_job(snakemake) as console:
        summary = run_index_studies(snakemake.config, Path(snakemake.output.manifest).parent, threads=snakemake.threads)
        console.show(summary["text"])
