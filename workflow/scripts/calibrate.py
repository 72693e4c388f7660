"""Rule calibrate: the operating threshold for evaluate.target_fppi (mammoseg.evaluation.calibrate)."""

from mammoseg.evaluation.calibrate import run_calibrate
from mammoseg.jobs import logged_job

with logged_job(snakemake):
    run_calibrate(snakemake.input.chunks, snakemake.output[0], config=snakemake.config)
