"""Rule synth: write the synthetic CBIS-DDSM-like demo tree (mammoseg.data.synth.run_synth)."""

from pathlib import Path

from mammoseg.data.synth import run_synth
from mammoseg.jobs import logged_job

with logged_job(snakemake):
    run_synth(snakemake.config, Path(snakemake.output.truth).parent)
