"""Mutation testing of the modules whose mistakes a training run would not show: the kernels' torch paths
and checks (tropd_kernels), the objectives, the rollout's masks and the config checks (`make mutation`).

mutmut (3.x) changes one operator, constant or call at a time and runs the fast tests that reach the
changed function; a mutant that no test fails "survives". It needs a flat tree (its copy of the sources goes
on sys.path as they are laid out, and this repository keeps tropd_kernels under kernels/), so this script
stages one under build/mutation/: tropd_ds/, tropd_kernels/, tests/, configs/ and a setup.cfg with the
[mutmut] section, runs mutmut there, and writes build/mutation/report.json and report.md (score, and every
survivor with its diff). Re-running continues where the last run stopped; --fresh starts over.

Survivors are listed in docs/TESTING.md, each killed by a test or argued equivalent.
"""

from __future__ import annotations

import argparse
import ast
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# What is mutated: file -> the top-level functions in scope, or None for all of them. The oracle is the tests'
# reference, not the code under test; the Triton kernels themselves (@triton.jit) are decorated, which
# mutmut leaves alone, and their launch wrappers run only in the interpreter, whose tests are not fast.
SCOPE: dict[str, list[str] | None] = {
    "tropd_kernels/backend.py": None,
    "tropd_kernels/contract.py": None,
    "tropd_kernels/projection.py": None,
    "tropd_kernels/topk_fkl.py": None,
    "tropd_kernels/vocab_pass_torch.py": None,
    "tropd_kernels/ops/token_terms.py": None,
    "tropd_kernels/ops/teacher_topk.py": None,
    "tropd_ds/objectives.py": None,
    # the padding of token rows and each row's teacher (the rest of data.py is file reading)
    "tropd_ds/data.py": ["left_pad", "teacher_routes"],
    # several teachers: each row's scores put back in its place, and each teacher's metrics
    "tropd_ds/scoring.py": ["score_rows", "merge_routed", "empty_topk"],
    "tropd_ds/update.py": ["teacher_metrics"],
    "tropd_ds/rollout.py": [  # the masks, the sampler and the guidance prefixes; not the engines' plumbing
        "end_token_ids",
        "response_keep",
        "_filter_top_p",
        "real_token_logits",
        "clean_generation_config",
        "sample",
        "max_prefix_len",
        "draw_prefix_len",
        "choose_prefixes",
        "teacher_responses",
        "rollout_metrics",
    ],
    "tropd_ds/config.py": None,
}
# Top-level functions left out of a file that is otherwise in scope: `tropd-ds config --list`'s text.
SKIP = {"tropd_ds/config.py": ["describe_fields", "_field_comments"]}

# The fast tests that exercise those modules in-process (no launcher, no interpreter-only Triton cases).
TESTS = [
    "tests/test_kernel_backend.py",
    "tests/test_kernel_contract.py",
    "tests/test_kernel_teacher_topk.py",
    "tests/test_kernel_token_terms.py",
    "tests/test_real_shapes.py",
    "tests/test_objectives.py",
    "tests/test_rollout.py",
    "tests/test_positions.py",
    "tests/test_bad_inputs.py",
    "tests/test_config_checks.py",
    "tests/test_config_docs.py",
    "tests/test_exact_refusals.py",
    "tests/test_several_teachers.py",
]
# Left out: the Triton interpreter's cases (minutes per mutant; the torch backend's cases check the same
# contract code) and the rehearsals (launches, whose child processes mutmut cannot see into).
SELECT = ["-m", "not rehearsal and not served", "-k", "not triton and not config_list_documents"]


def stage(dest: Path, fresh: bool) -> None:
    if fresh and dest.exists():
        shutil.rmtree(dest)
    dest.mkdir(parents=True, exist_ok=True)
    trees = {"tropd_ds": ROOT / "tropd_ds", "tropd_kernels": ROOT / "kernels" / "tropd_kernels"}
    trees |= {name: ROOT / name for name in ("tests", "configs", "ds_configs", "demo_assets", "scripts")}
    for name, src in trees.items():
        for file in src.rglob("*"):
            if file.is_file() and "__pycache__" not in file.parts:
                rel = f"{name}/{file.relative_to(src).as_posix()}"
                keep, skip = SCOPE.get(rel), SKIP.get(rel, [])
                data = file.read_bytes()
                if keep is not None or skip:
                    data = fenced(data.decode(), keep, skip).encode()
                target = dest / rel
                # only what changed is rewritten: mutmut re-tests the functions of files newer than its copy
                if not target.is_file() or target.read_bytes() != data:
                    target.parent.mkdir(parents=True, exist_ok=True)
                    target.write_bytes(data)
    cfg = [
        "[mutmut]",
        "source_paths =",
        "    tropd_ds",
        "    tropd_kernels",
        "only_mutate =",
        *(f"    {path}" for path in SCOPE),
        "also_copy =",
        "    configs",
        "    ds_configs",
        "    demo_assets",
        "    scripts",
        "pytest_add_cli_args_test_selection =",
        *(f"    {t}" for t in TESTS),
        "pytest_add_cli_args =",
        "    -p",
        "    no:cacheprovider",
        *(f"    {a}" for a in SELECT),
        "process_isolation = forkserver",
        # a mutant's CPU-time limit is (its tests' time + timeout_constant) x timeout_multiplier x 2, and the
        # tests' time leaves out fixtures (a tiny model is built in seconds): too tight a limit reports a
        # killed mutant where the fixture was only slow
        "timeout_multiplier = 5.0",
        "timeout_constant = 10.0",
        "use_git_change_detection = false",
        "",
    ]
    if not (dest / "setup.cfg").is_file() or (dest / "setup.cfg").read_text() != "\n".join(cfg):
        (dest / "setup.cfg").write_text("\n".join(cfg))


def fenced(source: str, keep: list[str] | None, skip: list[str]) -> str:
    """The source with each top-level function or class that is out of scope wrapped in mutmut's
    `# pragma: no mutate start` / `end`, so a plain `mutmut run` (which resumes) mutates only the scope."""
    lines = source.splitlines()
    tree = ast.parse("\n".join(lines))
    spans = []
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
            out = (keep is not None and node.name not in keep) or node.name in skip
            if out:
                first = min([node.lineno] + [d.lineno for d in node.decorator_list])
                spans.append((first, node.end_lineno))
    for first, last in reversed(spans):
        lines.insert(last, "# pragma: no mutate end")
        lines.insert(first - 1, "# pragma: no mutate start")
    return "\n".join(lines) + "\n"


def read_results(dest: Path) -> list[dict]:
    from mutmut.stats import status_by_exit_code

    rows = []
    for path in SCOPE:
        meta = dest / "mutants" / (path + ".meta")
        if not meta.exists():
            continue
        data = json.loads(meta.read_text())
        for key, code in data.get("exit_code_by_key", {}).items():
            status = status_by_exit_code[code]
            rows.append({"mutant": key, "file": path, "status": status})
    return rows


def describe(dest: Path, mutant: str) -> str:
    out = subprocess.run(
        [sys.executable, "-m", "mutmut", "show", mutant], cwd=dest, capture_output=True, text=True, check=False
    )
    return "\n".join(line for line in out.stdout.splitlines() if line.startswith(("+", "-", "@@")))


def report(dest: Path, elapsed: float) -> dict:
    rows = read_results(dest)
    counts: dict[str, int] = {}
    for r in rows:
        counts[r["status"]] = counts.get(r["status"], 0) + 1
    by_file: dict[str, dict[str, int]] = {}
    for r in rows:
        c = by_file.setdefault(r["file"], {})
        c[r["status"]] = c.get(r["status"], 0) + 1
    # a mutant no fast test reaches counts as not killed; "not checked" is one the run has not reached yet
    tested = sum(n for s, n in counts.items() if s not in ("not checked", "skipped"))
    killed = counts.get("killed", 0) + counts.get("timeout", 0)
    survivors = [r for r in rows if r["status"] not in ("killed", "timeout", "not checked", "skipped")]
    for r in survivors:
        r["diff"] = describe(dest, r["mutant"])
    result = {
        "mutants": len(rows),
        "counts": counts,
        "killed_fraction": killed / tested if tested else 0.0,
        "by_file": by_file,
        "survivors": survivors,
        "seconds": round(elapsed),
    }
    (dest / "report.json").write_text(json.dumps(result, indent=1))
    lines = [
        f"# Mutation testing: {killed} of {tested} mutants killed ({100 * result['killed_fraction']:.1f}%)",
        "",
        "| file | " + " | ".join(sorted(counts)) + " |",
        "|---|" + "---|" * len(counts),
    ]
    for path, c in by_file.items():
        lines.append(f"| {path} | " + " | ".join(str(c.get(s, 0)) for s in sorted(counts)) + " |")
    lines += ["", "## Survivors", ""]
    for r in survivors:
        lines += [f"### {r['mutant']} ({r['status']})", "", "```diff", r["diff"], "```", ""]
    (dest / "report.md").write_text("\n".join(lines))
    return result


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dir", type=Path, default=ROOT / "build" / "mutation", help="staging folder")
    p.add_argument("--fresh", action="store_true", help="discard earlier results and start over")
    p.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="mutants tested at once")
    p.add_argument("--report-only", action="store_true", help="rewrite the report from the last run")
    p.add_argument(
        "--retest-survivors", action="store_true", help="re-test the last run's survivors (after adding tests)"
    )
    p.add_argument("mutants", nargs="*", help="mutmut name globs to re-test (after a change of tests)")
    args = p.parse_args(argv)
    try:
        import mutmut  # noqa: F401
    except ImportError:
        sys.exit("mutation testing needs mutmut: pip install -e '.[mutation]'")
    dest = args.dir.resolve()
    start = time.time()
    if not args.report_only:
        stage(dest, args.fresh)
        env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
        names = list(args.mutants)
        if args.retest_survivors:
            names += [r["mutant"] for r in read_results(dest) if r["status"] in ("survived", "no tests")]
            if not names:
                print("no survivors to re-test")
                return 0
        cmd = [sys.executable, "-m", "mutmut", "run", "--max-children", str(args.jobs), *names]
        print("+", " ".join(cmd), f"(in {dest})", flush=True)
        rc = subprocess.run(cmd, cwd=dest, env=env, check=False).returncode
        if rc:
            print(f"mutmut ended with exit code {rc}", file=sys.stderr)
            return rc
    result = report(dest, time.time() - start)
    print(f"{dest / 'report.md'}: {result['counts']}, killed {100 * result['killed_fraction']:.1f}%")
    return 0


if __name__ == "__main__":
    sys.exit(main())
