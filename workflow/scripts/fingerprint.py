"""Rule fingerprint: counts and sizes of the restructured data (mammoseg.config.fingerprint)."""

from mammoseg.config.fingerprint import run_fingerprint
from mammoseg.jobs import logged_job

with logged_job(snakemake):
    run_fingerprint([snakemake.input.train, snakemake.input.test], snakemake.output[0])
