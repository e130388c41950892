"""The distillation run: `deepspeed [--num_gpus N] -m tropd_ds.train --config run.yaml [--set k=v ...]`.

Each step: rollout (the student samples, after a teacher prefix when guided), teacher scoring
(TeacherTopK per response token), student update (kernels, objective, backward, step), then
metrics, evaluation and checkpoints on schedule.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import random
import signal
import sys
import threading
import time
from pathlib import Path

import torch
import torch.distributed as dist

from .config import ConfigError, RunConfig, load_config, to_dict


def parse_args(argv=None):
    ap = argparse.ArgumentParser(prog="tropd-ds train", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", required=False, help="YAML or JSON run config")
    ap.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE", help="override a config field, e.g. --set objective.name=opd (repeatable)"
    )
    ap.add_argument("--dry-run", action="store_true", help="check the config on the meta device (no weights, no engines) and exit")
    ap.add_argument("--world-size", type=int, default=None, help="ranks the dry run plans for (default: WORLD_SIZE, or 1)")
    ap.add_argument("--gpu-mem", type=float, default=80.0, help="GiB per GPU for the dry run's memory plan")
    ap.add_argument("--local_rank", "--local-rank", type=int, default=int(os.environ.get("LOCAL_RANK", 0)), help=argparse.SUPPRESS)
    return ap.parse_args(argv)


def log(rank: int, msg: str) -> None:
    if rank == 0:
        print(f"[tropd-ds] {msg}", flush=True)


def validate_before_engines(cfg: RunConfig, world: int | None = None, dry_run: bool = False):
    """Everything that can be checked without a device: files, columns, rows, vocabulary, batch shapes.

    With `dry_run`, model folders may hold only config.json (no weights, no tokenizer): the
    vocabulary then comes from the configs and the tokenizer is None."""
    from .data import load_rows
    from .models import check_logit_transforms, load_tokenizers_and_check, vocab_from_configs
    from .objectives import loss_fn

    if dry_run and not all(has_tokenizer(m.path) for m in (cfg.student, cfg.teacher)):
        tokenizer, n_tokens = None, vocab_from_configs(cfg.student, cfg.teacher)
    else:
        tokenizer, n_tokens = load_tokenizers_and_check(cfg.student, cfg.teacher, weights=not dry_run)
    check_logit_transforms(cfg.student.path, "student")
    check_logit_transforms(cfg.teacher.path, "teacher")
    train_rows = load_rows(cfg.data.path, cfg.data.split, "data.path")
    eval_rows = load_rows(cfg.data.eval_path, cfg.data.split, "data.eval_path") if cfg.data.eval_path else None
    if eval_rows is not None and "answer" not in eval_rows.column_names:
        raise ConfigError(f"data.eval_path={cfg.data.eval_path!r} has columns {eval_rows.column_names}: evaluation needs an 'answer' column")
    try:
        objective = loss_fn(cfg.objective.name, **cfg.objective.options)
    except ValueError as exc:
        raise ConfigError(f"objective: {exc}") from exc
    if objective.ppo_clip is not None:
        raise ConfigError(
            f"objective.options.ppo_clip={objective.ppo_clip}: the trainer makes one update per rollout batch, where the ratio to "
            "the sampling policy is 1 and the clip never acts (several updates per batch are not implemented); remove ppo_clip. "
            "Callers of tropd_ds.objectives.loss_fn that keep the rollout's log-probs can still pass it with old_logprob"
        )
    if objective.max_k() > n_tokens:
        key = "k" if objective.k >= objective.max_k() else "k_end"
        raise ConfigError(f"objective.options.{key}={objective.max_k()} exceeds the vocabulary ({n_tokens} tokens): expected at most {n_tokens}")
    if cfg.rollout.guidance and cfg.rollout.prefix_source == "data" and "teacher_response" not in train_rows.column_names:
        raise ConfigError(
            f"rollout.guidance with prefix_source='data' needs a 'teacher_response' column; data.path has {train_rows.column_names} "
            "(set rollout.prefix_source=teacher or rollout.guidance=false)"
        )
    check_run_shapes(cfg, world or int(os.environ.get("WORLD_SIZE", "1")))
    return tokenizer, n_tokens, train_rows, eval_rows, objective


def has_tokenizer(path: str) -> bool:
    return any((Path(path) / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model"))


def check_run_shapes(cfg: RunConfig, world: int) -> None:
    """Batch arithmetic for `world` ranks, and the DeepSpeed configs against the run config."""
    from .models import check_ds_config, read_ds_config

    if cfg.rollout.prompts_per_step % world:
        raise ConfigError(f"rollout.prompts_per_step={cfg.rollout.prompts_per_step}: expected a multiple of the {world} ranks")
    rollouts_per_rank = cfg.rollout.prompts_per_step // world * cfg.rollout.samples_per_prompt
    if rollouts_per_rank % cfg.student.micro_batch_size:
        raise ConfigError(
            f"student.micro_batch_size={cfg.student.micro_batch_size} does not divide the {rollouts_per_rank} rollouts per rank "
            "(rollout.prompts_per_step / ranks x rollout.samples_per_prompt)"
        )
    grad_accum = rollouts_per_rank // cfg.student.micro_batch_size
    check_ds_config("student", cfg.student, read_ds_config(cfg.student.ds_config), cfg.student.micro_batch_size, grad_accum, world, cfg.optim)
    check_ds_config("teacher", cfg.teacher, read_ds_config(cfg.teacher.ds_config), cfg.teacher.micro_batch_size, 1, world)


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
        if args.dry_run:
            from .dry_run import dry_run

            world = args.world_size or int(os.environ.get("WORLD_SIZE", "1"))
            if world < 1:
                raise ConfigError(f"--world-size={world}: expected an integer >= 1")
            for line in dry_run(cfg, world, args.gpu_mem):
                print(line, flush=True)
            return 0
        tokenizer, n_tokens, train_rows, eval_rows, objective = validate_before_engines(cfg)
    except ConfigError as exc:
        print(f"tropd-ds: configuration error: {exc}", file=sys.stderr)
        return 2
    try:
        code = run(cfg, tokenizer, n_tokens, train_rows, eval_rows, objective)
    finally:
        release_cpu_shm_buffers()
    if dist.is_initialized():  # every rank returns here together (a rank that fails alone leaves through os._exit)
        dist.destroy_process_group()
    return code


def exit_without_teardown(code: int) -> None:
    """End a rank without the interpreter's teardown, where gloo's worker threads sometimes abort the
    process (SIGABRT, "terminate called without an active exception"; about one launch in a hundred on
    our CPU machine, even after destroy_process_group) and the launcher then reports -6 for a run that
    finished. Everything of ours is on disk by now; W&B, the one monitor that syncs at exit, is finished."""
    wandb = sys.modules.get("wandb")
    if wandb is not None and getattr(wandb, "run", None) is not None:
        wandb.finish()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def release_cpu_shm_buffers(port: str | None = None, rank: str | None = None) -> None:
    """DeepSpeed's CPU all-reduce (DS_ACCELERATOR=cpu, several ranks on one machine) maps a 66 MiB
    buffer per rank in /dev/shm and never unlinks it: every launch would leak 66 MiB of RAM per
    rank until the machine runs out. Unlink this rank's buffer at exit (its mapping stays valid);
    the tests pass a launch's port and rank "*" to clean up after ranks they killed."""
    port, rank = port or os.environ.get("MASTER_PORT"), rank or os.environ.get("RANK")
    if port is None or rank is None:
        return
    for path in Path("/dev/shm").glob(f"deepspeed_*_{port}_{rank}"):
        try:
            path.unlink()
        except OSError:
            pass


COMPILERS = {"ninja", "cc1plus", "c++", "g++", "gcc", "cc", "clang++", "nvcc"}


def stale_extension_locks() -> list[Path]:
    """Locks of torch C++ extension builds with no compiler running on this machine: what an
    interrupted build (Ctrl-C during DeepSpeed's first-run compile) leaves behind. torch waits for such
    a lock to disappear, forever."""
    from torch.utils.cpp_extension import get_default_build_root

    root = Path(os.environ.get("TORCH_EXTENSIONS_DIR") or get_default_build_root())
    locks = sorted(root.glob("*/*/lock")) + sorted(root.glob("*/lock"))
    if not locks:
        return []
    import psutil

    for proc in psutil.process_iter(["name"]):
        if (proc.info.get("name") or "") in COMPILERS:
            return []
    return locks


@contextlib.contextmanager
def watch_extension_locks(every_s: float = 30.0, patience: int = 2):
    """While the block runs, report (once) a torch-extension lock that stays without a compiler for
    `patience` checks in a row, with the command that frees the launch."""
    if os.environ.get("RANK", "0") != "0":
        yield
        return
    done = threading.Event()

    def watch():
        seen: dict[Path, int] = {}
        while not done.wait(every_s):
            stale = stale_extension_locks()
            seen = {lock: seen.get(lock, 0) + 1 for lock in stale}
            ripe = [lock for lock, n in seen.items() if n >= patience]
            if ripe:
                paths = " ".join(str(x) for x in ripe)
                print(
                    f"[tropd-ds] waiting on {paths}: no compiler is running, so this lock was probably left by an "
                    f"interrupted build of a DeepSpeed op, and torch waits for it forever. Remove it (rm {paths}); "
                    "if this launch then cannot load the op, launch again and it is rebuilt.",
                    flush=True,
                )
                return

    thread = threading.Thread(target=watch, name="tropd-ds-lock-watch", daemon=True)
    thread.start()
    try:
        yield
    finally:
        done.set()


def check_logit_parity(cfg: RunConfig, student, teacher, stream, device, rank: int) -> bool:
    """Before the first step: on the first training row (its prompt and teacher response, at most 64
    tokens, the same on every rank), tropd-ds's log-probs must equal each model's own forward's. A
    model whose logits the package does not reproduce (an unhandled logit transform) stops the run here
    with the figures, instead of training against the wrong distribution."""
    from . import collectives
    from .models import PARITY_TOLERANCE, logit_parity

    counters = stream.truncated, stream.skipped
    row = stream.encode(0) or stream.encode(len(stream.ds) - 1)
    stream.truncated, stream.skipped = counters
    ids = (row.ids + (row.response_ids or []))[:64] if row is not None else []
    if len(ids) < 2:
        return True
    input_ids = torch.tensor([ids], device=device)
    found = logit_parity(student.module, teacher.module, input_ids, torch.ones_like(input_ids))
    ok = True
    for role, model_cfg in (("student", cfg.student), ("teacher", cfg.teacher)):
        worst = float(collectives.all_reduce([found[role][0]], op="max")[0])
        tolerance = PARITY_TOLERANCE[model_cfg.dtype]
        if worst > tolerance:
            ok = False
            log(
                rank,
                f"error: {role} log-probs from the vocabulary kernels differ from the model's own forward by up to {worst:.3g} "
                f"(mean {found[role][1]:.3g}; accepted at {model_cfg.dtype}: {tolerance:g}) on {len(ids) - 1} tokens of the first "
                f"training row: {model_cfg.path} transforms its logits in a way tropd-ds does not reproduce (soft-capping, "
                "scaling, a custom head). Training would follow another distribution than the model's; stopping before step 1.",
            )
    return ok


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)


def run(cfg: RunConfig, tokenizer, n_tokens, train_rows, eval_rows, objective) -> int:
    import deepspeed
    from deepspeed.runtime.rollout import SamplingConfig

    from . import checkpoint, collectives, rollout, scoring, update
    from .data import PromptStream
    from .evaluation import evaluate
    from .metrics import MetricsWriter, reduce_across_ranks

    if "RANK" not in os.environ:  # started without a launcher: one process
        import socket

        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    with watch_extension_locks():  # the first CPU launch builds DeepSpeed's shm op under a file lock
        deepspeed.init_distributed(dist_backend="gloo" if not torch.cuda.is_available() else "nccl")
    rank, world = dist.get_rank(), dist.get_world_size()
    _seed_everything(cfg.seed + rank)
    if torch.cuda.is_available():  # each rank on its own GPU before anything is placed (the engines set it only later)
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")

    mb = cfg.student.micro_batch_size
    grad_accum = cfg.rollout.prompts_per_step // world * cfg.rollout.samples_per_prompt // mb

    from .models import student_engine, teacher_engine

    student, _keep_s = student_engine(cfg.student, cfg.optim, n_tokens, mb, grad_accum)
    teacher, _keep_t = teacher_engine(cfg.teacher, n_tokens)
    offload = teacher.config.get("zero_optimization", {}).get("offload_param", {}).get("device", "none") if isinstance(teacher.config, dict) else "?"
    log(
        rank,
        f"{world} ranks; student ZeRO stage {student.zero_optimization_stage()}, teacher ZeRO stage "
        f"{teacher.zero_optimization_stage()} with offload_param={offload}; generation "
        f"{'with all parameters gathered' if cfg.rollout.gather_params else 'layer by layer (ZeRO-3 gathers per forward)'}; teacher scoring "
        f"{'with all parameters gathered' if cfg.teacher.gather_params else 'layer by layer'}",
    )
    end_ids = rollout.end_token_ids(tokenizer, student.module.lm, teacher.module.lm)
    student_rollout = rollout.GenerateRollout(student, tokenizer.pad_token_id, end_ids, cfg.rollout.gather_params, cfg.rollout.micro_batch_size)
    # A teacher that may not fit on one device (teacher.gather_params false) generates layer by layer.
    teacher_rollout = rollout.GenerateRollout(teacher, tokenizer.pad_token_id, end_ids, cfg.teacher.gather_params, cfg.teacher.micro_batch_size)

    stream = PromptStream(
        train_rows,
        tokenizer,
        cfg.rollout.prompts_per_step,
        rank,
        world,
        cfg.data.shuffle_seed,
        cfg.data.max_prompt_tokens,
        cfg.data.long_prompts,
        cfg.data.chat_template,
    )
    eval_set = None
    if eval_rows is not None:
        enc = PromptStream(eval_rows, tokenizer, world, 0, world, 0, cfg.data.max_prompt_tokens, "truncate", cfg.data.chat_template)
        eval_set = [{"ids": enc.encode(i).ids, "answer": str(eval_rows[i]["answer"])} for i in range(min(len(eval_rows), cfg.eval.max_prompts))]

    if not check_logit_parity(cfg, student, teacher, stream, device, rank):
        return 2
    metrics = MetricsWriter(cfg.logging.dir, rank, getattr(student, "monitor", None))
    start_step = 0
    if cfg.checkpoint.resume:
        try:
            client = checkpoint.resume(student, cfg.checkpoint.dir, log=lambda m: log(rank, m))
        except checkpoint.CheckpointError as exc:
            log(rank, f"cannot resume: {exc}")
            return 3
        if client is not None:
            start_step = client["step"]
            stream.load_state_dict(client["data"])
            metrics.truncate_after(start_step)
            log(rank, f"resumed from {cfg.checkpoint.dir} at step {start_step}")
    if rank == 0:
        Path(cfg.logging.dir).mkdir(parents=True, exist_ok=True)
        (Path(cfg.logging.dir) / "config.json").write_text(json.dumps(to_dict(cfg), indent=2, default=str))

    total = cfg.optim.steps
    sampling = SamplingConfig(max_new_tokens=cfg.rollout.max_new_tokens, temperature=cfg.rollout.temperature, top_p=cfg.rollout.top_p)
    l_max = cfg.rollout.guidance_max_len or cfg.rollout.max_new_tokens

    accuracies: list[tuple[int, float]] = []

    def run_eval(step: int) -> None:
        if eval_set is None:
            return
        result = evaluate(student_rollout, tokenizer, eval_set, cfg.eval, device)
        metrics.write(step, {k_: v for k_, v in result.items() if k_ != "eval_examples"} | {"eval_examples": result["eval_examples"]})
        accuracies.append((step, result["eval_accuracy"]))
        log(rank, f"step {step}: held-out accuracy {result['eval_accuracy']:.3f} ({result['eval_completions']} completions)")

    if start_step == 0:
        run_eval(0)

    progress = None
    if rank == 0 and cfg.logging.progress:
        from tqdm import tqdm

        progress = tqdm(total=total, initial=start_step, desc="distill", unit="step", dynamic_ncols=True)
    stop_signal: list[str] = []

    def on_signal(signum, frame):
        if stop_signal:  # a second signal: give up at once
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
            return
        stop_signal.append(signal.Signals(signum).name)

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    bad_steps: list[int] = []

    def save(done: int) -> bool:
        try:
            checkpoint.save(student, cfg.checkpoint.dir, done, {"data": stream.state_dict()}, cfg.checkpoint.keep_last)
            return True
        except checkpoint.CheckpointError as exc:
            if exc.local:  # only this rank knows: leave at once; the launcher stops the others, which wait in a collective
                print(f"[tropd-ds{f' rank {rank}' if rank else ''}] error: {exc}", flush=True)
                if progress is not None:
                    progress.close()
                release_cpu_shm_buffers()
                exit_without_teardown(3)
            log(rank, f"error: {exc}")
            return False

    for step in range(start_step, total):
        t0 = time.perf_counter()
        skipped_before = student.skipped_steps
        batch_prompts = stream.next_batch()
        expanded = [p for p in batch_prompts for _ in range(cfg.rollout.samples_per_prompt)]
        gen = torch.Generator().manual_seed(cfg.seed * 1_000_003 + step * 1009 + rank)
        if cfg.rollout.guidance and cfg.rollout.prefix_source == "teacher":
            responses = rollout.teacher_responses(teacher_rollout, batch_prompts, sampling, device)
            for p, r in zip(batch_prompts, responses):
                p.response_ids = r
        prefixes = rollout.choose_prefixes(expanded, step, total, l_max, cfg.rollout.guidance, gen)
        student.eval()  # generation uses the KV cache (gradient checkpointing turns it off in train mode)
        tokens = rollout.sample(student_rollout, expanded, prefixes, sampling, device)
        t1 = time.perf_counter()
        k = objective.kernel_options(step, total)["k"]
        scored = scoring.score(teacher, tokens, cfg.teacher.micro_batch_size, k, cfg.objective.temperature, cfg.teacher.gather_params)
        teachers = scoring.split_rows(scoring.concat(scored), tokens.sampled | tokens.prefix, mb)
        t2 = time.perf_counter()
        n_local = float((tokens.sampled | tokens.prefix).sum())
        token_count = float(collectives.all_reduce([n_local])[0]) / (world * grad_accum)
        student.train()
        mb_metrics = update.update(student, objective, tokens, teachers, mb, step, total, cfg.objective.temperature, token_count, gen)
        t3 = time.perf_counter()

        resp_len = (tokens.sampled.sum(1)).float().mean().item()
        pre_len = (tokens.prefix.sum(1)).float().mean().item()
        seen = tokens.input_ids[:, 1:][tokens.sampled]  # what the loss saw of the student's samples
        ends = torch.isin(seen, torch.tensor(end_ids, device=seen.device))
        shape = dict(
            response_len=resp_len,
            prefix_len=pre_len,
            ended_fraction=float(ends.sum()) / max(1, len(expanded)),
            sampled_pad_fraction=float(((seen == tokenizer.pad_token_id) & ~ends).float().mean()) if len(seen) else 0.0,  # pad may be EOS
        )
        local = [dict(m, **shape) for m in mb_metrics]
        record = reduce_across_ranks(local)
        grad_norm = student.get_global_grad_norm()
        record.update(
            grad_norm=float(grad_norm) if grad_norm is not None else float("nan"),
            lr=student.get_lr()[0],
            tokens_per_s=float(n_local) / max(t3 - t0, 1e-9),
            time_rollout_s=t1 - t0,
            time_teacher_s=t2 - t1,
            time_update_s=t3 - t2,
            k=k,
            prompts_truncated=stream.truncated,
            prompts_skipped=stream.skipped,
        )
        if student.skipped_steps > skipped_before:  # DeepSpeed found a non-finite gradient norm and left the parameters alone
            bad = sorted(k_ for k_, v in record.items() if isinstance(v, float) and not math.isfinite(v) and k_ != "grad_norm") or ["gradient"]
            bad_steps.append(step + 1)
            record.update(skipped=True, non_finite=bad)
            log(rank, f"step {step + 1} skipped: non-finite {', '.join(bad)} (grad norm {record['grad_norm']}); parameters unchanged")
        else:
            bad_steps.clear()
        if cfg.logging.samples_every and (step + 1) % cfg.logging.samples_every == 0:
            # special tokens kept: a sampled pad or end token is part of what the loss saw
            record["sample"] = tokenizer.decode(tokens.input_ids[0][tokens.attention_mask[0].bool()], skip_special_tokens=False)
        metrics.write(step + 1, record)
        if progress is not None:
            progress.set_postfix(
                loss=f"{record.get('loss', float('nan')):.4f}", trust=f"{record.get('trust_fraction', float('nan')):.2f}", tok_s=f"{record['tokens_per_s']:.0f}"
            )
            progress.update(1)
        done = step + 1
        if len(bad_steps) >= cfg.optim.max_bad_steps:
            if progress is not None:
                progress.close()
            log(
                rank,
                f"error: {len(bad_steps)} consecutive steps with non-finite values (steps {bad_steps[0]}-{bad_steps[-1]}; "
                f"optim.max_bad_steps={cfg.optim.max_bad_steps}). Parameters are as after step {bad_steps[0] - 1}; the newest checkpoint "
                f"is in {cfg.checkpoint.dir}. Check the teacher and the data, lower optim.lr, or raise optim.max_bad_steps.",
            )
            return 4
        if cfg.eval.every and done % cfg.eval.every == 0 and done < total:
            run_eval(done)
        signalled = collectives.all_reduce([1.0 if stop_signal else 0.0])[0]  # a signal on any rank stops every rank after the same step
        stopping = bool(cfg.checkpoint.stop_after) and done - start_step >= cfg.checkpoint.stop_after and done < total
        interrupted = float(signalled) > 0 and done < total
        if (cfg.checkpoint.every and done % cfg.checkpoint.every == 0) or stopping or interrupted:
            if not save(done):
                return 3
        if stopping or interrupted:
            if progress is not None:
                progress.close()
            why = f"{stop_signal[0] if stop_signal else 'a signal on another rank'}" if interrupted else "checkpoint.stop_after"
            log(rank, f"stopping after step {done} ({why}); checkpoint saved in {cfg.checkpoint.dir}; relaunch the same command to resume")
            return 0
    if progress is not None:
        progress.close()
    if start_step < total:
        run_eval(total)
    checkpoint.export(student, tokenizer, cfg.checkpoint.export_dir)
    log(rank, f"exported the student to {cfg.checkpoint.export_dir}")
    if len(accuracies) >= 2:
        (s0, a0), (s1, a1) = accuracies[0], accuracies[-1]
        log(rank, f"held-out accuracy: {a0:.3f} at step {s0} -> {a1:.3f} at step {s1}; metrics in {metrics.path}")
    return 0


if __name__ == "__main__":
    exit_without_teardown(main())
