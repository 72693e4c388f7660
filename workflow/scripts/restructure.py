"""Rule restructure: index the download and restructure one collection (mammoseg.data.restructure)."""

from pathlib import Path

from mammoseg.data.restructure import run_restructure, summary_text
from mammoseg.jobs import logged_job

# The guard matters: full images are decoded in worker processes (forkserver), which import this file
# as their main module, where ``snakemake`` does not exist.
if __name__ == "__main__":
    with logged_job(snakemake) as console:
        summary = run_restructure(snakemake.config, snakemake.params.source, Path(snakemake.output.manifest).parent,
                                  snakemake.wildcards.split, threads=snakemake.threads)
        console.show(summary_text(summary))
