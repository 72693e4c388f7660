"""Rule summarise_studies: findings and candidates of the new studies (mammoseg.evaluation.summary)."""

from pathlib import Path

from mammoseg.evaluation.summary import summarise_findings
from mammoseg.jobs import logged_job

with logged_job(snakemake):
    summarise_findings(snakemake.input.chunks, Path(snakemake.output.findings).parent,
                       experiment=snakemake.params.experiment, threshold=snakemake.config["infer"]["threshold"])
