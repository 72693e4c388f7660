# Prediction: one job per chunk of images (bucket_of(image_id) mod chunk_count: infer.chunk_size images per chunk),
# the model (or the mean of the
# fold models) loaded once per job. Writes probability maps only: binarising is evaluation.


rule predict_chunk:
    input:
        plan=PLAN,
        manifest=lambda wildcards: set_manifest(wildcards.image_set),
        models=chunk_models,
        splits=SPLITS,
        images=chunk_images,
    output:
        directory(f"{PREDICTIONS}/{{image_set}}/chunk-{{c}}"),
    params:
        settings=SETTINGS["inference"],
    resources:
        gpu=1,
    group:
        "inference"
    conda:
        "../../envs/train.yaml"
    log:
        log_path("predict_chunk", KEYS.model, KEYS.inference, "{image_set}", "chunk-{c}"),
    benchmark:
        benchmark_path("predict_chunk", KEYS.model, KEYS.inference, "{image_set}", "chunk-{c}")
    script:
        "../scripts/predict_chunk.py"
