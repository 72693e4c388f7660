# Data: the synthetic demo tree (only for data.source = synthetic), restructuring per collection, and the
# dataset fingerprint + plan.


rule synth:
    output:
        tree=directory(f"{R}/synth/CBIS-DDSM"),
        csv_train=f"{R}/synth/csv/{ABN}_case_description_train_set.csv",
        csv_test=f"{R}/synth/csv/{ABN}_case_description_test_set.csv",
        truth=f"{R}/synth/truth.json",
    params:
        cfg=config_json("synth", "data"),
        out=lambda wildcards, output: os.path.dirname(output.truth),
    conda:
        "../../envs/data.yaml"
    log:
        f"{R}/logs/synth.log",
    benchmark:
        f"{R}/benchmarks/synth.tsv"
    shell:
        "mammoseg synth --config-json {params.cfg:q} --out {params.out} > {log} 2>&1"


checkpoint restructure:
    input:
        restructure_inputs,
    output:
        manifest=f"{R}/restructured/{ABN}/{{split}}/manifest.csv",
        skipped=report(
            f"{R}/restructured/{ABN}/{{split}}/skipped.csv",
            category="1. Data",
            labels={"table": "skipped files and ROIs", "split": "{split}"},
        ),
    params:
        cfg=config_json("data"),
        source=SOURCE,
        out=lambda wildcards, output: os.path.dirname(output.manifest),
    conda:
        "../../envs/data.yaml"
    log:
        f"{R}/logs/restructure/{{split}}.log",
    benchmark:
        f"{R}/benchmarks/restructure/{{split}}.tsv"
    shell:
        "mammoseg restructure --config-json {params.cfg:q} --source {params.source:q} --out {params.out}"
        " --split {wildcards.split} > {log} 2>&1"


rule fingerprint:
    input:
        train=restructured("train", "manifest.csv"),
        test=restructured("test", "manifest.csv"),
    output:
        fingerprint=f"{R}/plan/fingerprint.json",
        plan=report(f"{R}/plan/plan.json", category="1. Data", labels={"table": "training plan"}),
    params:
        cfg=config_json("data", "patches", "model", "train"),
    conda:
        "../../envs/data.yaml"
    log:
        f"{R}/logs/fingerprint.log",
    benchmark:
        f"{R}/benchmarks/fingerprint.tsv"
    shell:
        "mammoseg fingerprint --config-json {params.cfg:q} --out-fingerprint {output.fingerprint}"
        " --out-plan {output.plan} {input.train} {input.test} > {log} 2>&1"
