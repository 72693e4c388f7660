"""Rule extract_shard: cut the patches of one HDF5 shard (mammoseg.patches.shards.run_extract)."""

from mammoseg.jobs import logged_job
from mammoseg.patches.shards import run_extract

patches = snakemake.config["patches"]  # storage filters only: they change no patch, so they are not in the key
with logged_job(snakemake):
    run_extract(snakemake.input.plan, snakemake.input.manifest, snakemake.output[0], int(snakemake.wildcards.k),
                compression=patches["compression"], image_compression=patches["image_compression"])
