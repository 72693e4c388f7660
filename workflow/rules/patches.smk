# Patches: the plan (every derived number, read by extraction, training and prediction), one extraction job per
# HDF5 shard (a case belongs to shard bucket_of(image_id), so a changed case re-extracts one shard), and the
# patch table over all shards.


rule plan:
    input:
        train=f"{DATA}/train/manifest.csv",
    output:
        report(PLAN, caption="../report/plan.rst", category="2. Patches", labels={"table": "plan"}),
    params:
        settings=SETTINGS["patches"],
        key=KEYS.patches,
    resources:
        mem_mb=1000,
        runtime=10,
    conda:
        "../../envs/base.yaml"
    log:
        log_path("plan", KEYS.patches),
    benchmark:
        benchmark_path("plan", KEYS.patches)
    script:
        "../scripts/plan.py"


rule extract_shard:
    input:
        plan=PLAN,
        manifest=f"{DATA}/train/manifest.csv",
        files=shard_files,
    output:
        f"{PATCHES}/shard-{{k}}.h5",
    resources:
        mem_mb=4000,
        runtime=scaled_by_input(10, per_mb=0.02),
    conda:
        "../../envs/base.yaml"
    log:
        log_path("extract_shard", KEYS.patches, "shard-{k}"),
    benchmark:
        benchmark_path("extract_shard", KEYS.patches, "shard-{k}")
    script:
        "../scripts/extract_shard.py"


rule patch_manifest:
    input:
        plan=PLAN,
        shards=expand(f"{PATCHES}/shard-{{k}}.h5", k=range(N_SHARDS)),
    output:
        patches=f"{PATCHES}/patches.csv",
        skipped=report(
            f"{PATCHES}/skipped.csv",
            caption="../report/patch_skipped.rst",
            category="2. Patches",
            labels={"table": "ROIs without patches"},
        ),
        grid=report(
            f"{PATCHES}/patches.png",
            caption="../report/patches.rst",
            category="2. Patches",
            labels={"figure": "patches"},
        ),
    resources:
        mem_mb=2000,
        runtime=10,
    conda:
        "../../envs/base.yaml"
    log:
        log_path("patch_manifest", KEYS.patches),
    benchmark:
        benchmark_path("patch_manifest", KEYS.patches)
    script:
        "../scripts/patch_manifest.py"
