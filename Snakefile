# vlaforget: catastrophic forgetting when LoRA-fine-tuning a Vision-Language-Action model.
# The whole study DAG: data -> teacher model -> probe -> ICSM / CRaFT anchors -> train (method x suite x
# shots x seed) -> closed-loop + forgetting evals -> paper tables and figures. See README.md.

from snakemake.utils import min_version

min_version("9.0")


configfile: "config/config.yaml"


include: "workflow/rules/common.smk"
include: "workflow/rules/configs.smk"
include: "workflow/rules/data.smk"
include: "workflow/rules/model.smk"
include: "workflow/rules/probe.smk"
include: "workflow/rules/icsm.smk"
include: "workflow/rules/train.smk"
include: "workflow/rules/eval.smk"
include: "workflow/rules/vqa.smk"
include: "workflow/rules/report.smk"
include: "workflow/rules/export.smk"


rule all:
    input:
        table_outputs(),
        figures_outputs(),
        report_records(),  # under the data root: an empty root never looks up to date
    default_target: True


onstart:
    disk_safety_check()
    preflight_check()


include: "workflow/rules/console.smk"  # last: one console line per job of every rule above
