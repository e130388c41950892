#!/usr/bin/env python
"""The answer-only student (docs/REFERENCE.md): the demo student's size, supervised on `8+4-1-7=#4`
(no worked solution), so that the teacher's worked format is far from it (its first token, `#`, costs about
-11 under the teacher). The setting the trust region and off-policy guidance are for.

    python scripts/build_answer_only_student.py --assets demo_assets --out demo_assets/student_answer_only

reads the shipped teacher and data from --assets, writes a Hugging Face folder (bf16 safetensors and the
tokenizer) and answer_only_report.json (held-out accuracy, step-0 mismatch against the teacher).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from build_demo_models import STUDENT, accuracy, encode_pairs, mismatch, train_sft
from transformers import AutoModelForCausalLM

from tropd_ds.demo_models import build_llama
from tropd_ds.demo_task import build_tokenizer


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--assets", type=Path, default=Path("demo_assets"))
    ap.add_argument("--out", type=Path, default=Path("demo_assets/student_answer_only"))
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    torch.set_num_threads(2)
    torch.manual_seed(args.seed)
    tok = build_tokenizer()
    rows = [json.loads(x) for x in (args.assets / "train.jsonl").read_text().splitlines()]
    eval_rows = [json.loads(x) for x in (args.assets / "eval.jsonl").read_text().splitlines()]
    answer_only = [{"prompt": r["prompt"], "teacher_response": "#" + r["answer"]} for r in rows]
    student = build_llama(args.out, tok, **STUDENT, seed=args.seed + 3)
    train_sft(
        student, encode_pairs(tok, answer_only), args.steps, 128, 2e-3, args.seed + 2, False, "answer-only student"
    )
    student.to(torch.bfloat16).save_pretrained(args.out, safe_serialization=True)
    student.float()
    tok.save_pretrained(args.out)
    teacher = AutoModelForCausalLM.from_pretrained(args.assets / "teacher").float().eval()
    report = {
        "student_params": sum(p.numel() for p in student.parameters()),
        "student_accuracy": accuracy(student.to(torch.bfloat16).float(), tok, eval_rows),
        "step0_mismatch": mismatch(student, teacher, tok, eval_rows[:200]),
        "steps": args.steps,
        "seed": args.seed,
    }
    (args.out / "answer_only_report.json").write_text(json.dumps(report, indent=2))
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
