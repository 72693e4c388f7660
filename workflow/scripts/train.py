"""Rule train: fit one fold's U-Net on the patch shards (and the mined shard of a second round), resumably
(mammoseg.model.train.run_train). The model and train sections are the model key's (params.settings): the first
round of hard-negative mining trains without mining."""

from pathlib import Path

from mammoseg.jobs import logged_job
from mammoseg.model.train import run_train

with logged_job(snakemake):
    run_train({**snakemake.config, **snakemake.params.settings}, [*snakemake.input.shards, *snakemake.input.mined],
              Path(snakemake.output.report).parent,
              fold=int(snakemake.wildcards.f), plan=snakemake.input.plan, splits=snakemake.input.splits)
