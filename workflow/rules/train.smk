# Training: the cross-validation's splits (written once, read by every fold and by the out-of-fold prediction),
# then one job per fold (train.folds; 1 = a single model), each on all shards. Per-epoch resume state lives in the
# fold's _resume/ folder, deliberately not a declared output, so Snakemake never deletes it before a rerun or a
# retry. {model} is the experiment's model key, or with hard-negative mining also its first round's (common.smk).


rule splits:
    input:
        train=f"{DATA}/train/manifest.csv",
    output:
        f"{R}/models/{{model}}/splits.json",
    wildcard_constraints:
        model=one_of(CONFIG_OF_MODEL),
    params:
        folds=config["train"]["folds"],
        seed=config["train"]["seed"],
    conda:
        "../../envs/data.yaml"
    log:
        log_path("splits", "{model}"),
    benchmark:
        benchmark_path("splits", "{model}")
    script:
        "../scripts/splits.py"


rule train:
    input:
        plan=PLAN,
        splits=f"{R}/models/{{model}}/splits.json",
        shards=expand(f"{PATCHES}/shard-{{k}}.h5", k=range(N_SHARDS)),
        mined=lambda wildcards: [MINED] if MINING and wildcards.model == KEYS.model else [],
    output:
        best=f"{R}/models/{{model}}/fold-{{f}}/best.keras",
        last=f"{R}/models/{{model}}/fold-{{f}}/last.keras",
        history=f"{R}/models/{{model}}/fold-{{f}}/history.csv",
        curves=report(
            f"{R}/models/{{model}}/fold-{{f}}/curves.png",
            caption="../report/curves.rst",
            category="3. Training",
            labels={"model": "{model}", "fold": "{f}", "figure": "training curves"},
        ),
        report=f"{R}/models/{{model}}/fold-{{f}}/report.json",
    wildcard_constraints:
        model=one_of(CONFIG_OF_MODEL),
    params:
        # the model key's `model` and `train` sections (params, so that Snakemake compares exactly these)
        settings=lambda wildcards: stage_settings(CONFIG_OF_MODEL[wildcards.model])["model"],
    resources:
        gpu=1,
    threads: workflow.cores
    conda:
        "../../envs/train.yaml"
    log:
        log_path("train", "{model}", "fold-{f}"),
    benchmark:
        benchmark_path("train", "{model}", "fold-{f}")
    script:
        "../scripts/train.py"


rule mine:
    # train.hard_negatives: windows on the strongest lesion-free false positives of the first round's
    # out-of-fold maps of the training images, as one extra shard for the second round
    input:
        plan=PLAN,
        manifest=f"{DATA}/train/manifest.csv",
        predictions=lambda wildcards: expand(
            f"{R}/predictions/{ROUND1.model}/{ROUND1.inference}/oof/chunk-{{c}}", c=range(n_chunks("oof"))
        ),
    output:
        MINED,
    conda:
        "../../envs/train.yaml"
    log:
        log_path("mine", KEYS.model),
    benchmark:
        benchmark_path("mine", KEYS.model)
    script:
        "../scripts/mine.py"
