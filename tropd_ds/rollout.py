"""Rollout: the student samples responses, optionally continuing from a teacher prefix (off-policy
guidance). Output masks say which targets are sampled and which are teacher prefix.

`GenerateRollout` is a `deepspeed.runtime.rollout.RolloutEngine` (the interface a vLLM-backed engine
would also implement): a lean sampling loop over the model's own forward and KV cache. It replaces
DeepSpeed 0.19.8's `HybridEngineRollout`, which gets three things wrong for distillation:

- it marks response tokens by id (`!= pad_token_id`), so a pad token the student *samples* drops
  out of the loss (and a policy can learn to hide there). Here a response is every generated
  position up to and including its first end token, whatever the ids: the mask comes from lengths;
- it decodes with `eos_token_id=None`, always to `max_new_tokens`. Here decoding stops when every
  row has ended (all of the model's EOS ids count) or reached its budget;
- it runs every decoded token through ZeRO-3's per-module hooks, and transformers' `generate`
  applies the model's `generation_config` (repetition penalty, top-k 50, suppressed tokens...). Here
  the student is gathered once per rollout and run with the hooks removed (restored exactly
  afterwards), and tokens are drawn from softmax(logits / T) and nothing else: the distribution
  whose log-probs the objectives use. The loop makes the same draws as `generate` with a neutral
  configuration (`clean_generation_config`), without its per-token bookkeeping.
"""

from __future__ import annotations

import contextlib
import inspect
import math
from dataclasses import dataclass, field

import torch
from deepspeed.runtime.rollout import RolloutBatch, RolloutEngine, RolloutRequest, SamplingConfig

from . import collectives
from .data import Prompt, left_pad
from .zero3 import hook_free_gathered, zero3_offload


@dataclass
class RolloutTokens:
    """What the rollout hands to scoring and the update: the sequences and which targets are the response's."""

    input_ids: torch.Tensor  # [B, T] left-padded prompt (+ prefix) then response, right-padded
    attention_mask: torch.Tensor  # [B, T]
    sampled: torch.Tensor  # [B, T-1] bool: target t+1 was sampled by the student
    prefix: torch.Tensor  # [B, T-1] bool: target t+1 is a teacher-prefix token
    targets: torch.Tensor = field(init=False)  # [B, T-1] bool: sampled | prefix, every target a loss scores

    def __post_init__(self):
        self.targets = self.sampled | self.prefix

    def rows(self, start: int, count: int, trim: bool = True) -> RolloutTokens:
        """Rows start .. start + count - 1 (a micro-batch), without the columns that are padding in every one
        of them (`trim`)."""
        sl = slice(start, start + count)
        part = RolloutTokens(self.input_ids[sl], self.attention_mask[sl], self.sampled[sl], self.prefix[sl])
        return part.trimmed() if trim else part

    def select(self, order: torch.Tensor) -> RolloutTokens:
        """These rows in another order (`order`: row indices)."""
        return RolloutTokens(self.input_ids[order], self.attention_mask[order], self.sampled[order], self.prefix[order])

    def trimmed(self) -> RolloutTokens:
        """Without the leading and trailing columns that are padding in every row: a forward over them costs
        as much as over real tokens and changes nothing (positions come from the attention mask, left padding
        takes none; a target needs an attended position). One host sync."""
        used = self.attention_mask.any(0)
        if bool(used.all()):
            return self
        columns = used.nonzero().flatten().tolist()
        first, last = columns[0], columns[-1]
        return RolloutTokens(
            self.input_ids[:, first : last + 1],
            self.attention_mask[:, first : last + 1],
            self.sampled[:, first:last],
            self.prefix[:, first:last],
        )

    def micro_batches(self, size: int, trim: bool = True) -> list[RolloutTokens]:
        return [self.rows(start, size, trim) for start in range(0, self.input_ids.shape[0], size)]


def end_token_ids(tokenizer, *models) -> tuple[int, ...]:
    """Every id that ends a response: the tokenizer's EOS and each model's `generation_config.eos_token_id`
    (an int or a list: Llama-3 and Qwen chat models end turns with several ids)."""
    ids = [tokenizer.eos_token_id]
    for model in models:
        gen = getattr(model, "generation_config", None)
        eos = getattr(gen, "eos_token_id", None)
        ids += eos if isinstance(eos, (list, tuple)) else [eos]
    out = tuple(sorted({int(i) for i in ids if i is not None}))
    if not out:
        raise ValueError("neither the tokenizer nor the model's generation_config names an end-of-sequence token")
    return out


def response_keep(generated: torch.Tensor, end_ids, budgets: torch.Tensor | None = None) -> torch.Tensor:
    """[B, G] bool: generated positions that belong to the response, by position only: everything up to
    and including the first end token, and at most `budgets[i]` tokens."""
    positions = torch.arange(generated.shape[1], device=generated.device).unsqueeze(0)
    ends = torch.isin(generated, torch.as_tensor(end_ids, device=generated.device))
    length = torch.where(ends.any(1), ends.int().argmax(1) + 1, generated.shape[1])
    if budgets is not None:
        length = torch.minimum(length, budgets.to(length.device))
    return positions < length.unsqueeze(1)


def _filter_top_p(logits: torch.Tensor, top_p: float) -> torch.Tensor:
    """Nucleus filtering as transformers' TopPLogitsWarper: drop the least likely tokens whose total
    probability is at most 1 - top_p, always keeping the most likely one."""
    ordered, order = torch.sort(logits, descending=False)
    drop = ordered.softmax(-1).cumsum(-1) <= 1 - top_p
    drop[:, -1] = False
    return logits.masked_fill(drop.scatter(1, order, drop), float("-inf"))


def real_token_logits(logits: torch.Tensor, vocab: int | None) -> torch.Tensor:
    """The columns of real tokens: an lm_head's padding rows past the tokenizer's `vocab` tokens are cut
    off, so neither argmax nor sampling can return them (a view, no copy)."""
    return logits if vocab is None or logits.shape[-1] <= vocab else logits[..., :vocab]


def clean_generation_config(sampling: SamplingConfig, max_new_tokens: int, pad_id: int, end_ids):
    """A transformers GenerationConfig that samples what `GenerateRollout` samples (same seed, same
    draws): softmax(logits / T) and nothing else, every processor at its neutral value. For
    benchmarks and tests that compare against plain `generate`."""
    from transformers import GenerationConfig

    do_sample = sampling.temperature > 0
    return GenerationConfig(
        max_new_tokens=max_new_tokens,
        do_sample=do_sample,
        temperature=sampling.temperature if do_sample else 1.0,
        top_p=sampling.top_p if do_sample else 1.0,
        top_k=0,
        repetition_penalty=1.0,
        no_repeat_ngram_size=0,
        num_beams=1,
        eos_token_id=list(end_ids),
        pad_token_id=pad_id,
        use_cache=True,
    )


class GenerateRollout(RolloutEngine):
    """Rollouts sampled with the model's forward and KV cache, with a response mask by position.

    `gather`: with ZeRO-3, gather the whole model once per `generate` call and decode without the
    per-module hooks (fast; the model must fit on one device). Otherwise ZeRO-3 gathers layer by
    layer on every forward (any size), and the ranks decode in lock step until all have ended,
    since each forward is then a collective.
    `micro_batch` > 0 generates that many sequences at a time under one gather (the KV cache of a
    long generation is what limits it on a GPU).
    `vocab`: only ids below it are ever drawn, greedy or sampled. An lm_head can have more rows than the
    tokenizer has tokens (Qwen2.5: 152,064 rows for 151,665 tokens); those rows are not tokens, and
    scoring and the update mask them out. Default: the wrapped model's `n_tokens` (tropd-ds's
    `VocabHeadModel`), else every row.
    `preallocate`: the KV cache written in place into buffers sized once per micro-batch
    (`kv_cache.preallocated_cache`; transformers' DynamicCache where the model has layers other than full
    attention); False: DynamicCache, which copies the whole cache at every token."""

    name = "generate"

    def __init__(
        self,
        engine,
        pad_id: int,
        end_ids,
        gather: bool,
        micro_batch: int = 0,
        vocab: int | None = None,
        check_every: int | None = None,
        preallocate: bool = True,
    ):
        self.engine, self.pad_id, self.end_ids = engine, pad_id, tuple(end_ids)
        self.preallocate = bool(preallocate)
        self.gather, self.micro_batch = gather, micro_batch
        if check_every is not None and (isinstance(check_every, bool) or int(check_every) < 1):
            raise ValueError(f"check_every={check_every!r}: expected None or a number of tokens >= 1")
        self.check_every = check_every
        module = getattr(engine, "module", engine)
        self.lm = getattr(module, "lm", module)  # tropd-ds wraps the causal LM; plain modules work too
        self.vocab = vocab if vocab is not None else getattr(module, "n_tokens", None)
        if self.vocab is not None and (isinstance(self.vocab, bool) or int(self.vocab) < 1):
            raise ValueError(f"vocab={vocab!r}: expected None or the number of real tokens (>= 1)")
        # transformers 5.x renames forward's `past_key_values` to `cache` (the old name warns, then goes)
        self.cache_keyword = "cache" if "cache" in inspect.signature(self.lm.forward).parameters else "past_key_values"
        zero3 = zero3_offload(engine) is not None
        self.hook_free = zero3 and gather
        self.synced = zero3 and not gather and collectives.rank_world()[1] > 1  # every decode forward is a collective

    @torch.no_grad()
    def generate(
        self, request: RolloutRequest, sampling: SamplingConfig, budgets: torch.Tensor | None = None, on_part=None
    ) -> RolloutBatch:
        """Prompt + response per row (n_samples_per_prompt rows per prompt, adjacent); `budgets` [B'] caps
        each row's new tokens below `sampling.max_new_tokens`. The attention mask marks exactly the
        prompt tokens and the response positions of `response_keep`. `on_part(rows, ids, attention_mask)` is
        called as each micro-batch of rows (a slice) is done, with those rows as the returned batch will hold
        them (up to right padding), so that their scoring can start while the next micro-batch decodes."""
        if sampling.top_k > 0:
            raise ValueError(
                f"top_k={sampling.top_k}: GenerateRollout samples from the full distribution (top_k <= 0) or nucleus "
                "(top_p)"
            )
        n = sampling.n_samples_per_prompt
        ids = request.prompt_ids.repeat_interleave(n, 0) if n > 1 else request.prompt_ids
        mask = request.prompt_attention_mask.repeat_interleave(n, 0) if n > 1 else request.prompt_attention_mask
        rows, width = ids.shape
        if budgets is None:
            budgets = torch.full((rows,), sampling.max_new_tokens, dtype=torch.long)
        budgets = budgets.to(ids.device).clamp(0, sampling.max_new_tokens)
        step = self.micro_batch if self.micro_batch > 0 else rows
        parts = []
        with hook_free_gathered(self.engine) if self.hook_free else contextlib.nullcontext():
            for start in range(0, rows, step):
                sl = slice(start, start + step)
                parts.append(self._decode(ids[sl], mask[sl], budgets[sl], sampling))
                if on_part is not None:
                    part = parts[-1].clone()
                    keep = response_keep(part[:, width:], self.end_ids, budgets[sl])
                    part[:, width:] = part[:, width:].masked_fill(~keep, self.pad_id)
                    on_part(sl, part, torch.cat([mask[sl], keep.long()], 1))
        full = max(p.shape[1] for p in parts)
        out = torch.cat([torch.nn.functional.pad(p, (0, full - p.shape[1]), value=self.pad_id) for p in parts])
        keep = response_keep(out[:, width:], self.end_ids, budgets)
        out[:, width:] = out[:, width:].masked_fill(~keep, self.pad_id)
        attention = torch.cat([mask, keep.long()], 1)
        return RolloutBatch(out, attention, torch.full((rows,), width, dtype=torch.long, device=ids.device))

    def _decode(self, ids, mask, budgets, sampling: SamplingConfig) -> torch.Tensor:
        """Sampling with the model's KV cache: one forward for the prompts, then one per token, drawing
        from softmax(logits / T) (argmax at T = 0) with torch.multinomial on the float32 logits, as
        transformers' `generate` does, without its logits processors and per-token bookkeeping. Left
        padding is positioned by the attention mask. A row is done at an end token or its budget.

        Whether every row is done is asked of the device only every `check_every` tokens (default 16 on
        CUDA, where each such question drains the launch queue of an eager decode, and 1 elsewhere, where it
        costs nothing): in between, finished rows are fed pads, and the columns after the last row ended are
        cut off, so the tokens and the width are those of a loop that asks every token. On several ranks
        decoding layer by layer each forward is a ZeRO-3 collective: the ranks agree at each check, and a rank
        whose rows are done keeps feeding pads (drawing nothing) until all are."""
        from transformers import DynamicCache

        from .kv_cache import preallocated_cache

        rows = ids.shape[0]
        end = torch.as_tensor(self.end_ids, device=ids.device)
        every = self.check_every or (16 if ids.device.type == "cuda" else 1)
        limit = int(budgets.max()) if rows else 0  # no row decodes past its budget: the loop's last token
        if self.synced:
            limit = int(collectives.all_reduce([float(limit)], op="max")[0])
        # the prompts and every token but the last go through the model: ids.shape[1] + limit - 1 positions
        capacity = ids.shape[1] + max(1, limit)
        config = self.lm.config
        cache = preallocated_cache(config, capacity) if self.preallocate else DynamicCache(config=config)
        positions = (mask.long().cumsum(-1) - 1).clamp(min=0)
        cache_kw = {self.cache_keyword: cache}
        out = self.lm(
            input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True, logits_to_keep=1, **cache_kw
        )
        done = budgets <= 0
        busy = not bool(done.all())  # this rank still has a row to decode
        generated = []
        while True:
            if not busy:  # only keeping other ranks company: draw nothing, so the RNG is as unsynced
                token = torch.full((rows,), self.pad_id, dtype=torch.long, device=ids.device)
            else:
                logits = real_token_logits(out.logits[:, -1, :], self.vocab).float()
                if sampling.temperature > 0:
                    logits = logits / sampling.temperature
                    if sampling.top_p < 1.0:
                        logits = _filter_top_p(logits, sampling.top_p)
                    token = torch.multinomial(torch.softmax(logits, dim=-1), num_samples=1).squeeze(1)
                else:
                    token = logits.argmax(-1)
                token = torch.where(done, self.pad_id, token)
            generated.append(token)
            done = done | torch.isin(token, end) | (budgets <= len(generated))
            if len(generated) >= limit:  # every row's budget is spent: known on the host, no question asked
                break
            if len(generated) % every == 0:
                busy = not bool(done.all())  # the device is asked (a sync), every `every` tokens
                if not (collectives.all_reduce([float(busy)], op="max")[0] > 0 if self.synced else busy):
                    break
            mask = torch.cat([mask, mask.new_ones(rows, 1)], 1)
            positions = positions[:, -1:] + 1
            out = self.lm(
                input_ids=token[:, None], attention_mask=mask, position_ids=positions, use_cache=True, **cache_kw
            )
        new = torch.stack(generated, 1)
        if every > 1:  # the pad columns after the last row ended (on every rank, when ranks decode together)
            used = int(response_keep(new, self.end_ids, budgets).sum(1).max()) if rows else 0
            if self.synced:
                used = int(collectives.all_reduce([float(used)], op="max")[0])
            new = new[:, : max(1, used)]
        return torch.cat([ids, new], 1)

    def sync_weights(self, step: int) -> None:  # noqa: ARG002  (the rollout uses the training weights in place)
        return None


def sample(
    rollout_engine: GenerateRollout,
    prompts: list[Prompt],
    prefixes: list[list[int]],
    sampling: SamplingConfig,
    device,
    on_part=None,
) -> RolloutTokens:
    """One rollout per entry of `prompts` (already expanded to n per prompt), continuing after its prefix.

    Prefix plus continuation never exceed `sampling.max_new_tokens`: a row with a prefix of l tokens
    samples at most max_new_tokens - l, and a prefix that already ends with an end token samples nothing
    (that trajectory is fully off-policy). `on_part(tokens)`: called with the RolloutTokens of each
    micro-batch of rows as it is done (rows in order; see GenerateRollout.generate)."""
    seqs = [p.ids + pre for p, pre in zip(prompts, prefixes)]
    ids, mask = left_pad(seqs, rollout_engine.pad_id, device)
    ended = [bool(pre) and pre[-1] in rollout_engine.end_ids for pre in prefixes]
    budgets = torch.tensor(
        [0 if end else max(0, sampling.max_new_tokens - len(pre)) for pre, end in zip(prefixes, ended)], device=device
    )
    width = ids.shape[1]
    lens = torch.tensor([len(pre) for pre in prefixes], device=device).unsqueeze(1)

    def tokens(out: torch.Tensor, attention: torch.Tensor, rows: slice) -> RolloutTokens:
        t = torch.arange(1, out.shape[1], device=device).unsqueeze(0)  # position of each target
        prefix = (t >= width - lens[rows]) & (t < width)
        sampled = attention[:, 1:].bool() & (t >= width)
        return RolloutTokens(out, attention, sampled, prefix)

    each = None if on_part is None else (lambda rows, out, attention: on_part(tokens(out, attention, rows)))
    batch = rollout_engine.generate(RolloutRequest(ids, mask), sampling, budgets, on_part=each)
    return tokens(batch.input_ids, batch.attention_mask, slice(None))


def max_prefix_len(step: int, total_steps: int, l_max: int) -> int:
    """Cosine schedule of the longest teacher prefix: l_max at step 0, 0 at the last step."""
    if total_steps < 1 or step < 0 or l_max < 0:
        raise ValueError(
            f"step={step}, total_steps={total_steps}, l_max={l_max}: expected 0 <= step, 1 <= total_steps, 0 <= l_max"
        )
    frac = min(step, total_steps) / total_steps
    return int(math.floor(l_max * (1 + math.cos(math.pi * frac)) / 2))


def draw_prefix_len(step: int, total_steps: int, l_max: int, response_len: int, generator: torch.Generator) -> int:
    """l ~ Uniform{0 .. min(l_max(step), |y_T|)}, drawn with the caller's seeded generator."""
    high = min(max_prefix_len(step, total_steps, l_max), max(0, response_len))
    return int(torch.randint(0, high + 1, (1,), generator=generator))


def choose_prefixes(
    prompts: list[Prompt], step: int, total_steps: int, l_max: int, enabled: bool, generator: torch.Generator
) -> list[list[int]]:
    """Per rollout, l ~ Uniform{0 .. min(l_max(step), |y_T|)} tokens of the teacher response."""
    out = []
    for p in prompts:
        if not enabled or not p.response_ids:
            out.append([])
            continue
        length = draw_prefix_len(step, total_steps, l_max, len(p.response_ids), generator)
        out.append(p.response_ids[:length])
    return out


def teacher_responses(
    teacher_rollout: GenerateRollout, prompts: list[Prompt], sampling: SamplingConfig, device
) -> list[list[int]]:
    """Responses generated by the teacher engine (prefix_source = teacher), up to and including the first end token."""
    ids, mask = left_pad([p.ids for p in prompts], teacher_rollout.pad_id, device)
    batch = teacher_rollout.generate(RolloutRequest(ids, mask), sampling)
    width = ids.shape[1]
    return [row[width:][keep[width:].bool()].tolist() for row, keep in zip(batch.input_ids, batch.attention_mask)]


class Rollout:
    """The rollout phase of a step: teacher prefixes (off-policy guidance) on their cosine schedule, then the
    student's samples continuing after them. `student` and `teacher` are `GenerateRollout`s."""

    def __init__(self, student: GenerateRollout, teacher: GenerateRollout, cfg, device):
        self.student, self.teacher, self.cfg, self.device = student, teacher, cfg, device  # cfg: RolloutConfig
        self.sampling = SamplingConfig(max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature, top_p=cfg.top_p)
        self.l_max = cfg.guidance_max_len or cfg.max_new_tokens

    @classmethod
    def of_engines(cls, student_engine, teacher_engine, tokenizer, cfg, device, served_end_ids=()) -> Rollout:
        """The run's rollout (`cfg`: the RunConfig): the student generates gathered when rollout.gather_params;
        a teacher that may not fit on one device (teacher.gather_params false) generates layer by layer.
        `teacher_engine` None: a served teacher, which generates nothing; `served_end_ids` are its end ids. A list:
        several teachers (teachers:), whose end ids all end a response; none of them generates prefixes."""
        several = isinstance(teacher_engine, (list, tuple))
        engines = list(teacher_engine) if several else [] if teacher_engine is None else [teacher_engine]
        models = [student_engine.module.lm] + [engine.module.lm for engine in engines]
        end_ids = tuple(sorted({*end_token_ids(tokenizer, *models), *map(int, served_end_ids)}))
        pad, r, vocab = tokenizer.pad_token_id, cfg.rollout, len(tokenizer)
        student = GenerateRollout(student_engine, pad, end_ids, r.gather_params, r.micro_batch_size, vocab)
        teacher = None
        if teacher_engine is not None and not several:
            teacher = GenerateRollout(
                teacher_engine, pad, end_ids, cfg.teacher.gather_params, cfg.teacher.micro_batch_size, vocab
            )
        return cls(student, teacher, r, device)

    def metrics(self, tokens: RolloutTokens) -> dict[str, float]:
        return rollout_metrics(tokens, self.student.end_ids, self.student.pad_id)

    def __call__(
        self, prompts: list[Prompt], step: int, total_steps: int, generator: torch.Generator, on_part=None
    ) -> RolloutTokens:
        """samples_per_prompt rollouts per prompt (adjacent rows); the generator draws the prefix lengths.
        `on_part(tokens)`: each micro-batch of rows as it is done (rollout.micro_batch_size)."""
        expanded = [p for p in prompts for _ in range(self.cfg.samples_per_prompt)]
        if self.cfg.guidance and self.cfg.prefix_source == "teacher":
            for p, response in zip(prompts, teacher_responses(self.teacher, prompts, self.sampling, self.device)):
                p.response_ids = response
        prefixes = choose_prefixes(expanded, step, total_steps, self.l_max, self.cfg.guidance, generator)
        self.student.engine.eval()  # generation uses the KV cache (gradient checkpointing turns it off in train mode)
        return sample(self.student, expanded, prefixes, self.sampling, self.device, on_part)


def rollout_metrics(tokens: RolloutTokens, end_ids, pad_id: int) -> dict[str, float]:
    """Response and prefix lengths, the fraction of rollouts that ended, and sampled pads that are not end tokens."""
    targets = tokens.input_ids[:, 1:]
    is_end = torch.isin(targets, torch.tensor(end_ids, device=targets.device)) & tokens.sampled
    seen, ends = targets[tokens.sampled], is_end[tokens.sampled]  # what the loss saw of the student's samples
    return dict(
        response_len=(tokens.sampled.sum(1)).float().mean().item(),
        prefix_len=(tokens.prefix.sum(1)).float().mean().item(),
        ended_fraction=float(is_end.any(1).sum()) / max(1, tokens.input_ids.shape[0]),  # rows that sampled an end
        sampled_pad_fraction=float(((seen == pad_id) & ~ends).float().mean()) if len(seen) else 0.0,  # pad may be EOS
    )
