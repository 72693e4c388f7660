"""Rule evaluate_chunk: metrics, masks and overlays of one chunk's images (mammoseg.evaluation.evaluate)."""

from mammoseg.evaluation.evaluate import run_evaluate_chunk
from mammoseg.jobs import logged_job

with logged_job(snakemake):
    run_evaluate_chunk(snakemake.input.predictions, snakemake.input.manifest, snakemake.output[0],
                       chunk=int(snakemake.wildcards.c), config=snakemake.config,
                       image_set=snakemake.wildcards.image_set, experiment=snakemake.params.experiment,
                       operating_point=next(iter(snakemake.input.operating_point), None))
