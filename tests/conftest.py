import os

import torch

# The Triton backend runs on CPU tensors through the interpreter; it must be on before triton loads.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.pop("TROPD_KERNELS_BACKEND", None)
torch.set_num_threads(min(2, os.cpu_count() or 1))


def pytest_configure(config):
    config.addinivalue_line(
        "markers",
        "rehearsal: a first GPU run rehearsed on CPU ranks (`make rehearse`, run by CI; `make test` leaves them out)",
    )
    config.addinivalue_line(
        "markers",
        "faults: faults injected into launched 2-rank runs (`make test-faults`, run by CI; not in `make test`)",
    )
    config.addinivalue_line(
        "markers",
        "served: the teacher service under the real launchers (`make test-served`, run by CI; not in `make test`)",
    )
    config.addinivalue_line(
        "markers",
        "launches: more launched runs, each whole in itself: torchrun and accelerate, the plain-OPD demo "
        "(`make test-launches`, run by CI; not in `make test`, which must stay under 10 minutes)",
    )


# ----------------------------------------------------------------------------- shared trainer fixtures
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))


@pytest.fixture(scope="session")
def workspace(tmp_path_factory):
    from tropd_ds.demo_models import build_llama
    from tropd_ds.demo_task import build_tokenizer, write_splits

    root = tmp_path_factory.mktemp("trainer")
    tok = build_tokenizer()
    build_llama(root / "teacher", tok, hidden=64, layers=2, heads=4, mlp=128, seed=1)
    build_llama(root / "student", tok, hidden=32, layers=1, heads=2, mlp=64, seed=2)
    write_splits(root / "data", n_train=200, n_eval=16)
    return root


@pytest.fixture(scope="session")
def full_run(workspace):
    from launch import launch, write_config

    proc = launch(write_config(workspace, "full"), cli=True)  # the `deepspeed` command, as users run it
    return workspace / "full", proc


@pytest.fixture(scope="session")
def zero3_results(tmp_path_factory):
    """One launch of tests/zero3_workers.py: every ZeRO-3 worker's case (the student update with and without
    gradient checkpointing and LoRA, the partitioned lm_head, the global batch, hook-free generation) in
    one launch, which costs more than all of their steps. Returns the folder of their result files."""
    from biased_models import build_biased_llama
    from launch import cpu_ranks

    from tropd_ds.demo_models import build_llama
    from tropd_ds.demo_task import build_tokenizer

    root = tmp_path_factory.mktemp("zero3_results")
    tok = build_tokenizer()
    build_llama(root / "student", tok, hidden=32, layers=2, heads=2, mlp=64, seed=3)
    build_llama(root / "global_batch_student", tok, hidden=32, layers=1, heads=2, mlp=64, seed=4)
    build_biased_llama(root / "biased", tok, {tok.pad_token_id: 2.5, tok.eos_token_id: -0.5})
    build_llama(root / "plain", tok, hidden=32, layers=1, heads=2, mlp=64, seed=5)  # samples follow its weights
    cpu_ranks([Path(__file__).resolve().parent / "zero3_workers.py", root], cwd=root, timeout=900)
    return root
