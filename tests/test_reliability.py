"""Faults lose nothing: non-finite steps are skipped, checkpoints are atomic and verified, a signal
saves and exits, a killed rank costs only the steps since the last checkpoint. Every run is the real
DeepSpeed launcher on 2 CPU ranks with the tiny models of conftest.py; the reference is the
uninterrupted 6-step run (`full_run`, checkpoints every 3 steps)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import psutil
import pytest
from launch import ROOT, free_port, launch, launcher, records, release_shm, write_config

from tropd_ds import checkpoint
from tropd_ds.config import ConfigError, load_config

# Launched runs with faults injected, each 10-70 s: `make test-faults` (run by CI after `make test`).
pytestmark = pytest.mark.faults

KEYS = ("loss", "grad_norm", "trust_fraction", "response_len", "lr")


def assert_same_steps(run_dir: Path, reference: Path, steps) -> None:
    got = {r["step"]: r for r in records(run_dir) if "loss" in r}
    want = {r["step"]: r for r in records(reference) if "loss" in r}
    assert sorted(got) == sorted(want), (sorted(got), sorted(want))
    for step in steps:
        for key in KEYS:
            assert got[step][key] == pytest.approx(want[step][key], rel=1e-6, abs=1e-9), (step, key)


PORTS: list[int] = []


@pytest.fixture(autouse=True, scope="module")
def _release_shm_of_started_runs():
    yield
    for port in PORTS:
        release_shm(port)


def start(config: Path, env: dict | None = None, overrides: list[str] = (), cli: bool = False) -> subprocess.Popen:
    PORTS.append(free_port())
    cmd = [
        *launcher(PORTS[-1], cli=cli),
        "--module",
        "tropd_ds.train",
        "--config",
        str(config),
        *[x for o in overrides for x in ("--set", o)],
    ]
    full_env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", **(env or {})}
    full_env.pop("TRITON_INTERPRET", None)
    return subprocess.Popen(
        cmd, cwd=config.parent, env=full_env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )


def wait_for_step(run_dir: Path, proc: subprocess.Popen, step: int, timeout: float = 600) -> None:
    deadline = time.time() + timeout
    path = run_dir / "logs/metrics.jsonl"
    while time.time() < deadline:
        if path.is_file() and any(
            f'"step": {step},' in line and '"loss"' in line for line in path.read_text().splitlines()
        ):
            return
        assert proc.poll() is None, proc.stdout.read()[-3000:]
        time.sleep(0.2)
    raise AssertionError(f"step {step} did not appear in {path}")


def rank_pid(proc: subprocess.Popen, rank: int) -> int:
    for child in psutil.Process(proc.pid).children(recursive=True):
        if any(arg == f"--local_rank={rank}" for arg in child.cmdline()):
            return child.pid
    raise AssertionError(f"no rank {rank} under the launcher")


def read_until(proc: subprocess.Popen, words: str, timeout: float = 300) -> str:
    """The launch's output up to the first line with `words` (the launch keeps running)."""
    seen, deadline = [], time.time() + timeout
    for line in proc.stdout:
        seen.append(line)
        if words in line:
            return "".join(seen)
        assert time.time() < deadline, "".join(seen)[-3000:]
    raise AssertionError(f"the launch ended before saying {words!r}: " + "".join(seen)[-3000:])


def test_a_crash_while_saving_then_a_sigkill_of_one_rank_cost_only_the_steps_since_the_checkpoint(workspace, full_run):
    """One chain, each link the same command: every rank dies while saving step 6 (a power cut, a node lost),
    leaving a partial folder that resume skips; the resumed run loses rank 1 to SIGKILL before step 5; the
    third launch resumes at step 3 again and reproduces steps 4-6 exactly. (When only one rank dies while
    saving, the others see the gloo peer go in the closing barrier and remove the folder: the next test.)"""
    config = write_config(workspace, "crashed")
    ckpt = workspace / "crashed/ckpt"
    crashed = start(config, {"TROPD_DS_FAULT": "crash_in_save@6"})
    out, _ = crashed.communicate(timeout=600)
    assert crashed.returncode != 0, out[-3000:]
    assert (ckpt / ".incomplete-step6").is_dir() and not (ckpt / "step6").exists(), out[-3000:]
    assert (ckpt / "latest").read_text() == "step3"
    # the same command, rank 1 held before step 5 so that the kill lands between steps 4 and 5
    proc = start(config, {"TROPD_DS_FAULT": "stall@5:r1", "TROPD_DS_STALL_S": "60"})
    said = read_until(proc, "at step 3")
    assert "ignoring .incomplete-step6" in said, said[-3000:]
    wait_for_step(workspace / "crashed", proc, 4)
    os.kill(rank_pid(proc, 1), signal.SIGKILL)
    proc.wait(timeout=120)
    assert proc.returncode != 0
    assert (ckpt / "latest").read_text() == "step3" and not list(ckpt.glob("step[456]"))
    relaunch = launch(config)
    assert "at step 3" in relaunch.stdout
    assert_same_steps(workspace / "crashed", full_run[0], (4, 5, 6))
    assert not (ckpt / ".incomplete-step6").exists() and (ckpt / "step6/manifest.json").is_file()
    # the steps each interrupted launch logged after its checkpoint were set aside, not lost
    rolled_back = [
        json.loads(x) for x in (workspace / "crashed/logs/metrics.rolled_back.jsonl").read_text().splitlines()
    ]
    steps = [r["step"] for r in rolled_back if "loss" in r]
    assert steps.count(4) == 2 and 5 in steps, steps  # steps 4-5 (6) of the first launch, step 4 of the second


def test_a_signal_to_the_launcher_or_either_rank_saves_a_checkpoint_and_the_same_command_resumes(
    workspace, full_run, capsys, monkeypatch
):
    """SIGTERM to the `deepspeed` command (what `timeout`, a scheduler or Ctrl-C on a wrapper sends; it ends the
    launcher at once and used to leave its ranks training on, orphaned), then SIGTERM on rank 1 before step 5,
    then SIGINT on rank 0 during the final evaluation (after the final checkpoint), each while a rank is held:
    the ranks that lost their launcher stop after the step with a checkpoint, the rank signal stops both after
    the step, and the interrupted evaluation runs on the next launch, which exports. Every step equals the
    uninterrupted run's. Along the chain, the run owns its checkpoint folder: a second run on it is refused
    while the first runs, and so are a fresh start or another objective on its checkpoints; with
    checkpoint.every 0 the end still leaves a verified checkpoint of the last step before the export."""
    monkeypatch.setenv("WORLD_SIZE", "2")  # `refused` runs the pre-engine checks here as rank 0 of 2
    monkeypatch.setenv("RANK", "0")
    name = "signalled"
    config = write_config(workspace, name, checkpoint={"every": 0})
    # 1. the launcher command signalled while rank 1 is held before step 3 (15 s, then step 3 runs)
    proc = start(config, {"TROPD_DS_FAULT": "stall@3:r1", "TROPD_DS_STALL_S": "15"}, cli=True)
    wait_for_step(workspace / name, proc, 2)
    err = refused(config, [], capsys)  # a second run on the same folder while this one is running
    assert "is in use by another run" in err, err
    ranks = [rank_pid(proc, r) for r in (0, 1)]
    os.kill(proc.pid, signal.SIGTERM)
    out, _ = proc.communicate(timeout=300)  # the ranks keep the output pipe open until they end
    assert psutil.wait_procs([psutil.Process(p) for p in ranks if psutil.pid_exists(p)], timeout=300)[1] == []
    assert "stopping after step 3 (the loss of the launcher); checkpoint saved" in out, out[-3000:]
    # 2. SIGTERM on rank 1 before step 5; 3. SIGINT on rank 0 during the final evaluation ("step 7")
    for sig, rank, step in ((signal.SIGTERM, 1, 5), (signal.SIGINT, 0, 7)):
        proc = start(config, {"TROPD_DS_FAULT": f"stall@{step}:r{rank}", "TROPD_DS_STALL_S": "60"})
        wait_for_step(workspace / name, proc, step - 1)
        if step == 7:  # held after the final checkpoint, before the final evaluation
            deadline = time.time() + 300
            while not (workspace / name / "ckpt/step6/manifest.json").is_file():
                assert time.time() < deadline and proc.poll() is None
                time.sleep(0.2)
            time.sleep(1.0)
        os.kill(rank_pid(proc, rank), sig)
        out, _ = proc.communicate(timeout=300)
        saved = sorted(p.name for p in (workspace / name / "ckpt").glob("step*"))
        if step == 5:
            assert proc.returncode == 0, out[-3000:]
            assert saved == ["step3", "step5"], saved
            assert "stopping after step 5 (a signal on another rank); checkpoint saved" in out, out[-3000:]
            assert "at step 3" in out
        else:  # after the final checkpoint nothing is lost: rank 0 ends at once, the launcher ends rank 1
            assert proc.returncode != 0 and "SIGINT during the final evaluation: stopping now" in out, out[-3000:]
            assert saved == ["step5", "step6"] and not (workspace / name / "export/model.safetensors").exists()
        for overrides, words in (
            (["checkpoint.resume=false"], "holds another run's checkpoints"),
            (["objective.name=opd", "objective.options={}"], "objective.name: 'tropd' -> 'opd'"),
        ):
            err = refused(config, overrides, capsys)
            assert words in err and "Traceback" not in err, err[-3000:]
            assert sorted(p.name for p in (workspace / name / "ckpt").glob("step*")) == saved  # nothing deleted
    relaunch = launch(config)
    assert "resumed from" in relaunch.stdout and "at step 6" in relaunch.stdout
    assert "step 6: held-out accuracy" in relaunch.stdout  # the interrupted evaluation, run now
    assert_same_steps(workspace / name, full_run[0], range(1, 7))
    assert len({r["lr"] for r in records(workspace / name) if "loss" in r}) == 6  # the schedule decays every step
    assert checkpoint.verify(workspace / name / "ckpt/step6") is None  # checkpoint.every 0: the end still saves
    assert json.loads((workspace / name / "export/tropd_export.json").read_text())["complete"] is True
    launches = sorted(p.name for p in (workspace / name / "logs").glob("resolved_config.*.json"))
    assert len(launches) == 4, launches  # each launch's resolved config is kept


def test_when_one_rank_dies_while_saving_the_others_remove_the_partial_folder(workspace):
    """Rank 1 dies after writing its files; rank 0, whose own file may have landed while rank 1 was
    mid-save, sees the peer go in the closing barrier and removes the folder (CI once found an
    `.incomplete-step6` left behind when that barrier was outside the clean-up)."""
    name = "one_rank_died"
    config = write_config(workspace, name, checkpoint={"every": 3, "keep_last": 2})
    proc = start(config, {"TROPD_DS_FAULT": "crash_in_save@6:r1"})
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode != 0, out[-3000:]
    assert (
        f"saving checkpoint step6 in {workspace / name / 'ckpt'} failed on rank 0 (another rank stopped while saving"
        in out
    ), out[-3000:]
    assert_only_step3(workspace / name / "ckpt")


@pytest.fixture
def small_disk(tmp_path):
    """A 320 KiB tmpfs: one checkpoint of the tiny student fits, a second does not. Mounting needs
    root (CI runs as root); elsewhere the test is skipped and says why."""
    mount = tmp_path / "small_disk"
    mount.mkdir()
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=320k", "tmpfs", str(mount)], capture_output=True, text=True
    )
    if done.returncode != 0:
        pytest.skip(
            f"cannot mount a small tmpfs here ({done.stderr.strip()}); the injected ENOSPC tests cover the write path"
        )
    yield mount
    subprocess.run(["umount", str(mount)], capture_output=True)


def assert_only_step3(ckpt: Path) -> None:
    assert sorted(p.name for p in ckpt.iterdir() if p.is_dir()) == ["step3"]  # no stepN, no .incomplete-*
    assert (ckpt / "latest").read_text() == "step3"
    assert checkpoint.verify(ckpt / "step3") is None


def test_a_disk_without_room_for_the_next_checkpoint_is_refused_before_writing(workspace, small_disk):
    ckpt = small_disk / "ckpt"
    config = write_config(workspace, "diskfull", checkpoint={"dir": str(ckpt), "every": 3, "keep_last": 2})
    proc = start(config)
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode != 0, out[-3000:]  # each rank exits 3; the launcher reports whichever rank it saw last
    size = sum(f["bytes"] for f in json.loads((ckpt / "step3/manifest.json").read_text())["files"].values())
    assert (
        f"not enough space to save checkpoint step6 in {ckpt}: it needs about {size / 2**20:.1f} MiB (the size of "
        "step3)" in out
    ), out[-3000:]
    assert "MiB are free; nothing was written and the previous checkpoint" in out and "step3 is intact" in out
    assert "lower checkpoint.keep_last (now 2" in out
    assert_only_step3(ckpt)


@pytest.mark.parametrize(
    "fault,where",
    [
        ("disk_full_in_save@6:r1", " on rank 1"),
        ("disk_full_in_deepspeed_save@6:r0", " on rank 0"),
        ("disk_full_in_save@6", " on rank "),
    ],
    ids=["rank1-alone", "rank0-inside-deepspeed", "every-rank"],
)
def test_a_failed_write_is_a_clear_error_and_the_previous_checkpoint_stays_intact(workspace, fault, where):
    """ENOSPC while writing (after the space check passed): the failing rank removes the partial
    folder and exits; it must not hang in a collective the other ranks are not in (every rank hung
    when one rank ran out of space inside DeepSpeed's save_checkpoint, whose closing barrier the
    others were waiting in)."""
    name = f"writefail_{fault.split('@')[0]}_{fault.partition(':')[2] or 'all'}"
    config = write_config(workspace, name, checkpoint={"every": 3, "keep_last": 2})
    proc = start(config, {"TROPD_DS_FAULT": fault})
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode != 0, out[-3000:]
    # with every rank failing, the first to fail removes the folder under the others, which then report that
    assert f"saving checkpoint step6 in {workspace / name / 'ckpt'} failed{where}" in out, out[-3000:]
    assert "(OSError: [Errno 28] No space left on device" in out
    assert "the partial files were removed and the previous checkpoint" in out and "step3 is intact" in out
    assert_only_step3(workspace / name / "ckpt")


def test_a_corrupted_checkpoint_is_detected_and_resume_takes_the_previous_one(workspace, full_run, tmp_path):
    run = workspace / "corrupted"
    shutil.copytree(full_run[0], run)
    newest = run / "ckpt/step6"
    victim = max((p for p in newest.iterdir() if p.suffix == ".pt"), key=lambda p: p.stat().st_size)
    victim.write_bytes(victim.read_bytes()[: victim.stat().st_size // 2])  # a truncated write
    assert "manifest says" in checkpoint.verify(newest)
    config = write_config(workspace, "corrupted", optim={"steps": 6, "lr": 1e-3})
    from tropd_ds import cli

    out = tmp_path / "exported"
    assert cli.main(["export", "--config", str(config), "--out", str(out), "--tag", "step6"]) == 2
    assert not out.exists()  # the damaged checkpoint is refused before anything is written
    relaunch = launch(config)
    assert f"checkpoint step6 is damaged: {victim.name} has" in relaunch.stdout and "at step 3" in relaunch.stdout
    assert_same_steps(run, full_run[0], (4, 5, 6))
    # every checkpoint damaged: resume refuses (before touching the engine) instead of starting afresh
    broken = tmp_path / "ckpt"
    shutil.copytree(full_run[0] / "ckpt", broken)
    for folder in broken.glob("step*"):
        (folder / "rng_rank0.pt").write_bytes(b"flipped")
    with pytest.raises(
        checkpoint.CheckpointError, match=r"every checkpoint in .* is damaged: step6 \(rng_rank0.pt has 7 bytes"
    ):
        checkpoint.resume(None, str(broken), log=lambda m: None)


def test_non_finite_steps_are_skipped_without_changing_parameters_and_too_many_stop_the_run(workspace):
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    config = write_config(
        workspace,
        "nonfinite",
        checkpoint={"every": 1, "keep_last": 0},
        optim={"steps": 6, "lr": 1e-3, "max_bad_steps": 2},
    )
    proc = start(config, {"TROPD_DS_FAULT": "nan_loss@2,nan_loss@4,nan_loss@5"})
    out, _ = proc.communicate(timeout=600)
    assert proc.returncode != 0
    assert "step 2 skipped: non-finite loss" in out and "parameters unchanged" in out
    assert "2 consecutive steps with non-finite values (steps 4-5; optim.max_bad_steps=2)" in out, out[-3000:]
    steps = {r["step"]: r for r in records(workspace / "nonfinite") if "loss" in r}
    assert sorted(steps) == [1, 2, 3, 4, 5]
    assert steps[2]["skipped"] and "loss" in steps[2]["non_finite"] and steps[2]["grad_norm"] == float("inf")
    assert not steps[3].get("skipped") and steps[3]["grad_norm"] < float("inf")
    ckpt = workspace / "nonfinite/ckpt"
    params = {s: get_fp32_state_dict_from_zero_checkpoint(str(ckpt), tag=f"step{s}") for s in (1, 2, 3, 4)}
    assert all((params[1][k] == params[2][k]).all() for k in params[1]), "a skipped step changed parameters"
    assert any((params[2][k] != params[3][k]).any() for k in params[1]), "the step after a skipped one did not train"
    assert all((params[3][k] == params[4][k]).all() for k in params[1])
    assert not (ckpt / "step5").exists()  # the run stopped at step 5 without saving it


@pytest.mark.parametrize(
    "override,message",
    [
        ("rollout.temperature=0", "rollout.temperature=0.0: expected a number > 0"),
        ("rollout.temperature=-1", "rollout.temperature=-1.0: expected a number > 0"),
        ("rollout.top_p=1.5", "rollout.top_p=1.5: expected a number in (0, 1]"),
        ("optim.lr=0", "optim.lr=0.0: expected a number > 0"),
        ("rollout.samples_per_prompt=0", "rollout.samples_per_prompt=0: expected a number >= 1"),
        ("optim.max_bad_steps=0", "optim.max_bad_steps=0: expected a number >= 1"),
    ],
)
def test_out_of_range_values_name_the_value_and_what_is_accepted(workspace, override, message):
    with pytest.raises(ConfigError) as err:
        load_config(write_config(workspace, "ranges"), [override])
    assert message in str(err.value)


def test_deepspeed_configs_that_contradict_the_run_config_are_refused(workspace, tmp_path):
    from tropd_ds.preflight import validate_before_engines

    base = json.loads((ROOT / "ds_configs/cpu_student_zero3.json").read_text())
    cases = [
        (
            {"train_micro_batch_size_per_gpu": 4},
            "train_micro_batch_size_per_gpu=4 contradicts the run config, which implies 2",
        ),
        ({"bf16": {"enabled": True}}, "enables bf16 but student.dtype='float32'"),
        ({"gradient_clipping": 5.0}, "gradient_clipping=5.0 contradicts optim.grad_clip=1.0"),
        ({"zero_optimization": {"stage": 2}}, "zero_optimization.stage=2: expected 3"),
    ]
    for extra, message in cases:
        path = tmp_path / "student_ds.json"
        path.write_text(json.dumps({**base, **extra}))
        with pytest.raises(ConfigError) as err:
            validate_before_engines(load_config(write_config(workspace, "contradict"), [f"student.ds_config={path}"]))
        assert message in str(err.value), (extra, str(err.value))


def test_an_embedding_table_smaller_than_the_shared_tokenizer_is_refused(workspace, tmp_path):
    from tropd_ds.preflight import validate_before_engines

    small = tmp_path / "student_small"
    shutil.copytree(workspace / "student", small)
    cfg = json.loads((small / "config.json").read_text())
    cfg["vocab_size"] = 10
    (small / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(
        ConfigError, match=r"student embedding has 10 rows but the shared tokenizer has 18 tokens: expected at least 18"
    ):
        validate_before_engines(load_config(write_config(workspace, "small_vocab"), [f"student.path={small}"]))


def test_the_space_needed_by_a_first_checkpoint_is_a_floor_of_its_real_size(workspace, full_run):
    from types import SimpleNamespace

    from transformers import AutoModelForCausalLM

    student = AutoModelForCausalLM.from_pretrained(workspace / "student")
    floor, basis = checkpoint.needed_bytes(SimpleNamespace(module=student), [])
    assert basis == "at least the fp32 parameters" and floor == 4 * sum(p.numel() for p in student.parameters())
    ckpt = full_run[0] / "ckpt/step3"
    real = sum(p.stat().st_size for p in ckpt.rglob("*") if p.is_file() and p.name != "manifest.json")
    assert floor <= real
    assert checkpoint.needed_bytes(None, [ckpt]) == (real, "the size of step3")


def test_a_lock_left_by_an_interrupted_op_build_is_reported_with_the_command_that_frees_the_launch(
    tmp_path, monkeypatch, capsys
):
    from tropd_ds import process

    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    monkeypatch.setenv("RANK", "0")
    lock = tmp_path / "py311_cpu/deepspeed_shm_comm/lock"
    lock.parent.mkdir(parents=True)
    with process.watch_extension_locks(every_s=0.05, patience=2):
        time.sleep(0.5)
    assert capsys.readouterr().out == ""  # no lock, no message
    lock.touch()
    assert process.stale_extension_locks() == [lock]
    with process.watch_extension_locks(every_s=0.05, patience=2):
        time.sleep(0.5)
    out = capsys.readouterr().out
    assert f"waiting on {lock}: no compiler is running" in out and f"(rm {lock})" in out
    assert out.count("waiting on") == 1  # said once
    monkeypatch.setattr(process, "COMPILERS", process.COMPILERS | {psutil.Process().name()})  # a build in progress
    assert process.stale_extension_locks() == []


def finish(proc: subprocess.Popen, timeout: float = 300) -> tuple[int, str]:
    out, _ = proc.communicate(timeout=timeout)
    return proc.returncode, out


def test_a_signal_during_set_up_ends_the_run_at_once_with_nothing_written(workspace):
    config = write_config(workspace, "setup_signal", checkpoint={"every": 0})
    proc = start(config)
    seen = []
    for line in proc.stdout:  # rank 0 reports the engines once they are built: still set-up, no step yet
        seen.append(line)
        if "ranks; student ZeRO stage" in line:
            break
    os.kill(rank_pid(proc, 0), signal.SIGTERM)
    started = time.time()
    code, out = finish(proc, timeout=120)
    out = "".join(seen) + out
    assert code != 0 and time.time() - started < 60, out[-3000:]
    assert "SIGTERM during set-up: stopping now" in out or "SIGTERM during the first evaluation" in out, out[-3000:]
    assert not list((workspace / "setup_signal/ckpt").glob("step*"))
    assert "Traceback" not in out.split("SIGTERM during")[0][-2000:]


def refused(config: Path, overrides: list[str], capsys) -> str:
    """What the launch of `config` would say before its engines (the checks every rank runs first), run in
    this process as rank 0 of 2: the refusals below need no launcher of their own."""
    from tropd_ds import command

    argv = ["--config", str(config)] + [x for o in overrides for x in ("--set", o)]
    assert command.prepare(argv) == 2
    return capsys.readouterr().err


# A run owning its checkpoint folder, and the verified checkpoint at the end with checkpoint.every 0: along the
# signal chain above (test_a_signal_to_the_launcher_or_either_rank_saves_a_checkpoint_and_the_same_command_resumes).


def test_an_export_that_fails_on_rank_0_ends_every_rank_and_names_the_intact_checkpoint(workspace):
    export = workspace / "export_fails/export"
    (export / "model.safetensors").mkdir(parents=True)  # save_pretrained cannot write its weights file
    (export / "tropd_export.json").write_text('{"exported_from": "an earlier run", "complete": true}')
    config = write_config(workspace, "export_fails", optim={"steps": 2, "lr": 1e-3}, checkpoint={"every": 0})
    code, out = finish(start(config), timeout=300)  # the other rank must not wait in a barrier for ever
    assert code == 3, out[-3000:]
    assert "exporting the student to" in out and "Is a directory" in out, out[-3000:]
    assert "the final checkpoint" in out and "step2 is intact: export it with `tropd-ds export" in out
    assert checkpoint.verify(workspace / "export_fails/ckpt/step2") is None


@pytest.mark.rehearsal  # a minute of launch and waiting: `make rehearse`
def test_a_rank_held_back_past_the_collective_time_out_ends_the_run_with_the_setting_named(workspace):
    """Rank 1 sleeps 40 s before step 2 with collective_timeout_minutes=0.25: rank 0 waits 15 s in its next
    collective, then ends with a message that names the setting (no raw traceback); rank 1 is stopped by the
    launcher or, once awake, finds its peer gone in its next collective (no hang)."""
    config = write_config(workspace, "timeout", checkpoint={"every": 0}, eval={"max_prompts": 2})
    env = {"TROPD_DS_FAULT": "stall@2:r1", "TROPD_DS_STALL_S": "40"}
    proc = start(config, env=env, overrides=["collective_timeout_minutes=0.25", "logging.progress=false"])
    wait_for_step(workspace / "timeout", proc, 1)
    started = time.time()
    code, out = finish(proc, timeout=120)
    assert code != 0 and time.time() - started < 100, out[-3000:]
    assert "error: a collective waited longer than collective_timeout_minutes=0.25" in out, out[-3000:]
    assert "raise collective_timeout_minutes" in out and "Timed out waiting" in out  # gloo's own words kept
    groups = int(out.split("(collective_timeout_minutes; ")[1].split()[0])
    assert groups >= 2, out[-3000:]  # the world and DeepSpeed's data-parallel group (gradient reduce-scatter)
    assert "Traceback" not in out, out[-3000:]


PEER_SCRIPT = """
import os, sys
import torch, torch.distributed as dist
from tropd_ds import process
dist.init_process_group("gloo")
dist.barrier()
if dist.get_rank() == int(sys.argv[-1]):  # the launcher puts --local_rank first
    print("the cause leaves with 3", flush=True)
    os._exit(3)
try:
    for _ in range(3):
        dist.all_reduce(torch.ones(1))
except RuntimeError as exc:
    failure = process.collective_exit(exc, 1.0)
    if failure is None:
        raise
    process.leave_now(5, *failure)
os._exit(7)
"""


def test_the_launcher_reports_the_code_of_the_rank_that_failed_not_of_the_rank_that_lost_it(tmp_path):
    """One rank exits 3; the other finds its peer gone in the next collective and exits 5. DeepSpeed's launcher
    polls once a second and reports the first ended rank its loop meets: when both had ended by the same poll,
    it reported 5 about half the time (a CI run of the full-disk test below), hiding the cause. The rank that
    lost its peer now waits PEER_GONE_LINGER_S first. Either rank as the cause."""
    script = tmp_path / "peer.py"
    script.write_text(PEER_SCRIPT)
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    for cause in (0, 1):
        cmd = [*launcher(free_port()), str(script), str(cause)]
        proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
        out = proc.stdout + proc.stderr
        assert "the cause leaves with 3" in out and "another rank has stopped" in out, out[-3000:]
        assert proc.returncode == 3, (cause, out[-3000:])


def test_a_full_disk_under_the_metrics_ends_the_run_with_code_3_and_what_to_do(workspace):
    """Writing a step's record (metrics.jsonl, DeepSpeed's CSV monitor in logging.dir) on a full disk used to end
    in a traceback; now the rank that failed names the file and what to do, exits 3, and the launcher ends the
    others."""
    name = "metrics_full"
    config = write_config(workspace, name, optim={"steps": 3, "lr": 1e-3}, checkpoint={"every": 0})
    proc = start(config, {"TROPD_DS_FAULT": "disk_full_in_metrics@2"})
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 3, out[-3000:]
    assert "error: writing metrics.jsonl (injected by TROPD_DS_FAULT) failed (No space left on device)" in out, out[
        -3000:
    ]
    assert "relaunch the same command; it resumes from the last checkpoint" in out and "Traceback" not in out
