"""Rule summarise_studies: findings and candidates of the new studies (mammoseg.studies)."""

from pathlib import Path

from mammoseg.jobs import logged_job
from mammoseg.studies import run_summarise_studies

with logged_job(snakemake):
    run_summarise_studies(snakemake.input.chunks, Path(snakemake.output.findings).parent, config=snakemake.config,
                          image_set=snakemake.wildcards.image_set, experiment=snakemake.params.experiment,
                          operating_point=(snakemake.input.operating_point or [None])[0])
