"""The rollout's decode loop, timed per token: `GenerateRollout` on a Llama-shaped model with random weights
(built from a config, nothing downloaded), every row decoding its whole budget, in four settings:

- `dynamic, ask every token`: transformers' DynamicCache (the cache copied at every token by torch.cat) and
  a host sync per token, as the loop ran until 2026-11-30;
- `dynamic, ask every 16`, `preallocated, ask every token`: one change each;
- `preallocated, ask every 16`: both, the default on CUDA (on a CPU the default asks every token, where a
  question costs nothing).

Per setting: the median over --repeats of the decode's seconds per token (the prefill timed apart and
left out), and the host-side milliseconds per layer per token at one row, the planner's
`decode_host_ms_per_layer` (`tropd-ds plan --decode-host-ms-per-layer`), measured where a GPU makes the host
the bound. The tokens of every setting are compared with the first's (same seed; a difference is flagged,
not fatal: the timings stand). Writes RESULTS.json and RESULTS.md:

    python scripts/bench_rollout.py --out bench_out/rollout                     # CPU: a small model
    python scripts/bench_rollout.py --preset gpu --out bench_out/rollout        # CUDA: 8B-like layers, bf16
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# (hidden, layers, heads, kv heads, intermediate, vocab, rows, prompt tokens, new tokens, dtype)
PRESETS = {
    "cpu": dict(
        hidden=256,
        layers=4,
        heads=4,
        kv_heads=2,
        intermediate=1024,
        vocab=4096,
        rows=8,
        prompt=1024,
        new_tokens=128,
        dtype="float32",
    ),
    # Llama-3.1-8B's layer shapes, 8 of its 32 layers (the whole model would not change the per-layer figures)
    "gpu": dict(
        hidden=4096,
        layers=8,
        heads=32,
        kv_heads=8,
        intermediate=14336,
        vocab=128256,
        rows=16,
        prompt=1024,
        new_tokens=512,
        dtype="bfloat16",
    ),  # fmt: skip
}
SETTINGS = (  # (name, preallocate, check_every)
    ("dynamic, ask every token", False, 1),
    ("dynamic, ask every 16", False, 16),
    ("preallocated, ask every token", True, 1),
    ("preallocated, ask every 16", True, 16),
)


def positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text}: expected an integer >= 1")
    return value


def build(shape: dict, device, dtype):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=shape["vocab"], hidden_size=shape["hidden"], intermediate_size=shape["intermediate"],
        num_hidden_layers=shape["layers"], num_attention_heads=shape["heads"], num_key_value_heads=shape["kv_heads"],
        max_position_embeddings=shape["prompt"] + shape["new_tokens"] + 8, attn_implementation="sdpa",
    )  # fmt: skip
    with torch.device(device):
        lm = LlamaForCausalLM(config)
    return lm.to(dtype).eval()


def decode_seconds(lm, rows: int, prompt: int, new_tokens: int, preallocate: bool, every: int, seed: int):
    """(seconds of the whole generate, of its prefill alone, the tokens) for `rows` rows of `prompt` random
    tokens, each decoding `new_tokens` (no end token can stop it)."""
    import torch
    from deepspeed.runtime.rollout import RolloutRequest, SamplingConfig

    from tropd_ds.rollout import GenerateRollout

    device = next(lm.parameters()).device
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, lm.config.vocab_size, (rows, prompt), generator=g).to(device)
    mask = torch.ones_like(ids)
    engine = GenerateRollout(lm, pad_id=0, end_ids=(), gather=False, check_every=every, preallocate=preallocate)
    request = RolloutRequest(prompt_ids=ids, prompt_attention_mask=mask)
    sampling = SamplingConfig(max_new_tokens=new_tokens, temperature=1.0)

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    with torch.no_grad():  # the prefill alone, for its share of the time
        sync()
        t0 = time.perf_counter()
        lm(input_ids=ids, attention_mask=mask, use_cache=True, logits_to_keep=1)
        sync()
        prefill = time.perf_counter() - t0
    torch.manual_seed(seed)
    sync()
    t0 = time.perf_counter()
    out = engine.generate(request, sampling)
    sync()
    return time.perf_counter() - t0, prefill, out.input_ids[:, prompt:].cpu()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", choices=sorted(PRESETS), default=None, help="default: gpu on CUDA, else cpu")
    for key in ("hidden", "layers", "heads", "kv_heads", "intermediate", "vocab", "rows", "prompt", "new_tokens"):
        p.add_argument("--" + key.replace("_", "-"), type=positive, default=None, help="override the preset")
    p.add_argument("--repeats", type=positive, default=3)
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    p.add_argument("--out", type=Path, default=ROOT / "bench_out" / "rollout")
    args = p.parse_args(argv)
    import torch

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        p.error(f"--device {args.device}: torch sees no CUDA device on this machine (accepted: cpu)")
    preset = args.preset or ("gpu" if device.type == "cuda" else "cpu")
    shape = dict(PRESETS[preset])
    shape.update({k: v for k, v in vars(args).items() if k in shape and v is not None})
    if shape["heads"] % shape["kv_heads"] or shape["hidden"] % shape["heads"]:
        p.error(
            f"--heads {shape['heads']}, --kv-heads {shape['kv_heads']}, --hidden {shape['hidden']}: expected heads "
            "divisible by kv heads and hidden by heads"
        )
    dtype = getattr(torch, shape["dtype"])
    if device.type == "cpu" and dtype != torch.float32:
        dtype = torch.float32
        shape["dtype"] = "float32"
    lm = build(shape, device, dtype)
    rows, prompt, new = shape["rows"], shape["prompt"], shape["new_tokens"]
    decode_seconds(lm, rows, prompt, min(new, 16), True, 1, seed=0)  # warm-up: kernels, allocator
    # the settings take turns within each repeat, so that a machine's drift (a neighbour, the clock) falls on
    # all of them alike
    per_token, host, prefills, tokens = ({name: [] for name, _, _ in SETTINGS} for _ in range(4))
    for r in range(args.repeats):
        for name, preallocate, every in SETTINGS:
            total, prefill, out = decode_seconds(lm, rows, prompt, new, preallocate, every, seed=r)
            per_token[name].append((total - prefill) / new)
            prefills[name].append(prefill)
            tokens[name].append(out)
            one, one_prefill, _ = decode_seconds(lm, 1, prompt, new, preallocate, every, seed=r)
            host[name].append((one - one_prefill) / new / shape["layers"])
        print(f"repeat {r + 1}/{args.repeats}: " + ", ".join(f"{n} {1e3 * per_token[n][-1]:.2f}" for n in per_token))
    first = SETTINGS[0][0]
    results = []
    for name, preallocate, every in SETTINGS:
        same = all(torch.equal(a, b) for a, b in zip(tokens[name], tokens[first]))
        results.append(
            dict(
                setting=name,
                preallocate=preallocate,
                check_every=every,
                ms_per_token=round(1e3 * statistics.median(per_token[name]), 3),
                ms_per_token_range=[round(1e3 * min(per_token[name]), 3), round(1e3 * max(per_token[name]), 3)],
                ms_per_layer_per_token_at_one_row=round(1e3 * statistics.median(host[name]), 4),
                prefill_s=round(statistics.median(prefills[name]), 4),
                same_tokens_as_first=same,
            )  # fmt: skip
        )
    base = results[0]["ms_per_token"]
    for r in results:
        r["speedup_vs_first"] = round(base / r["ms_per_token"], 3) if r["ms_per_token"] else None
    info = dict(
        device=torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({torch.get_num_threads()} "
        "threads)", torch=torch.__version__, preset=preset, shape=shape, repeats=args.repeats,
        command=" ".join([Path(sys.argv[0]).name, *(argv if argv is not None else sys.argv[1:])]),
    )  # fmt: skip
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "RESULTS.json").write_text(json.dumps({**info, "rows": results}, indent=1))
    lines = [
        f"Decode on {info['device']}, torch {info['torch']}: {shape['layers']} Llama layers (d {shape['hidden']}, "
        f"{shape['heads']} heads / {shape['kv_heads']} KV, V {shape['vocab']}), {shape['dtype']}, {rows} rows x "
        f"{prompt} prompt + {new} new tokens; medians of {args.repeats}",
        "",
        "| setting | ms per token (range) | x vs first | host ms per layer per token, 1 row | same tokens |",
        "|---|---|---|---|---|",
    ]
    for r in results:
        lo, hi = r["ms_per_token_range"]
        lines.append(
            f"| {r['setting']} | {r['ms_per_token']} ({lo}-{hi}) | {r['speedup_vs_first']} | "
            f"{r['ms_per_layer_per_token_at_one_row']} | {'yes' if r['same_tokens_as_first'] else 'NO'} |"
        )
    (args.out / "RESULTS.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    if not all(r["same_tokens_as_first"] for r in results):  # timings stand; the tests pin exactness on CPU
        print("warning: a setting drew other tokens than the first (see 'same tokens'): the caches or the kernels "
              "attention chose differ numerically on this device", flush=True)  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
