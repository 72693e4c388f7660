# Patch extraction: one job per HDF5 shard; a case belongs to shard shard_of(image_id), so a changed case
# re-extracts one shard.


rule extract_shard:
    input:
        manifest=restructured("train", "manifest.csv"),
        files=shard_files,
    output:
        f"{R}/patches/{ABN}/shard-{{k}}.h5",
    params:
        cfg=config_json("patches"),
    conda:
        "../../envs/data.yaml"
    log:
        f"{R}/logs/extract/shard-{{k}}.log",
    benchmark:
        f"{R}/benchmarks/extract/shard-{{k}}.tsv"
    shell:
        "mammoseg extract --config-json {params.cfg:q} --manifest {input.manifest} --out {output}"
        " --shard {wildcards.k} > {log} 2>&1"


rule patch_manifest:
    input:
        expand(f"{R}/patches/{ABN}/shard-{{k}}.h5", k=range(N_SHARDS)),
    output:
        patches=f"{R}/patches/{ABN}/patches.csv",
        skipped=report(
            f"{R}/patches/{ABN}/skipped.csv", category="2. Patches", labels={"table": "ROIs without patches"}
        ),
    params:
        cfg=config_json("patches"),
    conda:
        "../../envs/data.yaml"
    log:
        f"{R}/logs/extract/patch_manifest.log",
    benchmark:
        f"{R}/benchmarks/extract/patch_manifest.tsv"
    shell:
        "mammoseg patches manifest --config-json {params.cfg:q} --out {output.patches}"
        " --skipped {output.skipped} {input} > {log} 2>&1"
