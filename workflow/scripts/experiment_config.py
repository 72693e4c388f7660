"""Rule experiment_config: the resolved configuration and stage keys of this run, beside its results."""

from mammoseg.config.resolve import write_resolved
from mammoseg.jobs import logged_job

with logged_job(snakemake):
    write_resolved(snakemake.params.config, snakemake.params.stage_keys, snakemake.output.config,
                   snakemake.output.stage_keys)
