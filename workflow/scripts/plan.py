"""Rule plan: the plan every later stage reads (mammoseg.config.plan)."""

from mammoseg.config.plan import run_plan
from mammoseg.jobs import logged_job

with logged_job(snakemake):
    run_plan(snakemake.params.settings, snakemake.params.key, snakemake.input.train, snakemake.output[0])
