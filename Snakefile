# mammoseg: mass segmentation in mammograms (Marita et al., U-Net on CBIS-DDSM), as a Snakemake workflow.
#
#   snakemake --cores all --resources gpu=1                       # the demo (config/config.yaml)
#   snakemake --cores all --resources gpu=1 --configfile config/paper.yaml --config data='{...}'
#
# The science lives in the `mammoseg` package; every rule calls one `mammoseg` subcommand.

from snakemake.utils import min_version

min_version("9.0")


configfile: "config/config.yaml"


report: "workflow/report/workflow.rst"


include: "workflow/rules/common.smk"


wildcard_constraints:
    split="train|test",
    k=r"\d+",
    image_id=r"[A-Za-z0-9._-]+",


include: "workflow/rules/data.smk"
include: "workflow/rules/patches.smk"
include: "workflow/rules/train.smk"
include: "workflow/rules/predict.smk"
include: "workflow/rules/evaluate.smk"


# Seconds of work each: not worth a cluster submission.
localrules:
    fingerprint,
    patch_manifest,


rule all:
    default_target: True
    input:
        f"{R}/plan/plan.json",
        f"{R}/patches/{ABN}/patches.csv",
        f"{R}/models/{MODEL}/report.json",
        f"{R}/metrics/{MODEL}/summary.csv",
        f"{R}/metrics/{MODEL}/froc.png",


onsuccess:
    print_run_summary()
