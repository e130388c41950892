"""A run owns its folders: before any engine starts, `claim` checks that the checkpoint folder holds this run's
checkpoints (or none), records the run's identity (every setting that changes what it computes, and the
content of its model and data files), takes the folder's lock against a second run, and marks the logging
and export folders as this run's; an export goes only into a new or empty folder or over an earlier export.
Checkpoints themselves (save, verify, resume) are tropd_ds/checkpoint.py.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import time
from pathlib import Path

from .checkpoint import INCOMPLETE, complete_checkpoints, write_atomic
from .config import ConfigError, RunConfig

IDENTITY = "run.json"  # what the checkpoints in a folder were trained with
LOCK = "run.lock"  # the run that owns the folder now
OWNER = "tropd_run.json"  # in logging.dir and export_dir: the run (its checkpoint.dir) whose files these are
EXPORT_MARK = "tropd_export.json"  # a folder tropd-ds exported (and may replace)
RESOLVED_CONFIG = "resolved_config"  # logging.dir/resolved_config.json: the latest launch's resolved config

# Settings a resumed run may change: they change how the run is watched, saved or fitted into memory, not
# what it computes (a section name covers all of its fields). Everything else is the run's identity.
SAFE_ON_RESUME = (
    "eval",
    "logging",
    "checkpoint",
    "collective_timeout_minutes",
    "data.eval_path",
    "data.eval_split",
    "student.ds_config",
    "teacher.ds_config",
    "student.gradient_checkpointing",
    "teacher.gather_params",
    "teacher.micro_batch_size",
    "teacher.url",
    "teacher.token_file",
    "teacher.wait_minutes",
    "rollout.gather_params",
    "rollout.micro_batch_size",
    "optim.max_bad_steps",
)
FINGERPRINTED = ("student.path", "teacher.path", "data.path")  # their content, not only their names


def _settings(cfg: RunConfig) -> dict:
    """Every setting as "section.field" -> value (dict-valued fields kept whole)."""
    from .config import to_dict

    out = {}
    for section, value in to_dict(cfg).items():
        if section == "teachers":  # several teachers: each teacher's every field, teachers.<name>.<field>
            out |= {f"teachers.{name}.{key}": v for name, fields in value.items() for key, v in fields.items()}
        elif isinstance(value, dict) and section not in ("seed", "collective_timeout_minutes"):
            out |= {f"{section}.{name}": v for name, v in value.items()}
        else:
            out[section] = value
    return out


def _safe(key: str) -> bool:
    key = re.sub(r"^teachers\.[^.]+\.", "teacher.", key)  # each of several teachers as the teacher section
    return any(key == s or key.startswith(s + ".") for s in SAFE_ON_RESUME)


def _fingerprinted(cfg: RunConfig) -> list[str]:
    """The settings whose files' content is part of the run's identity: the student's, each teacher's, the data."""
    teachers = [f"teachers.{name}.path" for name in cfg.teachers] if cfg.teachers else ["teacher.path"]
    return [t for key in FINGERPRINTED for t in (teachers if key == "teacher.path" else [key])]


def fingerprint(path: str) -> str:
    """A content fingerprint of a file or folder (a hub id: the id): every file's name and size, and the
    SHA-256 of each file's content, whole up to 64 MiB and sampled beyond (its first and last MiB and 16
    blocks of 64 KiB spread over it): a model's weights replaced at the same path, or a data file edited in
    place, change it; reading a 140 GB teacher to tell does not happen."""
    if not str(path).strip():  # a served teacher has no path here (Path("") would be the working folder)
        return "no path"
    root = Path(path)
    if not root.exists():
        return f"not a local path: {path}"
    files = sorted(p for p in ([root] if root.is_file() else root.rglob("*")) if p.is_file())
    whole = hashlib.sha256()
    for file in files:
        size = file.stat().st_size
        whole.update(f"{file.relative_to(root) if file != root else file.name}:{size}:".encode())
        with open(file, "rb") as f:
            if size <= 64 << 20:
                whole.update(f.read())
                continue
            offsets = [0, size - (1 << 20)] + [size * i // 17 for i in range(1, 17)]
            for offset in offsets:
                f.seek(offset)
                whole.update(f.read(1 << 20 if offset in (0, size - (1 << 20)) else 64 << 10))
    return whole.hexdigest()


def run_identity(cfg: RunConfig, world: int) -> dict:
    """What must not change between a checkpoint and the run that resumes it (name -> value): every setting
    that changes what the run computes, the number of ranks, and the content fingerprints of both models and
    the training data. "safe" holds the settings that may change (logged when they do)."""
    settings = _settings(cfg)
    identity = {key: value for key, value in settings.items() if not _safe(key)}
    identity["ranks"] = world
    if cfg.teachers:  # a teacher added or left out on resume changes which rows learn from whom
        identity["teachers"] = list(cfg.teachers)
    identity["fingerprints"] = {key: fingerprint(settings[key]) for key in _fingerprinted(cfg)}
    identity["safe"] = {key: value for key, value in settings.items() if _safe(key)}
    return identity


def identity_changes(old: dict, new: dict) -> list[str]:
    """What changed that may not (keys missing from an older run.json are not compared); optim.steps may
    only grow."""
    changes = []
    for key, value in new.items():
        if key in ("safe", "fingerprints") or key not in old:
            continue
        if key == "optim.steps" and isinstance(old[key], int) and value >= old[key]:
            continue
        if json.dumps(old[key], sort_keys=True, default=str) != json.dumps(value, sort_keys=True, default=str):
            changes.append(f"{key}: {old[key]!r} -> {value!r}")
    for key, value in new.get("fingerprints", {}).items():
        before = old.get("fingerprints", {}).get(key)
        if before is not None and before != value:
            changes.append(f"the content of {key} ({new.get(key)}) has changed since the checkpoints were written")
    return changes


def safe_changes(old: dict, new: dict) -> list[str]:
    """Changed settings that a resumed run may change (logged), optim.steps upward among them."""
    changes = [
        f"{key}: {old['safe'][key]!r} -> {value!r}"
        for key, value in new.get("safe", {}).items()
        if key in old.get("safe", {}) and json.dumps(old["safe"][key], default=str) != json.dumps(value, default=str)
    ]
    if isinstance(old.get("optim.steps"), int) and new["optim.steps"] > old["optim.steps"]:
        changes.append(f"optim.steps: {old['optim.steps']} -> {new['optim.steps']} (the schedule stretches)")
    return changes


def read_identity(root: Path) -> dict | None:
    """The run.json of a checkpoint folder; None when there is none; a damaged one is an error."""
    path = root / IDENTITY
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
        if not isinstance(data, dict) or "ranks" not in data:
            raise ValueError("not a run identity (no 'ranks')")
        return data
    except (OSError, ValueError) as exc:
        raise ConfigError(
            f"{path} is damaged ({type(exc).__name__}: {str(exc)[:120]}): it records what the checkpoints in "
            f"{root} were trained with, and without it a resume cannot tell whether this config matches them. "
            "Restore it from a backup, or set checkpoint.overwrite=true (deletes those checkpoints) or choose "
            "another checkpoint.dir to start afresh"
        ) from exc


def _folder_has_checkpoints(root: Path) -> list[str]:
    if not root.is_dir():
        return []
    names = [p.name for p in complete_checkpoints(str(root))]
    names += [p.name for p in root.glob(f"{INCOMPLETE}*")]
    return names + (["latest"] if (root / "latest").is_file() and not names else [])


def _process_start(pid: int) -> float | None:
    import psutil

    try:
        return psutil.Process(pid).create_time()
    except (psutil.NoSuchProcess, psutil.AccessDenied, ProcessLookupError, ValueError):  # ValueError: pid <= 0
        return None


def _create_exclusive(path: Path, text: str) -> bool:
    """Write `path` only if it does not exist, atomically (O_EXCL): of two processes, exactly one wins."""
    try:
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
        return False
    with os.fdopen(fd, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    return True


def take_lock(root: Path, log=print) -> None:
    """Rank 0 marks `root` as this run's; a live owner is refused, a dead one's lock replaced. Taken with
    O_EXCL: of two runs claiming at the same moment (a stale lock replaced by both), one wins and the other
    is refused."""
    import socket

    lock = root / LOCK
    me = {"host": socket.gethostname(), "pid": os.getpid(), "started": _process_start(os.getpid())}
    root.mkdir(parents=True, exist_ok=True)
    for _ in range(3):
        if _create_exclusive(lock, json.dumps(me)):
            return
        try:
            text = lock.read_text()
            if not text:  # a claimant between its O_EXCL create and its write: read again once it has written
                time.sleep(0.2)
                text = lock.read_text()
            owner = json.loads(text)  # still empty: a claimant that died mid-write, a stale lock
        except FileNotFoundError:
            continue  # released between our attempt and our read: try again
        except (OSError, ValueError):
            owner = {}
        if not isinstance(owner, dict) or not owner:
            raise ConfigError(
                f"checkpoint.dir={str(root)!r}: its lock {lock} is empty or unreadable (a run that died while taking "
                "it, or one taking it now): if no run is using this folder, delete the file and start again"
            )
        if owner.get("pid") == me["pid"] and owner.get("host") == me["host"]:
            return  # this process holds it already
        started = _process_start(int(owner.get("pid", -1)))  # None once that process has ended
        same_process = started is not None and abs(started - float(owner.get("started") or 0)) < 1.0
        alive = owner.get("host") != me["host"] or same_process
        if alive:
            where = "on this machine" if owner.get("host") == me["host"] else f"on host {owner.get('host')!r}"
            raise ConfigError(
                f"checkpoint.dir={str(root)!r} is in use by another run (pid {owner.get('pid')} {where}; {lock}): two "
                "runs in one folder delete each other's checkpoints. Stop that run or choose another checkpoint.dir"
                + ("" if owner.get("host") == me["host"] else "; if that run has ended, remove the lock file")
            )
        # a dead owner's lock: moved aside under this process's own name, and deleted only if it is still the
        # stale one (another claimant may have replaced it in between: then it goes back and that one wins)
        aside = root / f".{LOCK}.{os.getpid()}.stale"
        try:
            os.replace(lock, aside)
        except FileNotFoundError:
            continue
        if aside.read_text() != text:
            try:
                os.link(aside, lock)  # put the live claimant's lock back (fails if yet another took the name)
            finally:
                aside.unlink(missing_ok=True)
            continue
        aside.unlink(missing_ok=True)
        log(f"removed a stale lock of pid {owner.get('pid')} (that process has ended) from {root}")
    raise ConfigError(
        f"checkpoint.dir={str(root)!r}: another run claimed {lock} at the same moment as this one; it owns the folder"
    )


def _owned_by(folder: Path, owner: dict, cfg: RunConfig) -> bool:
    """Whether an owner record names this run's checkpoint folder: by its absolute path, or by its path relative
    to `folder` (a run folder moved or copied whole is still the same run)."""
    mine = os.path.realpath(cfg.checkpoint.dir)
    relative = owner.get("checkpoint_dir_relative")
    return owner.get("checkpoint_dir") == mine or (
        isinstance(relative, str) and os.path.realpath(folder / relative) == mine
    )


def check_owner(folder: Path, key: str, cfg: RunConfig) -> None:
    """`folder` (logging.dir, checkpoint.export_dir) is not another run's: its tropd_run.json, when there is
    one, names this run's checkpoint folder (checkpoint.overwrite=true takes it over)."""
    owner_file = folder / OWNER
    if not owner_file.is_file() or cfg.checkpoint.overwrite:
        return
    try:
        owner = json.loads(owner_file.read_text())
        if not isinstance(owner, dict):
            raise ValueError
    except (OSError, ValueError):
        return  # not a record this code wrote: rewritten below
    if not _owned_by(folder, owner, cfg):
        raise ConfigError(
            f"{key}={str(folder)!r} belongs to another run, the one whose checkpoints are in "
            f"{owner.get('checkpoint_dir')!r} ({owner_file}): two runs there would overwrite each other's files and "
            f"interleave their records. Choose another {key}, or set checkpoint.overwrite=true to take it over"
        )


def mark_owner(folder: Path, key: str, cfg: RunConfig) -> None:
    """Rank 0: `folder` is this run's from now on (atomically: a run that claims it at the same moment is refused)."""
    folder.mkdir(parents=True, exist_ok=True)
    ckpt = os.path.realpath(cfg.checkpoint.dir)
    text = json.dumps({"checkpoint_dir": ckpt, "checkpoint_dir_relative": os.path.relpath(ckpt, folder.resolve())})
    if not _create_exclusive(folder / OWNER, text):
        check_owner(folder, key, cfg)  # another run's, created since our check: refused
        write_atomic(folder / OWNER, text)


def check_resolved_config_name(folder: Path) -> None:
    """The run writes its resolved config as logging.dir/resolved_config.json: a file of that name that is not
    one (the user's own) is never written over."""
    path = folder / f"{RESOLVED_CONFIG}.json"
    if not path.is_file():
        return
    try:
        ours = "resumed_at_step" in json.loads(path.read_text())
    except (OSError, ValueError, TypeError):
        ours = False
    if not ours:
        raise ConfigError(
            f"logging.dir={str(folder)!r} holds {path.name}, which is not a resolved config tropd-ds wrote: the run "
            "would write over it. Choose another logging.dir or move that file"
        )


def release_lock(root: str) -> None:
    lock = Path(root) / LOCK
    try:
        if json.loads(lock.read_text()).get("pid") == os.getpid():
            lock.unlink()
    except (OSError, ValueError):
        pass


def claim(cfg: RunConfig, world: int, rank: int, log=print) -> None:
    """Before any engine: the checkpoint folder is this run's (or its own earlier launch's, unchanged in
    what matters), nobody else is using it, and the export folder may be written. Rank 0 takes the lock
    and records the run's identity; every rank makes the same decision from the same files."""
    root = Path(cfg.checkpoint.dir)
    found = _folder_has_checkpoints(root)
    new = run_identity(cfg, world)
    old = None
    if found and cfg.checkpoint.resume and not cfg.checkpoint.overwrite:
        old = read_identity(root)
        if old is None:
            raise ConfigError(
                f"checkpoint.dir={str(root)!r} holds checkpoints ({', '.join(found[:3])}) but no {IDENTITY}, the "
                "record of what they were trained with: a resume cannot tell whether this config matches them. Set "
                "checkpoint.overwrite=true (deletes them) or choose another checkpoint.dir to start afresh"
            )
    elif (root / IDENTITY).is_file():
        try:
            old = read_identity(root)
        except ConfigError:
            old = None  # overwritten below, or no checkpoints to protect
    if found and not cfg.checkpoint.resume and not cfg.checkpoint.overwrite:
        raise ConfigError(
            f"checkpoint.dir={str(root)!r} holds another run's checkpoints ({', '.join(found[:3])}) and "
            "checkpoint.resume=false: a fresh run there would rotate them away with its own. Choose another "
            "checkpoint.dir, resume it (checkpoint.resume=true), or set checkpoint.overwrite=true to delete them"
        )
    if found and cfg.checkpoint.resume and old is not None:
        changes = identity_changes(old, new)
        if changes and not cfg.checkpoint.overwrite:
            ranks = [c for c in changes if c.startswith("ranks:")]
            note = (
                f" (resuming on another number of ranks is not supported: the ZeRO-3 shards and the data order are "
                f"per rank; launch with {old['ranks']} ranks)"
                if ranks
                else ""
            )
            raise ConfigError(
                f"checkpoint.dir={str(root)!r} holds checkpoints of a run with another config: {'; '.join(changes)}"
                f"{note}. Resume with the same values, choose another checkpoint.dir, or set "
                "checkpoint.overwrite=true to delete those checkpoints and start afresh"
            )
        changed = safe_changes(old, new)
        if changed and rank == 0:
            log(f"resuming with settings changed that a resume may change: {'; '.join(changed)}")
    logs = Path(cfg.logging.dir)
    for path in (root / IDENTITY, root / LOCK, logs / OWNER, Path(cfg.checkpoint.export_dir) / OWNER,
                 logs / f"{RESOLVED_CONFIG}.json", logs / "metrics.jsonl"):  # fmt: skip
        if path.exists() and not path.is_file():
            raise ConfigError(f"{path} is a folder: the run writes a file of that name there; move the folder away")
    if (logs / "metrics.jsonl").is_file() and not (logs / OWNER).is_file() and not found:
        raise ConfigError(
            f"logging.dir={str(logs)!r} holds a metrics.jsonl that no tropd-ds run of these checkpoints wrote (no "
            f"{OWNER}): the run would append its records to it. Choose another logging.dir or move the file"
        )
    own = (root, Path(cfg.logging.dir))  # this run's own folders may lie inside its export folder
    check_export_target(cfg.checkpoint.export_dir, cfg.checkpoint.overwrite, "checkpoint.export_dir", own)
    outputs = (("logging.dir", Path(cfg.logging.dir)), ("checkpoint.export_dir", Path(cfg.checkpoint.export_dir)))
    for key, folder in outputs:
        check_owner(folder, key, cfg)
    check_resolved_config_name(Path(cfg.logging.dir))
    for key, folder in (("checkpoint.dir", root), ("logging.dir", Path(cfg.logging.dir))):
        check_writable(folder, key)
    if rank != 0:
        return
    take_lock(root, log)
    for key, folder in outputs:
        mark_owner(folder, key, cfg)
    if found and (cfg.checkpoint.overwrite and (not cfg.checkpoint.resume or (old and identity_changes(old, new)))):
        log(f"checkpoint.overwrite=true: deleting {', '.join(found)} in {root}")
        for name in {*found, "latest"}:
            target = root / name
            shutil.rmtree(target, ignore_errors=True) if target.is_dir() else target.unlink(missing_ok=True)
    write_atomic(root / IDENTITY, json.dumps(new, indent=1, default=str))


def check_writable(folder: Path, key: str) -> None:
    """`folder` exists or can be made, and a file can be written there (found now, not at the first save)."""
    if folder.is_symlink() and not folder.exists():
        raise ConfigError(
            f"{key}={str(folder)!r} is a link to {os.readlink(folder)!r}, which does not resolve to a folder (it does "
            "not exist, or the link points at itself): expected a folder"
        )
    probe_root = folder
    while not probe_root.exists() and probe_root != probe_root.parent:
        probe_root = probe_root.parent
    if probe_root.exists() and not probe_root.is_dir():
        raise ConfigError(f"{key}={str(folder)!r}: {probe_root} is a file, expected a folder")
    if not os.access(probe_root, os.W_OK | os.X_OK):
        raise ConfigError(f"{key}={str(folder)!r} cannot be written ({probe_root} is not writable by this user)")


def check_export_target(out: str, force: bool, what: str = "--out", own: tuple[Path, ...] = ()) -> None:
    """An export goes into a new or empty folder, or replaces an earlier export; anything else needs force.
    The run's `own` folders (checkpoints, logs) and its owner file may lie inside it."""
    path = Path(out)
    if any(len(part.encode()) > 255 for part in path.parts):
        raise ConfigError(f"{what}={out!r}: a part of the path is too long (over 255 bytes, a file name's limit)")
    if path.is_symlink() and not path.exists():
        raise ConfigError(f"{what}={out!r} is a link to {os.readlink(path)!r}, which does not exist: expected a folder")
    if path.exists() and not path.is_dir():
        raise ConfigError(f"{what}={out!r} is a file: expected a folder for the exported model")
    mine = {os.path.realpath(p) for p in own}
    others = [p for p in path.iterdir() if p.name != OWNER and os.path.realpath(p) not in mine] if path.is_dir() else []
    if others and not (path / EXPORT_MARK).is_file() and not force:
        names = sorted(p.name for p in others)
        flag = "--force" if what == "--out" else "checkpoint.overwrite=true"
        raise ConfigError(
            f"{what}={out!r} is not empty ({', '.join(names[:5])}{', ...' if len(names) > 5 else ''}) and is not an "
            f"earlier tropd-ds export (no {EXPORT_MARK}): nothing was written. Choose a new folder, or pass {flag} to "
            "replace its files"
        )
    check_writable(path, what)
