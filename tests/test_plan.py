"""`tropd-ds plan`: model shapes from the shipped configs, model states against DeepSpeed's own
estimator, the CLI's text and JSON, and clear errors."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
import weakref
from pathlib import Path

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

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
    # the fused loss path is what lets long responses fit: full logits need far more (here 9.67 GiB against
    # one 1 GiB block of logits and the per-token terms, 1.13 GiB)
    assert g["loss_path_full_logits"] > 8 * g["phases"]["update"]["loss path (tropd_kernels)"]
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
    # gather_params auto (the default) follows the run's rule: whole when the bf16 weights take at most half a GPU
    auto = P.Workload()
    P.plan(student, teacher, hw, auto)
    assert auto.gather_for_generation is True and auto.teacher_gathered is False  # 15 GiB of 40; 131 of 40
    big = P.Workload()
    P.plan(student, teacher, P.Hardware(gpu_mem_gib=300.0), big)
    assert big.teacher_gathered is True  # 131 GiB of 150


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


# ---- the rollout prefill, the update's lm_head weight gradient and the host reserve


class LiveBytes(TorchDispatchMode):
    """Bytes of the tensors that the ops under this mode create, alive at once (peak): a storage counts from
    the op that makes it until no tensor the mode saw refers to it; views of `existing` (weights) count nothing."""

    def __init__(self, existing=(), keep=lambda t: True):
        super().__init__()
        self.existing = {t.untyped_storage().data_ptr() for t in existing}
        self.keep = keep
        self.storages: dict[int, list[int]] = {}  # data_ptr -> [bytes, tensors alive]
        self.now = self.peak = 0

    def _release(self, key):
        entry = self.storages[key]
        entry[1] -= 1
        if entry[1] == 0:
            self.now -= entry[0]
            del self.storages[key]

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if not isinstance(t, torch.Tensor):
                continue
            key = t.untyped_storage().data_ptr()
            if key == 0 or key in self.existing or (key not in self.storages and not self.keep(t)):
                continue
            if key not in self.storages:
                self.storages[key] = [t.untyped_storage().nbytes(), 0]
                self.now += self.storages[key][0]
                self.peak = max(self.peak, self.now)
            self.storages[key][1] += 1
            weakref.finalize(t, self._release, key)
        return out


# (family, rows, tokens, d, ffn, heads, kv heads, head dim): the last layer's MLP is the peak (the shipped
# models at the presets' shape), attention with its [T, T] mask, RoPE, RMSNorm; GQA K and V copied to every
# head, MQA (one KV head: a view) and plain multi-head attention; Qwen2's q/k/v biases.
PREFILL_SHAPES = [
    ("llama", 4, 512, 64, 1024, 4, 2, 16),
    ("qwen2", 3, 300, 96, 384, 6, 2, 16),
    ("llama", 4, 512, 128, 256, 4, 2, 32),
    ("llama", 2, 1024, 64, 128, 4, 1, 16),
    ("llama", 2, 64, 256, 64, 4, 4, 64),
    ("llama", 2, 64, 256, 32, 2, 1, 32),
]


@pytest.mark.parametrize("family,rows,tokens,d,ffn,heads,kv_heads,head_dim", PREFILL_SHAPES)
def test_the_prefill_term_is_the_peak_of_a_real_prefill_to_the_byte(family, rows, tokens, d, ffn, heads, kv_heads,
                                                                     head_dim):  # fmt: skip
    """The rollout's prefill as `GenerateRollout._decode` runs it (transformers' SDPA, left padding, a
    DynamicCache, logits_to_keep=1): the peak of the tensors it creates is the plan's prefill working set
    plus the KV cache it writes, on CPU, where the plan's attention path (a bf16 additive mask from the
    bool one, no [T, T] scores) is the one torch takes too."""
    from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    config_cls, model_cls = (LlamaConfig, LlamaForCausalLM) if family == "llama" else (Qwen2Config, Qwen2ForCausalLM)
    layers, vocab = 2, 512
    config = config_cls(
        hidden_size=d,
        intermediate_size=ffn,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        head_dim=head_dim,
        num_hidden_layers=layers,
        vocab_size=vocab,
        max_position_embeddings=4096,
    )
    config._attn_implementation = "sdpa"
    torch.manual_seed(0)
    lm = model_cls(config).to(torch.bfloat16).eval()
    ids = torch.randint(0, vocab, (rows, tokens))
    mask = torch.ones(rows, tokens, dtype=torch.long)
    mask[0, :3] = 0  # left padding, as the rollout's prompt batch has
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    live = LiveBytes([*lm.parameters(), *lm.buffers()])
    with torch.no_grad(), live:
        lm(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True, logits_to_keep=1,
           cache=DynamicCache(config=config))  # fmt: skip
    arch = P.Arch(family, d, ffn, layers, heads, kv_heads, head_dim, vocab, False, family == "qwen2")
    kv_cache = 2 * layers * arch.kv_dim * 2 * rows * tokens
    assert live.peak == sum(P.prefill_bytes(arch, rows, tokens).values()) + kv_cache


def test_the_prefill_scales_with_rows_and_tokens_and_is_in_the_rollout_phase():
    llama = P.load_arch("llama-3.1-8b")
    rows, tokens = 16, 1024 + 8096
    # by hand, Llama-3.1-8B at 16 rows x 9,120 tokens: the [rows, 1, T, T] bool mask, RoPE's cos and sin (bf16
    # [rows, T, 128] each), 4 bf16 [rows, T, 4096] hidden states and act(gate), up and their product (bf16
    # [rows, T, 14336] each) in the last layer's MLP
    n = rows * tokens
    hand = rows * tokens**2 + 2 * 2 * n * 128 + 4 * 2 * n * 4096 + 3 * 2 * n * 14336
    terms = P.prefill_bytes(llama, rows, tokens)
    assert sum(terms.values()) == hand and "MLP temporaries" in terms
    assert 18.5e9 < hand < 19e9  # the "13-15 GB" counted gate and up only, not their product
    # linear in the rows; in the tokens but for the mask, which is quadratic
    assert P.prefill_bytes(llama, 2 * rows, tokens) == {k: 2 * v for k, v in terms.items()}
    longer = P.prefill_bytes(llama, rows, 2 * tokens)
    assert longer == {k: (4 if "mask" in k else 2) * v for k, v in terms.items()}
    # the plan adds it to the rollout phase, at the rollout micro-batch and prompt + response tokens
    r = P.plan(llama, P.load_arch("llama-3.1-70b"), P.Hardware(), P.Workload(rollout_micro_batch=rows))
    assert r["gpu_gib"]["phases"]["rollout"]["prefill working set"] == round(hand / 2**30, 2)
    assert r["gpu_gib"]["prefill"]["rows"] == rows and r["gpu_gib"]["prefill"]["tokens"] == tokens
    # without teacher prefixes the prefill is the prompts' (and so is its compute time)
    short = P.plan(llama, P.load_arch("llama-3.1-70b"), P.Hardware(),
                   P.Workload(rollout_micro_batch=rows, guidance=False))  # fmt: skip
    assert short["gpu_gib"]["prefill"]["tokens"] == 1024
    assert short["gpu_gib"]["phases"]["rollout"]["prefill working set"] == round(
        sum(P.prefill_bytes(llama, rows, 1024).values()) / 2**30, 2
    )
    assert short["step_seconds"]["detail"]["prefill_s"] < r["step_seconds"]["detail"]["prefill_s"] / 8
    assert P.Workload(guidance_max_len=2000).prefill_len() == 1024 + 2000
    assert P.Workload(response_len=500, guidance_max_len=2000).prefill_len() == 1024 + 500  # within the response


def test_a_run_configs_prefill_covers_its_prompts_and_teacher_prefixes():
    preset = str(ROOT / "configs/presets/llama70b_to_llama8b_1x8.yaml")

    def tokens(*extra):
        return json.loads(run_plan("--config", preset, *extra, "--json").stdout)["gpu_gib"]["prefill"]["tokens"]

    assert tokens() == 1024 + 8096  # guidance_max_len defaults to max_new_tokens
    assert tokens("--set", "rollout.guidance_max_len=2000") == 1024 + 2000
    assert tokens("--set", "rollout.guidance=false") == 1024
    assert tokens("--response-len", "4000") == 1024 + 4000  # the CLI's lengths override the config's
    text = run_plan("--config", preset).stdout
    assert "prefill working set" in text and "12 rows x 9120 tokens (prompt + teacher prefix)" in text


def test_the_update_holds_the_lm_head_weight_gradient_as_two_fp32_v_by_d():
    key = "lm_head weight grad (fp32 + bf16)"
    for name in P.SHIPPED:  # an fp32 accumulator (2.2 GB for Qwen2.5-7B) and, at the end, its bf16 cast
        arch = P.load_arch(name)
        update = P.plan(arch, arch, P.Hardware(), P.Workload())["gpu_gib"]["phases"]["update"]
        assert update[key] == round((4 + 2) * arch.vocab * arch.hidden / 2**30, 2)
    lora = P.plan(arch, arch, P.Hardware(), P.Workload(trainable_params=1e7))  # a frozen lm_head: no weight gradient
    assert lora["gpu_gib"]["phases"]["update"][key] == 0
    # the loss path's block is the kernels' own CUDA block
    from tropd_kernels.projection import HIDDEN_CHUNK_BYTES

    assert P.LOSS_CHUNK_BYTES == HIDDEN_CHUNK_BYTES["cuda"]


def test_the_kernels_backward_holds_one_fp32_v_by_d_at_once():
    """token_terms_from_hidden's backward, several chunks: the [V, d] fp32 tensors it creates peak at what the
    plan counts for an fp32 weight (so that the operand is the weight itself, as a bf16 one is on CUDA): one
    accumulator, each chunk's product added in place (a fresh product per chunk made it two until
    2026-11-30), and no cast at the end."""
    import tropd_kernels as tk

    n, d, vocab, k = 24, 16, 96, 4
    torch.manual_seed(0)
    hidden = torch.randn(n, d, requires_grad=True)
    weight = torch.randn(vocab, d, requires_grad=True)
    targets = torch.randint(0, vocab, (n,))
    logprobs, ids = torch.randn(n, vocab).log_softmax(-1).topk(k)
    teacher = tk.TeacherTopK(ids, logprobs, logprobs[:, 0], torch.ones(n))
    terms = tk.token_terms_from_hidden(hidden, weight, targets, teacher, chunk_size=5, backend="torch")
    loss = terms.logprob.sum() + terms.fkl.sum()
    live = LiveBytes([weight, hidden], keep=lambda t: t.shape == (vocab, d) and t.dtype == torch.float32)
    with live:
        loss.backward()
    arch = P.Arch("x", d, 1, 1, 1, 1, d, vocab, False, False)
    assert weight.grad is not None and live.peak == P.lm_head_grad_bytes(arch, weight_bytes=4) == 4 * vocab * d


def test_host_memory_keeps_a_reserve_and_a_plan_that_eats_it_does_not_fit():
    student, hw = P.load_arch("llama-3.1-8b"), P.Hardware()
    r = P.plan(student, P.load_arch("llama-3.1-70b"), hw, P.Workload(rollout_micro_batch=16))
    h = r["host_gib_per_node"]
    assert h["reserve: OS and page cache"] == 32 and h["reserve: 8 processes"] == 8 * 6
    assert h["reserve: 8 checkpoint tensors staged"] == 8 * 5
    assert h["reserve: student export (bf16, rank 0)"] == round(2 * student.params() / 2**30, 2)
    assert h["total"] == pytest.approx(h["counted"] + h["reserve"], abs=0.02) and h["reserve"] > 130
    # the teacher the 90%-of-host rule allowed (561 layers of Llama-3.1-70B's shape, 482 B) leaves less than the
    # reserve beside the student: reported, and fits again only without the reserve
    big = dataclasses.replace(P.load_arch("llama-3.1-70b"), layers=561)
    wl = P.Workload(rollout_micro_batch=16)
    tight = P.plan(student, big, hw, wl)
    assert tight["host_gib_per_node"]["counted"] <= 0.9 * hw.host_mem_gib  # what the 90% rule let through
    assert not tight["fits_host"] and not tight["fits"] and tight["fits_gpu"]
    text = P.format_plan(tight)
    assert "DOES NOT FIT (the reserve needs" in text and "verdict: does NOT fit: host" in text
    none = dataclasses.replace(hw, host_os_gib=0, host_process_gib=0, host_staging_gib=0)
    assert P.plan(student, big, none, wl)["fits_host"]
    # the reserve's figures are flags of the CLI
    out = run_plan("--student", "llama-3.1-8b", "--teacher", "llama-3.1-70b", "--rollout-micro-batch", "16",
                   "--host-mem-gib", "290", "--host-process-gib", "7")  # fmt: skip
    assert out.returncode == 1 and "reserve: 8 processes                         56.00" in out.stdout, out.stdout


def test_a_decoded_token_costs_the_weights_and_one_pass_over_the_kv_cache_or_the_host_if_larger():
    """Per decoded token the GPU reads the bf16 weights and the KV cache once (attention's read: the cache is
    written in place, tests/test_rollout.py checks its layers are views of one buffer), at the cache's
    average size; the host issues each layer's launches from Python; a token costs the larger."""
    llama = P.load_arch("llama-3.1-8b")
    teacher = P.load_arch("llama-3.1-70b")
    rows, seq, response = 16, 1024 + 8096, 8096
    wl = P.Workload(rollout_micro_batch=rows)
    ps = llama.params()
    hbm = 3350e9 * 0.6
    kv_mid = 2 * llama.layers * llama.kv_dim * 2 * seq * rows / 2
    r = P.plan(llama, teacher, P.Hardware(), wl)
    d = r["step_seconds"]["detail"]
    assert d["decode_ms"]["weights"] == round(2 * ps / hbm * 1e3, 2)
    assert d["decode_ms"]["kv_cache"] == round(kv_mid / hbm * 1e3, 2)
    assert d["decode_ms"]["host"] == round(32 * 0.6, 2)
    gpu_ms = (2 * ps + kv_mid) / hbm * 1e3
    assert d["decode_ms"]["gpu"] == round(gpu_ms, 2) and d["decode_per_token_ms"] == round(max(gpu_ms, 19.2), 2)
    # no host cost: the GPU's time alone; a slow host: the host's alone, batch size or not
    fast = P.plan(llama, teacher, P.Hardware(decode_host_ms_per_layer=0.0), wl)["step_seconds"]
    assert fast["detail"]["decode_per_token_ms"] == round(gpu_ms, 2)
    slow = P.plan(llama, teacher, P.Hardware(decode_host_ms_per_layer=2.0), wl)["step_seconds"]
    assert slow["detail"]["decode_per_token_ms"] == 64.0
    chunks = -(-r["rollouts_per_gpu"] // rows)
    decode_s = slow["rollout"] - slow["detail"]["prefill_s"] - slow["detail"]["gather_student_s"]
    assert decode_s == pytest.approx(chunks * response * 0.064, abs=0.2)
    text = P.format_plan(r)
    assert f"KV cache {d['decode_ms']['kv_cache']})" in text and "0.6 ms x 32 layers, assumed" in text


def test_the_gather_flags_take_auto_true_or_false_and_name_a_bad_value():
    """--gather-for-generation and --teacher-gathered are true / false / auto like rollout.gather_params and
    teacher.gather_params (they were parsed as integers: `false` was refused)."""
    base = ["--student", "llama-3.1-8b", "--teacher", "llama-3.1-70b", "--rollout-micro-batch", "12", "--json"]
    cmd = [sys.executable, "-m", "tropd_ds.plan", *base]
    runs = {
        v: subprocess.run(cmd + ["--gather-for-generation", v], capture_output=True, text=True, cwd=ROOT)
        for v in ("false", "auto", "maybe")
    }
    off, auto = (json.loads(runs[v].stdout) for v in ("false", "auto"))
    assert off["workload"]["gather_for_generation"] is False and auto["workload"]["gather_for_generation"] is True
    assert off["step_seconds"]["rollout"] > 2 * auto["step_seconds"]["rollout"]  # layer by layer, every token
    assert runs["maybe"].returncode == 2 and "'maybe': expected auto or one of true" in runs["maybe"].stderr


def test_a_served_teacher_leaves_the_students_gpus_and_hosts_and_overlaps_with_the_rollout():
    """--teacher-gpus N: no teacher memory on the student's side, the teacher's own GPUs and hosts planned apart,
    and with rollout micro-batches a step of max(rollout, first micro-batch + scoring) + update."""
    student, teacher = P.load_arch("llama-3.1-8b"), P.load_arch("llama-3.1-70b")
    hw = P.Hardware()
    wl = dict(rollout_micro_batch=8, teacher_offload="cpu", teacher_gathered=False)
    local = P.plan(student, teacher, hw, P.Workload(**wl))
    served = P.plan(student, teacher, hw, P.Workload(teacher_gpus=8, **wl))
    assert "teacher streaming buffers" in local["gpu_gib"]["resident"]
    assert not any("teacher" in k for k in served["gpu_gib"]["resident"])
    assert "teacher scoring" in local["gpu_gib"]["phases"] and "teacher scoring" not in served["gpu_gib"]["phases"]
    assert "teacher parameters (pinned)" in local["host_gib_per_node"]
    assert not any("teacher" in k for k in served["host_gib_per_node"])
    service = served["teacher_service"]
    pinned = 2 * teacher.params() / P.GiB
    assert service["host_gib_per_node"]["teacher parameters (pinned)"] == pytest.approx(pinned, abs=0.01)
    assert (service["gpus"], service["nodes"], service["rollouts_per_gpu"]) == (8, 1, 64)
    assert service["gpu_gib"]["scoring"] == local["gpu_gib"]["phases"]["teacher scoring"]
    st, lst = served["step_seconds"], local["step_seconds"]
    assert st["teacher_scoring"] == lst["teacher_scoring"]  # the same teacher work on as many GPUs of its own
    chunks = 64 // 8
    rollout, scoring, update = st["rollout"], st["teacher_scoring"], st["update"]
    expected = max(rollout, rollout / chunks + scoring + st["teacher_transfer"]) + update
    assert st["overlapped"] and st["total"] == pytest.approx(expected, abs=0.2)
    assert st["total"] < lst["total"] == pytest.approx(rollout + scoring + update, abs=0.2)
    # one rollout micro-batch: nothing to overlap, the sum again; twice the service's GPUs: half the scoring
    whole = P.plan(student, teacher, hw, P.Workload(teacher_gpus=8, **{**wl, "rollout_micro_batch": 0}))
    assert not whole["step_seconds"]["overlapped"]
    w = whole["step_seconds"]
    assert w["total"] == pytest.approx(w["rollout"] + w["teacher_scoring"] + w["teacher_transfer"] + update, abs=0.2)
    double = P.plan(student, teacher, hw, P.Workload(teacher_gpus=16, **wl))
    assert double["teacher_service"]["nodes"] == 2 and double["teacher_service"]["rollouts_per_gpu"] == 32
    assert double["step_seconds"]["detail"]["teacher_passes"] == 8


def test_plan_cli_takes_teacher_gpus_and_prints_the_service():
    out = subprocess.run(
        [sys.executable, "-m", "tropd_ds.cli", "plan", "--config", "llama70b_to_llama8b_1x8", "--teacher-gpus", "8"],
        capture_output=True, text=True, check=False, cwd=ROOT,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert "teacher service: 1 node(s), 8 GPUs, 64 rollouts per GPU" in out.stdout
    assert "each rollout micro-batch is scored while the next decodes" in out.stdout
