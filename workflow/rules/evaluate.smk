# Evaluation: per-image metrics and overlays, then the summary tables over all test images.


rule evaluate_image:
    input:
        prob=rules.predict.output.prob,
        image=test_image,
        masks=test_masks,
        manifest=restructured("test", "manifest.csv"),
    output:
        json=f"{R}/metrics/{MODEL}/images/{{image_id}}.json",
        overlay=report(
            f"{R}/overlays/{MODEL}/{{image_id}}.png",
            category="5. Overlays",
            subcategory=MODEL,
            labels={"model": MODEL, "image": "{image_id}"},
        ),
    params:
        cfg=config_json("patches", "infer", "evaluate"),
    group:
        "per_image"
    conda:
        "../../envs/evaluate.yaml"
    log:
        f"{R}/logs/evaluate/{MODEL}/{{image_id}}.log",
    benchmark:
        f"{R}/benchmarks/evaluate/{MODEL}/{{image_id}}.tsv"
    shell:
        "mammoseg evaluate --config-json {params.cfg:q} --prob {input.prob} --manifest {input.manifest}"
        " --image-id {wildcards.image_id} --out-json {output.json} --out-overlay {output.overlay} > {log} 2>&1"


rule summarise:
    input:
        jsons=all_image_jsons,
        overlays=all_overlays,
    output:
        per_image=report(
            f"{R}/metrics/{MODEL}/per_image.csv", category="4. Metrics", labels={"model": MODEL, "table": "per image"}
        ),
        lesions=f"{R}/metrics/{MODEL}/lesions.csv",
        summary=report(
            f"{R}/metrics/{MODEL}/summary.csv", category="4. Metrics", labels={"model": MODEL, "table": "summary"}
        ),
        froc=f"{R}/metrics/{MODEL}/froc.csv",
        froc_png=report(
            f"{R}/metrics/{MODEL}/froc.png", category="4. Metrics", labels={"model": MODEL, "figure": "FROC"}
        ),
    params:
        cfg=config_json("patches", "infer", "evaluate"),
        out_dir=lambda wildcards, output: os.path.dirname(output.summary),
        model=MODEL,
    conda:
        "../../envs/evaluate.yaml"
    log:
        f"{R}/logs/summarise/{MODEL}.log",
    benchmark:
        f"{R}/benchmarks/summarise/{MODEL}.tsv"
    shell:
        # tee: the summary is both logged and printed at the end of the run.
        "mammoseg summarise --config-json {params.cfg:q} --out-dir {params.out_dir} --model-name {params.model}"
        " {input.jsons} 2>&1 | tee {log}"
