"""What a teacher service and its clients exchange: scoring requests and answers as safetensors payloads
(binary tensors with a small text header; no floats printed as JSON), and the checks every request meets
before it reaches the teacher.

A request holds `input_ids` [B, T] (int32 or int64), `attention_mask` [B, T] (0/1) and `targets` [B, T-1]
(bool: score the token at t + 1), with `k` and `temperature` in its header. The answer is the TeacherTopK
of every selected target in row-major order: `ids` [N, k] int32, `logprobs` [N, k], `target_logprob` [N] and
`entropy` [N] float32.
"""

from __future__ import annotations

import math

import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

API = "v1"
MAX_HEADER_BYTES = 64 << 10  # three tensors and two numbers take a few hundred bytes
CONTENT_TYPE = "application/octet-stream"
REQUEST_KEYS = ("input_ids", "attention_mask", "targets")
ANSWER_KEYS = ("ids", "logprobs", "target_logprob", "entropy")


class BadRequest(ValueError):
    """A request the service refuses, with the reason it sends back (HTTP 400)."""


def encode_request(input_ids, attention_mask, targets, k: int, temperature: float) -> bytes:
    tensors = {
        "input_ids": input_ids.to("cpu", torch.int32).contiguous(),
        "attention_mask": attention_mask.to("cpu", torch.uint8).contiguous(),
        "targets": targets.to("cpu", torch.bool).contiguous(),
    }
    return st_save(tensors, metadata={"k": str(int(k)), "temperature": repr(float(temperature))})


def _metadata(payload: bytes) -> dict:
    """The safetensors header's __metadata__ (safetensors' loader drops it)."""
    import json

    if len(payload) < 8:
        raise BadRequest("the body is not a safetensors payload (shorter than its 8-byte header length)")
    size = int.from_bytes(payload[:8], "little")
    if size > MAX_HEADER_BYTES:
        raise BadRequest(f"the body's safetensors header has {size} bytes: expected at most {MAX_HEADER_BYTES}")
    if size > len(payload) - 8:
        raise BadRequest(f"the body is not a safetensors payload (a header of {size} bytes in {len(payload)} bytes)")
    try:
        header = json.loads(payload[8 : 8 + size])
    except ValueError as exc:
        raise BadRequest(f"the body is not a safetensors payload (its header is not JSON: {exc})") from exc
    meta = header.get("__metadata__") if isinstance(header, dict) else None
    return meta if isinstance(meta, dict) else {}


def decode_request(
    payload: bytes, n_tokens: int, max_positions: int, max_rows: int, max_tokens: int = 1 << 22, max_k: int = 1024
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int, float]:
    """The request's (input_ids int64, attention_mask int64, targets bool, k, temperature), or BadRequest naming
    what is wrong: ids outside [0, n_tokens), more than `max_positions` columns, `max_rows` rows or `max_tokens`
    tokens in all, shapes that disagree, a target at a padding position, k outside [1, min(n_tokens, max_k)], a
    temperature that is not a number > 0. The limits bound what one request can make the teacher hold."""
    meta = _metadata(payload)
    try:
        tensors = st_load(payload)
    except Exception as exc:  # safetensors raises its own SafetensorError for a malformed body
        raise BadRequest(f"the body is not a safetensors payload ({type(exc).__name__}: {exc})") from exc
    missing = [key for key in REQUEST_KEYS if key not in tensors]
    extra = sorted(set(tensors) - set(REQUEST_KEYS))
    if missing or extra:
        raise BadRequest(
            f"expected the tensors {', '.join(REQUEST_KEYS)}; "
            + (f"missing {', '.join(missing)}" if missing else f"unexpected {', '.join(extra)}")
        )
    unknown = sorted(set(meta) - {"k", "temperature"})
    if unknown:
        raise BadRequest(f"unknown header keys {unknown}: expected k and temperature")
    ids, mask, targets = (tensors[key] for key in REQUEST_KEYS)
    if ids.dtype not in (torch.int32, torch.int64) or ids.dim() != 2:
        raise BadRequest(f"input_ids is {ids.dtype} {list(ids.shape)}: expected int32 or int64 [rows, tokens]")
    rows, width = ids.shape
    if not 1 <= rows <= max_rows:
        raise BadRequest(f"{rows} rows: expected 1 to {max_rows} per request (serve.max_rows)")
    if not 2 <= width <= max_positions:
        raise BadRequest(f"{width} tokens per row: expected 2 to {max_positions} (the teacher's positions)")
    if rows * width > max_tokens:
        raise BadRequest(f"{rows} x {width} = {rows * width} tokens: expected at most {max_tokens} (serve.max_tokens)")
    if list(mask.shape) != [rows, width] or mask.dtype.is_floating_point or mask.dtype == torch.bool:
        raise BadRequest(f"attention_mask is {mask.dtype} {list(mask.shape)}: expected uint8 [{rows}, {width}]")
    if list(targets.shape) != [rows, width - 1] or targets.dtype != torch.bool:
        raise BadRequest(f"targets is {targets.dtype} {list(targets.shape)}: expected bool [{rows}, {width - 1}]")
    if bool(((mask != 0) & (mask != 1)).any()):
        raise BadRequest("attention_mask holds values other than 0 and 1")
    low, high = int(ids.min()), int(ids.max())
    if low < 0 or high >= n_tokens:
        bad = low if low < 0 else high
        raise BadRequest(f"token id {bad} is outside the teacher's vocabulary [0, {n_tokens})")
    mask = mask.long()
    if bool((targets & ~(mask[:, 1:].bool() & mask[:, :-1].bool())).any()):
        raise BadRequest("a target is selected at a padding position (targets need the token and the one before it)")
    try:
        k = int(meta.get("k", ""))
        temperature = float(meta.get("temperature", ""))
    except ValueError as exc:
        raise BadRequest(f"k={meta.get('k')!r}, temperature={meta.get('temperature')!r}: expected numbers") from exc
    if not 1 <= k <= min(n_tokens, max_k):
        raise BadRequest(f"k={k}: expected 1 to {min(n_tokens, max_k)} (the vocabulary, at most serve.max_k)")
    if not math.isfinite(temperature) or temperature <= 0:
        raise BadRequest(f"temperature={temperature!r}: expected a finite number > 0")
    return ids.long(), mask, targets, k, temperature


def encode_answer(topk, seconds: float) -> bytes:
    ids, logprobs, target_logprob, entropy = (t.detach().to("cpu") for t in topk)
    tensors = {
        "ids": ids.to(torch.int32).contiguous(),
        "logprobs": logprobs.float().contiguous(),
        "target_logprob": target_logprob.float().contiguous(),
        "entropy": entropy.float().contiguous(),
    }
    return st_save(tensors, metadata={"seconds": f"{seconds:.6f}"})


def decode_answer(payload: bytes, device=None):
    """The TeacherTopK of an answer (ids as int64), and the seconds the service spent on it."""
    import tropd_kernels as tk

    tensors = st_load(payload)
    seconds = float(_metadata(payload).get("seconds", "nan"))
    ids = tensors["ids"].long()
    fields = (ids, tensors["logprobs"], tensors["target_logprob"], tensors["entropy"])
    if device is not None:
        fields = tuple(t.to(device) for t in fields)
    return tk.TeacherTopK(*fields), seconds


def tokenizer_fingerprint(tokenizer) -> str:
    """SHA-256 of what token ids mean: every token and its id, and the special tokens' ids. Two tokenizers with
    the same fingerprint encode and decode alike for distillation's purposes."""
    import hashlib
    import json

    vocab = sorted(tokenizer.get_vocab().items(), key=lambda item: item[1])
    special = {name: getattr(tokenizer, f"{name}_token_id", None) for name in ("bos", "eos", "pad", "unk")}
    text = json.dumps({"vocab": vocab, "special": special}, ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()
