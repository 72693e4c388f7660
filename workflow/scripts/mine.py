"""Rule mine: fold f's hard negatives, from round-1 model f's maps of its own training images
(mammoseg.mining)."""

from mammoseg.jobs import logged_job
from mammoseg.mining import run_mine

with logged_job(snakemake):
    run_mine(snakemake.input.plan, snakemake.input.manifest, snakemake.input.predictions, snakemake.output[0],
             config=snakemake.config, fold=int(snakemake.wildcards.f), splits=snakemake.input.splits,
             training_splits=snakemake.input.training_splits)
