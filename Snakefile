# mammoseg: mass segmentation in mammograms (Marita et al., U-Net on CBIS-DDSM), as a Snakemake workflow.
#
#   snakemake --cores all --resources gpu=1                                   # the demo (config/config.yaml)
#   snakemake --cores all --resources gpu=1 --configfile config/paper.yaml --config data='{...}'
#
# A run's configuration is the schema's defaults, then the --configfile files (the demo when none is given),
# then --config (README "Configuration"). Every artefact lives under a path keyed by the settings that made it
# (docs/architecture.md), so variants coexist. The science lives in the `mammoseg` package; every rule runs a
# thin script of workflow/scripts/ that calls one stage function.

from snakemake.utils import min_version

min_version("9.0")


report: "workflow/report/workflow.rst"


include: "workflow/rules/common.smk"


wildcard_constraints:
    split="train|test",
    image_set=rf"test|oof|studies-[A-Za-z0-9._-]+|{FIT_SET}\d+",
    k=r"\d+",
    c=r"\d+",
    f=r"\d+",


include: "workflow/rules/data.smk"
include: "workflow/rules/patches.smk"
include: "workflow/rules/train.smk"
include: "workflow/rules/predict.smk"
include: "workflow/rules/evaluate.smk"


# Seconds of work each: not worth a cluster submission.
localrules:
    fingerprint,
    plan,
    splits,
    patch_manifest,
    experiment_config,
    calibrate,
    summarise,
    summarise_studies,
    report_pages,
    index_studies,


rule all:
    default_target: True
    input:
        FINGERPRINT,
        f"{PATCHES}/patches.csv",
        expand(f"{MODELS}/fold-{{f}}/report.json", f=FOLDS),
        f"{EXPERIMENT}/config.yaml",
        f"{EXPERIMENT}/model",
        f"{EXPERIMENT}/report",
        expand(f"{EXPERIMENT}/{{image_set}}/summary.csv", image_set=IMAGE_SETS),
        [f"{EXPERIMENT}/{STUDIES_SET}/findings.csv"] if STUDIES_ROOT else [],


onsuccess:
    print_run_summary()
