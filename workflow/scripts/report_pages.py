"""Rule report_pages: HTML pages of the experiment's tables for the report (mammoseg.evaluation.report)."""

from pathlib import Path

from mammoseg.evaluation.report import run_report_pages
from mammoseg.jobs import logged_job

with logged_job(snakemake):
    run_report_pages(Path(snakemake.input.config).parent, snakemake.params.image_sets, snakemake.input.histories,
                     snakemake.input.config, snakemake.output[0], experiment=snakemake.params.experiment)
