"""`tropd-ds plan`: model shapes from the shipped configs, model states against DeepSpeed's own
estimator, the CLI's text and JSON, and clear errors."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tropd_ds import plan as P

ROOT = Path(__file__).resolve().parents[1]
PUBLISHED_B = {"llama-3.1-8b": 8.03, "llama-3.1-70b": 70.55, "qwen2.5-7b": 7.62, "qwen2.5-72b": 72.71}


@pytest.mark.parametrize("name", P.SHIPPED)
def test_parameter_counts_equal_the_model_built_on_the_meta_device(name):
    from transformers import AutoConfig, AutoModelForCausalLM

    arch = P.load_arch(name)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(ROOT / "configs/models" / name))
    assert arch.params() == sum(p.numel() for p in model.parameters())
    assert arch.largest_layer_params() == max(
        sum(p.numel() for p in m.parameters(recurse=False)) for m in model.modules()
    )
    assert round(arch.params() / 1e9, 2) == PUBLISHED_B[name]


@pytest.mark.parametrize("name", P.SHIPPED)
@pytest.mark.parametrize("gpus_per_node,nodes", [(8, 1), (8, 2), (1, 1), (4, 3)])
@pytest.mark.parametrize("offload", P.STUDENT_OFFLOADS)
def test_model_states_agree_with_deepspeeds_estimator_within_5_percent(name, gpus_per_node, nodes, offload):
    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs

    arch = P.load_arch(name)
    hw = P.Hardware(gpus_per_node=gpus_per_node, nodes=nodes)
    gpu, host = P.student_model_states(arch, hw, offload)
    cpu_ref, gpu_ref, _ = estimate_zero3_model_states_mem_needs(
        total_params=arch.params(),
        largest_layer_params=arch.largest_layer_params(),
        num_gpus_per_node=gpus_per_node,
        num_nodes=nodes,
        cpu_offload=offload != "none",
        cpu_offload_params=offload == "optimizer+params",
        zero_init=True,
    )
    assert gpu == pytest.approx(gpu_ref, rel=0.05) and host == pytest.approx(cpu_ref, rel=0.05)


def run_plan(*args):
    return subprocess.run(
        [sys.executable, "-m", "tropd_ds.cli", "plan", *args], capture_output=True, text=True, cwd=ROOT
    )


def test_plan_cli_prints_the_budget_and_json_and_exit_status_says_whether_it_fits():
    base = ["--student", "llama-3.1-8b", "--teacher", "llama-3.1-70b", "--response-len", "8096"]
    whole = run_plan(*base, "--rollout-micro-batch", "0")
    assert whole.returncode == 1 and "DOES NOT FIT" in whole.stdout and "KV cache" in whole.stdout, (
        whole.stdout + whole.stderr
    )
    chunked = run_plan(*base, "--rollout-micro-batch", "16", "--json")
    assert chunked.returncode == 0, chunked.stdout + chunked.stderr
    r = json.loads(chunked.stdout)
    assert r["fits"] and r["rollouts_per_gpu"] == 64 and r["student"]["params"] == P.load_arch("llama-3.1-8b").params()
    g = r["gpu_gib"]
    assert g["total"] <= g["usable"] and g["peak_phase"] == "rollout"
    # the fused loss path is what lets long responses fit: full logits need far more
    assert g["loss_path_full_logits"] > 10 * g["phases"]["update"]["loss path (tropd_kernels)"]
    assert g["activations_without_checkpointing"] > 5 * g["activations_with_checkpointing"]
    st = r["step_seconds"]
    assert st["total"] == pytest.approx(st["rollout"] + st["teacher_scoring"] + st["update"], abs=0.2)
    # twice the GPUs: half the rollouts per GPU, less memory and less time per step
    two = json.loads(run_plan(*base, "--rollout-micro-batch", "16", "--nodes", "2", "--json").stdout)
    assert two["rollouts_per_gpu"] == 32 and two["step_seconds"]["total"] < st["total"]
    assert two["gpu_gib"]["resident"]["student model states"] < g["resident"]["student model states"]


def test_plan_reads_a_run_config():
    r = run_plan("--config", str(ROOT / "configs/presets/llama70b_to_llama8b_1x8.yaml"), "--json")
    assert r.returncode == 0, r.stdout + r.stderr
    out = json.loads(r.stdout)
    assert (
        out["workload"]["k"] == 64
        and out["workload"]["teacher_offload"] == "cpu"
        and out["workload"]["gradient_checkpointing"]
    )
    assert out["teacher"]["params"] == P.load_arch("llama-3.1-70b").params()


def test_plan_errors_name_the_bad_value():
    r = run_plan("--student", "llama-9b", "--teacher", "llama-3.1-70b")
    assert r.returncode == 2 and "model 'llama-9b': expected one of llama-3.1-8b" in r.stderr
    r = run_plan("--student", "llama-3.1-8b", "--teacher", "llama-3.1-70b", "--k", "200000")
    assert r.returncode == 2 and "k=200000 exceeds the vocabulary (128256)" in r.stderr
    r = run_plan("--student", "llama-3.1-8b", "--teacher", "llama-3.1-70b", "--nodes", "0")
    assert r.returncode == 2 and "nodes=0" in r.stderr
    r = run_plan("--student", "llama-3.1-8b", "--teacher", "llama-3.1-70b", "--teacher-offload", "disk")
    assert r.returncode == 2 and "invalid choice: 'disk'" in r.stderr


def test_a_gathered_teacher_is_planned_whole_on_each_gpu_while_scoring():
    student, teacher = P.load_arch("llama-3.1-8b"), P.load_arch("llama-3.1-70b")
    hw = P.Hardware()
    streamed = P.plan(student, teacher, hw, P.Workload())
    gathered = P.plan(student, teacher, hw, P.Workload(teacher_gathered=True))
    assert "gathered teacher (bf16)" not in streamed["gpu_gib"]["phases"]["teacher scoring"]
    added = gathered["gpu_gib"]["phases"]["teacher scoring"]["gathered teacher (bf16)"]
    assert added == pytest.approx(2 * teacher.params() / 2**30, abs=0.01)  # the whole bf16 teacher
    assert not gathered["fits"]  # 131 GiB of teacher on an 80 GiB GPU: the 70B presets stream it


def test_a_lora_student_is_planned_with_its_adapters_trained_and_its_base_frozen():
    lora = "student.lora={r: 16, target_modules: [q_proj, v_proj]}"
    preset = str(ROOT / "configs/presets/llama70b_to_llama8b_1x8.yaml")
    full, adapted = (json.loads(run_plan("--config", preset, *extra, "--json").stdout)
                     for extra in ([], ["--set", lora]))  # fmt: skip
    # Llama-3.1-8B: q_proj 4096 -> 4096 and v_proj 4096 -> 1024 in 32 layers, r (in + out) each
    trainable = 32 * 16 * ((4096 + 4096) + (4096 + 1024))
    assert adapted["workload"]["trainable_params"] == trainable and full["workload"]["trainable_params"] == 0
    p, gib = P.load_arch("llama-3.1-8b").params(), 2**30
    saved = (18 * p - (18 * trainable + 2 * (p - trainable))) / 8 / gib  # per GPU, 8 GPUs, no offload
    got = full["gpu_gib"]["resident"]["student model states"] - adapted["gpu_gib"]["resident"]["student model states"]
    assert got == pytest.approx(saved, abs=0.02)
