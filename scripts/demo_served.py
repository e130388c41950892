"""`make demo-served`: the demo with its teacher served on its own process (`tropd-ds serve-teacher`): start the
service, train the demo (2 CPU ranks under the deepspeed launcher, teacher.url pointing at the service, rollout
micro-batches of 16 scored while the next ones decode), stop the service. Outputs under runs/demo-served/."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "runs" / "demo-served"


def main() -> int:
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"}
    address = OUT / "teacher.address"
    address.unlink(missing_ok=True)
    OUT.mkdir(parents=True, exist_ok=True)
    service_log = open(OUT / "teacher_service.log", "w")
    config = ROOT / "configs/demo_teacher_service.yaml"
    service = subprocess.Popen(
        [sys.executable, "-m", "tropd_ds.cli", "serve-teacher", "--config", str(config)],
        env=env, stdout=service_log, stderr=subprocess.STDOUT, start_new_session=True,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 300
        while not address.is_file():
            if service.poll() is not None or time.monotonic() > deadline:
                print((OUT / "teacher_service.log").read_text()[-3000:], file=sys.stderr)
                print("demo-served: the teacher service did not start", file=sys.stderr)
                return 1
            time.sleep(0.2)
        url = address.read_text().strip()
        print(f"demo-served: the teacher service answers at {url} (its log: {OUT / 'teacher_service.log'})", flush=True)
        sets = [
            "teacher.path=", "teacher.ds_config=", f"teacher.url={url}", "rollout.micro_batch_size=16",
            f"checkpoint.dir={OUT / 'checkpoints'}", f"checkpoint.export_dir={OUT / 'export'}",
            f"logging.dir={OUT / 'logs'}",
        ]  # fmt: skip
        deepspeed = str(Path(sys.executable).with_name("deepspeed"))
        cmd = [deepspeed, "--num_gpus", "2", "--module", "tropd_ds.train", "--config", str(ROOT / "configs/demo.yaml")]
        for item in sets:
            cmd += ["--set", item]
        return subprocess.run(cmd, env=env, cwd=ROOT, check=False).returncode
    finally:
        os.killpg(service.pid, signal.SIGTERM)
        service.wait(timeout=60)
        print("demo-served: the teacher service stopped", flush=True)


if __name__ == "__main__":
    sys.exit(main())
