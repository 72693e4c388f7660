# Evaluation: per chunk, the metrics, binary masks and overlays of its images; then the tables of each image set
# and the resolved configuration of the experiment.


rule evaluate_chunk:
    input:
        predictions=f"{PREDICTIONS}/{{image_set}}/chunk-{{c}}",
        manifest=lambda wildcards: set_manifest(wildcards.image_set),
        files=chunk_files,
        operating_point=operating_point_input,
    output:
        report(
            directory(f"{EXPERIMENT}/{{image_set}}/chunk-{{c}}"),
            patterns=["{image_id}.overlay.png"],
            caption="../report/overlay.rst",
            category="5. Overlays",
            subcategory="{image_set}",
            labels={"image": "{image_id}"},
        ),
    params:
        settings=SETTINGS["evaluation"],
        experiment=KEYS.experiment,
    resources:
        mem_mb=8000,
        runtime=scaled_by_input(5, per_mb=0.05),
    group:
        "inference"
    conda:
        "../../envs/base.yaml"
    log:
        log_path("evaluate_chunk", KEYS.experiment, "{image_set}", "chunk-{c}"),
    benchmark:
        benchmark_path("evaluate_chunk", KEYS.experiment, "{image_set}", "chunk-{c}")
    script:
        "../scripts/evaluate_chunk.py"


rule calibrate:
    # evaluate.target_fppi > 0: the operating threshold read off the out-of-fold FROC (never the test images)
    input:
        chunks=lambda wildcards: expand(f"{EXPERIMENT}/oof/chunk-{{c}}", c=range(n_chunks("oof"))),
    output:
        OPERATING_POINT,
    resources:
        mem_mb=2000,
        runtime=10,
    conda:
        "../../envs/base.yaml"
    log:
        log_path("calibrate", KEYS.experiment),
    benchmark:
        benchmark_path("calibrate", KEYS.experiment)
    script:
        "../scripts/calibrate.py"


rule summarise:
    input:
        chunks=chunk_folders,
    output:
        per_image=report(
            f"{EXPERIMENT}/{{image_set}}/per_image.csv",
            caption="../report/per_image.rst",
            category="4. Metrics",
            subcategory="{image_set}",
            labels={"table": "per image"},
        ),
        lesions=f"{EXPERIMENT}/{{image_set}}/lesions.csv",
        summary=report(
            f"{EXPERIMENT}/{{image_set}}/summary.csv",
            caption="../report/summary.rst",
            category="4. Metrics",
            subcategory="{image_set}",
            labels={"table": "summary"},
        ),
        froc=f"{EXPERIMENT}/{{image_set}}/froc.csv",
        froc_png=report(
            f"{EXPERIMENT}/{{image_set}}/froc.png",
            caption="../report/froc.rst",
            category="4. Metrics",
            subcategory="{image_set}",
            labels={"figure": "FROC"},
        ),
        text=f"{EXPERIMENT}/{{image_set}}/summary.txt",
    wildcard_constraints:
        image_set="test|oof",
    params:
        settings=SETTINGS["evaluation"],
        experiment=KEYS.experiment,
    resources:
        mem_mb=2000,
        runtime=30,
    conda:
        "../../envs/base.yaml"
    log:
        log_path("summarise", KEYS.experiment, "{image_set}"),
    benchmark:
        benchmark_path("summarise", KEYS.experiment, "{image_set}")
    script:
        "../scripts/summarise.py"


rule experiment_config:
    output:
        config=f"{EXPERIMENT}/config.yaml",
        stage_keys=f"{EXPERIMENT}/keys.json",
    params:
        config=EXPERIMENT_CONFIG,
        stage_keys=KEYS.as_dict(),
    resources:
        mem_mb=1000,
        runtime=5,
    conda:
        "../../envs/base.yaml"
    log:
        log_path("experiment_config", KEYS.experiment),
    benchmark:
        benchmark_path("experiment_config", KEYS.experiment)
    script:
        "../scripts/experiment_config.py"


rule export_model:
    input:
        models=fold_models(KEYS.model),
        plan=PLAN,
        fingerprint=FINGERPRINT,
        reports=expand(f"{MODELS}/fold-{{f}}/report.json", f=FOLDS),
        oof=[f"{EXPERIMENT}/oof/summary.csv"] if len(FOLDS) > 1 else [],
        operating_point=[OPERATING_POINT] if CALIBRATED else [],
    output:
        directory(f"{EXPERIMENT}/model"),
    params:
        export=config["export"],
    resources:
        mem_mb=export_memory,
        runtime=60,
    conda:
        "../../envs/tensorflow.yaml"
    log:
        log_path("export_model", KEYS.experiment),
    benchmark:
        benchmark_path("export_model", KEYS.experiment)
    script:
        "../scripts/export_model.py"


rule summarise_studies:
    input:
        chunks=chunk_folders,
        operating_point=operating_point_input,
    output:
        findings=report(
            f"{EXPERIMENT}/{{image_set}}/findings.csv",
            caption="../report/findings.rst",
            category="6. New studies",
            labels={"table": "findings per image"},
        ),
        candidates=f"{EXPERIMENT}/{{image_set}}/candidates.csv",
        text=report(
            f"{EXPERIMENT}/{{image_set}}/summary.txt",
            caption="../report/findings_summary.rst",
            category="6. New studies",
            labels={"table": "summary of the findings"},
        ),
    wildcard_constraints:
        # the studies of the configured folder only (another folder's findings were made with its own root);
        # without studies.root no image set is new studies and the pattern matches none of the real ones
        image_set=one_of([STUDIES_SET]) if STUDIES_ROOT else "studies-none",
    params:
        experiment=KEYS.experiment,
    resources:
        mem_mb=2000,
        runtime=30,
    conda:
        "../../envs/base.yaml"
    log:
        log_path("summarise_studies", KEYS.experiment, "{image_set}"),
    benchmark:
        benchmark_path("summarise_studies", KEYS.experiment, "{image_set}")
    script:
        "../scripts/summarise_studies.py"


rule report_pages:
    input:
        summaries=expand(f"{EXPERIMENT}/{{image_set}}/summary.csv", image_set=IMAGE_SETS),
        histories=expand(f"{MODELS}/fold-{{f}}/history.csv", f=FOLDS),
        config=f"{EXPERIMENT}/config.yaml",
    output:
        report(
            directory(f"{EXPERIMENT}/report"),
            patterns=["{page}.html"],
            caption="../report/pages.rst",
            category="0. Tables",
            labels={"page": "{page}"},
        ),
    params:
        experiment=KEYS.experiment,
        image_sets=IMAGE_SETS,
    resources:
        mem_mb=2000,
        runtime=10,
    conda:
        "../../envs/base.yaml"
    log:
        log_path("report_pages", KEYS.experiment),
    benchmark:
        benchmark_path("report_pages", KEYS.experiment)
    script:
        "../scripts/report_pages.py"
