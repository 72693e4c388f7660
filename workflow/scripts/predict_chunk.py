"""Rule predict_chunk: probability maps of one chunk of images, the models loaded once (mammoseg.inference.predict)."""

from mammoseg.inference.predict import run_predict_chunk
from mammoseg.jobs import logged_job

with logged_job(snakemake):
    run_predict_chunk(snakemake.input.plan, snakemake.input.manifest, snakemake.input.models, snakemake.output[0],
                      image_set=snakemake.wildcards.image_set, chunk=int(snakemake.wildcards.c),
                      config=snakemake.config, splits=snakemake.input.splits)
