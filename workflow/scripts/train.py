"""Rule train: fit one fold's U-Net on the patch shards, resumably (mammoseg.model.train.run_train)."""

from pathlib import Path

from mammoseg.jobs import logged_job
from mammoseg.model.train import run_train

with logged_job(snakemake):
    run_train(snakemake.config, snakemake.input.shards, Path(snakemake.output.report).parent,
              fold=int(snakemake.wildcards.f), plan=snakemake.input.plan, splits=snakemake.input.splits)
