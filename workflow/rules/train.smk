# Training: the cross-validation's splits (written once, read by every fold and by the out-of-fold prediction),
# then one job per fold (train.folds; 1 = a single model), each on all shards. Per-epoch resume state lives in the
# fold's _resume/ folder, deliberately not a declared output, so Snakemake never deletes it before a rerun or a
# retry.


rule splits:
    input:
        train=f"{DATA}/train/manifest.csv",
    output:
        SPLITS,
    params:
        folds=config["train"]["folds"],
        seed=config["train"]["seed"],
    conda:
        "../../envs/data.yaml"
    log:
        log_path("splits", KEYS.model),
    benchmark:
        benchmark_path("splits", KEYS.model)
    script:
        "../scripts/splits.py"


rule train:
    input:
        plan=PLAN,
        splits=SPLITS,
        shards=expand(f"{PATCHES}/shard-{{k}}.h5", k=range(N_SHARDS)),
    output:
        best=f"{MODELS}/fold-{{f}}/best.keras",
        last=f"{MODELS}/fold-{{f}}/last.keras",
        history=f"{MODELS}/fold-{{f}}/history.csv",
        curves=report(
            f"{MODELS}/fold-{{f}}/curves.png",
            caption="../report/curves.rst",
            category="3. Training",
            labels={"model": KEYS.model, "fold": "{f}", "figure": "training curves"},
        ),
        report=f"{MODELS}/fold-{{f}}/report.json",
    params:
        settings=SETTINGS["model"],
    resources:
        gpu=1,
    threads: workflow.cores
    conda:
        "../../envs/train.yaml"
    log:
        log_path("train", KEYS.model, "fold-{f}"),
    benchmark:
        benchmark_path("train", KEYS.model, "fold-{f}")
    script:
        "../scripts/train.py"
