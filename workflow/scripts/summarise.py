"""Rule summarise: the tables and FROC of one image set (mammoseg.evaluation.summary)."""

from pathlib import Path

from mammoseg.evaluation.summary import run_summarise
from mammoseg.jobs import logged_job

with logged_job(snakemake):
    run_summarise(snakemake.input.chunks, Path(snakemake.output.summary).parent, experiment=snakemake.params.experiment,
                  image_set=snakemake.wildcards.image_set, config=snakemake.config)
