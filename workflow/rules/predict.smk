# Inference: one job per test image, grouped for clusters (profiles/slurm) so that a cluster gets a few
# jobs of many images rather than thousands of tiny ones.


rule predict:
    input:
        model=rules.train.output.model,
        image=test_image,
    output:
        prob=f"{R}/predictions/{MODEL}/{{image_id}}.prob.npz",
        mask=f"{R}/predictions/{MODEL}/{{image_id}}.mask.png",
    params:
        cfg=config_json("patches", "infer"),
    resources:
        gpu=1,
    group:
        "per_image"
    conda:
        "../../envs/train.yaml"
    log:
        f"{R}/logs/predict/{MODEL}/{{image_id}}.log",
    benchmark:
        f"{R}/benchmarks/predict/{MODEL}/{{image_id}}.tsv"
    shell:
        "mammoseg predict --config-json {params.cfg:q} --model {input.model} --image {input.image}"
        " --out-prob {output.prob} --out-mask {output.mask} > {log} 2>&1"
