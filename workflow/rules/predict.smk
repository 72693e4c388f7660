# Prediction: one job per chunk of images (bucket_of(image_id) mod chunk_count: infer.chunk_size images per chunk),
# the model (or the mean of the fold models) loaded once per job. Writes probability maps only: binarising is
# evaluation. {model}/{inference}: the experiment's keys, or with hard-negative mining also its first round's.


rule predict_chunk:
    input:
        plan=PLAN,
        manifest=lambda wildcards: set_manifest(wildcards.image_set),
        models=lambda wildcards: fold_models(wildcards.model),
        splits=f"{R}/models/{{model}}/splits.json",
        images=chunk_images,
    output:
        directory(f"{R}/predictions/{{model}}/{{inference}}/{{image_set}}/chunk-{{c}}"),
    wildcard_constraints:
        model=one_of(CONFIG_OF_MODEL),
        inference=one_of(INFERENCE_OF_MODEL.values()),
    resources:
        gpu=1,
    group:
        "inference"
    conda:
        "../../envs/train.yaml"
    log:
        log_path("predict_chunk", "{model}", "{inference}", "{image_set}", "chunk-{c}"),
    benchmark:
        benchmark_path("predict_chunk", "{model}", "{inference}", "{image_set}", "chunk-{c}")
    script:
        "../scripts/predict_chunk.py"
