"""Rule patch_manifest: one table of every patch and skipped ROI over all shards, and a picture of patches."""

from mammoseg.jobs import logged_job
from mammoseg.patches.shards import run_patch_manifest

with logged_job(snakemake):
    run_patch_manifest(snakemake.input.plan, snakemake.input.shards, snakemake.output.patches,
                       snakemake.output.skipped, snakemake.output.grid)
