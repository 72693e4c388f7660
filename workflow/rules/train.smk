# Training: one job per model, on all shards. Per-epoch resume state lives in results/models/NAME/_resume/,
# which is deliberately not a declared output, so Snakemake never deletes it before a rerun or a retry.


rule train:
    input:
        shards=expand(f"{R}/patches/{ABN}/shard-{{k}}.h5", k=range(N_SHARDS)),
    output:
        model=f"{R}/models/{MODEL}/model.keras",
        best=f"{R}/models/{MODEL}/best.keras",
        history=f"{R}/models/{MODEL}/history.csv",
        curves=report(
            f"{R}/models/{MODEL}/curves.png",
            category="3. Training",
            labels={"model": MODEL, "figure": "training curves"},
        ),
        report=f"{R}/models/{MODEL}/report.json",
    params:
        cfg=config_json("patches", "model", "train"),
        out_dir=lambda wildcards, output: os.path.dirname(output.model),
    resources:
        gpu=1,
    threads: workflow.cores
    conda:
        "../../envs/train.yaml"
    log:
        f"{R}/logs/train/{MODEL}.log",
    benchmark:
        f"{R}/benchmarks/train/{MODEL}.tsv"
    shell:
        "mammoseg train --config-json {params.cfg:q} --out-dir {params.out_dir} {input.shards} > {log} 2>&1"
