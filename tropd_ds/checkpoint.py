"""Checkpoints: DeepSpeed checkpoints that resume exactly (optimiser, schedule, RNG states, data
position), keeping the last K. The run's identity and its ownership of its folders are tropd_ds/ownership.py;
the export of the student as a Hugging Face folder is tropd_ds/export.py.

Durability: a checkpoint is written under `.incomplete-stepN`, every file's size and SHA-256 go
into `manifest.json` (each rank hashes a share), and rank 0 then renames the folder to `stepN` and
replaces `latest` atomically. A crash during saving therefore leaves only an `.incomplete-*` folder,
which resume ignores (and removes). Resume takes the newest `stepN` whose files match its manifest
and says which ones it skipped and why.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import sys
from pathlib import Path

import torch

from . import collectives, faults

INCOMPLETE = ".incomplete-"
MANIFEST = "manifest.json"


class CheckpointError(RuntimeError):
    """Saving or resuming a checkpoint failed; the message says what is intact. `local`: raised on
    this rank alone (so this rank must report it), not agreed by every rank."""

    def __init__(self, message: str, local: bool = False):
        super().__init__(message)
        self.local = local


def all_ranks_true(flag: bool) -> bool:
    return float(collectives.all_reduce([0.0 if flag else 1.0])[0]) == 0.0


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 24), b""):
            h.update(block)
    return h.hexdigest()


def _files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file() and p.name != MANIFEST)


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")  # a name of this process's own: no two writers share one
    with tmp.open("w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def step_of(folder: Path) -> int:
    return int(folder.name[4:])


def complete_checkpoints(ckpt_dir: str) -> list[Path]:
    """`stepN` folders with a manifest, newest first."""
    root = Path(ckpt_dir)
    found = [p for p in root.glob("step*") if p.is_dir() and p.name[4:].isdigit() and (p / MANIFEST).is_file()]
    return sorted(found, key=step_of, reverse=True)


def _free_bytes(root: Path) -> int | None:
    """Free space where `root` is (or will be created)."""
    path = root
    while not path.exists() and path != path.parent:
        path = path.parent
    try:
        return shutil.disk_usage(path).free
    except OSError:
        return None


def needed_bytes(engine, previous: list[Path]) -> tuple[int, str]:
    """Bytes a new checkpoint takes: the newest complete one's size (same model, same files), else a
    floor from the parameter count (every ZeRO checkpoint holds an fp32 copy of the parameters)."""
    if previous:
        try:
            files = json.loads((previous[0] / MANIFEST).read_text())["files"]
            return sum(f["bytes"] for f in files.values()), f"the size of {previous[0].name}"
        except (OSError, ValueError, KeyError):
            pass
    numel = sum(getattr(p, "ds_numel", p.numel()) for p in engine.module.parameters()) if engine is not None else 0
    return 4 * numel, "at least the fp32 parameters"


def _space(ckpt_dir: str) -> str:
    free = _free_bytes(Path(ckpt_dir))
    if free is None:
        return ""
    return f"; {free / 2**20:.1f} MiB free in {ckpt_dir}" + (", the disk is probably full" if free < 64 * 2**20 else "")


def save(engine, ckpt_dir: str, step: int, client_state: dict, keep_last: int) -> None:
    """Write checkpoint `stepN` atomically. Raises CheckpointError, with nothing partial left behind,
    when the disk lacks the room (checked by every rank before anything is written) or a write fails.

    A rank whose write fails takes part in no further collective: the others may be waiting inside
    DeepSpeed's own barriers, and a mismatched collective would hang every rank. It removes the partial
    folder and raises; its non-zero exit makes the launcher stop the other ranks."""
    rank, world = collectives.rank_world()
    root = Path(ckpt_dir)
    tag = f"step{step}"
    tmp = root / f"{INCOMPLETE}{tag}"
    previous = complete_checkpoints(ckpt_dir)
    intact = f"the previous checkpoint {previous[0]} is intact" if previous else "there is no previous checkpoint"
    need, basis = needed_bytes(engine, previous)
    free = _free_bytes(root)
    room = free is None or free >= need
    if not all_ranks_true(room):
        have = f"{free / 2**20:.1f} MiB are free" if free is not None and not room else "another rank's disk has less"
        raise CheckpointError(
            f"not enough space to save checkpoint {tag} in {ckpt_dir}: it needs about {need / 2**20:.1f} MiB "
            f"({basis}) and {have}; "
            f"nothing was written and {intact}. Free space, point checkpoint.dir at a larger disk, or lower "
            f"checkpoint.keep_last (now {keep_last}; older checkpoints are removed only after a new one is complete)"
        )
    if rank == 0:
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
    collectives.barrier()
    try:
        faults.inject_into_deepspeed_save(engine, step, rank)
        engine.save_checkpoint(ckpt_dir, tag=tmp.name, client_state={**client_state, "step": step}, save_latest=False)
        torch.save(rng_states(), tmp / f"rng_rank{rank}.pt")
        faults.in_save(step, rank)
        # inside the try: when another rank's write fails it removes the folder and exits, and this rank may
        # have been writing its own file at that moment (rmtree then leaves that file behind); the barrier
        # then fails here with the peer gone, and this rank removes what is left
        collectives.barrier()  # every rank's files are written
    except (OSError, RuntimeError) as exc:  # torch.save reports a full disk as a RuntimeError from its zip writer
        shutil.rmtree(tmp, ignore_errors=True)
        what = f"{type(exc).__name__}: {str(exc).strip()}"
        if collectives.peer_gone(what):
            what = "another rank stopped while saving; its error is above"
        where = f" on rank {rank}" if world > 1 else ""
        raise CheckpointError(
            f"saving checkpoint {tag} in {ckpt_dir} failed{where} ({what}){_space(ckpt_dir)}; the partial files were "
            f"removed and {intact}",
            local=True,
        ) from exc
    files = _files(tmp)
    mine = {
        str(p.relative_to(tmp)): {"bytes": p.stat().st_size, "sha256": _sha256(p)}
        for i, p in enumerate(files)
        if i % world == rank
    }
    manifest = {k: v for part in collectives.all_gather_object(mine) for k, v in part.items()}
    if rank == 0:
        write_atomic(tmp / MANIFEST, json.dumps({"step": step, "world_size": world, "files": manifest}, indent=1))
        final = root / tag
        if final.exists():  # the same step saved again (e.g. stop_after on a checkpoint step)
            shutil.rmtree(final)
        os.replace(tmp, final)
        _fsync_dir(root)
        write_atomic(root / "latest", tag)
        if keep_last > 0:
            for old in complete_checkpoints(ckpt_dir)[keep_last:]:
                shutil.rmtree(old, ignore_errors=True)
    collectives.barrier()


def _accelerator():
    """(device type, device module, device index) of this process's accelerator (CUDA, ROCm, XPU, MPS...), or
    None on CPU."""
    current = torch.accelerator.current_accelerator() if torch.accelerator.is_available() else None
    if current is None:
        return None
    return current.type, torch.get_device_module(current.type), torch.accelerator.current_device_index()


def rng_states() -> dict:
    """Every generator a run draws from, for an exact resume: torch's CPU generator, the accelerator's
    (on GPUs the rollout samples, and dropout draws, from it; no DeepSpeed checkpoint keeps it), Python's
    and NumPy's."""
    accelerator = _accelerator()
    states = {"torch": torch.get_rng_state(), "python": random.getstate(), "device": "cpu"}
    if accelerator is not None:
        kind, module, index = accelerator
        states["device"] = kind
        states["accelerator"] = {"type": kind, "state": module.get_rng_state(index)}
    numpy = sys.modules.get("numpy")
    if numpy is not None:  # as plain values: a pickled array would tie the file to NumPy's module layout
        name, keys, pos, has_gauss, cached = numpy.random.get_state()
        states["numpy"] = (name, keys.tolist(), int(pos), int(has_gauss), float(cached))
    return states


def restore_rng_states(states: dict, log=print) -> None:
    """Put back what `rng_states` saved. A checkpoint from another kind of device (a GPU run resumed on
    CPUs, say) restores what both have and says that sampling will not repeat the uninterrupted run's."""
    torch.set_rng_state(states["torch"])
    random.setstate(states["python"])
    if "numpy" in states:
        import numpy

        name, keys, pos, has_gauss, cached = states["numpy"]
        numpy.random.set_state((name, numpy.asarray(keys, dtype=numpy.uint32), pos, has_gauss, cached))
    accelerator, saved = _accelerator(), states.get("accelerator")
    now = accelerator[0] if accelerator else "cpu"
    if accelerator is not None and saved is not None and saved["type"] == accelerator[0]:
        accelerator[1].set_rng_state(saved["state"], accelerator[2])
    elif "device" not in states and accelerator is not None:
        log(
            f"note: the checkpoint predates saving the {now} generator: the run continues, but its samples will not "
            "repeat those of an uninterrupted run"
        )
    elif states.get("device", "cpu") != now:
        log(
            f"note: the checkpoint's random state is from a {states['device']} run and this one runs on {now}: the "
            "run continues, but its samples will not repeat those of an uninterrupted run"
        )


def verify(folder: Path) -> str | None:
    """None when every file matches the manifest, else what is wrong (checked by all ranks together)."""
    rank, world = collectives.rank_world()
    try:
        manifest = json.loads((folder / MANIFEST).read_text())["files"]
    except (OSError, ValueError, KeyError) as exc:
        return f"{MANIFEST} is unreadable ({exc})"
    problems = []
    for i, (name, want) in enumerate(sorted(manifest.items())):
        if i % world != rank:
            continue
        p = folder / name
        if not p.is_file():
            problems.append(f"{name} is missing")
        elif p.stat().st_size != want["bytes"]:
            problems.append(f"{name} has {p.stat().st_size} bytes, the manifest says {want['bytes']}")
        elif _sha256(p) != want["sha256"]:
            problems.append(f"{name} does not match its SHA-256")
    problems = [x for part in collectives.all_gather_object(problems) for x in part]
    return "; ".join(problems) if problems else None


def resume(engine, ckpt_dir: str, log=print) -> dict | None:
    """Load the newest complete, intact checkpoint if there is one; returns its client state."""
    rank, _ = collectives.rank_world()
    root = Path(ckpt_dir)
    if not root.is_dir():
        return None
    stale = sorted(root.glob(f"{INCOMPLETE}*"))
    collectives.barrier()  # every rank has listed the folder before rank 0 removes anything
    for folder in stale:
        log(f"ignoring {folder.name}: a save that did not finish (removed)")
        if rank == 0:
            shutil.rmtree(folder, ignore_errors=True)
    collectives.barrier()
    candidates = complete_checkpoints(ckpt_dir)
    if not candidates and (root / "latest").is_file():
        raise CheckpointError(
            f"{ckpt_dir} has a 'latest' file but no checkpoint with a {MANIFEST} (written by another tool or "
            "version?): "
            "move it away, or set checkpoint.resume=false to start afresh"
        )
    skipped = []
    for folder in candidates:
        problem = verify(folder)
        if problem is not None:
            skipped.append(f"{folder.name} ({problem})")
            log(f"checkpoint {folder.name} is damaged: {problem}; trying the previous one")
            continue
        path, client = engine.load_checkpoint(
            ckpt_dir, tag=folder.name, load_optimizer_states=True, load_lr_scheduler_states=True
        )
        if path is None:
            raise CheckpointError(f"DeepSpeed could not load {folder}")
        restore_rng_states(torch.load(folder / f"rng_rank{rank}.pt", weights_only=True), log)
        return client
    if skipped:
        raise CheckpointError(
            f"every checkpoint in {ckpt_dir} is damaged: {'; '.join(skipped)}. Nothing was loaded; "
            "set checkpoint.resume=false (or another checkpoint.dir) to start afresh"
        )
    return None
