"""The process around a run: distributed start-up, the launcher's shared memory, stale build locks,
signals, and leaving without the interpreter's teardown. Nothing here knows about distillation."""

from __future__ import annotations

import contextlib
import os
import random
import signal
import socket
import sys
import threading
import time
from pathlib import Path

import torch

from . import collectives
from .config import ConfigError
from .exit_codes import ExitCode  # noqa: F401  (process.ExitCode: the run's exit statuses)

STARTUP_TIMEOUT_MINUTES = 15.0  # the rendezvous: a node that never comes, an unreachable master


def start_distributed(timeout_minutes: float = 240.0) -> torch.device:
    """Join the launcher's process group (or make a one-process group when started without a launcher),
    after putting this rank on its own GPU (before anything is placed; the engines set it only later).
    The rendezvous waits at most STARTUP_TIMEOUT_MINUTES (or `timeout_minutes` when shorter); then every
    collective's time-out becomes `timeout_minutes` (`set_collective_timeout`, again once the engines have
    made their own groups)."""
    from datetime import timedelta

    import deepspeed

    if "RANK" not in os.environ:  # started without a launcher: one process
        check_not_launched_by_mpi(os.environ)
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(assign_device(os.environ, torch.cuda.device_count()))
        avoid_cudnn_attention()
    with watch_extension_locks():  # the first CPU launch builds DeepSpeed's shm op under a file lock
        startup = timedelta(minutes=min(timeout_minutes, STARTUP_TIMEOUT_MINUTES))
        deepspeed.init_distributed(dist_backend="nccl" if cuda else "gloo", timeout=startup)
    set_collective_timeout(timeout_minutes)
    if cuda:
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def avoid_cudnn_attention() -> None:
    """Turn off cuDNN's attention kernel for this process. Since torch 2.11 it is scaled_dot_product_attention's
    first choice on Hopper GPUs, and its backward returns NaN query gradients when a mask is passed (every
    padded batch: transformers builds one), the sequence length is 64 mod 128 and some row's logsumexp is below
    ln(FLT_MAX) = -88.7 (a left-padding row that sees no key has -inf; so can a "massive activation" head):
    pytorch/pytorch#196678, reported on torch 2.11 to 2.13 (the versions this package is tested with), and
    met by the GPU check on an H200 with torch 2.11 (step 1 skipped, NaN out of
    ScaledDotProductCudnnAttentionBackward0). Re-enable it once the installed torch carries the fix. The
    memory-efficient and flash kernels take its place, in generation and teacher scoring too (their speed
    there not measured against cuDNN's). Only this process: code that calls tropd_kernels from its own
    training loop sets the switch itself."""
    torch.backends.cuda.enable_cudnn_sdp(False)


def set_collective_timeout(minutes: float) -> int:
    """Every process group's time-out: the world's, and those DeepSpeed makes with `new_group` and no
    time-out of its own (its data-parallel group: ZeRO-3's gradient reduce-scatter and norms), which torch
    would otherwise give 10 minutes under NCCL. Returns the number of groups set."""
    from datetime import timedelta

    import torch.distributed as dist
    from torch.distributed import distributed_c10d as c10d

    if not dist.is_initialized():
        return 0
    groups = list(getattr(getattr(c10d, "_world", None), "pg_map", {}) or [dist.group.WORLD])
    count = 0
    for group in groups:
        if c10d._rank_not_in_group(group):
            continue
        c10d._set_pg_timeout(timedelta(minutes=minutes), group)
        count += 1
    return count


MPI_SIZES = ("OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMIX_SIZE", "SLURM_STEP_NUM_TASKS")


def check_not_launched_by_mpi(env) -> None:
    """Several processes started by mpirun or srun without RANK / WORLD_SIZE would each train alone."""
    for name in MPI_SIZES:
        if env.get(name, "1").isdigit() and int(env.get(name, "1")) > 1:
            raise ConfigError(
                f"{name}={env[name]} but RANK and WORLD_SIZE are not set: each of these processes would train alone. "
                "Launch with the deepspeed launcher or torchrun, or export RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR "
                "and MASTER_PORT per process (the Slurm script in docs/SCALING.md does)"
            )


def assign_device(env, visible: int) -> int:
    """This rank's GPU: LOCAL_RANK modulo the GPUs this process sees. Where a scheduler shows each process
    only its own GPU (Slurm's per-task binding), every rank sees one device, index 0, whatever its local
    rank. DeepSpeed takes LOCAL_RANK itself as the device index (its engine and zero.Init), so LOCAL_RANK
    becomes that index; the launcher's value stays in TROPD_DS_LAUNCHER_LOCAL_RANK."""
    local = int(env.get("LOCAL_RANK", "0"))
    if visible < 1:
        raise RuntimeError("torch sees CUDA but no device: check CUDA_VISIBLE_DEVICES")
    if local >= visible > 1:  # NCCL refuses two ranks on one GPU ("Duplicate GPU detected")
        raise ConfigError(
            f"LOCAL_RANK={local} but this process sees {visible} GPUs (CUDA_VISIBLE_DEVICES="
            f"{env.get('CUDA_VISIBLE_DEVICES', 'unset')}): start one process per GPU (--num_gpus {visible}), or show "
            "each process its own GPU only"
        )
    index = local % visible
    if index != local:
        env.setdefault("TROPD_DS_LAUNCHER_LOCAL_RANK", str(local))
        env["LOCAL_RANK"] = str(index)
        if "OMPI_COMM_WORLD_LOCAL_RANK" in env:  # DeepSpeed asserts the two agree under mpirun
            env["OMPI_COMM_WORLD_LOCAL_RANK"] = str(index)
    return index


def collective_failure(exc: BaseException, timeout_minutes: float) -> str | None:
    """What to tell a user when a collective ended the run after set-up: it waited past the time-out (gloo
    says "Timed out waiting"; NCCL with TORCH_NCCL_BLOCKING_WAIT raises a DistBackendError that names the
    time-out; by default NCCL's watchdog aborts the process itself), or a peer has gone. None for anything
    else, a rendezvous or store failure or a CUDA error among them, which is raised as it is. The error's
    own text is kept in the message."""
    import torch.distributed as dist

    if not dist.is_initialized() or isinstance(exc, (dist.DistStoreError, dist.DistNetworkError)):
        return None
    text = f"{type(exc).__name__}: {exc}".strip()
    if "CUDA error" in text:
        return None
    detail = text if len(text) <= 2000 else text[:2000] + " ..."
    if "Timed out waiting" in text or (isinstance(exc, dist.DistBackendError) and "timeout" in text.lower()):
        return (
            f"a collective waited longer than collective_timeout_minutes={timeout_minutes:g} for another rank. A rank "
            "that generates long answers alone (gathered generation, evaluation) keeps the others waiting in their "
            "next collective: raise collective_timeout_minutes (accepted: minutes > 0), or find the rank that stopped "
            f"(its log, py-spy dump). The error: {detail}"
        )
    if collectives.peer_gone(text):
        return f"{PEER_GONE}; its own message is above. The error here: {detail}"
    return None


def log(msg: str) -> None:
    """One line on rank 0 only, the run's voice: the process group's rank once it exists, before it the
    launcher's RANK."""
    rank = collectives.rank_world()[0] if collectives.active() else int(os.environ.get("RANK", "0") or 0)
    if rank == 0:
        print(f"[tropd-ds] {msg}", flush=True)


PEER_GONE = "another rank has stopped"  # collective_failure's message when a peer has gone
PEER_GONE_LINGER_S = 3.0  # > the launchers' poll intervals (DeepSpeed 1 s, torchrun 0.1 s): the cause's code wins


def collective_exit(exc: BaseException, timeout_minutes: float) -> tuple[str, float] | None:
    """(message, seconds to wait before exiting) for a rank that a collective ended (`collective_failure`),
    or None. A rank that leaves only because another has gone waits `PEER_GONE_LINGER_S`, so the launcher
    reports the exit code of the rank that failed first (see `leave_now`)."""
    message = collective_failure(exc, timeout_minutes)
    if message is None:
        return None
    return message, PEER_GONE_LINGER_S if message.startswith(PEER_GONE) else 0.0


def seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)


class StopRequest:
    """SIGTERM / SIGINT, from the first line of a run. While nothing would be lost (`can_leave_now`: set-up,
    the first evaluation, a step after a checkpoint) the process ends at once with 128 + the signal's number.
    Once a step has completed since the last checkpoint, the run stops after the current step and saves;
    a second signal ends the process at once. `agreed()` is the same on every rank: a signal on any rank
    stops all."""

    def __init__(self):
        self.signal_name: str | None = None
        self.can_leave_now = True
        self.finished = False  # the run has ended (exported): a signal now stops nothing
        self.phase = "set-up"
        self.launchers = launcher_processes()
        signal.signal(signal.SIGTERM, self._on_signal)
        signal.signal(signal.SIGINT, self._on_signal)

    def _on_signal(self, signum, frame):  # noqa: ARG002
        if self.finished:
            if os.environ.get("RANK", "0") == "0":
                print(
                    f"[tropd-ds] {signal.Signals(signum).name} after the run had finished: nothing to stop", flush=True
                )
            release_cpu_shm_buffers()
            exit_without_teardown(0)
        if self.signal_name is not None:  # a second signal: give up at once
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
            return
        self.signal_name = signal.Signals(signum).name
        if self.can_leave_now:
            rank = os.environ.get("RANK", "0")
            if rank == "0":
                print(
                    f"[tropd-ds] {self.signal_name} during {self.phase}: stopping now; no step has completed since "
                    "the last checkpoint (or the start), so nothing is lost",
                    flush=True,
                )
            release_cpu_shm_buffers()
            exit_without_teardown(128 + signum)

    def agreed(self) -> bool:
        """A collective: True on every rank when any rank was signalled or has lost its launcher."""
        if self.signal_name is None and self.launchers and launcher_gone(self.launchers):
            self.signal_name = "the loss of the launcher"  # SIGTERM to the `deepspeed` command ends it, not us
        return float(collectives.all_reduce([1.0 if self.signal_name else 0.0])[0]) > 0

    def reason(self) -> str:
        return self.signal_name or "a signal on another rank"


LAUNCHER_WORDS = ("deepspeed", "torchrun", "torch.distributed.run", "torch.distributed.launch", "accelerate")


def launcher_processes(pid: int | None = None) -> list[tuple[int, float]]:
    """(pid, start time) of the launcher processes above this one: the parents whose command line is a
    launcher's (the `deepspeed` command and its per-node launch.py, torchrun, accelerate), nearest first;
    nothing else (a shell or a scheduler above the launcher is not watched: it may end on purpose)."""
    import psutil

    out = []
    try:
        proc = psutil.Process(pid or os.getpid()).parent()
        while proc is not None and proc.pid > 1:
            words = " ".join(proc.cmdline())
            if not any(w in words for w in LAUNCHER_WORDS):
                break
            out.append((proc.pid, proc.create_time()))
            proc = proc.parent()
    except (psutil.Error, OSError):
        pass
    return out


def launcher_gone(launchers: list[tuple[int, float]]) -> bool:
    """Whether any of these launcher processes has ended (a zombie, or a pid reused by a new process, counts)."""
    import psutil

    for pid, started in launchers:
        try:
            proc = psutil.Process(pid)
            if abs(proc.create_time() - started) > 1.0 or proc.status() == psutil.STATUS_ZOMBIE:
                return True  # another process under that pid, or one that has ended and awaits its parent
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            return True
        except psutil.Error:
            continue
    return False


def leave_now(code: int, message: str, linger_s: float = 0.0) -> None:
    """End this rank at once, after an error only it knows of (the launcher stops the others, which wait in
    a collective): print the message with the rank, free the shared memory, exit without teardown.

    `linger_s`: wait that long first, signals at their defaults, for a rank that leaves only because another
    has gone. A launcher reports the exit code of the first rank it sees ended (DeepSpeed's polls every
    second and takes whichever of the ended ranks its loop meets first), so a rank that read "connection
    reset" a moment after the failing rank exited would otherwise often have its own code (5) reported in
    place of the cause's (3 for a full disk, -9 for a killed rank)."""
    rank = collectives.rank_world()[0]
    print(f"[tropd-ds{f' rank {rank}' if rank else ''}] error: {message}", flush=True)
    release_cpu_shm_buffers()
    if linger_s > 0:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)  # the launcher's clean-up ends the wait
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        sys.stdout.flush()
        time.sleep(linger_s)
    exit_without_teardown(code)


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
    thread = threading.Thread(
        target=_watch_locks, args=(done, every_s, patience), name="tropd-ds-lock-watch", daemon=True
    )
    thread.start()
    try:
        yield
    finally:
        done.set()


def _watch_locks(done: threading.Event, every_s: float, patience: int) -> None:
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


def gather_decision(engine, device: torch.device) -> tuple[bool, str]:
    """`gather_params: auto`: whether the engine's whole model fits on one device with room to spare
    (config.gather_fits: its weights at most half of the device's free memory; on the CPU, of the available
    memory shared by this node's ranks), the same answer on every rank (the smallest room decides), and why."""
    import psutil

    from .config import gather_fits

    params = list(engine.module.parameters())
    need = sum(getattr(p, "ds_numel", p.numel()) * p.element_size() for p in params)
    if device.type == "cuda":
        free = float(torch.cuda.mem_get_info(device)[0])
        where = f"{torch.cuda.get_device_name(device)} free memory"
    else:
        # ranks on this node: torchrun / accelerate set LOCAL_WORLD_SIZE, DeepSpeed's launcher LOCAL_SIZE
        local = max(1, int(os.environ.get("LOCAL_WORLD_SIZE") or os.environ.get("LOCAL_SIZE") or "1"))
        free = psutil.virtual_memory().available / local
        where = f"host memory available per rank ({local} on this node)"
    fits = gather_fits(need, free)
    fits = float(collectives.all_reduce([1.0 if fits else 0.0], op="min")[0]) > 0 if collectives.active() else fits
    how = "gathered whole, hook-free" if fits else "layer by layer (ZeRO-3 gathers per module)"
    return fits, f"the model's {need / 2**30:.2f} GiB against {free / 2**30:.1f} GiB of {where}: {how}"
