"""The distillation run: `deepspeed [--num_gpus N] -m tropd_ds.train --config run.yaml [--set k=v ...]`.

Each step (`train_step`) is the algorithm's three phases: rollout (the student samples, after a teacher
prefix when guided), teacher scoring (a TeacherTopK per response token), student update (kernels,
objective, backward, step). Around them, on schedule: metrics, held-out evaluation, checkpoints.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from . import (
    checkpoint,
    collectives,
    command,
    evaluation,
    export,
    faults,
    ownership,
    preflight,
    process,
    rollout,
    scoring,
    update,
)
from .config import ConfigError, RunConfig, TeacherConfig, micro_batches_per_rank, teacher_sections, to_dict
from .data import PromptStream
from .metrics import MetricsWriter, NonFiniteSteps, code_version, step_record
from .preflight import Prepared, check_logit_parity
from .process import ExitCode
from .progress import StepProgress


def main(argv=None) -> int:
    stop = process.StopRequest()  # signals are handled from the first line: set-up ends at once
    loaded = command.prepare(argv)  # arguments, config and pre-flight checks (or the dry run): an int is an exit code
    if isinstance(loaded, int):
        return loaded
    try:
        code = run(*loaded, stop=stop)
    except ConfigError as exc:  # found only once running (e.g. a data set whose every prompt is skipped)
        log(f"configuration error: {exc}")
        code = ExitCode.CONFIG
    except OSError as exc:  # a full disk or a vanished folder under a file the run writes (metrics, a monitor's)
        ownership.release_lock(loaded[0].checkpoint.dir)
        where = f" {exc.filename}" if getattr(exc, "filename", None) else " a file"
        process.leave_now(
            ExitCode.IO,
            f"writing{where} failed ({exc.strerror or exc}): free space (or restore the folder) and relaunch the same "
            "command; it resumes from the last checkpoint",
        )
    except RuntimeError as exc:  # a collective that timed out, or a peer that has gone: each rank says so
        failure = process.collective_exit(exc, loaded[0].collective_timeout_minutes)
        if failure is None:
            raise
        ownership.release_lock(loaded[0].checkpoint.dir)
        process.leave_now(ExitCode.COLLECTIVE, *failure)
    finally:
        process.release_cpu_shm_buffers()
        ownership.release_lock(loaded[0].checkpoint.dir)
    if dist.is_initialized():  # every rank returns here together (a rank failing alone leaves via process.leave_now)
        dist.destroy_process_group()
    return code


log = process.log  # rank 0's voice


@dataclass
class Teacher:
    """One teacher of the run: its name (its metrics are teacher_<name>_...; "teacher" when it is the only one),
    its config key (teacher, or teachers.<name>), its section, and a DeepSpeed engine around scoring.TeacherScorer
    or a teacher_client.RemoteTeacher (a served teacher, `url`)."""

    name: str
    key: str
    cfg: TeacherConfig
    engine: object

    @property
    def served(self) -> bool:
        return bool(self.cfg.url)


@dataclass
class Trainer:
    """What set-up makes and every step uses."""

    cfg: RunConfig
    prepared: Prepared  # tokenizer, vocabulary size, data sets, objective, each row's teacher
    student: object  # DeepSpeed engine around update.StudentTerms
    teachers: list[Teacher]  # one, or several (teachers:), each scoring the rows routed to it
    roll_out: rollout.Rollout
    stream: PromptStream
    keep_alive: list  # the HfDeepSpeedConfig objects, which must live as long as the engines

    @property
    def teacher(self):
        """The engine (or client) of the run's first teacher, its only one unless teachers: names several."""
        return self.teachers[0].engine

    @property
    def served(self) -> bool:
        return any(te.served for te in self.teachers)


def set_up(cfg: RunConfig, prepared: Prepared, device: torch.device) -> Trainer:
    rank, world = collectives.rank_world()
    mb, n_tokens, tokenizer = cfg.student.micro_batch_size, prepared.n_tokens, prepared.tokenizer
    grad_accum = micro_batches_per_rank(cfg, world)
    student, keep_s = update.student_engine(cfg.student, cfg.optim, n_tokens, mb, grad_accum, cfg.logging.dir)
    teachers, keep = [], [keep_s]
    for key, section in teacher_sections(cfg):
        if section.url:
            engine, kept = connect_teacher(cfg, prepared, key, section), None
        else:
            engine, kept = scoring.teacher_engine(section, n_tokens)
        teachers.append(Teacher(key.removeprefix("teachers."), key, section, engine))
        keep.append(kept)
    for where, section, engine in [
        ("rollout", cfg.rollout, student),
        *((te.key, te.cfg, te.engine) for te in teachers),
    ]:
        if section.gather_params == "auto" and not getattr(section, "url", ""):  # the same on every rank
            section.gather_params, why = process.gather_decision(engine, device)
            log(f"{where}.gather_params=auto: {why}")
    preflight.check_teacher_prefixes(cfg)  # teacher prefixes need a teacher that can generate as resolved
    how = {True: "with all parameters gathered", False: "layer by layer"}
    placed, scored = [], []  # per teacher: where it runs, how it scores
    for te in teachers:
        if te.served:
            placed.append("served")
            scored.append(f"by the service at {te.cfg.url}")
        else:
            offload = te.engine.config.get("zero_optimization", {}).get("offload_param", {}).get("device", "none")
            placed.append(f"ZeRO stage {te.engine.zero_optimization_stage()} with offload_param={offload}")
            scored.append(how[te.cfg.gather_params])
    gathers = "" if cfg.rollout.gather_params else " (ZeRO-3 gathers per forward)"
    start = f"{world} ranks; student ZeRO stage {student.zero_optimization_stage()}"
    if len(teachers) == 1:
        log(f"{start}, teacher {placed[0]}; generation {how[cfg.rollout.gather_params]}{gathers}; teacher scoring "
            f"{scored[0]}")  # fmt: skip
    else:
        each = "; ".join(f"teacher {te.name} {p}, scoring {h}" for te, p, h in zip(teachers, placed, scored))
        log(f"{start}; generation {how[cfg.rollout.gather_params]}{gathers}; {each}")
    d = cfg.data
    stream = PromptStream(
        prepared.train_rows, tokenizer, cfg.rollout.prompts_per_step, rank, world, d.shuffle_seed,
        d.max_prompt_tokens, d.long_prompts, d.chat_template, d.chat_template_kwargs, prepared.routes,
    )  # fmt: skip
    local = [te.engine for te in teachers if not te.served]
    served_end_ids = [i for te in teachers if te.served for i in te.engine.served["end_ids"]]
    engines = local if cfg.teachers else (local[0] if local else None)
    roll_out = rollout.Rollout.of_engines(student, engines, tokenizer, cfg, device, served_end_ids)
    return Trainer(cfg, prepared, student, teachers, roll_out, stream, keep)


def connect_teacher(cfg: RunConfig, prepared: Prepared, key: str = "teacher", t: TeacherConfig | None = None):
    """A served teacher (`key`.url), checked before step 1: its tokenizer and vocabulary are the student's."""
    from .teacher_client import RemoteTeacher, TeacherUnavailable
    from .teacher_service import read_token
    from .teacher_wire import tokenizer_fingerprint

    t = t if t is not None else cfg.teacher
    token = read_token(t.token_file, f"{key}.token_file") if t.token_file else None
    remote = RemoteTeacher(t.url, token, t.wait_minutes, log=log)
    info, failure = None, None
    try:
        info = remote.info()
    except TeacherUnavailable as exc:
        failure = exc
    # every rank goes on, or none: a rank turned away alone would leave the others in a collective
    if float(collectives.all_reduce([1.0 if failure else 0.0], op="max")[0]) > 0:
        raise failure or TeacherUnavailable(f"another rank could not reach the teacher service at {t.url}")
    mine = tokenizer_fingerprint(prepared.tokenizer)
    if info.get("tokenizer_fingerprint") != mine or info.get("n_tokens") != prepared.n_tokens:
        raise ConfigError(
            f"the {key} served at {t.url} ({info.get('model')}, {info.get('n_tokens')} tokens, tokenizer "
            f"{str(info.get('tokenizer_fingerprint'))[:12]}) and the student ({cfg.student.path}, {prepared.n_tokens} "
            f"tokens, tokenizer {mine[:12]}) have different tokenizers: token-level distillation needs one vocabulary"
        )
    check_service_limits(cfg, prepared, info, collectives.rank_world()[1], t.url)
    remote.served = info
    log(
        f"{key} served at {t.url}: {info.get('model')} ({info.get('dtype')}, {info.get('ranks')} ranks, "
        f"tokenizer {mine[:12]} = the student's)"
    )
    return remote


def train_step(t: Trainer, step: int) -> dict:
    """One step of the algorithm; returns the step's record (reduced across ranks)."""
    cfg, total, mb = t.cfg, t.cfg.optim.steps, t.cfg.student.micro_batch_size
    options = t.prepared.objective.step_options(step, total, cfg.rollout.temperature)  # k, kernel options
    generator = torch.Generator().manual_seed(cfg.seed * 1_000_003 + step * 1009 + collectives.rank_world()[0])
    t0 = time.perf_counter()
    # 1. Rollout: the student samples its responses, continuing after a teacher prefix when guided.
    # A served teacher scores each micro-batch of rollouts while the student generates the next.
    prompts = t.stream.next_batch()
    route = None  # each row's teacher (rows: samples_per_prompt per prompt, adjacent), with several
    if len(t.teachers) > 1:
        route = torch.tensor([p.teacher for p in prompts for _ in range(cfg.rollout.samples_per_prompt)])
    pending = {j: [] for j, te in enumerate(t.teachers) if te.served}
    ask = send_to_served(t, route, options, pending) if pending else None
    tokens = t.roll_out(prompts, step, total, generator, ask)
    t1 = time.perf_counter()
    # 2. Teacher scoring: a TeacherTopK per response token, cut as the student's micro-batches.
    waited, times = 0.0, {}
    if route is not None:
        teachers, waited, times = routed_scores(t, tokens, route, options, mb, pending)
    elif t.served:
        before = t.teacher.waited_s
        teachers = agreed(lambda: t.teacher.score(tokens, options, mb, pending[0]))
        waited = t.teacher.waited_s - before
    else:
        te = t.teachers[0]
        teachers = scoring.score(te.engine, tokens, options, te.cfg.micro_batch_size, mb, te.cfg.gather_params)
    t2 = time.perf_counter()
    # 3. Student update: per-token terms, the objective, backward and one optimiser step.
    names = tuple(te.name for te in t.teachers)
    micro = update.update(
        t.student, t.prepared.objective, tokens, teachers, mb, step, total, options, generator, route, names
    )
    t3 = time.perf_counter()

    shape = t.roll_out.metrics(tokens)
    times = dict(time_rollout_s=t1 - t0, time_teacher_s=t2 - t1, time_update_s=t3 - t2, **times)
    if t.served:
        times["time_teacher_wait_s"] = waited  # of time_teacher_s, waiting on the services' answers
    counters = dict(k=options.k, prompts_truncated=t.stream.truncated, prompts_skipped=t.stream.skipped)
    speed = float(tokens.targets.sum()) / max(t3 - t0, 1e-9)
    record = step_record([dict(m, **shape) for m in micro], t.student, dict(tokens_per_s=speed, **times, **counters))
    if cfg.logging.samples_every and (step + 1) % cfg.logging.samples_every == 0:
        # special tokens kept: a sampled pad or end token is part of what the loss saw
        sample = tokens.input_ids[0][tokens.attention_mask[0].bool()]
        record["sample"] = t.prepared.tokenizer.decode(sample, skip_special_tokens=False)
    return record


def send_to_served(t: Trainer, route, options, pending: dict):
    """The rollout's `on_part`: each micro-batch of rows, as it is decoded, sent to the served teacher of its rows
    (`pending[j]` collects teacher j's futures, rows in order)."""
    done = [0]  # rows already sent: the parts come in row order

    def ask(part) -> None:
        n = part.input_ids.shape[0]
        for j in pending:
            remote = t.teachers[j].engine
            if route is None:
                pending[j].append(remote.submit(part, options.k, options.kernel.temperature))
                continue
            rows = (route[done[0] : done[0] + n] == j).nonzero().flatten()
            if len(rows):
                pending[j].append(remote.submit(part.select(rows), options.k, options.kernel.temperature))
        done[0] += n

    return ask


def routed_scores(t: Trainer, tokens, route, options, mb: int, pending: dict):
    """Several teachers: each row scored by its own (`route`), joined into one TeacherTopK per student micro-batch.
    The served teachers' answers are collected first (every rank learns whether any lost a service before the
    in-job teachers' collectives start), then each in-job teacher scores its rows. Returns the scores, the time
    spent waiting on services and each teacher's seconds (time_teacher_<name>_s: scoring, or waiting)."""
    answers, times, device = {}, {}, tokens.input_ids.device
    counts = tokens.targets.sum(1).cpu()

    def collect():
        for j in pending:
            remote, start = t.teachers[j].engine, time.perf_counter()
            expected = int(counts[route == j].sum())
            answers[j] = remote.joined(pending[j], expected, options.k, device)
            times[f"time_teacher_{t.teachers[j].name}_s"] = time.perf_counter() - start

    before = sum(t.teachers[j].engine.waited_s for j in pending)
    agreed(collect)
    waited = sum(t.teachers[j].engine.waited_s for j in pending) - before
    for j, te in enumerate(t.teachers):
        if te.served:
            continue
        start = time.perf_counter()
        rows = (route == j).nonzero().flatten()
        answers[j] = scoring.score_rows(te.engine, tokens, rows, options, te.cfg.micro_batch_size, te.cfg.gather_params)
        times[f"time_teacher_{te.name}_s"] = time.perf_counter() - start
    return scoring.merge_routed(answers, tokens, route, mb), waited, times


def check_service_limits(cfg: RunConfig, prepared: Prepared, info: dict, world: int, url: str = "") -> None:
    """What the service will refuse, found before step 1: rows longer than its teacher's positions, requests with
    more rows or tokens than it takes, a k larger than it serves."""
    longest = cfg.data.max_prompt_tokens + cfg.rollout.max_new_tokens
    rows = cfg.rollout.micro_batch_size or cfg.rollout.prompts_per_step // world * cfg.rollout.samples_per_prompt
    k = prepared.objective.max_k()
    where = f"the teacher service at {url or cfg.teacher.url}"
    limits = [
        (longest, info.get("max_positions"), "data.max_prompt_tokens + rollout.max_new_tokens", "positions"),
        (rows, info.get("max_rows"), "rows per request (rollout.micro_batch_size, or a rank's rollouts)", "max_rows"),
        (rows * longest, info.get("max_tokens"), "tokens per request at the longest", "max_tokens"),
        (k, info.get("max_k"), "the objective's k", "max_k"),
    ]
    for value, limit, what, name in limits:
        if limit is not None and value > limit:
            raise ConfigError(
                f"{what} is {value}, more than {where} takes ({name} {limit}): lower it, or raise the service's limit"
            )


def agreed(fetch):
    """`fetch()` (answers from teacher services), with every rank learning whether any rank lost a service or had a
    request refused (one all-reduce), so that all stop together instead of some entering the update."""
    from .teacher_client import TeacherRefused, TeacherUnavailable

    error, result = None, None
    try:
        result = fetch()
    except (TeacherUnavailable, TeacherRefused) as exc:
        error = exc
    codes = {None: 0.0, TeacherUnavailable: 1.0, TeacherRefused: 2.0}
    worst = float(collectives.all_reduce([codes[type(error) if error else None]], op="max")[0])
    if worst == 2.0:
        raise error if isinstance(error, TeacherRefused) else TeacherRefused("another rank's request was refused")
    if worst == 1.0:
        raise error if error is not None else TeacherUnavailable("another rank lost the teacher service")
    return result


def teacher_lost(t: Trainer, step: int, saved, before, exc, progress) -> int:
    """The served teacher stopped answering (or refused a request) during step `step` + 1: the run stops with a
    checkpoint of step `step` (the data position and random states as they were before the lost step, so a
    resume repeats it exactly); exit status 6, or 2 for a refusal."""
    cfg = t.cfg
    if progress is not None:
        progress.close()
    where = "no step has completed in this launch"
    if step > 0 and saved != step:
        t.stream.load_state_dict(before[0])
        checkpoint.restore_rng_states(before[1], log)
        if not save(t, step, progress):
            return ExitCode.IO
        where = f"checkpoint of step {step} saved in {cfg.checkpoint.dir}"
    elif step > 0:
        where = f"the checkpoint of step {step} is in {cfg.checkpoint.dir}"
    from .teacher_client import TeacherRefused

    if isinstance(exc, TeacherRefused):  # the request itself: relaunching as it is would meet the same refusal
        log(f"error: {exc}; stopped before step {step + 1} ({where}). Fix what the service names and relaunch "
            "to resume")  # fmt: skip
        return ExitCode.CONFIG
    log(f"error: {exc}; stopped before step {step + 1} ({where}). Start the service again and relaunch the same "
        "command to resume")  # fmt: skip
    return ExitCode.TEACHER


def run(cfg: RunConfig, prepared: Prepared, stop: process.StopRequest | None = None) -> int:
    # Set-up: processes and engines; then the check that our log-probs are the models' own, and resume.
    stop = stop or process.StopRequest()
    device = process.start_distributed(cfg.collective_timeout_minutes)
    rank = collectives.rank_world()[0]
    process.seed_everything(cfg.seed + rank)
    from .teacher_client import TeacherRefused, TeacherUnavailable

    try:
        t = set_up(cfg, prepared, device)
    except TeacherUnavailable as exc:
        log(f"error: {exc}; nothing was trained. Start the service (tropd-ds serve-teacher) and relaunch")
        return ExitCode.TEACHER
    groups = process.set_collective_timeout(cfg.collective_timeout_minutes)  # DeepSpeed's groups too
    log(f"collectives wait at most {cfg.collective_timeout_minutes:g} min for the slowest rank "
        f"(collective_timeout_minutes; {groups} process groups)")  # fmt: skip
    try:
        agree = [
            check_logit_parity(
                cfg, t.student, te.engine, prepared.train_rows, prepared.tokenizer, device, log, te.key, te.cfg, i == 0
            )
            for i, te in enumerate(t.teachers)
        ]  # every teacher checked on every rank (each check is a collective), then judged
        if not all(agree):
            return ExitCode.CONFIG
    except TeacherUnavailable as exc:  # this rank alone may know: it leaves, the launcher stops the others
        process.leave_now(ExitCode.TEACHER, f"{exc} (during the logit-parity check; nothing was trained)")
    except TeacherRefused as exc:  # likewise, for a request the service refused (or failed on three times)
        process.leave_now(ExitCode.CONFIG, f"{exc} (during the logit-parity check; nothing was trained)")
    metrics = MetricsWriter(cfg.logging.dir, rank, getattr(t.student, "monitor", None))
    start_step = 0
    if cfg.checkpoint.resume:
        try:
            client = checkpoint.resume(t.student, cfg.checkpoint.dir, log=log)
        except checkpoint.CheckpointError as exc:
            log(f"cannot resume: {exc}")
            return ExitCode.IO
        if client is not None:
            start_step = client["step"]
            if start_step > cfg.optim.steps:
                log(
                    f"error: the checkpoint in {cfg.checkpoint.dir} is at step {start_step}, past optim.steps="
                    f"{cfg.optim.steps}: raise optim.steps to train on, or export it with `tropd-ds export`"
                )
                return ExitCode.CONFIG
            t.stream.load_state_dict(client["data"])
            metrics.truncate_after(start_step)
            log(f"resumed from {cfg.checkpoint.dir} at step {start_step}")
    # what ran: the resolved config and the code's commit, with the first step of each launch and in the trackers
    version = code_version() if rank == 0 else {}
    run_info = {"run_config": to_dict(cfg), **version}
    if rank == 0:  # each launch's resolved config is kept: resolved_config.json the latest, .<time>-step<N> each
        metrics.describe_run(start_step, run_info)
        logs = Path(cfg.logging.dir)
        logs.mkdir(parents=True, exist_ok=True)
        text = json.dumps(dict(to_dict(cfg), resumed_at_step=start_step, **version), indent=2, default=str)
        name = ownership.RESOLVED_CONFIG
        (logs / f"{name}.{time.strftime('%Y%m%d-%H%M%S')}-step{start_step}.json").write_text(text)
        (logs / f"{name}.json").write_text(text)

    total = cfg.optim.steps
    held_out = evaluation.Schedule(t.roll_out.student, prepared, cfg, device, metrics, log)
    stop.phase = "the first evaluation"
    if start_step == 0:
        held_out.evaluate(0)
    progress = None
    if rank == 0 and cfg.logging.progress:
        progress = StepProgress(total, start_step)  # a bar on a terminal, plain lines in a log file
    bad_steps = NonFiniteSteps(cfg.optim.max_bad_steps)
    saved = start_step if start_step else None  # the step of the newest checkpoint of this run

    for step in range(start_step, total):
        skipped_before = t.student.skipped_steps
        stop.phase = f"step {step + 1}"
        faults.stall(step + 1, collectives.rank_world()[0], lambda: stop.signal_name is not None)
        before = (t.stream.state_dict(), checkpoint.rng_states()) if t.served else None
        try:
            record, done = train_step(t, step), step + 1
        except (TeacherUnavailable, TeacherRefused) as exc:
            return teacher_lost(t, step, saved, before, exc, progress)
        stop.can_leave_now = False  # a completed step that no checkpoint holds yet
        # DeepSpeed skips a step whose gradient norm is not finite: the parameters stay as they were.
        message = bad_steps.observe(done, record, t.student.skipped_steps > skipped_before)
        if message:
            log(message)
        if step == start_step:
            record.update(run_info)
        metrics.write(done, record)
        if progress is not None:
            progress.update(record)
        error = bad_steps.exhausted(cfg.checkpoint.dir)
        if error:
            if progress is not None:
                progress.close()
            log(error)
            return ExitCode.NON_FINITE
        if cfg.eval.every and done % cfg.eval.every == 0 and done < total:
            held_out.evaluate(done)
        # A signal on any rank, or checkpoint.stop_after, stops every rank after the same step, with a checkpoint.
        interrupted = stop.agreed() and done < total
        stopping = bool(cfg.checkpoint.stop_after) and done - start_step >= cfg.checkpoint.stop_after and done < total
        if (cfg.checkpoint.every and done % cfg.checkpoint.every == 0) or stopping or interrupted:
            if not save(t, done, progress):
                return ExitCode.IO
            saved, stop.can_leave_now = done, True
        if stopping or interrupted:
            if progress is not None:
                progress.close()
            why = stop.reason() if interrupted else "checkpoint.stop_after"
            log(
                f"stopping after step {done} ({why}); checkpoint saved in {cfg.checkpoint.dir}; "
                "relaunch the same command to resume"
            )
            return ExitCode.OK

    # The end: a verified checkpoint of the last step, a last evaluation, and the student exported.
    if progress is not None:
        progress.close()
    if saved != total:
        stop.phase = "the final save"
        if not save(t, total, progress):
            return ExitCode.IO
        stop.can_leave_now = True
    final = Path(cfg.checkpoint.dir) / f"step{total}"
    problem = checkpoint.verify(final)
    if problem is not None:
        log(f"error: the final checkpoint {final} fails its check ({problem}); nothing was exported")
        return ExitCode.IO
    stop.phase = "the final evaluation"
    faults.stall(total + 1, rank, lambda: stop.signal_name is not None)  # tests: "stall@<steps + 1>" holds it here
    if start_step < total or not final_evaluation_done(cfg, total):  # one a signal interrupted runs on relaunch
        held_out.evaluate(total)
    stop.phase = "the export"
    try:
        export.export(t.student, prepared.tokenizer, cfg.checkpoint.export_dir, cfg.student.path)
    except checkpoint.CheckpointError as exc:
        log(
            f"error: {exc}; the final checkpoint {final} is intact: export it with `tropd-ds export --config "
            "<this run's config> --out <folder>`"
        )
        return ExitCode.IO
    log(f"exported the student to {cfg.checkpoint.export_dir}")
    held_out.summary()
    stop.finished = True  # a signal from here on stops nothing: the run is complete
    return ExitCode.OK


def final_evaluation_done(cfg: RunConfig, total: int) -> bool:
    """Whether every rank wrote its records of the evaluation after the last step (a collective: the same
    answer on every rank). Without data.eval_path there is nothing to do."""
    if not cfg.data.eval_path:
        return True
    rank = collectives.rank_world()[0]
    mine = (Path(cfg.logging.dir) / "eval" / f"step{total}-rank{rank}.jsonl").is_file()
    return float(collectives.all_reduce([0.0 if mine else 1.0], op="max")[0]) == 0


def save(t: Trainer, done: int, progress) -> bool:
    """A checkpoint after step `done`; False when it failed on every rank (the run then ends with code 3).
    A failure only this rank knows of ends this rank at once (process.leave_now)."""
    try:
        checkpoint.save(
            t.student, t.cfg.checkpoint.dir, done, {"data": t.stream.state_dict()}, t.cfg.checkpoint.keep_last
        )
        return True
    except checkpoint.CheckpointError as exc:
        if exc.local:
            if progress is not None:
                progress.close()
            process.leave_now(ExitCode.IO, str(exc))
        log(f"error: {exc}")
        return False


if __name__ == "__main__":
    process.exit_without_teardown(main())
