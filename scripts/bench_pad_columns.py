"""Teacher scoring on mixed-length rollouts with and without the pad columns: full-width micro-batches in row
order (`trim=False`, as scoring ran until 2026-11-30) against micro-batches of rollouts of like length that leave
out the columns padded in every row (the default). Tokens scored per second, medians of --repeats, and whether
the two agree; writes RESULTS.json and a table:

    python scripts/bench_pad_columns.py --out bench_out/pad_columns
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def rollouts(rows: int, vocab: int, pad: int, seed: int):
    """Prompts of 8 .. 128 tokens (left-padded) and responses of 4 .. 256 (right-padded): a GSM8K-like spread."""
    import torch

    from tropd_ds.rollout import RolloutTokens

    g = torch.Generator().manual_seed(seed)
    prompt = torch.randint(8, 129, (rows,), generator=g).tolist()
    response = torch.randint(4, 257, (rows,), generator=g).tolist()
    start, width = max(prompt), max(prompt) + max(response)
    ids = torch.full((rows, width), pad)
    mask = torch.zeros(rows, width, dtype=torch.long)
    sampled = torch.zeros(rows, width - 1, dtype=torch.bool)
    for i, (p, r) in enumerate(zip(prompt, response)):
        ids[i, start - p : start + r] = torch.randint(3, vocab, (p + r,), generator=g)
        mask[i, start - p : start + r] = 1
        sampled[i, start - 1 : start - 1 + r] = True
    return RolloutTokens(ids, mask, sampled, torch.zeros_like(sampled))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=ROOT / "bench_out" / "pad_columns")
    p.add_argument("--rows", type=int, default=32)
    p.add_argument("--micro-batch", type=int, default=8)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--vocab", type=int, default=4096)
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args(argv)
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from tropd_ds.objectives import loss_fn
    from tropd_ds.scoring import TeacherScorer, score

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=4 * args.hidden,
                         num_hidden_layers=args.layers, num_attention_heads=4, max_position_embeddings=512)  # fmt: skip
    teacher = TeacherScorer(LlamaForCausalLM(config).eval(), args.vocab)
    tokens = rollouts(args.rows, args.vocab, 0, seed=1)
    options = loss_fn("tropd", k=16).step_options()
    scored = int(tokens.targets.sum())
    real = int(tokens.attention_mask.sum())
    results, outputs = {}, {}
    for name, trim in (("full width, row order (before)", False), ("like lengths, pad columns cut (now)", True)):
        times = []
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            outputs[name] = score(teacher, tokens, options, args.micro_batch, args.micro_batch, trim=trim)
            times.append(time.perf_counter() - t0)
        columns = sum(r.input_ids.numel() for r in tokens.micro_batches(args.micro_batch, trim)) if not trim else None
        median = statistics.median(times)
        results[name] = {"seconds": median, "spread_s": [min(times), max(times)],
                         "tokens_scored_per_s": scored / median, "positions_run": columns}  # fmt: skip
    (before, b), (now, a) = outputs.items()
    agree = all(torch.equal(x.ids, y.ids) and torch.allclose(x.target_logprob, y.target_logprob, atol=1e-5)
                for x, y in zip(b, a))  # fmt: skip
    rows_sorted = tokens.select(torch.argsort(tokens.attention_mask.sum(1), descending=True, stable=True))
    results[now]["positions_run"] = sum(r.input_ids.numel() for r in rows_sorted.micro_batches(args.micro_batch))
    report = {
        "command": "python scripts/bench_pad_columns.py " + " ".join(argv or sys.argv[1:]),
        "shapes": {
            "rows": args.rows,
            "micro_batch": args.micro_batch,
            "teacher": f"Llama {args.layers} layers, hidden {args.hidden}, vocab {args.vocab}",
            "real_positions": real,
            "targets": scored,
            "full_width": tokens.input_ids.shape[1],
        },  # fmt: skip
        "results": results,
        "same_results": agree,
        "speedup": results[before]["seconds"] / results[now]["seconds"],
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "RESULTS.json").write_text(json.dumps(report, indent=1))
    print("| scoring | positions run | s (median) | tokens scored / s |\n|---|---|---|---|")
    for name, r in results.items():
        print(f"| {name} | {r['positions_run']:,} | {r['seconds']:.3f} | {r['tokens_scored_per_s']:,.0f} |")
    print(f"{real:,} real positions; same results: {agree}; speed-up {report['speedup']:.2f}x")
    return 0 if agree else 1


if __name__ == "__main__":
    sys.exit(main())
