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
    resources:
        mem_mb=1000,
        runtime=10,
    conda:
        "../../envs/base.yaml"
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
        mined=lambda wildcards: (
            [f"{MODELS}/fold-{wildcards.f}/hard_negatives.h5"] if MINING and wildcards.model == KEYS.model else []
        ),
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
        mem_mb=8000,
        runtime=training_runtime,
        gpu=1,
    # an interrupted training continues from its last finished epoch (the fold's _resume/ folder): a retry
    # after a node failure or a time limit loses at most one epoch
    retries: 2
    threads: workflow.cores
    conda:
        "../../envs/tensorflow.yaml"
    log:
        log_path("train", "{model}", "fold-{f}"),
    benchmark:
        benchmark_path("train", "{model}", "fold-{f}")
    script:
        "../scripts/train.py"


rule mine:
    # train.hard_negatives, fold f: windows on the strongest lesion-free false positives of round-1 model f's
    # maps of the training images it was fit on (image set fit-f), as one extra shard for round-2 model f
    input:
        plan=PLAN,
        manifest=f"{DATA}/train/manifest.csv",
        splits=lambda wildcards: f"{R}/models/{ROUND1.model}/splits.json",
        training_splits=f"{MODELS}/splits.json",
        predictions=lambda wildcards: expand(
            f"{R}/predictions/{ROUND1.model}/{ROUND1.inference}/{fit_set(int(wildcards.f))}/chunk-{{c}}",
            c=range(n_chunks(fit_set(int(wildcards.f)))),
        ),
        files=lambda wildcards: files_of(manifest_rows("train"), f"{DATA}/train"),
    output:
        f"{MODELS}/fold-{{f}}/hard_negatives.h5",
    resources:
        mem_mb=8000,
        runtime=scaled_by_input(10, per_mb=0.05),
    conda:
        "../../envs/tensorflow.yaml"
    log:
        log_path("mine", KEYS.model, "fold-{f}"),
    benchmark:
        benchmark_path("mine", KEYS.model, "fold-{f}")
    script:
        "../scripts/mine.py"
