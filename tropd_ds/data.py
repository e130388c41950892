"""Prompts through `datasets`: loading, checks, tokenisation, deterministic sharded order, resumable."""

from __future__ import annotations

import contextlib
import json
import logging
import math
import random
from dataclasses import dataclass
from pathlib import Path

from .config import ConfigError, looks_like_hub_id

BUILDERS = {".json": "json", ".jsonl": "json", ".parquet": "parquet", ".arrow": "arrow", ".csv": "csv"}


@dataclass(frozen=True)
class Columns:
    """Where a data set keeps each field (data.*_column): the rows are renamed to the canonical names
    prompt / answer / teacher_response on load. Without the prompt column, a `messages` column (a chat:
    a list of {role, content}) gives the prompt (every turn before the last assistant turn) and the
    teacher response (that turn)."""

    prompt: str = "prompt"
    answer: str = "answer"
    teacher_response: str = "teacher_response"
    messages: str = "messages"
    # how messages name the setting of each column: False, the run config's (data.prompt_column); True, the
    # command-line flags of `tropd-ds eval` (--prompt-column)
    flags: bool = False

    @classmethod
    def of(cls, data_cfg) -> Columns:
        return cls(
            data_cfg.prompt_column, data_cfg.answer_column, data_cfg.teacher_response_column, data_cfg.messages_column
        )

    def source(self, canonical: str) -> str:
        """The data set's own name of a canonical column (what messages about its rows call it)."""
        return getattr(self, canonical)

    def setting(self, canonical: str) -> str:
        """The name of the setting that chooses a canonical column: data.prompt_column, or --prompt-column."""
        return f"--{canonical.replace('_', '-')}-column" if self.flags else f"data.{canonical}_column"


def load_rows(
    path: str,
    split: str | None = "train",
    what: str = "data.path",
    columns: Columns | None = None,
    split_key: str = "data.split",
):
    """A `datasets.Dataset` from a local file, a folder saved by `datasets`, or a hub name, with its columns
    renamed to prompt / answer / teacher_response (see Columns). `split` None: the data's only split; data
    with several splits (a folder with train.jsonl and test.jsonl, a DatasetDict) is refused, naming them,
    so that evaluation never reads a training split by default (`split_key` is the setting that chooses)."""
    import datasets

    p = Path(path)
    if not path:
        raise ConfigError(f"{what} is empty: expected a JSON/JSONL/Parquet/Arrow file or a folder saved by datasets")
    if p.is_dir():
        if not any(p.iterdir()):
            raise ConfigError(f"{what}={path!r} is an empty folder: expected data files or a folder saved by datasets")
        try:
            if (p / "dataset_dict.json").exists() or (p / "state.json").exists():
                ds = datasets.load_from_disk(str(p))
            else:
                ds = datasets.load_dataset(str(p), split=split)  # split None: a DatasetDict of every split
        except Exception as exc:  # datasets raises many kinds of errors for folders it cannot read
            raise ConfigError(
                f"{what}={path!r} could not be read as a data set: {type(exc).__name__}: {str(exc)[:300]}"
            ) from exc
    elif p.is_file():
        if split not in ("train", None):
            raise ConfigError(
                f"{split_key}={split!r} with the file {what}={path!r}: a file holds one split, 'train'; {split_key} "
                "chooses among the splits of a saved DatasetDict folder or a hub data set"
            )
        builder = BUILDERS.get(p.suffix)
        if builder is None:
            raise ConfigError(f"{what}={path!r}: unknown file type {p.suffix!r}; expected one of {', '.join(BUILDERS)}")
        if p.stat().st_size == 0:
            raise ConfigError(f"{what}={path!r} is empty: expected at least one row with a 'prompt'")
        if builder in ("json", "csv"):
            check_utf8(p, what)
        options = {}
        if builder == "csv":  # every cell as text: a response "3" stays "3", not the int 3
            options["features"] = csv_text_features(p)
        try:
            with quiet_builders():
                ds = datasets.load_dataset(builder, data_files=str(p), split="train", **options)
        except Exception as exc:  # datasets raises many kinds of errors for unreadable files
            where = json_syntax_error(p) if builder == "json" else None
            if where:
                raise ConfigError(f"{what}={path!r} {where}") from None
            raise ConfigError(f"{what}={path!r} could not be read as {builder}: {type(exc).__name__}: {exc}") from exc
    elif looks_like_hub_id(path) and not p.exists():
        ds = load_hub_dataset(path, split, what)
    else:
        raise ConfigError(f"{what}={path!r} does not exist: expected a data file, a saved dataset folder or a hub name")
    if isinstance(ds, datasets.DatasetDict):
        if split is None and len(ds) == 1:
            split = next(iter(ds))
        elif split is None:
            raise ConfigError(
                f"{what}={path!r} has splits {list(ds)}: set {split_key} to the one to use (a held-out split, "
                "never the training one by default)"
            )
        if split not in ds:
            raise ConfigError(f"{what}={path!r} has splits {list(ds)}: {split_key}={split!r} is not one of them")
        ds = ds[split]
    if len(ds) == 0:
        raise ConfigError(f"{what}={path!r} has no rows: expected at least one prompt")
    columns = columns or Columns()
    ds = canonical_columns(ds, columns, f"{what}={path!r}")
    return answers_as_text(ds, p if p.is_file() and BUILDERS.get(p.suffix) == "json" else None, what, columns)


@contextlib.contextmanager
def quiet_builders():
    """datasets' file builders without their error log ("Failed to load JSON from file ... row 1"): a file they
    cannot read becomes one ConfigError that says where and why."""
    logger = logging.getLogger("datasets.packaged_modules")
    level = logger.level
    logger.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        logger.setLevel(level)


def answer_text(value) -> str:
    """A reference answer as text: a number as it is written, 3 and not 3.0 (`datasets` reads a column that
    mixes 3 and 4.5 as floats)."""
    if isinstance(value, float) and value.is_integer() and abs(value) < 2**53:
        return str(int(value))
    return str(value)


def answers_as_text(ds, json_file: Path | None, what: str, columns: Columns):
    """`ds` with a float answer column as text (see answer_text). A NaN or infinite answer is refused by row;
    an integer past float64's 53 bits (a 30-digit answer) is read again, exactly, from `json_file`, and
    refused where there is none (its digits are lost: quote answers as strings)."""
    import datasets

    feature = ds.features.get("answer")
    if not (isinstance(feature, datasets.Value) and feature.dtype.startswith("float")):
        return ds
    values = ds["answer"]
    name = columns.source("answer")
    lossy = None
    for i, v in enumerate(values):
        if v is None:
            continue
        if not math.isfinite(v):
            raise ConfigError(f"{what} row {i}: {name}={v!r} (float): expected a finite number or a string")
        if lossy is None and v.is_integer() and abs(v) >= 2**53:
            lossy = i
    texts = [None if v is None else answer_text(v) for v in values]
    if lossy is not None:
        exact = json_answers(json_file, name, len(values)) if json_file is not None else None
        if exact is None:
            raise ConfigError(
                f"{what} row {lossy}: {name}={values[lossy]!r}: an integer too large for a float64, its digits are "
                'lost when read as a number: write the answers as strings ("123456789012345678901234567890")'
            )
        texts = [None if v is None else answer_text(v) for v in exact]
    return ds.remove_columns("answer").add_column("answer", texts, feature=datasets.Value("string"))


def json_answers(path: Path, key: str, rows: int) -> list | None:
    """The `key` of every row of a JSON Lines file, or of a JSON file holding a list of rows, as Python's json
    reads it (integers exact); None when the file's rows do not line up with the `rows` datasets read."""
    try:
        text = path.read_text(encoding="utf-8")
        try:
            records = json.loads(text)
        except json.JSONDecodeError:
            records = [json.loads(line) for line in text.splitlines() if line.strip()]
    except (OSError, ValueError):
        return None
    if isinstance(records, dict):  # one row
        records = [records]
    if not isinstance(records, list) or len(records) != rows or not all(isinstance(r, dict) for r in records):
        return None
    return [r.get(key) for r in records]


def json_syntax_error(path: Path) -> str | None:
    """Where a JSON / JSON Lines file that datasets could not read breaks: its first line that is not JSON
    (the line, column and json's reason), or None when every line reads. Only called after datasets failed."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        return None
    lines = text.splitlines()
    first = next((line for line in lines if line.strip()), "")
    if path.suffix == ".json":  # one document, unless its first line is a whole row (JSON Lines in a .json file)
        try:
            json.loads(first)
            one_document = False
        except json.JSONDecodeError:
            one_document = True
        if one_document:
            try:
                json.loads(text)
                return None
            except json.JSONDecodeError as exc:
                return f"line {exc.lineno} (column {exc.colno}) is not JSON: {exc.msg}: expected a JSON list of rows"
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            json.loads(line)
        except json.JSONDecodeError as exc:
            shown = line if len(line) <= 80 else line[:77] + "..."
            return (
                f"line {number} (column {exc.colno}) is not JSON: {exc.msg} in {shown!r}: expected one JSON object "
                "per line"
            )
    return None


def csv_text_features(path: Path):
    """`datasets` features reading every column of a CSV file as text (None when pandas cannot read its header:
    datasets then reports the problem)."""
    import datasets
    import pandas as pd

    try:
        names = list(pd.read_csv(path, nrows=0).columns)
    except Exception:  # an unreadable header: load_dataset says why
        return None
    if not names or len(set(map(str, names))) != len(names):
        return None
    return datasets.Features({str(n): datasets.Value("string") for n in names})


def check_utf8(path: Path, what: str) -> None:
    """A text data file is UTF-8 throughout (Arrow keeps the bytes as they are, and the first read of a bad row
    fails deep in pyarrow): decoded in 1 MiB blocks, and on a failure scanned again line by line to name the
    first bad byte by line and column."""
    import codecs

    decoder = codecs.getincrementaldecoder("utf-8")()
    try:
        with open(path, "rb") as f:
            while block := f.read(1 << 20):
                decoder.decode(block)
        decoder.decode(b"", final=True)
        return
    except UnicodeDecodeError:
        pass
    with open(path, "rb") as f:
        for number, line in enumerate(f, 1):
            try:
                line.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise ConfigError(
                    f"{what}={str(path)!r} line {number} (column {exc.start + 1}) is not UTF-8 text (byte "
                    f"0x{line[exc.start]:02x}): save the file as UTF-8"
                ) from None
    raise ConfigError(f"{what}={str(path)!r} is not UTF-8 text (it ends inside a character): save the file as UTF-8")


def shared_prompts(train_rows, eval_rows) -> int:
    """How many evaluation rows have a prompt that is also a training prompt (the same text or messages)."""
    held = {json.dumps(p, sort_keys=True, default=str) for p in eval_rows["prompt"]}
    seen: set[str] = set()
    for start in range(0, len(train_rows), 10_000):  # batches: a large training set is never all in memory
        for p in train_rows[start : start + 10_000]["prompt"]:
            key = json.dumps(p, sort_keys=True, default=str)
            if key in held:
                seen.add(key)
    return sum(json.dumps(p, sort_keys=True, default=str) in seen for p in eval_rows["prompt"])


def canonical_columns(ds, columns: Columns, what: str):
    """`ds` with the configured columns under the canonical names (other columns kept as they are)."""
    names = ds.column_names
    if columns.prompt not in names and columns.messages not in names:
        raise ConfigError(
            f"{what} has columns {names}: expected a prompt column {columns.prompt!r} ({columns.setting('prompt')}) "
            f"or a conversation column {columns.messages!r} ({columns.setting('messages')})"
        )
    # a column configured under another name that the data lacks is missing, even if one is called by the
    # canonical name (which the user chose not to use)
    unused = [dst for dst in ("prompt", "answer", "teacher_response") if getattr(columns, dst) not in names + [dst]]
    if unused and any(dst in names for dst in unused):
        ds = ds.remove_columns([dst for dst in unused if dst in names])
    wanted = {"answer": columns.answer, "teacher_response": columns.teacher_response}
    if columns.prompt in names:
        wanted["prompt"] = columns.prompt
    renames = {src: dst for dst, src in wanted.items() if src in names and src != dst}
    if renames:
        # through temporary names: a configured column may carry another one's canonical name
        ds = ds.rename_columns({src: f"__tropd_{dst}" for src, dst in renames.items()})
        shadowed = [dst for dst in renames.values() if dst in ds.column_names]
        if shadowed:  # the configured column wins over one that merely has the canonical name
            ds = ds.remove_columns(shadowed)
        ds = ds.rename_columns({f"__tropd_{dst}": dst for dst in renames.values()})
    if "prompt" not in wanted:
        ds = from_messages(ds, columns.messages, what)
    return ds


def split_conversation(messages, where: str) -> tuple[list[dict], str | None]:
    """A chat as (prompt turns, teacher response): the last turn is the response when it is the assistant's."""
    if not isinstance(messages, list) or not messages:
        raise ConfigError(
            f"{where}: messages={messages!r}: expected a non-empty list of {{'role': ..., 'content': ...}} turns"
        )
    for turn in messages:
        if not (isinstance(turn, dict) and isinstance(turn.get("role"), str) and isinstance(turn.get("content"), str)):
            raise ConfigError(
                f"{where}: the turn {turn!r} is not a chat message: expected {{'role': str, 'content': str}}"
            )
    if messages[-1]["role"] != "assistant":
        return [{"role": m["role"], "content": m["content"]} for m in messages], None
    prompt = [{"role": m["role"], "content": m["content"]} for m in messages[:-1]]
    if not prompt:
        raise ConfigError(
            f"{where}: the conversation is a lone assistant turn: a prompt needs at least one turn before"
        )
    return prompt, messages[-1]["content"]


def from_messages(ds, column: str, what: str):
    """Conversation rows as prompt (turns before the last assistant turn) and teacher_response (that turn),
    unless the data has its own teacher_response column."""
    has_response = "teacher_response" in ds.column_names

    def convert(row, index):
        prompt, response = split_conversation(row[column], f"{what} row {index} ({column!r})")
        return {"prompt": prompt} if has_response else {"prompt": prompt, "teacher_response": response}

    return ds.map(convert, with_indices=True, remove_columns=[column], keep_in_memory=True, desc="conversations")


def load_hub_dataset(name: str, split: str, what: str):
    """A data set by hub id: from the hub, or, offline (HF_HUB_OFFLINE=1), from the repository files in
    the hub cache (what `huggingface-cli download --repo-type dataset` leaves there)."""
    import datasets
    from huggingface_hub import snapshot_download

    try:
        return datasets.load_dataset(name, split=split)
    except Exception as online:  # offline, unknown repository, no network: try the hub cache
        try:
            folder = snapshot_download(name, repo_type="dataset", local_files_only=True)
        except Exception:
            raise ConfigError(
                f"{what}={name!r} is not a local file or folder, and as a hub data set it cannot be loaded: "
                f"{type(online).__name__}: {str(online).splitlines()[0] if str(online) else ''}. Offline, its files "
                "must be in the "
                "hub cache (HF_HOME / HF_HUB_CACHE) with HF_HUB_OFFLINE=1"
            ) from online
        return datasets.load_dataset(folder, split=split)


RESERVED_TEMPLATE_KWARGS = ("conversation", "messages", "tokenize", "add_generation_prompt", "return_dict")


def render_prompt(tokenizer, prompt, chat_template: bool, template_kwargs: dict | None = None) -> str:
    """The prompt's text: a list of chat messages, or a string when `chat_template`, through the tokenizer's
    chat template (with `template_kwargs`, e.g. enable_thinking); otherwise the string itself."""
    if isinstance(prompt, list) or chat_template:
        messages = prompt if isinstance(prompt, list) else [{"role": "user", "content": prompt}]
        return tokenizer.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=True, **(template_kwargs or {})
        )
    return prompt


def template_variables(tokenizer) -> set[str] | None:
    """The names the tokenizer's chat template reads (None without a template)."""
    import jinja2
    from jinja2 import meta

    template = getattr(tokenizer, "chat_template", None)
    if not template:
        return None
    texts = template.values() if isinstance(template, dict) else [template]
    env = jinja2.Environment(extensions=["jinja2.ext.loopcontrols"])
    found: set[str] = set()
    for text in texts:
        try:
            found |= meta.find_undeclared_variables(env.parse(text))
        except jinja2.TemplateError:  # a template jinja cannot parse here: nothing to say about its keywords
            return None
    return found


def check_template_kwargs(tokenizer, kwargs: dict, what: str = "data.chat_template_kwargs") -> list[str]:
    """Errors for keywords tropd-ds sets itself; warnings (returned) for keywords the template never reads."""
    reserved = [k for k in kwargs if k in RESERVED_TEMPLATE_KWARGS]
    if reserved:
        raise ConfigError(
            f"{what} sets {', '.join(map(repr, reserved))}: tropd-ds sets {', '.join(RESERVED_TEMPLATE_KWARGS)} "
            "itself; pass only the template's own keywords (e.g. enable_thinking)"
        )
    if not kwargs:
        return []
    read = template_variables(tokenizer)
    if read is None:
        return [f"warning: {what}={kwargs!r} but the tokenizer has no chat template: the keywords have no effect"]
    ignored = sorted(k for k in kwargs if k not in read)
    if not ignored:
        return []
    return [
        f"warning: {what}: the chat template never reads {', '.join(map(repr, ignored))} (it reads "
        f"{', '.join(sorted(read - {'messages'})) or 'only messages'}): "
        f"{'they have' if len(ignored) > 1 else 'it has'} no effect"
    ]


def prompt_ids(tokenizer, prompt, chat_template: bool, template_kwargs: dict | None = None) -> list[int]:
    """Token ids of a prompt; text from a chat template already holds the template's special tokens."""
    templated = chat_template or isinstance(prompt, list)
    text = render_prompt(tokenizer, prompt, chat_template, template_kwargs)
    return tokenizer(text, add_special_tokens=not templated)["input_ids"]


@dataclass
class Prompt:
    index: int  # row in the data set
    ids: list[int]
    response_ids: list[int] | None  # the teacher's response, ending with EOS, when the data has one
    answer: str | None
    truncated: bool = False  # longer than max_prompt_tokens: only its last tokens are kept
    teacher: int = 0  # the teacher that scores its rollouts (an index into the run's teachers)


def encode_prompt(
    tokenizer,
    row: dict,
    index: int,
    max_prompt_tokens: int,
    long_prompts: str,
    chat_template: bool = False,
    template_kwargs: dict | None = None,
):
    """One data row as a Prompt (its text through the chat template when asked, then the tokenizer), or
    None when it is longer than `max_prompt_tokens` and `long_prompts` is 'skip' ('truncate' keeps its
    last tokens). The teacher response, when the row has one, ends with the tokenizer's EOS."""
    ids = prompt_ids(tokenizer, row["prompt"], chat_template, template_kwargs)
    truncated = len(ids) > max_prompt_tokens
    if truncated:
        if long_prompts == "skip":
            return None
        ids = ids[-max_prompt_tokens:]
    response = row.get("teacher_response")
    response_ids = None
    if response:
        response_ids = tokenizer(response, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    answer = row.get("answer")
    return Prompt(index, ids, response_ids, None if answer is None else answer_text(answer), truncated)


class PromptStream:
    """Global order: a seeded permutation per epoch; each step takes the next `per_step` prompts and
    rank r keeps its contiguous share. The state is (epoch, cursor), the same on every rank."""

    def __init__(
        self,
        ds,
        tokenizer,
        per_step: int,
        rank: int,
        world: int,
        seed: int,
        max_prompt_tokens: int,
        long_prompts: str,
        chat_template: bool = False,
        template_kwargs: dict | None = None,
        routes: list[int] | None = None,
    ):
        if per_step % world:
            raise ConfigError(
                f"rollout.prompts_per_step={per_step} does not divide among {world} ranks: use a multiple of {world}"
            )
        self.ds, self.tok = ds, tokenizer
        self.per_step, self.rank, self.world, self.seed = per_step, rank, world, seed
        self.max_prompt_tokens, self.long_prompts, self.chat_template = max_prompt_tokens, long_prompts, chat_template
        self.template_kwargs = template_kwargs
        self.routes = routes  # each row's teacher (`teacher_routes`); None: one teacher
        self.epoch, self.cursor = 0, 0
        self.truncated = self.skipped = 0
        self._order = self._permutation(0)

    def _permutation(self, epoch: int) -> list[int]:
        order = list(range(len(self.ds)))
        random.Random(self.seed * 100003 + epoch).shuffle(order)
        return order

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "cursor": self.cursor, "truncated": self.truncated, "skipped": self.skipped}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.cursor = state["epoch"], state["cursor"]
        self.truncated, self.skipped = state.get("truncated", 0), state.get("skipped", 0)
        self._order = self._permutation(self.epoch)

    def _next_index(self) -> int:
        if self.cursor >= len(self._order):
            self.epoch, self.cursor = self.epoch + 1, 0
            self._order = self._permutation(self.epoch)
        idx = self._order[self.cursor]
        self.cursor += 1
        return idx

    def encode(self, index: int) -> Prompt | None:
        """Row `index` as a Prompt (None when skipped), counted in `truncated` / `skipped`."""
        prompt = encode_prompt(
            self.tok, self.ds[index], index, self.max_prompt_tokens, self.long_prompts, self.chat_template,
            self.template_kwargs,
        )  # fmt: skip
        self.skipped += prompt is None
        self.truncated += prompt is not None and prompt.truncated
        if prompt is not None and self.routes is not None:
            prompt.teacher = self.routes[index]
        return prompt

    def next_batch(self) -> list[Prompt]:
        """This rank's prompts for the next step (all ranks advance the same global cursor)."""
        chosen: list[Prompt] = []
        skipped_in_a_row = 0
        while len(chosen) < self.per_step:
            idx = self._next_index()
            prompt = self.encode(idx)
            if prompt is not None:
                chosen.append(prompt)
                skipped_in_a_row = 0
                continue
            skipped_in_a_row += 1
            if skipped_in_a_row >= len(self.ds):  # a whole epoch without one usable prompt: it would never end
                raise ConfigError(
                    f"every one of the {len(self.ds)} prompts is longer than data.max_prompt_tokens="
                    f"{self.max_prompt_tokens} and data.long_prompts='skip' drops them: raise max_prompt_tokens or "
                    "set long_prompts=truncate"
                )
        share = self.per_step // self.world
        return chosen[self.rank * share : (self.rank + 1) * share]


def teacher_routes(ds, column: str, names: list[str], what: str = "data.path") -> list[int]:
    """Each row's teacher, an index into `names`, read from the column that names it (data.teacher_column): every
    row must name one of them, or the run is refused before any engine starts, naming the first row that does not."""
    if column not in ds.column_names:
        raise ConfigError(
            f"{what} has columns {ds.column_names}: several teachers ({', '.join(names)}) need a column naming each "
            f"row's teacher, {column!r} (data.teacher_column)"
        )
    index = {name: i for i, name in enumerate(names)}
    values = ds[column]
    bad = [i for i, value in enumerate(values) if not isinstance(value, str) or value not in index]
    if bad:
        first = values[bad[0]]
        raise ConfigError(
            f"{what} row {bad[0]}: {column}={first!r} names no teacher of this run: expected one of "
            f"{', '.join(names)} ({len(bad)} of {len(values)} rows name none)"
        )
    return [index[value] for value in values]


def unknown_token(tokenizer) -> tuple[int | None, str | None]:
    """The id and text of the token that characters outside the vocabulary become: the tokenizer's
    unk_token, or its backend model's (a WordLevel or BPE model can name one the wrapper does not)."""
    if getattr(tokenizer, "unk_token_id", None) is not None:
        return tokenizer.unk_token_id, tokenizer.unk_token
    backend = getattr(getattr(tokenizer, "backend_tokenizer", None), "model", None)
    text = getattr(backend, "unk_token", None)
    if text:
        token_id = tokenizer.convert_tokens_to_ids(text)
        if isinstance(token_id, int) and token_id >= 0:
            return token_id, text
    return None, None


SCAN_ROWS = 20_000  # rows checked before the engines start (all of them in smaller data sets)


def check_rows(
    ds,
    tokenizer,
    what: str,
    max_prompt_tokens: int,
    long_prompts: str,
    chat_template: bool,
    need_answer: bool = False,
    template_kwargs: dict | None = None,
    columns: Columns | None = None,
) -> list[str]:
    """Types, nulls, chat template and lengths of the first SCAN_ROWS rows, before any engine starts.
    Raises ConfigError naming the first bad row; returns warnings (unknown-token rate) to print."""
    n = min(len(ds), SCAN_ROWS)
    has_template = bool(getattr(tokenizer, "chat_template", None))
    usable, unknown, total_tokens, unknown_rows, example = 0, 0, 0, 0, None
    unk, unk_text = unknown_token(tokenizer)
    name = (columns or Columns()).source  # the data set's own name of each column, in messages
    table = ds[:n]  # one read of every column
    for i in range(n):
        row = {key: values[i] for key, values in table.items()}
        prompt = row["prompt"]
        if isinstance(prompt, list):
            if not prompt or not all(
                isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
                for m in prompt
            ):
                raise ConfigError(
                    f"{what} row {i}: prompt is a list but not of chat messages: expected "
                    "[{'role': 'user', 'content': '...'}, ...] with string roles and contents"
                )
            if not has_template:
                raise ConfigError(
                    f"{what} row {i}: prompt is a list of chat messages but the tokenizer has no chat template: "
                    "use a tokenizer with one (tokenizer_config.json 'chat_template'), or plain string prompts"
                )
        elif not isinstance(prompt, str) or not prompt.strip():
            raise ConfigError(
                f"{what} row {i}: {name('prompt')}={prompt!r} ({type(prompt).__name__}): expected a non-empty string "
                "or a list of chat messages"
            )
        elif chat_template and not has_template:
            raise ConfigError(
                f"data.chat_template=true but the tokenizer has no chat template ({what} row {i}): set "
                "data.chat_template=false or use a tokenizer with one"
            )
        response = row.get("teacher_response")
        if response is not None and not isinstance(response, str):
            raise ConfigError(
                f"{what} row {i}: {name('teacher_response')}={response!r} ({type(response).__name__}): expected a "
                "string or null"
            )
        answer = row.get("answer")
        if answer is not None and (isinstance(answer, bool) or not isinstance(answer, (str, int, float))):
            raise ConfigError(
                f"{what} row {i}: {name('answer')}={answer!r} ({type(answer).__name__}): expected a string or a number"
            )
        if isinstance(answer, float) and not math.isfinite(answer):
            raise ConfigError(
                f"{what} row {i}: {name('answer')}={answer!r} (float): expected a finite number or a string"
            )
        if need_answer and (answer is None or str(answer).strip() == ""):
            raise ConfigError(
                f"{what} row {i}: {name('answer')} is {row.get('answer')!r}: every held-out row needs an answer"
            )
        try:
            ids = prompt_ids(tokenizer, prompt, chat_template, template_kwargs)
        except Exception as exc:  # jinja2's TemplateSyntaxError / TemplateError (raise_exception), and the like
            raise ConfigError(
                f"{what} row {i}: the tokenizer's chat template fails on it ({type(exc).__name__}: "
                f"{str(exc).splitlines()[0] if str(exc) else ''}): fix the template ({tokenizer.name_or_path}, "
                "tokenizer_config.json 'chat_template' or chat_template.jinja) or the row, or set data.chat_template="
                "false for plain string prompts"
            ) from exc
        if not ids:
            raise ConfigError(
                f"{what} row {i}: the prompt renders to no tokens"
                + (" through the chat template" if chat_template or isinstance(prompt, list) else "")
                + ": a rollout needs at least one prompt token"
            )
        usable += len(ids) <= max_prompt_tokens or long_prompts != "skip"
        if unk is not None:
            bad = sum(t == unk for t in ids)
            unknown += bad
            unknown_rows += bad > 0
            if bad and example is None:
                example = i
        total_tokens += len(ids)
    if usable == 0:
        raise ConfigError(
            f"every one of the {'first ' if n < len(ds) else ''}{n} prompts in {what} is longer than "
            f"data.max_prompt_tokens={max_prompt_tokens} and data.long_prompts='skip' drops them: no step could "
            "start; raise max_prompt_tokens or set long_prompts=truncate"
        )
    warnings = []
    if unknown:
        warnings.append(
            f"warning: {unknown} of {total_tokens} prompt tokens in {unknown_rows} of {n} rows of {what} map to the "
            f"tokenizer's unknown token {unk_text!r} (first in row {example}): the models never see "
            "those characters"
        )
    return warnings


def left_pad(seqs: list[list[int]], pad_id: int, device):
    """Token rows as one left-padded batch: (ids, attention mask), each [rows, longest row] int64 on `device`.
    Left padding keeps every row's last token in the last column, where generation continues."""
    import torch

    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        if s:
            ids[i, width - len(s) :] = torch.tensor(s)
            mask[i, width - len(s) :] = 1
    return ids.to(device), mask.to(device)
