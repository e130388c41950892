"""The Triton kernels compile for the GPUs the package runs on, without a GPU: every variant the launchers
in tropd_kernels.vocab_pass_triton make (dtypes bf16 / fp16 / fp32, the block sizes they pick, the
vocabulary widths of real models, the k of the objectives) goes through Triton's whole pipeline down to a
cubin for sm_80 (A100) and sm_90 (H100/H200) with the ptxas Triton ships. The test fails on a compile
error, on a register spill or any stack frame (ptxas -v), and on a kernel that could not load on the
target (shared memory, registers for its threads).

The compiling runs in a child process with a fresh Triton cache (nothing is reused from an earlier run)
and without TRITON_INTERPRET, which conftest.py sets on machines without CUDA: under it `triton.jit` makes
interpreted functions, which do not compile. Variants are deduplicated by what Triton compiles: the
signature, the argument specialisations (an int divisible by 16 or equal to 1, a 16-byte aligned pointer),
the constexprs and the options. Widths and k that give the same launch compile to the same cubin and are
compiled once; each result lists all the cases it stands for. The specialisations come from Triton's own
launch path (its binder `create_function_from_signature` and `JITFunction._pack_args`, Triton 3.9 internals a
Triton upgrade may move), so they are those of a real launch; the per-kernel ptxas -v report is the one
Triton prints with knobs.nvidia.dump_ptxas_log.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# Part of rehearsing a first GPU run (`make rehearse`, run by CI after `make test`): 20 s of ptxas.
pytestmark = pytest.mark.rehearsal

TARGETS = (80, 90)  # compute capabilities: sm_80 (A100), sm_90 (H100, H200; Triton emits sm_90a)
DTYPES = ("bfloat16", "float16", "float32")
# (vocabulary width the kernels see, row stride of the logits in elements): the _from_hidden ops pass fresh
# contiguous fp32 logits [chunk, V]; the logits ops pass the caller's logits (rows 16-byte aligned here: a
# view such as logits[1:] whose first row is not would specialise x_ptr once more, and is not compiled).
WIDTHS = {
    "llama3.1": (128256, 128256),
    "qwen2.5-tokenizer": (151665, 151665),  # a caller's own logits cut to the tokenizer's width, contiguous
    "qwen2.5-padded": (152064, 152064),
    # the package's own case: the _from_hidden ops project the whole padded head and reduce its first 151,665
    # columns (vocab=n_tokens), rows keeping the head's stride
    "qwen2.5-tokenizer-of-padded-logits": (151665, 152064),
    "mistral-v0.3": (32768, 32768),
    "gemma2": (256000, 256000),
    "odd-3001": (3001, 3001),
    "demo-18": (18, 18),  # configs/demo.yaml's tokenizer: the only width under one block
}
# The teacher's k (the student's backward gathers k + 1 columns: the teacher's ids, then the target):
# 1 for the objectives without a top-k term, 18 configs/demo.yaml, 64 configs/presets, 16 / 32 / 128
# the README and the k ablation's neighbours; 63 stands for the k a k -> k_end schedule passes through
# where k + 1 is a multiple of 16 (Triton specialises that int).
KS = (1, 16, 18, 32, 63, 64, 128)

SHARED_LIMIT = {80: 166912, 90: 232448}  # opt-in shared memory per block: 163 KiB (A100), 227 KiB (H100)
REGISTERS_PER_BLOCK = 65536
STACK_RE = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
REGS_RE = re.compile(r"Used (\d+) registers")


# ----------------------------------------------------------------------------- the child: compile


def launches():
    """(kernel, positional args, launch kwargs, case) of every launch the package makes on a GPU; pointers
    are Triton's MockTensor (a dtype, an aligned data_ptr) so that Triton's own binder specialises them."""
    import torch
    from triton.runtime.jit import MockTensor
    from tropd_kernels import vocab_pass_triton as vp

    f32, i64 = MockTensor(torch.float32), MockTensor(torch.int64)
    for dtype_name in DTYPES:
        dtype = getattr(torch, dtype_name)
        for width, (vocab, stride) in WIDTHS.items():
            x = MockTensor(dtype)
            # forward(): logits, stride, vocab, temperature, lse (fp32), entropy (fp32)
            yield "_forward_kernel", (x, stride, vocab, 1.0, f32, f32), vp.forward_launch(vocab, True), width
            # backward() on CUDA writes the gradient in the logits' dtype: into a fresh contiguous tensor (the
            # logits ops: row stride = vocab) or over the fp32 logits themselves (the _from_hidden ops: the
            # head's stride).
            grad = MockTensor(dtype)
            for k in KS:
                if k > vocab:
                    continue
                g = k + 1
                for stride_g in sorted({vocab, stride}):
                    args = (x, stride, grad, stride_g, vocab, 1.0, f32, f32, i64, f32, g)
                    yield "_backward_kernel", args, vp.backward_launch(vocab, g, dtype, True), f"{width} k={k}"


def compile_all(arch: int) -> dict:
    """Compile every distinct launch for sm_`arch`; one record per variant."""
    import contextlib
    import io

    import triton
    from triton import knobs
    from triton.backends import backends
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, make_backend
    from triton.runtime.jit import create_function_from_signature
    from tropd_kernels import vocab_pass_triton as vp

    if "nvidia" not in backends:
        raise SystemExit(f"triton {triton.__version__} has no nvidia backend (backends: {sorted(backends)})")
    from triton.backends.nvidia.compiler import get_ptxas

    knobs.nvidia.dump_ptxas_log = True  # Triton prints ptxas -v's report after each cubin
    knobs.compilation.always_compile = True
    try:
        ptxas = get_ptxas(arch).path
    except Exception as exc:  # any failure to find ptxas is the same finding
        raise SystemExit(f"triton {triton.__version__}: no ptxas for sm_{arch}: {exc!r}") from exc
    out = {"triton": triton.__version__, "ptxas": ptxas, "variants": []}
    target = GPUTarget("cuda", arch, 32)
    backend = make_backend(target)
    binders, seen = {}, {}
    for name, args, launch, case in launches():
        fn = getattr(vp, name)
        if name not in binders:
            binders[name] = create_function_from_signature(fn.signature, fn.params, backend)
        bound, spec, opts = binders[name](*args, **launch)
        options, signature, constexprs, attrs = fn._pack_args(backend, dict(launch), bound, spec, opts)
        key = json.dumps(
            [
                name,
                signature,
                sorted(map(str, constexprs.items())),
                sorted(map(str, attrs.items())),
                sorted(options.__dict__.items(), key=str),
            ],
            default=str,
        )
        if key in seen:
            seen[key]["cases"].append(case)
            continue
        rec = {
            "arch": arch,
            "kernel": name,
            "dtype": str(args[0].dtype).removeprefix("torch."),
            "launch": dict(launch),
            "signature": signature,
            "divisible_by_16": [fn.arg_names[i] for (i,), a in attrs.items() if a],
            "cases": [case],
        }
        seen[key] = rec
        out["variants"].append(rec)
        log = io.StringIO()
        t0 = time.perf_counter()
        try:
            with contextlib.redirect_stdout(log):
                kernel = triton.compile(
                    ASTSource(fn, signature, constexprs, attrs), target=target, options=options.__dict__
                )
        except Exception as exc:  # reported per variant, the test fails on it
            rec["error"] = f"{type(exc).__name__}: {exc}"[-4000:]
            continue
        finally:
            rec["seconds"] = round(time.perf_counter() - t0, 3)
        report = log.getvalue()
        stack, regs = STACK_RE.findall(report), REGS_RE.findall(report)
        if len(stack) != 1 or len(regs) != 1:
            rec["error"] = f"expected one ptxas -v report for {name}, got:\n{report}"
            continue
        rec["stack_frame"], rec["spill_stores"], rec["spill_loads"] = map(int, stack[0])
        rec["registers"] = int(regs[0])
        rec["ptx_local"] = bool(re.search(r"\.local\b|__local_depot", kernel.asm["ptx"]))
        rec["global_access"] = global_access(kernel.asm["ptx"])
        rec["shared"] = kernel.metadata.shared
        rec["num_warps"] = kernel.metadata.num_warps
        rec["cubin_bytes"] = len(kernel.asm["cubin"])
    return out


GLOBAL_RE = re.compile(r"\b(ld|st)\.global(?:\.[a-z]+)*?(\.v[248])?\.[bfsu](?:8|16|32|64)\b")


def global_access(ptx: str) -> dict:
    """Counts of the PTX's global loads and stores, vector (.v2/.v4: several elements per instruction) or
    scalar. The main loop's loads are vector only where the compiler can prove the addresses aligned and the
    accesses unmasked (or masked in whole vectors)."""
    counts = {"ld_vector": 0, "ld_scalar": 0, "st_vector": 0, "st_scalar": 0}
    for op, vec in GLOBAL_RE.findall(ptx):
        counts[f"{op}_{'vector' if vec else 'scalar'}"] += 1
    return counts


# ----------------------------------------------------------------------------- the test


def problems(rec: dict) -> list[str]:
    if "error" in rec:
        return [rec["error"]]
    found = []
    for key in ("stack_frame", "spill_stores", "spill_loads"):
        if rec[key]:
            found.append(f"{rec[key]} bytes {key.replace('_', ' ')}")
    if rec["ptx_local"]:
        found.append("local memory in the PTX")
    if rec["num_warps"] != rec["launch"]["num_warps"]:
        found.append(f"compiled with num_warps={rec['num_warps']}, launched with {rec['launch']['num_warps']}")
    if rec["shared"] > SHARED_LIMIT[rec["arch"]]:
        found.append(f"{rec['shared']} bytes of shared memory, over sm_{rec['arch']}'s {SHARED_LIMIT[rec['arch']]}")
    threads = rec["num_warps"] * 32
    if rec["registers"] * threads > REGISTERS_PER_BLOCK:
        found.append(f"{rec['registers']} registers x {threads} threads exceed {REGISTERS_PER_BLOCK} per block")
    return found


@pytest.fixture(scope="module")
def compiled(tmp_path_factory):
    if importlib.util.find_spec("triton") is None:
        pytest.skip("triton is not installed (setup.py installs it on Linux only)")
    tmp = tmp_path_factory.mktemp("kernel_compile")
    env = {k: v for k, v in os.environ.items() if not k.startswith("TRITON_")}  # no interpreter, shipped ptxas
    env["TRITON_CACHE_DIR"] = str(tmp / "cache")
    t0 = time.perf_counter()
    # One child per target, side by side (two CPU cores halve the time; the variants are the same).
    children = {
        arch: subprocess.Popen(
            [sys.executable, __file__, str(tmp / f"sm_{arch}.json"), str(arch)],
            cwd=ROOT,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for arch in TARGETS
    }
    out = {"variants": []}
    try:
        for arch, child in children.items():
            stdout, stderr = child.communicate(timeout=900)
            assert child.returncode == 0, f"compiling for sm_{arch} failed:\n{stdout[-3000:]}\n{stderr[-6000:]}"
            part = json.loads((tmp / f"sm_{arch}.json").read_text())
            out["triton"] = part["triton"]
            out["variants"] += part["variants"]
    finally:
        for child in children.values():
            if child.poll() is None:
                child.kill()
                child.communicate()
    out["wall_seconds"] = time.perf_counter() - t0
    return out


def test_every_launched_variant_compiles_for_sm80_and_sm90_without_spills(compiled):
    variants = compiled["variants"]
    lines = [f"triton {compiled['triton']}, {len(variants)} variants in {compiled['wall_seconds']:.1f} s"]
    for arch in TARGETS:
        ok = [r for r in variants if r["arch"] == arch and "error" not in r]
        if ok:
            lines.append(
                f"sm_{arch}: max {max(r['registers'] for r in ok)} registers, "
                f"{max(r['spill_stores'] + r['spill_loads'] for r in ok)} bytes spilled, "
                f"{max(r['stack_frame'] for r in ok)} bytes stack, {max(r['shared'] for r in ok)} bytes shared"
            )
    print("\n".join(lines))
    bad = []
    for rec in variants:
        for p in problems(rec):
            bad.append(
                f"sm_{rec['arch']} {rec['kernel']} {rec['dtype']} {rec['launch']} {rec['signature']} "
                f"16-divisible {rec['divisible_by_16']} ({', '.join(rec['cases'])}): {p}"
            )
    shown = "\n".join(bad[:20]) + (f"\n... and {len(bad) - 20} more" if len(bad) > 20 else "")
    assert not bad, f"{len(bad)} of {len(variants)} variants fail:\n{shown}"


def test_the_main_loops_load_and_store_whole_vectors_where_the_rows_are_aligned(compiled):
    """Rows whose stride is a multiple of 16 elements (every real model's lm_head rows; for Qwen2.5 the
    padded head's 152,064, of which the kernels read the tokenizer's 151,665) get vector loads in both
    kernels' main loops, and vector stores of the gradient where its rows are aligned too. The loops run the
    full blocks unmasked and mask only the tail: a mask `offs < vocab` over every block with an odd vocab
    (151,665) made every load scalar, checked. Rows of an odd stride (a caller's contiguous 151,665-wide
    logits) cannot be vector loads; they are not asserted."""
    checked = 0
    for rec in compiled["variants"]:
        aligned = "stride_x" in rec["divisible_by_16"] and rec["launch"]["BLOCK"] >= 128
        if "error" in rec or not aligned:
            continue
        access, name = rec["global_access"], f"sm_{rec['arch']} {rec['kernel']} {rec['dtype']} {rec['cases']}"
        assert access["ld_vector"] >= 1, f"{name}: no vector load ({access})"
        if rec["kernel"] == "_backward_kernel" and "stride_g" in rec["divisible_by_16"]:
            assert access["st_vector"] >= 1, f"{name}: no vector store ({access})"
        checked += 1
    cases = {c for r in compiled["variants"] if "stride_x" in r["divisible_by_16"] for c in r["cases"]}
    assert "qwen2.5-tokenizer-of-padded-logits" in cases and checked >= 4 * len(DTYPES), checked


def test_the_variants_cover_every_kernel_dtype_and_launch_choice(compiled):
    """The set is what the launchers pick: both kernels, all dtypes, each block size, GP and READ_BACK."""
    import torch
    from tropd_kernels import vocab_pass_triton as vp

    got = {(r["arch"], r["kernel"], r["dtype"], json.dumps(r["launch"], sort_keys=True)) for r in compiled["variants"]}
    want = set()
    for arch in TARGETS:
        for dtype in DTYPES:
            for vocab, _ in WIDTHS.values():
                want.add((arch, "_forward_kernel", dtype, json.dumps(vp.forward_launch(vocab, True), sort_keys=True)))
                for k in KS:
                    if k <= vocab:
                        launch = vp.backward_launch(vocab, k + 1, getattr(torch, dtype), True)
                        want.add((arch, "_backward_kernel", dtype, json.dumps(launch, sort_keys=True)))
    assert got == want
    blocks = {json.loads(w[3])["BLOCK"] for w in want}
    assert blocks == {32, 4096}, blocks  # the demo's 18 tokens, every real vocabulary


def test_the_compiled_arguments_are_the_launchers(monkeypatch):
    """launches() passes what forward() and backward() pass: the same argument kinds, pointer dtypes and ints,
    and the launch options of forward_launch / backward_launch (recorded here on CPU tensors)."""
    import torch
    from tropd_kernels import vocab_pass_triton as vp

    calls = {}

    class Recorder:
        def __init__(self, name):
            self.name = name

        def __getitem__(self, grid):
            return lambda *args, **kwargs: calls.setdefault(self.name, (args, kwargs))

    monkeypatch.setattr(vp, "_forward_kernel", Recorder("_forward_kernel"))
    monkeypatch.setattr(vp, "_backward_kernel", Recorder("_backward_kernel"))
    vocab, k = WIDTHS["odd-3001"][0], 16
    logits = torch.randn(3, vocab)
    ids = torch.randint(vocab, (3, k + 1))
    lse = vp.forward(logits, ids, 1.0)[0]
    vp.backward(logits, lse, ids, torch.ones(3), torch.ones(3, k + 1), 1.0)

    def kind(a):
        return str(a.dtype) if hasattr(a, "data_ptr") else a if isinstance(a, int) else type(a).__name__

    mocks = {(name, case): (args, launch) for name, args, launch, case in launches() if args[0].dtype == torch.float32}
    for name, case, cpu_launch in (
        ("_forward_kernel", "odd-3001", vp.forward_launch(vocab, False)),
        ("_backward_kernel", f"odd-3001 k={k}", vp.backward_launch(vocab, k + 1, torch.float32, False)),
    ):
        args, launch = mocks[name, case]
        got_args, got_kwargs = calls[name]
        assert [kind(a) for a in args] == [kind(a) for a in got_args], name
        assert got_kwargs == cpu_launch and launch.keys() == cpu_launch.keys(), name


if __name__ == "__main__":
    Path(sys.argv[1]).write_text(json.dumps(compile_all(int(sys.argv[2])), indent=1))
