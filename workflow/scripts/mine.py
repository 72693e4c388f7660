"""Rule mine: hard negatives of the training images from the first round's out-of-fold maps (mammoseg.patches.mining)."""

from mammoseg.jobs import logged_job
from mammoseg.patches.mining import run_mine

with logged_job(snakemake):
    run_mine(snakemake.input.plan, snakemake.input.manifest, snakemake.input.predictions, snakemake.output[0],
             config=snakemake.config)
