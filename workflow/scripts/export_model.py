"""Rule export_model: SavedModel (+ ONNX) and model card of the experiment's fold models (mammoseg.export)."""

from mammoseg.export import run_export
from mammoseg.jobs import logged_job

with logged_job(snakemake):
    run_export(snakemake.input.models, snakemake.input.plan, snakemake.input.fingerprint, snakemake.input.reports,
               snakemake.output[0], config=snakemake.config, oof_summary=(snakemake.input.oof or [None])[0],
               operating_point=(snakemake.input.operating_point or [None])[0])
