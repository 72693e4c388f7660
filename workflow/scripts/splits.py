"""Rule splits: the folds of the training patients, written once (mammoseg.model.folds.run_splits)."""

from mammoseg.jobs import logged_job
from mammoseg.model.folds import run_splits

with logged_job(snakemake):
    run_splits(snakemake.input.train, snakemake.output[0], folds=snakemake.params.folds, seed=snakemake.params.seed)
