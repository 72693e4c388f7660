# Prediction: one job per chunk of images (bucket_of(image_id) mod chunk_count: infer.chunk_size images per chunk),
# the model (or the mean of the fold models) loaded once per job. Writes probability maps only: binarising is
# evaluation. {run} = {model}/{inference}: the experiment's keys, or with hard-negative mining also round 1's.


rule predict_chunk:
    input:
        plan=PLAN,
        manifest=lambda wildcards: set_manifest(wildcards.image_set),
        models=lambda wildcards: fold_models(wildcards.run.split("/")[0]),
        splits=lambda wildcards: f"{R}/models/{wildcards.run.split('/')[0]}/splits.json",
        images=chunk_images,
    output:
        directory(f"{R}/predictions/{{run}}/{{image_set}}/chunk-{{c}}"),
    wildcard_constraints:
        # {run} = {model key}/{inference key}, one of the pairs this configuration makes (common.smk)
        run=one_of(PREDICTION_RUNS),
    resources:
        mem_mb=8000,
        runtime=scaled_by_input(10, per_mb=0.1),
        gpu=1,
    group:
        "inference"
    conda:
        "../../envs/tensorflow.yaml"
    log:
        log_path("predict_chunk", "{run}", "{image_set}", "chunk-{c}"),
    benchmark:
        benchmark_path("predict_chunk", "{run}", "{image_set}", "chunk-{c}")
    script:
        "../scripts/predict_chunk.py"
