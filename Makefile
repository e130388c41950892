# Two commands do all the set-up on a fresh machine: `make test` (and, later, `make demo`).
VENV ?= .venv
PY := $(VENV)/bin/python
PYTEST_ARGS ?=

.PHONY: setup test test-faults test-served test-launches rehearse mutation demo demo-served bench-cpu bench-step gpu-check lint

setup: $(VENV)/.installed

# torch first, as the CPU build 2.13.0 when the venv has none: a bare `torch` requirement would
# pull a multi-GB CUDA build.
$(VENV)/.installed: setup.py
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e ".[dev,eval,peft,tensorboard]"
	touch $@

test: setup
	$(PY) -m pytest -q -p no:cacheprovider --durations=15 -m "not rehearsal and not faults and not served and not launches" $(PYTEST_ARGS) tests

# Faults injected into launched 2-rank runs (tests/test_reliability.py: signals, kill -9, crashes while saving,
# corrupt checkpoints, full disks, a lost peer), each against the uninterrupted run; about 5 minutes, CI runs
# it after `make test`.
test-faults: setup
	$(PY) -m pytest -q -p no:cacheprovider --durations=10 -m "faults and not rehearsal" $(PYTEST_ARGS) tests

# The teacher served on its own ranks (tests/test_teacher_service.py): served = in-job metrics on 1 and 2 service
# ranks, a service killed and restarted mid-run, one gone past teacher.wait_minutes and the exact resume, bad
# requests over HTTP; several teachers routed by a data column (tests/test_several_teachers.py); CI runs it
test-served: setup
	$(PY) -m pytest -q -p no:cacheprovider --durations=10 -m "served" $(PYTEST_ARGS) tests

# More launched runs, each whole in itself (tests marked `launches`): torchrun and accelerate start the training the
# deepspeed launcher starts, plain OPD on the demo does not learn to emit pad; out of `make test` to keep it under 10
# minutes on 2 cores; CI runs it
test-launches: setup
	$(PY) -m pytest -q -p no:cacheprovider --durations=10 -m "launches" $(PYTEST_ARGS) tests

# The rehearsal of a first GPU run, on CPU ranks: the Llama-3.1, Qwen2.5 (padded rows; tied and untied),
# Mistral and Gemma-2 vocabulary layouts, each 3 steps on 2 CPU ranks, evaluated and exported; a padded head
# whose padding rows are likely; a rank held back past the collective time-out; the Triton kernels compiled
# for sm_80 and sm_90 with ptxas; the GPU check's flow (about 3 minutes; CI runs it after `make test`).
rehearse: setup
	$(PY) -m pytest -q -p no:cacheprovider --durations=10 -m rehearsal $(PYTEST_ARGS) tests

# Mutation testing (mutmut) of tropd_kernels' torch paths and checks, the objectives, the rollout's masks and
# the config checks against their fast tests; report in build/mutation/report.md, survivors argued in
# docs/TESTING.md. Not part of `make test` (a complete run: about 3 hours on 2 cores); re-running continues where it stopped.
mutation: setup
	$(PY) -m pip install -q -e ".[mutation]"
	$(PY) scripts/mutation_test.py $(MUTATION_ARGS)

# The main job: TrOPD with guidance on the embedded demo task, 2 CPU ranks under the deepspeed
# launcher. Uses the shipped demo_assets/ (rebuilt by scripts/build_demo_models.py if missing).
demo: setup
	test -f demo_assets/teacher/model.safetensors || $(PY) scripts/build_demo_models.py --out demo_assets
	rm -rf runs/demo
	DS_ACCELERATOR=cpu OMP_NUM_THREADS=1 $(VENV)/bin/deepspeed --num_gpus 2 --module tropd_ds.train --config configs/demo.yaml
	$(PY) scripts/plot_metrics.py runs/demo/logs/metrics.jsonl --out runs/demo/plots

# The demo with its teacher served on its own process (tropd-ds serve-teacher), started and stopped around the run;
# outputs in runs/demo-served/
demo-served: setup
	test -f demo_assets/teacher/model.safetensors || $(PY) scripts/build_demo_models.py --out demo_assets
	rm -rf runs/demo-served
	$(PY) scripts/demo_served.py
	$(PY) scripts/plot_metrics.py runs/demo-served/logs/metrics.jsonl --out runs/demo-served/plots

bench-cpu: setup
	$(PY) scripts/bench_kernels.py --preset cpu --out bench_out/cpu

# Per-phase step time on tiny models, and TRL's DistillationTrainer on the same work (docs/BENCHMARKS.md).
bench-step: setup
	$(PY) -m pip install -q -e ".[bench]"
	$(PY) scripts/bench_step.py --out bench_out/step

# On a machine lent a GPU, with its own python3 (torch, triton): env, kernels on CUDA, GPU benchmarks and a
# short real run within a 420 s budget, results in $OUT (at most 8 files); the wheels it lacks come from
# scripts/gpu_wheels.sh (docs/GPU.md has the one-line device command). Without CUDA (here, with the venv's
# python) it rehearses the same flow on the CPU. No `setup` prerequisite: the device has no venv.
GPU_PY ?= $(if $(wildcard $(PY)),$(PY),python3)
GPU_CHECK_ARGS ?=
gpu-check:
	$(GPU_PY) scripts/gpu_check.py --out $${OUT:-gpu_out} $(GPU_CHECK_ARGS)

# ruff's checks and its formatting (ruff.toml; CI runs this first); `pre-commit install` runs the same on commit
lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
