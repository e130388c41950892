"""`tropd-ds plan`: will a run fit, and roughly how long is a step? Answered from configs alone.

Memory per GPU and per host for the student (ZeRO-3 training), the teacher (ZeRO-3 inference with
offloaded parameters), the rollout (gathered student + KV cache), activations and the loss path;
and a step-time estimate split into rollout, teacher scoring and update, from stated hardware
figures. Every figure is a formula over the model shapes printed with it, not a measurement.

The rollout phase adds the prefill's working set to the gathered student and the KV cache; the update
adds the lm_head weight gradient's fp32 accumulator and bf16 copy to the activations and the loss path; host memory
keeps a reserve for the OS and page cache, each rank's own process and the checkpoints' staging
(`Hardware`'s host_* fields), and a plan whose total with that reserve exceeds the host does not fit.

Model states follow DeepSpeed's accounting for ZeRO-3 (`estimate_zero3_model_states_mem_needs`,
zero_init on): 18 bytes per trained parameter (bf16 parameter and gradient, fp32 master weights,
Adam's two moments, and gradient buffers) spread over the GPUs or, when offloaded, over the hosts
with a 1.5x buffer factor, plus the largest layer gathered in full on each GPU.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from tropd_kernels.projection import HIDDEN_CHUNK_BYTES

from .config import gather_fits
from .exit_codes import ExitCode
from .resources import shipped

GiB = 2**30
MODELS_DIR = shipped("configs", "models")  # the shipped model shapes (a clone's, or a wheel's copy)
SHIPPED = ("llama-3.1-8b", "llama-3.1-70b", "qwen2.5-7b", "qwen2.5-72b")
CPU_BUFFER_FACTOR = 1.5  # DeepSpeed's additional_buffer_factor for host memory
LOSS_CHUNK_BYTES = HIDDEN_CHUNK_BYTES["cuda"]  # tropd_kernels' fp32 [chunk, V] block of logits on CUDA
GPU_RESERVE = 0.9  # plan for 90% of the card: CUDA context, allocator fragmentation, NCCL buffers


@dataclass
class Arch:
    """The shape of a Llama-family decoder (Llama, Qwen2, Mistral ...) read from config.json."""

    name: str
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    tied: bool
    qkv_bias: bool

    @property
    def kv_dim(self) -> int:
        return self.kv_heads * self.head_dim

    def layer_params(self) -> int:
        h, q = self.hidden, self.heads * self.head_dim
        attn = h * q + 2 * h * self.kv_dim + q * h + ((q + 2 * self.kv_dim) if self.qkv_bias else 0)
        return attn + 3 * h * self.intermediate + 2 * h

    def params(self) -> int:
        emb = self.vocab * self.hidden
        return emb * (1 if self.tied else 2) + self.layers * self.layer_params() + self.hidden

    def largest_layer_params(self) -> int:
        """The largest module's own parameters, as DeepSpeed's model_to_params counts them."""
        h, q = self.hidden, self.heads * self.head_dim
        return max(self.vocab * h, h * self.intermediate, h * q + (q if self.qkv_bias else 0))


SHAPE_KEYS = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "vocab_size")


def read_model_config(path: Path) -> dict:
    """A model's config.json as a dict, or a ValueError naming the file (and the line and column of a syntax
    error)."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ValueError(f"model config {str(path)!r} cannot be read: {exc}") from exc
    try:
        c = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValueError(
            f"model config {str(path)!r} line {exc.lineno} column {exc.colno}: JSON syntax error: {exc.msg}"
        ) from exc
    if not isinstance(c, dict):
        raise ValueError(
            f"model config {str(path)!r} holds a {type(c).__name__}: expected a JSON object of the model's settings "
            "(hidden_size, num_attention_heads, ...)"
        )
    return c


def load_arch(spec: str) -> Arch:
    """A shipped name (see SHIPPED), a model folder, or a config.json path."""
    path = Path(spec)
    if spec in SHIPPED:
        path = MODELS_DIR / spec / "config.json"
    elif path.is_dir():
        path = path / "config.json"
    if path.is_file():
        c = read_model_config(path)
    elif spec.count("/") != 1 or spec.startswith((".", "/", "~")):
        raise ValueError(
            f"model {spec!r}: expected one of {', '.join(SHIPPED)}, a model folder, a config.json file or a hub id "
            "org/name"
        )
    else:
        try:  # a hub id (from the hub, or its offline cache)
            from transformers import AutoConfig

            c = AutoConfig.from_pretrained(spec).to_dict()
        except Exception as exc:
            raise ValueError(
                f"model {spec!r}: expected one of {', '.join(SHIPPED)}, a model folder, a config.json file or a hub "
                f"id ({exc})"
            ) from exc
    c = c.get("text_config", c)
    if not isinstance(c, dict):
        raise ValueError(f"model config {str(path)!r}: text_config is a {type(c).__name__}: expected a JSON object")
    missing = [k for k in SHAPE_KEYS if k not in c]
    if missing:
        raise ValueError(
            f"model config {str(path)!r} lacks {', '.join(missing)}: expected a decoder-only (Llama-family) config"
        )
    for key in (*SHAPE_KEYS, "num_key_value_heads", "head_dim"):
        value = c.get(key)
        if key in SHAPE_KEYS or value is not None:
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(
                    f"model config {str(path)!r}: {key}={value!r} ({type(value).__name__}): expected a positive integer"
                )
    heads = c["num_attention_heads"]
    kv_heads = c.get("num_key_value_heads") or heads
    if heads % kv_heads:
        raise ValueError(
            f"model config {str(path)!r}: num_attention_heads={heads} is not a multiple of num_key_value_heads="
            f"{kv_heads}: expected whole groups of query heads per key/value head"
        )
    if not c.get("head_dim") and c["hidden_size"] % heads:
        raise ValueError(
            f"model config {str(path)!r}: hidden_size={c['hidden_size']} is not a multiple of num_attention_heads="
            f"{heads} and there is no head_dim: expected hidden_size divisible by the heads, or a head_dim"
        )
    return Arch(
        name=spec if spec in SHIPPED else str(path.parent.name),
        hidden=c["hidden_size"],
        intermediate=c["intermediate_size"],
        layers=c["num_hidden_layers"],
        heads=heads,
        kv_heads=kv_heads,
        head_dim=c.get("head_dim") or c["hidden_size"] // heads,
        vocab=c["vocab_size"],
        tied=bool(c.get("tie_word_embeddings", False)),
        qkv_bias=bool(c.get("attention_bias", c.get("model_type") == "qwen2")),
    )


KV_CACHE_PASSES = 1  # reads of the whole KV cache per decoded token (see plan())


@dataclass
class Hardware:
    gpus_per_node: int = 8
    nodes: int = 1
    gpu_mem_gib: float = 80.0
    host_mem_gib: float = 1024.0  # per node
    tflops: float = 989.0  # dense bf16 peak per GPU (H100 SXM)
    mfu: float = 0.4  # fraction of peak reached by large matmuls
    hbm_gbs: float = 3350.0
    hbm_efficiency: float = 0.6  # of HBM bandwidth reached by decoding (HF generate is far from vLLM)
    # The host's share of one decoded token: an eager Hugging Face forward issues every module from Python, a
    # few dozen kernel launches per decoder layer, whatever the batch. The GPU runs them asynchronously (the
    # decode loop syncs only every 16 tokens), so a token costs the larger of this and the GPU's own time.
    # 0.6 ms per layer is an assumption, not a measurement on our code: it is what HF's eager decode of an 8B
    # model at about 30 tokens/s per sequence implies, where HBM alone would allow 150+. The GPU check's
    # rollout micro-benchmark replaces it when a GPU is at hand.
    decode_host_ms_per_layer: float = 0.6
    pcie_gbs: float = 25.0  # effective host<->GPU per GPU
    intra_gbs: float = 300.0  # NVLink all-gather bus bandwidth per GPU
    inter_gbs: float = 40.0  # network per GPU across nodes (e.g. 400 Gb/s InfiniBand)
    nvme_gbs: float = 6.0  # NVMe read per node
    cpu_adam_params_per_s: float = 1.0e9  # DeepSpeed CPU Adam per GPU's share
    # Host memory the plan keeps free besides what it counts (the total with it must fit in host_mem_gib):
    # the OS, its daemons and the page cache that checkpoint and data reads go through (a node whose pinned
    # memory leaves no page cache re-reads the disk while 140 GB of teacher load);
    host_os_gib: float = 32.0
    # one rank's own resident memory: the Python interpreter, the torch / CUDA / NCCL libraries and the CUDA
    # context (3-5 GiB for a process that imported torch, DeepSpeed and transformers and initialised CUDA),
    # the tokenizer and its share of the data set;
    host_process_gib: float = 6.0
    # and, per rank, one checkpoint tensor staged on the host: from_pretrained reads a safetensors shard (the
    # 70B/72B checkpoints ship <= 5 GB shards, transformers' default max_shard_size) and DeepSpeed's save copies
    # each GPU tensor to the host in turn (ZeRO-3's fp32 sub-groups of <= 1e9 elements: <= 4 GB).
    # The export (export.export) adds the whole bf16 student on rank 0's host (plan() counts it).
    host_staging_gib: float = 5.0

    @property
    def gpus(self) -> int:
        return self.gpus_per_node * self.nodes

    def collective_gbs(self) -> float:
        return self.intra_gbs if self.nodes == 1 else min(self.intra_gbs, self.inter_gbs)


@dataclass
class Workload:
    prompt_len: int = 1024
    response_len: int = 8096
    prompts_per_step: int = 128
    samples_per_prompt: int = 4
    student_micro_batch: int = 1
    teacher_micro_batch: int = 4
    rollout_micro_batch: int = 0  # sequences generated at once per GPU; 0 = all of the GPU's share
    # the rollout's prefill runs over the prompt batch padded to its longest prompt + teacher prefix: with
    # guidance (rollout.guidance) prefixes of up to guidance_max_len tokens (0 = response_len, as
    # rollout.guidance_max_len), which a guided run's first steps reach
    guidance: bool = True
    guidance_max_len: int = 0

    k: int = 64
    student_offload: str = "none"  # none | optimizer | optimizer+params
    teacher_offload: str = "cpu"  # none | cpu | nvme
    gradient_checkpointing: bool = True
    gather_for_generation: bool | str = "auto"  # rollout.gather_params
    teacher_gathered: bool | str = "auto"  # teacher.gather_params: the whole teacher on each GPU while scoring
    teacher_prefetch_params: float = 5e7  # stage3_prefetch_bucket_size
    nvme_buffer_count: int = 5  # offload_param.buffer_count (NVMe)
    nvme_buffer_size: float = 1e9  # offload_param.buffer_size, parameters per buffer
    trainable_params: float = 0  # a LoRA student's adapter parameters; 0 = every parameter trains
    # GPUs of a teacher served on machines of its own (tropd-ds serve-teacher, teacher.url), of the same kind
    # as the student's; 0: the teacher shares the student's GPUs and hosts
    teacher_gpus: int = 0

    def prefill_len(self) -> int:
        prefix = min(self.guidance_max_len or self.response_len, self.response_len) if self.guidance else 0
        return self.prompt_len + prefix

    def rollouts_per_gpu(self, gpus: int) -> int:
        return math.ceil(self.prompts_per_step * self.samples_per_prompt / gpus)


STUDENT_OFFLOADS = ("none", "optimizer", "optimizer+params")
TEACHER_OFFLOADS = ("none", "cpu", "nvme")


def student_model_states(arch: Arch, hw: Hardware, offload: str, trainable: float = 0) -> tuple[float, float]:
    """(bytes per GPU, bytes per host) of ZeRO-3 training states, DeepSpeed's accounting: 18 bytes per
    trained parameter; a LoRA student's frozen base keeps only its bf16 copy (2 bytes), and its `trainable`
    adapter parameters the 18."""
    p, largest = arch.params(), arch.largest_layer_params()
    t = trainable or p
    frozen = p - t if trainable else 0
    gathered = 4 * largest  # the largest layer's bf16 parameter and gradient in full
    if offload == "none":
        return gathered + (18 * t + 2 * frozen) / hw.gpus, 4 * largest * hw.gpus_per_node * CPU_BUFFER_FACTOR
    if offload == "optimizer":  # fp32 master, Adam moments and fp32 gradients on the host
        return gathered + 2 * (t + frozen) / hw.gpus, 16 * t / hw.nodes * CPU_BUFFER_FACTOR
    if offload == "optimizer+params":
        return gathered, (18 * t + 2 * frozen) / hw.nodes * CPU_BUFFER_FACTOR
    raise ValueError(f"student offload {offload!r}: expected one of {', '.join(STUDENT_OFFLOADS)}")


def prefill_bytes(arch: Arch, rows: int, tokens: int) -> dict[str, int]:
    """The working set of one no-grad Hugging Face forward over `rows` x `tokens` (the rollout's prefill:
    `rollout.GenerateRollout._decode`, `logits_to_keep=1`) besides the weights and the KV cache it writes;
    its peak is in the last layer. Attention is transformers' SDPA (its default attn_implementation, no
    [T, T] scores): left padding makes transformers build one [rows, 1, T, T] bool mask per forward, torch's
    SDPA turns it into a bf16 additive mask in every layer, and with a mask grouped-query K and V are
    copied to every head (`repeat_kv`; a view when there is a single KV head). Each term agrees to the
    byte with the live tensors of a real prefill on CPU (tests/test_plan.py); on CUDA the memory-efficient
    kernel may also pad the bf16 mask's last dimension to its alignment for a moment (attention only, not
    the MLP peak of the shipped models)."""
    n, q = rows * tokens, arch.heads * arch.head_dim
    hidden = 2 * n * arch.hidden  # one bf16 [rows, T, d]
    repeated = 1 < arch.kv_heads < arch.heads
    # in attention the embeddings, the layer's input and its normed copy are alive (3 hidden), and either
    # RoPE's temporaries beside q (x cos, rotate_half(x) and its product with sin, or their sum; k and v are
    # the size of the layer's KV cache, not written yet) or, in SDPA, the rotated queries, K and V repeated to
    # every head, the output, its fp32 log-sum-exp and the bf16 additive mask (K and V are the KV cache's)
    rope = 2 * n * q + 2 * n * max(3 * q, q + 3 * arch.kv_dim)
    sdpa = 2 * n * q * (4 if repeated else 2) + 4 * rows * arch.heads * tokens + 2 * rows * tokens * tokens
    attention = 3 * hidden + max(rope, sdpa)
    # in the MLP: embeddings, layer input, residual and normed input (4 hidden), then act(gate), up and their
    # product, [rows, T, ffn] each (gate itself is freed once act(gate) exists)
    mlp = 4 * hidden + 3 * 2 * n * arch.intermediate
    # RMSNorm after attention: embeddings, layer input and residual; two fp32 [rows, T, d] temporaries and the
    # fp32 variance and its rsqrt
    norm = 3 * hidden + 2 * 4 * n * arch.hidden + 2 * 4 * n
    layer = {"attention": (3, attention), "MLP": (4, mlp), "RMSNorm": (3, norm)}
    peak_at = max(layer, key=lambda k: layer[k][1])
    copies, peak = layer[peak_at]
    return {
        "4D attention mask (bool)": rows * tokens * tokens,
        "rotary cos and sin": 2 * 2 * n * arch.head_dim,
        f"{copies} hidden states [rows, T, d]": copies * hidden,
        f"{peak_at} temporaries": peak - copies * hidden,
    }


def lm_head_grad_bytes(arch: Arch, weight_bytes: int = 2) -> int:
    """The update's lm_head weight gradient in `token_terms_from_hidden`'s backward: one fp32 [V, d]
    accumulator that each chunk's product is added into in place, and at the end its cast to the weight's
    dtype (none for an fp32 weight): 6 V d bytes for a bf16 lm_head."""
    return (4 + (weight_bytes if weight_bytes != 4 else 0)) * arch.vocab * arch.hidden


def host_reserve(student: Arch, hw: Hardware) -> dict[str, float]:
    """Host bytes per node kept free for what the plan does not count as model state (Hardware's host_* fields)."""
    return {
        "reserve: OS and page cache": hw.host_os_gib * GiB,
        f"reserve: {hw.gpus_per_node} processes": hw.gpus_per_node * hw.host_process_gib * GiB,
        f"reserve: {hw.gpus_per_node} checkpoint tensors staged": hw.gpus_per_node * hw.host_staging_gib * GiB,
        "reserve: student export (bf16, rank 0)": 2 * student.params(),
    }


def activation_bytes_per_token_layer(arch: Arch) -> int:
    """bf16 tensors a decoder layer keeps for backward per token (SDPA/flash attention: no [s, s])."""
    return 2 * (6 * arch.hidden + 2 * arch.kv_dim + 4 * arch.intermediate)


def plan(student: Arch, teacher: Arch, hw: Hardware, wl: Workload) -> dict:
    if wl.student_offload not in STUDENT_OFFLOADS:
        raise ValueError(f"student offload {wl.student_offload!r}: expected one of {', '.join(STUDENT_OFFLOADS)}")
    if wl.teacher_offload not in TEACHER_OFFLOADS:
        raise ValueError(f"teacher offload {wl.teacher_offload!r}: expected one of {', '.join(TEACHER_OFFLOADS)}")
    for name in (
        "prompt_len",
        "response_len",
        "prompts_per_step",
        "samples_per_prompt",
        "student_micro_batch",
        "teacher_micro_batch",
        "k",
    ):
        if getattr(wl, name) < 1:
            raise ValueError(f"{name}={getattr(wl, name)}: expected an integer >= 1")
    if wl.k > min(student.vocab, teacher.vocab):
        raise ValueError(f"k={wl.k} exceeds the vocabulary ({min(student.vocab, teacher.vocab)})")
    G = hw.gpus
    served = wl.teacher_gpus > 0  # the teacher on GPUs and hosts of its own: `thw`
    thw = hw
    if served:
        thw = replace(
            hw,
            nodes=math.ceil(wl.teacher_gpus / hw.gpus_per_node),
            gpus_per_node=min(wl.teacher_gpus, hw.gpus_per_node),
        )
    TG = thw.gpus
    seq = wl.prompt_len + wl.response_len
    pre_len = wl.prefill_len()
    rollouts = wl.rollouts_per_gpu(G)
    t_rollouts = math.ceil(G * rollouts / TG)  # what each of the teacher's GPUs scores
    gen_batch = rollouts if wl.rollout_micro_batch <= 0 else min(rollouts, wl.rollout_micro_batch)
    ps, pt = student.params(), teacher.params()
    # gather_params: auto, as a run decides it (config.gather_fits): bf16 weights against a GPU's memory
    if wl.gather_for_generation == "auto":
        wl.gather_for_generation = gather_fits(2 * ps, hw.gpu_mem_gib * GiB)
    if wl.teacher_gathered == "auto":
        wl.teacher_gathered = gather_fits(2 * pt, thw.gpu_mem_gib * GiB)

    # ---- memory per GPU
    gpu: dict[str, float] = {}
    host: dict[str, float] = {}
    disk = 0.0
    gpu["student model states"], host["student model states"] = student_model_states(
        student, hw, wl.student_offload, wl.trainable_params
    )
    tgpu, thost = ({}, {}) if served else (gpu, host)  # the teacher's resident memory: its own, or the student's
    t_layer = max(teacher.layer_params(), teacher.largest_layer_params())
    streaming = 2 * (t_layer + wl.teacher_prefetch_params)  # one gathered layer (or lm_head) + the prefetch bucket
    t_disk = 0.0
    if wl.teacher_offload == "none":
        tgpu["teacher parameters"] = 2 * pt / TG + streaming
    else:
        tgpu["teacher streaming buffers"] = streaming
        if wl.teacher_offload == "cpu":
            thost["teacher parameters (pinned)"] = 2 * pt / thw.nodes
        else:
            thost["teacher NVMe read buffers (pinned)"] = (
                wl.nvme_buffer_count * wl.nvme_buffer_size * 2 * thw.gpus_per_node
            )
            t_disk = 2 * pt / thw.nodes
    disk = 0.0 if served else t_disk
    # phase working sets (rollout, teacher scoring and update do not overlap)
    kv = 2 * student.layers * student.kv_dim * 2 * seq * gen_batch
    prefill = prefill_bytes(student, gen_batch, pre_len)
    rollout_ws = {
        "gathered student (bf16)": 2 * ps if wl.gather_for_generation else 2 * student.largest_layer_params(),
        "KV cache": kv,  # prompt + response tokens, the end of generation
        # added to the whole KV cache: exact when the prefill runs over prompt + response (a teacher prefix
        # fills the response), an upper bound otherwise
        "prefill working set": sum(prefill.values()),
    }
    n_resp = wl.student_micro_batch * wl.response_len
    per_tok = activation_bytes_per_token_layer(student)
    tokens = wl.student_micro_batch * seq
    act_full = student.layers * tokens * per_tok
    act_ckpt = student.layers * tokens * 2 * student.hidden + tokens * per_tok
    activations = act_ckpt if wl.gradient_checkpointing else act_full
    loss_ours = LOSS_CHUNK_BYTES + n_resp * wl.k * 12 + n_resp * student.hidden * 2 * 2
    loss_full = n_resp * student.vocab * (2 + 4 + 4)  # bf16 logits, fp32 log-softmax, fp32 gradient
    head_trains = not wl.trainable_params  # a LoRA student's lm_head is frozen: no weight gradient
    update_ws = {
        "activations": activations,
        "loss path (tropd_kernels)": loss_ours,
        # the backward casts each chunk's fp32 logit gradient to bf16 for its matmuls (half a [chunk, V] block)
        "logit gradient chunk (bf16 cast)": LOSS_CHUNK_BYTES // 2,
        "lm_head weight grad (fp32 + bf16)": lm_head_grad_bytes(student) if head_trains else 0,
    }
    n_teacher = wl.teacher_micro_batch * seq
    teacher_ws = {
        "teacher layer working set": n_teacher
        * 2
        * (2 * teacher.hidden + 2 * teacher.kv_dim + 3 * teacher.intermediate),
        "teacher top-k (tropd_kernels)": LOSS_CHUNK_BYTES + wl.teacher_micro_batch * wl.response_len * wl.k * 12,
    }
    if wl.teacher_gathered:
        teacher_ws["gathered teacher (bf16)"] = 2 * pt
    teacher_full = wl.teacher_micro_batch * wl.response_len * teacher.vocab * (2 + 4)
    phases = (
        {"rollout": rollout_ws, "update": update_ws}
        if served
        else {"rollout": rollout_ws, "teacher scoring": teacher_ws, "update": update_ws}
    )
    resident = sum(gpu.values())
    peak_phase = max(phases, key=lambda k: sum(phases[k].values()))
    gpu_total = resident + sum(phases[peak_phase].values())
    host_counted = sum(host.values())
    reserve = host_reserve(student, hw)
    host.update(reserve)
    host_total = sum(host.values())

    # ---- step time per GPU (all GPUs work in parallel on their share)
    flops = hw.tflops * 1e12 * hw.mfu
    coll = hw.collective_gbs() * 1e9
    gather_s = 2 * ps * (G - 1) / G / coll if wl.gather_for_generation else 0.0
    chunks = math.ceil(rollouts / gen_batch)
    prefill_s = chunks * 2 * ps * gen_batch * pre_len / flops
    kv_mid = kv / 2  # the KV cache at the average decoded position
    hbm = hw.hbm_gbs * 1e9 * hw.hbm_efficiency
    # the rollout's KV cache is written in place (kv_cache.PreallocatedLayer): attention's read is the one pass
    # over it per token (transformers' DynamicCache, kept for sliding-window layers, would add a read and a
    # write of the whole cache by torch.cat: three passes)
    decode_weights_s, decode_kv_s = 2 * ps / hbm, KV_CACHE_PASSES * kv_mid / hbm
    decode_gpu_s = max(decode_weights_s + decode_kv_s, 2 * ps * gen_batch / flops)
    decode_host_s = student.layers * hw.decode_host_ms_per_layer / 1e3
    per_token = max(decode_gpu_s, decode_host_s)
    if not wl.gather_for_generation:
        per_token = max(per_token, 2 * ps * (G - 1) / G / coll)  # ZeRO-3 gathers every layer for every token
    decode_s = chunks * wl.response_len * per_token
    rollout_s = gather_s + prefill_s + decode_s
    passes = math.ceil(t_rollouts / wl.teacher_micro_batch)
    t_compute = 2 * pt * wl.teacher_micro_batch * seq / flops
    t_gather = (
        2 * pt * (TG - 1) / TG / (thw.collective_gbs() * 1e9) / (passes if wl.teacher_gathered else 1)
    )  # gathered once per step, or per pass
    if wl.teacher_offload == "cpu":
        t_fetch = 2 * pt / TG / (thw.pcie_gbs * 1e9)
    elif wl.teacher_offload == "nvme":
        t_fetch = 2 * pt / TG / (thw.nvme_gbs * 1e9 / thw.gpus_per_node)
    else:
        t_fetch = 0.0
    if wl.teacher_gathered:
        t_fetch /= passes
    teacher_pass = max(t_compute, t_gather, t_fetch)
    teacher_s = passes * teacher_pass
    micro = math.ceil(rollouts / wl.student_micro_batch)
    mult = 8 if wl.gradient_checkpointing else 6
    u_compute = mult * ps * wl.student_micro_batch * seq / flops
    u_comm = 3 * 2 * ps * (G - 1) / G / coll  # all-gather forward and backward, reduce-scatter gradients
    update_s = micro * max(u_compute, u_comm)
    if wl.student_offload != "none":
        update_s += 4 * ps / G / (hw.pcie_gbs * 1e9) + ps / G / hw.cpu_adam_params_per_s
    gib = lambda d: {k: round(v / GiB, 2) for k, v in d.items()}  # noqa: E731
    transfer_s = 0.0
    overlapped = served and chunks > 1
    if served:
        # each rollout's answer crosses the network: k ids (int32) and log-probs (fp32), the target's log-prob and
        # the entropy per response token (the requests' ids are 20x smaller); a student GPU's share of the link
        transfer_s = rollouts * wl.response_len * (8 * wl.k + 8) / (hw.inter_gbs * 1e9)
    if overlapped:  # rollout micro-batches are scored while the next decode; the last one's scoring is waited on
        step_s = max(rollout_s, rollout_s / chunks + teacher_s + transfer_s) + update_s
    else:
        step_s = rollout_s + teacher_s + transfer_s + update_s
    service = None
    if served:
        t_resident, t_peak = sum(tgpu.values()), sum(teacher_ws.values())
        t_host = {**thost, **{k: v for k, v in host_reserve(student, thw).items() if "export" not in k}}
        service = {
            "gpus": TG,
            "nodes": thw.nodes,
            "rollouts_per_gpu": t_rollouts,
            "gpu_gib": {
                "resident": gib(tgpu),
                "scoring": gib(teacher_ws),
                "total": round((t_resident + t_peak) / GiB, 2),
            },
            "host_gib_per_node": {**gib(t_host), "total": round(sum(t_host.values()) / GiB, 2)},
            "nvme_gib_per_node": round(t_disk / GiB, 2),
            "fits": t_resident + t_peak <= thw.gpu_mem_gib * GiB * GPU_RESERVE
            and sum(t_host.values()) <= thw.host_mem_gib * GiB,
        }

    fits = gpu_total <= hw.gpu_mem_gib * GiB * GPU_RESERVE and host_total <= hw.host_mem_gib * GiB
    return {
        "student": {**asdict(student), "params": ps, "largest_layer_params": student.largest_layer_params()},
        "teacher": {**asdict(teacher), "params": pt, "largest_layer_params": teacher.largest_layer_params()},
        "hardware": asdict(hw),
        "workload": asdict(wl),
        "rollouts_per_gpu": rollouts,
        "gpu_gib": {
            "resident": gib(gpu),
            "phases": {k: gib(v) for k, v in phases.items()},
            "peak_phase": peak_phase,
            "total": round(gpu_total / GiB, 2),
            "usable": round(hw.gpu_mem_gib * GPU_RESERVE, 2),
            "activations_without_checkpointing": round(act_full / GiB, 2),
            "activations_with_checkpointing": round(act_ckpt / GiB, 2),
            "loss_path_full_logits": round(loss_full / GiB, 2),
            "teacher_scoring_full_logits": round(teacher_full / GiB, 2),
            "prefill": {"rows": gen_batch, "tokens": pre_len, **gib(prefill)},
            "lm_head_weight_gradient": round(update_ws["lm_head weight grad (fp32 + bf16)"] / GiB, 2),
        },
        "host_gib_per_node": {
            **gib(host),
            "counted": round(host_counted / GiB, 2),
            "reserve": round(sum(reserve.values()) / GiB, 2),
            "total": round(host_total / GiB, 2),
            "available": hw.host_mem_gib,
        },
        "nvme_gib_per_node": round(disk / GiB, 2),
        "fits_gpu": gpu_total <= hw.gpu_mem_gib * GiB * GPU_RESERVE,
        "fits_host": host_total <= hw.host_mem_gib * GiB,
        "fits": fits and (service is None or service["fits"]),
        "teacher_service": service,
        "step_seconds": {
            "rollout": round(rollout_s, 1),
            "teacher_scoring": round(teacher_s, 1),
            "teacher_transfer": round(transfer_s, 1),
            "overlapped": overlapped,
            "update": round(update_s, 1),
            "total": round(step_s, 1),
            "detail": {
                "gather_student_s": round(gather_s, 2),
                "prefill_s": round(prefill_s, 2),
                "decode_per_token_ms": round(per_token * 1e3, 2),
                "decode_ms": {  # a token costs the largest of the GPU's time, the host's and (layer by layer) gathers
                    "weights": round(decode_weights_s * 1e3, 2),
                    "kv_cache": round(decode_kv_s * 1e3, 2),
                    "gpu": round(decode_gpu_s * 1e3, 2),
                    "host": round(decode_host_s * 1e3, 2),
                },
                "teacher_passes": passes,
                "teacher_pass_s": {
                    "compute": round(t_compute, 2),
                    "all_gather": round(t_gather, 2),
                    "fetch": round(t_fetch, 2),
                },
                "update_micro_batches": micro,
                "update_micro_batch_s": {"compute": round(u_compute, 2), "communication": round(u_comm, 2)},
            },
        },
    }


def ds_config_path(path: str, key: str) -> str:
    """A DeepSpeed config path that names a readable file, or a ConfigError naming the setting."""
    from .config import ConfigError

    if not str(path).strip():
        raise ConfigError(f"{key} is empty: expected a DeepSpeed JSON config file")
    try:
        p = Path(path)
        if p.is_file():
            return path
        state = "is a folder" if p.is_dir() else "does not exist"
    except OSError as exc:  # a name too long, a link loop ...
        state = f"cannot be read ({exc.strerror or exc})"
    raise ConfigError(f"{key}={str(path)!r} {state}: expected a DeepSpeed JSON config file")


def ds_mapping(config: dict, key: str, where: str) -> dict:
    """config[key] when it is a mapping ({} when absent), or a ConfigError naming the file and the key."""
    from .config import ConfigError

    value = config.get(key, {})
    if not isinstance(value, dict):
        raise ConfigError(
            f"{where}: {key}={value!r} ({type(value).__name__}): expected a mapping (a JSON object) of its settings"
        )
    return value


def workload_from_run_config(cfg) -> tuple[str, str, Workload]:
    """Student and teacher folders and the workload of a run config (tropd_ds.config.RunConfig)."""
    from .config import read_ds_config
    from .objectives import loss_fn

    s_ds = read_ds_config(ds_config_path(cfg.student.ds_config, "student.ds_config"))
    # a served teacher's DeepSpeed config is the service's: --teacher-offload and --teacher-gpus describe it
    t_ds = {} if cfg.teacher.url else read_ds_config(ds_config_path(cfg.teacher.ds_config, "teacher.ds_config"))
    s_zero = ds_mapping(s_ds, "zero_optimization", f"student.ds_config={cfg.student.ds_config!r}")
    t_zero = ds_mapping(t_ds, "zero_optimization", f"teacher.ds_config={cfg.teacher.ds_config!r}")
    s_where = f"student.ds_config={cfg.student.ds_config!r}: zero_optimization"
    opt_dev = ds_mapping(s_zero, "offload_optimizer", s_where).get("device", "none")
    par_dev = ds_mapping(s_zero, "offload_param", s_where).get("device", "none")
    student_offload = "none" if opt_dev == "none" else ("optimizer+params" if par_dev != "none" else "optimizer")
    t_off = ds_mapping(t_zero, "offload_param", f"teacher.ds_config={cfg.teacher.ds_config!r}: zero_optimization")
    wl = Workload(
        prompt_len=cfg.data.max_prompt_tokens,
        response_len=cfg.rollout.max_new_tokens,  # teacher prefix plus continuation never exceed it (rollout.sample)
        prompts_per_step=cfg.rollout.prompts_per_step,
        samples_per_prompt=cfg.rollout.samples_per_prompt,
        student_micro_batch=cfg.student.micro_batch_size,
        teacher_micro_batch=cfg.teacher.micro_batch_size,
        rollout_micro_batch=cfg.rollout.micro_batch_size,
        guidance=cfg.rollout.guidance,  # the prefill runs over prompts plus teacher prefixes
        guidance_max_len=cfg.rollout.guidance_max_len,
        k=loss_fn(cfg.objective.name, **cfg.objective.options).max_k(),
        student_offload=student_offload,
        teacher_offload=t_off.get("device", "none"),
        gradient_checkpointing=cfg.student.gradient_checkpointing,
        gather_for_generation=cfg.rollout.gather_params,
        teacher_gathered=cfg.teacher.gather_params,
        teacher_prefetch_params=float(t_zero.get("stage3_prefetch_bucket_size", 5e7)),
        nvme_buffer_count=int(t_off.get("buffer_count", 5)),
        nvme_buffer_size=float(t_off.get("buffer_size", 1e9)),
    )
    if cfg.student.lora:  # the adapters built on the student's architecture, on the meta device
        from .lora import check as lora_parameters

        wl.trainable_params = float(lora_parameters(cfg.student.path, cfg.student.lora))
    if cfg.teacher.url and not wl.teacher_gpus:
        wl.teacher_gpus = 8  # a service on one node of 8 GPUs, unless --teacher-gpus says otherwise
    return cfg.student.path, cfg.teacher.path, wl


def format_plan(r: dict) -> str:
    s, t, hw, wl = r["student"], r["teacher"], r["hardware"], r["workload"]
    g, h = r["gpu_gib"], r["host_gib_per_node"]
    pf = g["prefill"]
    lines = [
        f"student {s['name']}: {s['params'] / 1e9:.2f} B parameters ({s['layers']} layers, d {s['hidden']}, V "
        f"{s['vocab']}); "
        f"teacher {t['name']}: {t['params'] / 1e9:.2f} B ({t['layers']} layers, d {t['hidden']})",
        f"{hw['nodes']} node(s) x {hw['gpus_per_node']} GPUs of {hw['gpu_mem_gib']:g} GiB, {hw['host_mem_gib']:g} "
        "GiB host per node; "
        f"{wl['prompts_per_step']} prompts x {wl['samples_per_prompt']} samples = {r['rollouts_per_gpu']} rollouts "
        "per GPU of "
        f"{wl['prompt_len']} + {wl['response_len']} tokens; k {wl['k']}",
        f"student offload: {wl['student_offload']}; teacher offload: {wl['teacher_offload']}; gradient checkpointing: "
        f"{'on' if wl['gradient_checkpointing'] else 'off'}; rollout micro-batch: {wl['rollout_micro_batch'] or 'all'}",
        "",
        "GPU memory per GPU (GiB)",
    ]
    for k, v in g["resident"].items():
        lines.append(f"  {k:<40} {v:>9.2f}   (resident)")
    for phase, items in g["phases"].items():
        mark = "  <- peak" if phase == g["peak_phase"] else ""
        lines.append(f"  {phase} phase: {sum(items.values()):.2f}{mark}")
        for k, v in items.items():
            lines.append(f"    {k:<38} {v:>9.2f}")
    lines += [
        f"  {'total at peak':<40} {g['total']:>9.2f}   of {g['usable']:.2f} usable -> "
        f"{'fits' if r['fits_gpu'] else 'DOES NOT FIT'}",
        f"  activations without / with checkpointing: {g['activations_without_checkpointing']:.2f} / "
        f"{g['activations_with_checkpointing']:.2f}",
        f"  student loss path with full [N, V] logits instead: {g['loss_path_full_logits']:.2f}; "
        f"teacher scoring with full logits: {g['teacher_scoring_full_logits']:.2f}",
        f"  prefill working set, {pf['rows']} rows x {pf['tokens']} tokens (prompt + teacher prefix), at its peak:",
        "    " + ", ".join(f"{k} {v:.2f}" for k, v in pf.items() if k not in ("rows", "tokens")),
        "",
        "host memory per node (GiB)",
    ]
    for k, v in h.items():
        if k not in ("counted", "reserve", "total", "available"):
            lines.append(f"  {k:<40} {v:>9.2f}")
    lines.append(
        f"  {'total':<40} {h['total']:>9.2f}   of {h['available']:g} -> {'fits' if r['fits_host'] else 'DOES NOT FIT'}"
        + ("" if r["fits_host"] else f" (the reserve needs {h['reserve']:.2f} beside {h['counted']:.2f} counted)")
    )
    if r["nvme_gib_per_node"]:
        lines.append(f"  NVMe per node: {r['nvme_gib_per_node']:.2f} GiB of teacher parameters")
    sv = r["teacher_service"]
    if sv is not None:
        lines += [
            "",
            f"teacher service: {sv['nodes']} node(s), {sv['gpus']} GPUs, {sv['rollouts_per_gpu']} rollouts per GPU",
        ]
        for k, v in {**sv["gpu_gib"]["resident"], **sv["gpu_gib"]["scoring"]}.items():
            lines.append(f"  {k:<40} {v:>9.2f}   (per GPU)")
        lines.append(f"  {'GPU total while scoring':<40} {sv['gpu_gib']['total']:>9.2f}")
        lines.append(f"  {'host per node':<40} {sv['host_gib_per_node']['total']:>9.2f}   of {hw['host_mem_gib']:g}")
        if sv["nvme_gib_per_node"]:
            lines.append(f"  NVMe per node: {sv['nvme_gib_per_node']:.2f} GiB of teacher parameters")
        lines.append(f"  -> {'fits' if sv['fits'] else 'DOES NOT FIT'}")
    st = r["step_seconds"]
    d = st["detail"]
    lines += [
        "",
        f"step time estimate (s), {hw['tflops']:g} TFLOP/s x MFU {hw['mfu']:g}, HBM {hw['hbm_gbs']:g} GB/s x "
        f"{hw['hbm_efficiency']:g}, "
        f"PCIe {hw['pcie_gbs']:g} GB/s, collectives "
        f"{hw['intra_gbs'] if hw['nodes'] == 1 else min(hw['intra_gbs'], hw['inter_gbs']):g} GB/s",
        f"  rollout          {st['rollout']:>8.1f}   (gather {d['gather_student_s']} s, prefill {d['prefill_s']} s, "
        f"{d['decode_per_token_ms']} ms per decoded token)",
        f"{'':30}per token: GPU {d['decode_ms']['gpu']} ms (weights {d['decode_ms']['weights']}, "
        f"KV cache {d['decode_ms']['kv_cache']}), host {d['decode_ms']['host']} ms "
        f"({hw['decode_host_ms_per_layer']:g} ms x {r['student']['layers']} layers, assumed)",
        f"  teacher scoring  {st['teacher_scoring']:>8.1f}   ({d['teacher_passes']} passes; per pass compute "
        f"{d['teacher_pass_s']['compute']} s, "
        f"all-gather {d['teacher_pass_s']['all_gather']} s, fetch {d['teacher_pass_s']['fetch']} s)",
        *(
            [
                f"  answers' transfer {st['teacher_transfer']:>7.1f}   (k ids and log-probs per response token, "
                "over the network)",
                "  (served teacher: "
                + (
                    "each rollout micro-batch is scored while the next decodes; the step waits for the larger of "
                    "rollout and first micro-batch + scoring)"
                    if st["overlapped"]
                    else "scoring follows the rollout; set --rollout-micro-batch to overlap them)"
                ),
            ]
            if sv is not None
            else []
        ),
        f"  update           {st['update']:>8.1f}   ({d['update_micro_batches']} micro-batches; compute "
        f"{d['update_micro_batch_s']['compute']} s, "
        f"communication {d['update_micro_batch_s']['communication']} s each)",
        f"  total            {st['total']:>8.1f}",
        "",
        "verdict: "
        + (
            "fits"
            if r["fits"]
            else "does NOT fit: "
            + ", ".join(
                x
                for x, ok in (
                    ("GPU", r["fits_gpu"]),
                    ("host", r["fits_host"]),
                    ("teacher service", (sv or {}).get("fits", True)),
                )
                if not ok
            )
        ),
    ]
    return "\n".join(lines)


# Figures that may be 0 (everything else must be > 0): 0 rollout micro-batch means "all of a GPU's share",
# 0 guidance_max_len "response_len", 0 trainable parameters "every parameter trains", a 0 host reserve none.
MAY_BE_ZERO = {
    "rollout_micro_batch",
    "guidance_max_len",
    "teacher_prefetch_params",
    "trainable_params",
    "teacher_gpus",
    "host_os_gib",
    "host_process_gib",
    "host_staging_gib",
}
FRACTIONS = {"mfu", "hbm_efficiency"}  # in (0, 1]


def check_figures(hw: Hardware, wl: Workload) -> None:
    """Every hardware and workload number finite and in range: a plan from a zero, a NaN or a negative
    figure would print nonsense (or divide by zero)."""
    for obj in (hw, wl):
        for name, f in obj.__dataclass_fields__.items():
            value = getattr(obj, name)
            if f.type not in ("int", "float"):
                continue
            flag = "--" + name.replace("_", "-")
            low_ok = value >= 0 if name in MAY_BE_ZERO else value > 0
            if not math.isfinite(value) or not low_ok:
                raise ValueError(f"{flag}={value}: expected a finite number {'>= 0' if name in MAY_BE_ZERO else '> 0'}")
            if name in FRACTIONS and value > 1:
                raise ValueError(f"{flag}={value}: expected a fraction in (0, 1]")
    if wl.k > 0 and not float(wl.k).is_integer():
        raise ValueError(f"--k={wl.k}: expected an integer")


TRUE_WORDS, FALSE_WORDS = ("true", "1", "yes", "on"), ("false", "0", "no", "off")


def parse_bool(text: str) -> bool:
    """A boolean flag's value: true/false, 1/0, yes/no or on/off (any case); anything else is refused."""
    word = text.strip().lower()
    if word in TRUE_WORDS:
        return True
    if word in FALSE_WORDS:
        return False
    raise argparse.ArgumentTypeError(f"{text!r}: expected one of {', '.join(TRUE_WORDS + FALSE_WORDS)}")


def parse_bool_or_auto(text: str) -> bool | str:
    """A gather setting's value: `auto` (the run's rule: gathered when the model fits with room to spare) or a
    boolean as `parse_bool` reads it."""
    if text.strip().lower() == "auto":
        return "auto"
    try:
        return parse_bool(text)
    except argparse.ArgumentTypeError:
        words = ", ".join(TRUE_WORDS + FALSE_WORDS)
        raise argparse.ArgumentTypeError(f"{text!r}: expected auto or one of {words}") from None


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(
        prog="tropd-ds plan",
        description="Memory budget and step-time estimate of a distillation run, from configs alone (no weights, no "
        "GPU).",
    )
    ap.add_argument(
        "--config",
        help="a run config (YAML/JSON) or a shipped preset's name (tropd-ds config --presets): models, lengths, batch "
        "sizes, k and offload choices come from it",
    )
    ap.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE", help="override a run-config field"
    )
    ap.add_argument("--student", help=f"student: {', '.join(SHIPPED)}, a model folder or a config.json")
    ap.add_argument(
        "--teacher",
        help="teacher, as --student; with a --config of several teachers, one's name (NAME:MODEL for a served one)",
    )
    for f in Workload.__dataclass_fields__.values():
        flag = "--" + f.name.replace("_", "-")
        if f.type == "bool":
            ap.add_argument(flag, type=parse_bool, default=None, metavar="BOOL")
        elif f.type == "bool | str":  # gather_params: true, false or auto
            ap.add_argument(flag, type=parse_bool_or_auto, default=None, metavar="BOOL|auto")
        elif f.name in ("student_offload", "teacher_offload"):
            ap.add_argument(
                flag, default=None, choices=STUDENT_OFFLOADS if f.name == "student_offload" else TEACHER_OFFLOADS
            )
        else:
            ap.add_argument(flag, type=float if f.type == "float" else int, default=None)
    for f in Hardware.__dataclass_fields__.values():
        ap.add_argument("--" + f.name.replace("_", "-"), type=float if f.type == "float" else int, default=f.default)
    ap.add_argument("--json", action="store_true", help="print the plan as JSON")
    args = ap.parse_args(argv)
    if args.overrides and not args.config:
        ap.error(
            f"--set {args.overrides[0]!r} without --config: --set overrides a run-config field; give --config, or "
            "set the figure with its own flag (see --help)"
        )
    try:
        student, teacher, wl = args.student, args.teacher, Workload()
        if args.config:
            from .config import load_config
            from .resources import preset_names, preset_path

            config_path = preset_path(args.config)  # a file, or a shipped preset's name
            if not Path(config_path).exists():
                raise ValueError(
                    f"--config {args.config!r}: no such file, nor a shipped preset's name (presets: "
                    f"{', '.join(preset_names())})"
                )
            cfg = load_config(config_path, args.overrides)
            if cfg.teachers:  # several teachers: each planned in turn, named by --teacher NAME (NAME:MODEL if served)
                name, _, model = (teacher or "").partition(":")
                if name not in cfg.teachers:
                    raise ValueError(
                        f"--config {args.config!r} has several teachers ({', '.join(cfg.teachers)}): plan the run with "
                        f"one of them at a time, --teacher NAME (given: {teacher!r})"
                    )
                chosen = cfg.teachers[name]
                if chosen.url and not model:
                    raise ValueError(
                        f"teachers.{name} is served at {chosen.url}: the plan needs its model, --teacher {name}:MODEL "
                        "(a model folder, a config.json or a shipped name), and --teacher-gpus for its service"
                    )
                cfg.teacher, cfg.teachers, teacher = chosen, {}, model or None
            s_path, t_path, wl = workload_from_run_config(cfg)
            student, teacher = student or s_path, teacher or t_path
        for name in Workload.__dataclass_fields__:
            if getattr(args, name) is not None:
                setattr(wl, name, getattr(args, name))
        if not student or not teacher:
            raise ValueError(
                "give --student and --teacher (or --config with both models; a config with teacher.url needs "
                "--teacher, the served teacher's model, and --teacher-gpus)"
            )
        hw = Hardware(**{name: getattr(args, name) for name in Hardware.__dataclass_fields__})
        check_figures(hw, wl)
        result = plan(load_arch(student), load_arch(teacher), hw, wl)
    except ValueError as exc:  # ConfigError is a ValueError
        print(f"tropd-ds plan: {exc}", file=sys.stderr)
        return ExitCode.CONFIG
    print(json.dumps(result, indent=2) if args.json else format_plan(result))
    return ExitCode.OK if result["fits"] else ExitCode.DOES_NOT_FIT


if __name__ == "__main__":
    sys.exit(main())
