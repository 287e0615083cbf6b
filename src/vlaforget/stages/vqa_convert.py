"""Recipe `vlaforget vqa-convert`: VQAv2 questions + annotations JSON -> the multiple-choice VQA JSONL
(eval/vqa_mc.py).
"""

from __future__ import annotations

import argparse

from ..eval.vqa_mc import convert_vqav2


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--questions", required=True, help="VQAv2 questions JSON (v2_OpenEnded_mscoco_*_questions.json)"
    )
    p.add_argument(
        "--annotations", required=True, help="VQAv2 annotations JSON (v2_mscoco_*_annotations.json)"
    )
    p.add_argument("--images", required=True, help="folder of the COCO images")
    p.add_argument("--out", required=True, help="output JSONL (eval.forgetting.vqa_jsonl)")
    p.add_argument("--candidates", type=int, default=4, help="candidates per number/other question")
    p.add_argument("--limit", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)


def main(args) -> int:
    n = convert_vqav2(
        args.questions, args.annotations, args.images, args.out, args.candidates, args.limit, args.seed
    )
    print(f"wrote {n} questions to {args.out}")
    return 0
