# Data: the synthetic demo tree (data.source: synthetic), restructuring per collection, the dataset fingerprint.


rule synth:
    output:
        tree=directory(f"{SYNTH}/CBIS-DDSM"),
        csv_train=f"{SYNTH}/csv/{ABN}_case_description_train_set.csv",
        csv_test=f"{SYNTH}/csv/{ABN}_case_description_test_set.csv",
        truth=f"{SYNTH}/truth.json",
    params:
        settings=SETTINGS["synth"],
    resources:
        mem_mb=2000,
        runtime=30,
    conda:
        "../../envs/base.yaml"
    log:
        log_path("synth", KEYS.synth),
    benchmark:
        benchmark_path("synth", KEYS.synth)
    script:
        "../scripts/synth.py"


checkpoint restructure:
    input:
        restructure_inputs,
    output:
        manifest=f"{DATA}/{{split}}/manifest.csv",
        skipped=report(
            f"{DATA}/{{split}}/skipped.csv",
            caption="../report/skipped.rst",
            category="1. Data",
            labels={"table": "skipped files and ROIs", "split": "{split}"},
        ),
    params:
        settings=SETTINGS["data"],
        source=SOURCE,
    resources:
        mem_mb=4000,
        runtime=120,
    threads: 4
    conda:
        "../../envs/base.yaml"
    log:
        log_path("restructure", KEYS.data, "{split}"),
    benchmark:
        benchmark_path("restructure", KEYS.data, "{split}")
    script:
        "../scripts/restructure.py"


rule fingerprint:
    input:
        train=f"{DATA}/train/manifest.csv",
        test=f"{DATA}/test/manifest.csv",
    output:
        report(FINGERPRINT, caption="../report/fingerprint.rst", category="1. Data", labels={"table": "fingerprint"}),
    resources:
        mem_mb=1000,
        runtime=10,
    conda:
        "../../envs/base.yaml"
    log:
        log_path("fingerprint", KEYS.data),
    benchmark:
        benchmark_path("fingerprint", KEYS.data)
    script:
        "../scripts/fingerprint.py"


checkpoint index_studies:
    output:
        manifest=f"{STUDIES}/manifest.csv",
        skipped=report(
            f"{STUDIES}/skipped.csv",
            caption="../report/skipped_studies.rst",
            category="6. New studies",
            labels={"table": "files of the studies folder not read"},
        ),
    params:
        root=STUDIES_ROOT,
    resources:
        mem_mb=2000,
        runtime=60,
    threads: 4
    conda:
        "../../envs/base.yaml"
    log:
        log_path("index_studies", STUDIES_SET or "none"),
    benchmark:
        benchmark_path("index_studies", STUDIES_SET or "none")
    script:
        "../scripts/index_studies.py"
