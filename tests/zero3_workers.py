"""Every ZeRO-3 worker of the suite in one launch on 2 CPU ranks (conftest's `zero3_results`): a launch costs
more than all of their steps together. Each worker writes its own file under the folder it is given:

- zero3_student_worker: the trainer's student update (plain, gradient checkpointing, LoRA) -> <case>.json
- zero3_lm_head_worker: token_terms_from_hidden on a partitioned lm_head -> lm_head.json
- global_batch_worker: every objective over 2 ranks x 2 micro-batches -> updates.json
- zero3_rollout_worker: hook-free against hooked generation and teacher scoring -> rollout.json (last: it
  ends the process group)
"""

from __future__ import annotations

import sys
from pathlib import Path

import deepspeed
import global_batch_worker
import zero3_lm_head_worker
import zero3_rollout_worker
import zero3_student_worker

from tropd_ds.process import exit_without_teardown


def main(root: Path) -> None:
    deepspeed.init_distributed(dist_backend="gloo")
    zero3_student_worker.main(str(root / "student"), str(root))
    zero3_lm_head_worker.main(str(root / "lm_head.json"))
    global_batch_worker.main(str(root / "global_batch_student"), str(root / "updates.json"))
    zero3_rollout_worker.main(str(root / "biased"), str(root / "plain"), str(root / "rollout.json"))


if __name__ == "__main__":
    main(Path([a for a in sys.argv[1:] if not a.startswith("--local_rank")][0]))
    exit_without_teardown(0)  # gloo's threads sometimes abort the interpreter's teardown (SIGABRT)
