#!/usr/bin/env python
"""Build the demo's data, tokenizer, teacher and student deterministically (CPU, a few minutes).

    python scripts/build_demo_models.py --out demo_assets

writes train.jsonl / eval.jsonl (disjoint), teacher/ (Llama 256 x 4 layers, supervised on worked
solutions until it is accurate) and student/ (Llama 128 x 2 layers, a brief supervised start in
the same format: weak on purpose), each a Hugging Face folder with model.safetensors, plus
build_report.json with held-out accuracies and the step-0 teacher/student mismatch.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import time
from pathlib import Path

import torch

from tropd_ds.demo_models import build_llama
from tropd_ds.demo_task import build_tokenizer, write_splits
from tropd_ds.evaluation import is_correct

TEACHER = dict(hidden=256, layers=4, heads=4, mlp=1024)
STUDENT = dict(hidden=128, layers=2, heads=4, mlp=512)


def encode_pairs(tok, rows):
    out = []
    for r in rows:
        p = tok(r["prompt"], add_special_tokens=False)["input_ids"]
        y = tok(r["teacher_response"], add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        out.append((p, y))
    return out


def sft_batch(pairs, pad_id):
    width = max(len(p) + len(y) for p, y in pairs)
    ids = torch.full((len(pairs), width), pad_id)
    labels = torch.full((len(pairs), width), -100)
    attn = torch.zeros((len(pairs), width), dtype=torch.long)
    for i, (p, y) in enumerate(pairs):
        seq = p + y
        ids[i, : len(seq)] = torch.tensor(seq)
        labels[i, len(p) : len(seq)] = torch.tensor(y)
        attn[i, : len(seq)] = 1
    return ids, attn, labels


def train_sft(model, pairs, steps, batch, lr, seed, bf16, label):
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.98), weight_decay=0.0)
    warm = min(50, steps // 4)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt,
        lambda s: (
            (s + 1) / warm
            if s < warm
            else 0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * (s - warm) / max(1, steps - warm)))
        ),
    )
    rng = random.Random(seed)
    model.train()
    start = time.time()
    for step in range(steps):
        ids, attn, labels = sft_batch(rng.sample(pairs, batch), model.config.pad_token_id)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss = model(input_ids=ids, attention_mask=attn, labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad()
        if (step + 1) % 50 == 0 or step + 1 == steps:
            print(f"[{label}] step {step + 1}/{steps} loss {loss.item():.4f} ({time.time() - start:.0f} s)", flush=True)
    model.eval()


@torch.no_grad()
def accuracy(model, tok, rows, max_new_tokens=48):
    correct = 0
    for start in range(0, len(rows), 100):
        chunk = rows[start : start + 100]
        enc = tok([r["prompt"] for r in chunk], return_tensors="pt", padding=True, add_special_tokens=False)
        out = model.generate(
            **enc,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=tok.pad_token_id,
            eos_token_id=tok.eos_token_id,
        )
        texts = tok.batch_decode(out[:, enc["input_ids"].shape[1] :], skip_special_tokens=True)
        correct += sum(is_correct(t, r["answer"]) for t, r in zip(texts, chunk))
    return correct / len(rows)


@torch.no_grad()
def mismatch(student, teacher, tok, rows, seed=0):
    """Student samples at temperature 1; r = lp_T - lp_S on its tokens: mean, p1, p10, trust fraction."""
    torch.manual_seed(seed)
    enc = tok([r["prompt"] for r in rows], return_tensors="pt", padding=True, add_special_tokens=False)
    out = student.generate(
        **enc,
        max_new_tokens=48,
        do_sample=True,
        temperature=1.0,
        top_k=0,
        pad_token_id=tok.pad_token_id,
        eos_token_id=tok.eos_token_id,
    )
    width = enc["input_ids"].shape[1]
    attn = torch.cat([enc["attention_mask"], torch.ones_like(out[:, width:])], 1)
    resp = out[:, width:]
    after_eos = (resp == tok.eos_token_id).cumsum(1) - (resp == tok.eos_token_id).long() > 0
    attn[:, width:] = (~after_eos & (resp != tok.pad_token_id)).long()
    lps = []
    for m in (teacher, student):
        logp = torch.log_softmax(m(input_ids=out, attention_mask=attn).logits[:, :-1].float(), -1)
        lps.append(logp.gather(2, out[:, 1:, None]).squeeze(2))
    mask = attn[:, 1:].bool()
    mask[:, : width - 1] = False
    r = (lps[0] - lps[1])[mask]
    q = torch.quantile(r, torch.tensor([0.01, 0.10]))
    return {
        "mean": float(r.mean()),
        "p1": float(q[0]),
        "p10": float(q[1]),
        "trust_fraction": float(torch.exp(r.clamp(max=0)).mean()),
        "frac_below_minus3": float((r < -3).float().mean()),
        "tokens": int(mask.sum()),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path("demo_assets"))
    ap.add_argument("--teacher-steps", type=int, default=300)
    ap.add_argument("--student-steps", type=int, default=80)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    torch.set_num_threads(2)
    torch.manual_seed(args.seed)
    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    train_path, eval_path = write_splits(out, n_train=20000, n_eval=500, seed=args.seed)
    tok = build_tokenizer()
    train_rows = [json.loads(x) for x in train_path.read_text().splitlines()]
    eval_rows = [json.loads(x) for x in eval_path.read_text().splitlines()]
    pairs = encode_pairs(tok, train_rows)

    teacher = build_llama(out / "teacher", tok, **TEACHER, seed=args.seed + 1)
    train_sft(teacher, pairs, args.teacher_steps, 128, 2e-3, args.seed, True, "teacher")
    student = build_llama(out / "student", tok, **STUDENT, seed=args.seed + 2)
    train_sft(student, pairs, args.student_steps, 128, 2e-3, args.seed + 1, False, "student")
    for name, model in (("teacher", teacher), ("student", student)):
        model.to(torch.bfloat16).save_pretrained(out / name, safe_serialization=True)  # bf16 on disk: small to ship
        model.float()
        tok.save_pretrained(out / name)
    report = {
        "teacher_params": sum(p.numel() for p in teacher.parameters()),
        "student_params": sum(p.numel() for p in student.parameters()),
        "teacher_accuracy": accuracy(teacher.to(torch.bfloat16).float(), tok, eval_rows),
        "student_accuracy": accuracy(student.to(torch.bfloat16).float(), tok, eval_rows),
        "step0_mismatch": mismatch(student, teacher, tok, eval_rows[:200]),
        "teacher_steps": args.teacher_steps,
        "student_steps": args.student_steps,
        "seed": args.seed,
    }
    (out / "build_report.json").write_text(json.dumps(report, indent=2))
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
