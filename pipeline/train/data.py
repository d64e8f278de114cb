"""Training data: read pair and ranked-list tables and tokenize each piece once (collation: collate.py).

Tokenization (the same for the policy, the cached reference pass and every epoch, because it happens once):
- prompt ids = the chat template applied to [system?, user] with add_generation_prompt=True, rendered to text
  and encoded without special tokens; a BOS is prepended only when the tokenizer normally adds one and the
  template did not write it, and a doubled leading BOS is collapsed. Without a chat template the prompt text is
  encoded as is.
- completion ids = the completion text encoded without special tokens, + EOS once (not when the text already
  ends with it).
- prefix_as_prompt: the pair's shared_prefix is encoded once, appended to the prompt ids, and only the
  divergent suffix of chosen/rejected is scored (both sides see the same prefix tokens).
- rejected_to_divergence: the rejected ids end at the first token where they differ from the chosen ids (the
  common tokens before it are kept: under DPO's margin they cancel, and NLL sees only the chosen). A rejected
  that is a prefix of the chosen one, or equal to it, is left whole.
Identical prompts, prefixes and completions are encoded once per table (a dict of text -> ids).

Truncation policy, per row, counted in `EncodeStats`:
1. a prompt longer than max_prompt_length keeps its last tokens (the text nearest the answer), with its BOS;
2. a completion that does not fit in max_length after its prompt is cut at the end (TRL's keep_start);
3. a pair/list whose prompt leaves no room for one completion token is dropped.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from pydantic import BaseModel, ConfigDict, Field

from pipeline.errors import InputError
from pipeline.train.conversational import from_conversational
from schemas.pairs import CHOSEN_IS_TERMINAL, RATIONALE, RATIONALE_PROMPT, REJECTED_IS_TERMINAL, SHARED_PREFIX
from schemas.tables import SCORE_MAX, SCORE_MIN, SFT_TARGETS

PAIR_COLUMNS = ("prompt", "chosen", "rejected")
LIST_COLUMNS = ("prompt", "responses", "scores")


class TokenizeConfig(BaseModel):
    """How rows become token ids. Part of the reference-cache fingerprint."""
    model_config = ConfigDict(extra="forbid")

    max_length: int = Field(1024, ge=2, description="max prompt + completion tokens per sequence")
    max_prompt_length: int | None = Field(None, ge=1, description="prompts longer than this keep their end")
    prefix_as_prompt: bool = Field(False, description="score only the part after shared_prefix")
    partial_eos: bool = Field(False, description="append EOS to completions marked non-terminal "
                              "(`chosen_is_terminal` / `rejected_is_terminal` false, e.g. tree step pairs); off: "
                              "such a completion is a step of a longer response, and EOS after it would teach "
                              "the model to stop there")
    step_separator: str | None = Field(None, description="text appended to completions marked non-terminal "
                                       "(when partial_eos is off): what the policy emitted after a step line "
                                       "before the next one, e.g. \"\\n\" for the bundled task's one-step-per-line "
                                       "solutions. Without it a wrong line that is a prefix of the right one "
                                       "(\"= 1\" vs \"= 13\") has no token that differs from the chosen side")
    rejected_to_divergence: bool = Field(False, description="cut each rejected completion just after its first "
                                         "token that differs from the chosen one (token-level step pairs: "
                                         "what follows a wrong token is the policy's consistent continuation of "
                                         "it, not a second mistake, so it is not pushed down)")


# ---------------------------------------------------------------------------------------------------- reading

def read_table(path: str | Path) -> pa.Table:
    """A parquet file, a folder of parquet shards (a store stage folder), a JSONL file, or an export folder of
    `prefpipe export` (`FOLDER[@CONFIG]`, read back as store rows: from_export.py)."""
    from pipeline.train.from_export import export_target, read_export
    if (target := export_target(path)) is not None:
        return read_export(*target)
    p, output = Path(path), "main"
    if not p.exists() and "@" in p.name:  # runs/<run>/<stage>@lists reads that stage's `lists` output
        p, output = p.parent / p.name.split("@")[0], p.name.split("@")[1]
    if not p.exists():
        raise InputError("no such file or folder", file=str(path))
    try:
        if (p / "manifest.json").exists():  # a run-store stage folder: read exactly the shards it lists
            from pipeline.store import StageStore
            table = StageStore(p.parent, p.name).read(output)
        elif p.is_dir():
            shards = sorted(p.glob("*.parquet"))
            if not shards:
                raise InputError("folder has no .parquet files", file=str(p))
            table = pa.concat_tables([pq.read_table(s) for s in shards], promote_options="default")
        elif p.suffix in (".jsonl", ".json"):
            import pyarrow.json as pj
            table = pj.read_json(p)
        else:
            table = pq.read_table(p)
    except (pa.ArrowInvalid, OSError) as e:
        raise InputError(f"cannot read table: {e}", file=str(p)) from e
    from pipeline.train.data_check import check_training_table
    check_training_table(table, str(path))  # what `prefpipe validate` refuses, numbered as in the file
    if "status" in table.column_names:  # store outputs: failed/filtered rows are reported there, not trained on
        table = table.filter(pc.equal(table["status"], "ok"))
    if table.num_rows == 0:
        raise InputError("table has no (ok) rows", file=str(p))
    return table


def _require(table: pa.Table, columns: tuple[str, ...], kinds: dict[str, str], file: str | None) -> None:
    for c in columns:
        if c not in table.column_names:
            raise InputError(f"missing column (have {table.column_names})", file=file, column=c)
        col = table[c]
        if col.null_count:
            row = int(np.flatnonzero(col.is_null().to_numpy(zero_copy_only=False))[0])
            raise InputError("null value", file=file, row=row, column=c)
        want = kinds[c]
        ok = {"string": pa.types.is_string(col.type) or pa.types.is_large_string(col.type),
              "list": pa.types.is_list(col.type) or pa.types.is_large_list(col.type)}[want]
        if not ok:
            raise InputError(f"expected {want}, got {col.type}", file=file, column=c)


def check_pairs(table: pa.Table, file: str | None = None, prefix_as_prompt: bool = False) -> None:
    if table.num_rows == 0:
        raise InputError("empty pair table", file=file)
    _require(table, PAIR_COLUMNS, dict.fromkeys(PAIR_COLUMNS, "string"), file)
    if prefix_as_prompt and SHARED_PREFIX not in table.column_names:
        raise InputError(f"prefix_as_prompt needs a {SHARED_PREFIX} column", file=file, column=SHARED_PREFIX)


def check_lists(table: pa.Table, file: str | None = None) -> None:
    if table.num_rows == 0:
        raise InputError("empty ranked-list table", file=file)
    _require(table, LIST_COLUMNS, {"prompt": "string", "responses": "list", "scores": "list"}, file)
    n_resp = pc.list_value_length(table["responses"]).to_numpy(zero_copy_only=False)
    n_score = pc.list_value_length(table["scores"]).to_numpy(zero_copy_only=False)
    bad = np.flatnonzero(n_resp != n_score)
    if bad.size:
        raise InputError(f"{n_resp[bad[0]]} responses but {n_score[bad[0]]} scores", file=file,
                         row=int(bad[0]), column="scores")
    bad = np.flatnonzero(n_resp < 2)
    if bad.size:
        raise InputError("a ranked list needs at least 2 responses", file=file, row=int(bad[0]),
                         column="responses")


# ---------------------------------------------------------------------------------------------------- encoding

@dataclass
class EncodeStats:
    rows_in: int = 0
    rows_dropped: int = 0          # prompt left no room for a completion token
    prompts_truncated: int = 0     # rows whose prompt was cut to max_prompt_length
    completions_truncated: int = 0  # completions cut at max_length (counted per sequence)
    rejected_cut: int = 0          # rejected completions cut after their first divergent token

    def as_dict(self) -> dict[str, int]:
        return dict(self.__dict__)


@dataclass
class Encoded:
    """Token ids of a table: one prompt and K completions per kept row (K=2 for pairs: chosen, rejected)."""
    rows: np.ndarray                       # index of each kept row in the source table
    prompts: list[list[int]]
    completions: list[list[list[int]]]
    scores: list[list[float]] | None = None  # ranked lists only
    stats: EncodeStats = field(default_factory=EncodeStats)
    extra: list[tuple[list[int], list[int]]] | None = None
    """One more sequence per group with its own prompt: (prompt ids, completion ids), e.g. the RDPO rationale
    conditioned on prompt_rat. Scored by the policy only (no reference term)."""
    score_range: tuple[float, float] | None = None  # lists: the scale their scores are declared on

    def __len__(self) -> int:
        return len(self.prompts)

    def num_tokens(self) -> int:
        return sum(len(p) * len(c) + sum(map(len, c)) for p, c in zip(self.prompts, self.completions))

    def subset(self, keep: list[int]) -> "Encoded":
        """The groups at positions `keep` (same stats: they describe the encoding of the whole table)."""
        return Encoded(self.rows[keep], [self.prompts[i] for i in keep], [self.completions[i] for i in keep],
                       [self.scores[i] for i in keep] if self.scores is not None else None, self.stats,
                       [self.extra[i] for i in keep] if self.extra is not None else None, self.score_range)


class PieceEncoder:
    """Encodes prompts and completions with one tokenizer; each distinct text is tokenized once."""

    def __init__(self, tokenizer):
        self.tok = tokenizer
        self.bos = tokenizer.bos_token_id
        self.eos = tokenizer.eos_token_id
        probe = tokenizer("a", add_special_tokens=True)["input_ids"]
        self.adds_bos = self.bos is not None and len(probe) > 0 and probe[0] == self.bos
        self.has_template = bool(getattr(tokenizer, "chat_template", None))
        self._cache: dict[tuple[str, str], list[int]] = {}

    def _encode_many(self, kind: str, texts: list[str]) -> list[list[int]]:
        todo = sorted({t for t in texts if (kind, t) not in self._cache})
        if todo:
            ids = self.tok(todo, add_special_tokens=False)["input_ids"]
            for t, i in zip(todo, ids):
                self._cache[(kind, t)] = self._fix(kind, t, list(i))
        return [self._cache[(kind, t)] for t in texts]

    def _fix(self, kind: str, text: str, ids: list[int]) -> list[int]:
        if kind == "prompt":
            if self.adds_bos and (not ids or ids[0] != self.bos):
                ids = [self.bos] + ids
            while len(ids) >= 2 and self.bos is not None and ids[0] == ids[1] == self.bos:
                ids = ids[1:]
            return ids
        if kind in ("completion", "partial"):
            while ids and self.bos is not None and ids[0] == self.bos:
                ids = ids[1:]
            if kind == "completion" and self.eos is not None and (not ids or ids[-1] != self.eos):
                ids = ids + [self.eos]
            return ids
        return ids  # "prefix": continues the prompt, so no specials of its own and no EOS

    def render_prompt(self, prompt: str, system: str | None = None, messages_json: str | None = None) -> str:
        if messages_json:
            messages = json.loads(messages_json)
        else:
            messages = ([{"role": "system", "content": system}] if system else []) + \
                       [{"role": "user", "content": prompt}]
        if not self.has_template:
            return "\n\n".join(m["content"] for m in messages)
        return self.tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)

    def prompts(self, texts: list[str]) -> list[list[int]]:
        return self._encode_many("prompt", texts)

    def completions(self, texts: list[str]) -> list[list[int]]:
        return self._encode_many("completion", texts)

    def completions_marked(self, texts: list[str], terminal: list[bool | None] | None,
                           partial_eos: bool, separator: str | None = None) -> list[list[int]]:
        """Completions with EOS, except those marked non-terminal (terminal False) unless partial_eos; those end
        with `separator` instead when given (tokenized together with the text, as the policy produced it)."""
        if terminal is None or partial_eos:
            return self.completions(texts)
        full = iter(self.completions([x for x, t in zip(texts, terminal) if t is not False]))
        partial = iter(self._encode_many("partial", [x + (separator or "") for x, t in zip(texts, terminal)
                                                     if t is False]))
        return [next(partial) if t is False else next(full) for t in terminal]

    def prefixes(self, texts: list[str]) -> list[list[int]]:
        return self._encode_many("prefix", texts)


def _optional_strings(table: pa.Table, name: str) -> list[str | None]:
    return table[name].to_pylist() if name in table.column_names else [None] * table.num_rows


def _optional_flags(table: pa.Table, name: str) -> list[bool | None] | None:
    return table[name].to_pylist() if name in table.column_names else None


def _rendered_prompts(enc: PieceEncoder, table: pa.Table) -> list[str]:
    prompts = table["prompt"].to_pylist()
    systems = _optional_strings(table, "system")
    messages = _optional_strings(table, "prompt_messages")
    rendered: dict[tuple, str] = {}  # many pairs share a prompt: render each distinct one once
    out = []
    for key in zip(prompts, systems, messages):
        if key not in rendered:
            rendered[key] = enc.render_prompt(*key)
        out.append(rendered[key])
    return out


def _strip_prefix(prefixes: list[str], texts: list[str], file: str | None, column: str) -> list[str]:
    """The part of each text after its shared prefix; a text that does not start with it is an input error."""
    for i, (p, t) in enumerate(zip(prefixes, texts)):
        if not t.startswith(p):
            raise InputError("shared_prefix is not a prefix of this completion", file=file, row=i, column=column)
    return [t[len(p):] for p, t in zip(prefixes, texts)]


def _fit(prompt: list[int], comps: list[list[int]], cfg: TokenizeConfig, bos: int | None,
         stats: EncodeStats) -> tuple[list[int], list[list[int]]] | None:
    """Apply the truncation policy to one row; None when the row must be dropped."""
    if cfg.max_prompt_length is not None and len(prompt) > cfg.max_prompt_length:
        stats.prompts_truncated += 1
        keep = prompt[-cfg.max_prompt_length:]
        if bos is not None and prompt[0] == bos and cfg.max_prompt_length > 1:
            keep = [bos] + prompt[-(cfg.max_prompt_length - 1):]
        prompt = keep
    room = cfg.max_length - len(prompt)
    if room < 1:
        stats.rows_dropped += 1
        return None
    out = []
    for c in comps:
        if len(c) > room:
            stats.completions_truncated += 1
            c = c[:room]
        out.append(c)
    return prompt, out


def encode_pairs(table: pa.Table, tokenizer, cfg: TokenizeConfig, file: str | None = None,
                 rationales: bool = False) -> Encoded:
    """Pairs as groups [chosen, rejected]. rationales=True also encodes the RDPO rationale of every pair as an
    extra sequence: the `rationale_prompt` column (prompt_rat) as a user turn -> `rationale` + EOS."""
    table = from_conversational(table, file)
    check_pairs(table, file, cfg.prefix_as_prompt)
    enc = PieceEncoder(tokenizer)
    prompts = enc.prompts(_rendered_prompts(enc, table))
    if cfg.prefix_as_prompt:
        prefix_text = [p or "" for p in table[SHARED_PREFIX].to_pylist()]
        chosen_text = _strip_prefix(prefix_text, table["chosen"].to_pylist(), file, "chosen")
        rejected_text = _strip_prefix(prefix_text, table["rejected"].to_pylist(), file, "rejected")
        prompts = [p + x for p, x in zip(prompts, enc.prefixes(prefix_text))]
    else:
        chosen_text, rejected_text = table["chosen"].to_pylist(), table["rejected"].to_pylist()
    chosen = enc.completions_marked(chosen_text, _optional_flags(table, CHOSEN_IS_TERMINAL), cfg.partial_eos,
                                    cfg.step_separator)
    rejected = enc.completions_marked(rejected_text, _optional_flags(table, REJECTED_IS_TERMINAL),
                                      cfg.partial_eos, cfg.step_separator)
    rejected_full = rejected
    if cfg.rejected_to_divergence:
        rejected = [cut_at_divergence(c, r) for c, r in zip(chosen, rejected)]
    extra = None
    if rationales:
        _require(table, (RATIONALE, RATIONALE_PROMPT), dict.fromkeys((RATIONALE, RATIONALE_PROMPT), "string"), file)
        rat_prompts = enc.prompts([enc.render_prompt(p) for p in table[RATIONALE_PROMPT].to_pylist()])
        extra = list(zip(rat_prompts, enc.completions(table[RATIONALE].to_pylist())))
    encoded = _assemble(table.num_rows, prompts, [list(cr) for cr in zip(chosen, rejected)], None, cfg, enc, extra)
    if cfg.rejected_to_divergence:
        encoded.stats.rejected_cut = sum(len(rejected[i]) < len(rejected_full[i]) for i in encoded.rows)
    return encoded


def cut_at_divergence(chosen: list[int], rejected: list[int]) -> list[int]:
    """`rejected` up to and including its first token that differs from `chosen` (whole if none differs)."""
    k = 0
    while k < min(len(chosen), len(rejected)) and chosen[k] == rejected[k]:
        k += 1
    return rejected[:k + 1]


def encode_sft(table: pa.Table, tokenizer, cfg: TokenizeConfig, file: str | None = None,
               target: str | None = None) -> Encoded:
    """One completion per row: the `target` column if given, else `completion`, else the pairs' `chosen`
    (groups of K=1)."""
    table = from_conversational(table, file)
    if target is None:
        target = next((c for c in SFT_TARGETS if c in table.column_names), SFT_TARGETS[-1])
    if table.num_rows == 0:
        raise InputError("empty table", file=file)
    _require(table, ("prompt", target), {"prompt": "string", target: "string"}, file)
    enc = PieceEncoder(tokenizer)
    prompts = enc.prompts(_rendered_prompts(enc, table))
    texts = table[target].to_pylist()
    if cfg.prefix_as_prompt and SHARED_PREFIX in table.column_names:
        prefixes = [p or "" for p in table[SHARED_PREFIX].to_pylist()]
        texts = _strip_prefix(prefixes, texts, file, target)
        prompts = [a + b for a, b in zip(prompts, enc.prefixes(prefixes))]
    return _assemble(table.num_rows, prompts, [[c] for c in enc.completions(texts)], None, cfg, enc)


def encode_lists(table: pa.Table, tokenizer, cfg: TokenizeConfig, file: str | None = None) -> Encoded:
    check_lists(table, file)
    enc = PieceEncoder(tokenizer)
    prompts = enc.prompts(_rendered_prompts(enc, table))
    responses = table["responses"].to_pylist()
    flat = enc.completions([r for rs in responses for r in rs])
    comps, k = [], 0
    for rs in responses:
        comps.append(flat[k:k + len(rs)])
        k += len(rs)
    encoded = _assemble(table.num_rows, prompts, comps, table["scores"].to_pylist(), cfg, enc)
    encoded.score_range = declared_score_range(table, file)
    return encoded


def declared_score_range(table: pa.Table, file: str | None = None) -> tuple[float, float] | None:
    """The one (score_min, score_max) the rows' scores are declared on (schemas.tables.SCORE_RANGE), or None
    when no row declares one. Rows that declare different ranges cannot share one label scale: an error."""
    if SCORE_MIN not in table.column_names or SCORE_MAX not in table.column_names:
        return None
    ranges = list(zip(table[SCORE_MIN].to_pylist(), table[SCORE_MAX].to_pylist()))
    declared = [(i, r) for i, r in enumerate(ranges) if r != (None, None)]
    if not declared:
        return None
    first = declared[0][1]
    for i, r in enumerate(ranges):
        if r != first:
            raise InputError(f"score range {list(r)} differs from row {declared[0][0]}'s {list(first)}: a table's "
                             "list scores must share one declared scale", file=file, row=i, column=SCORE_MIN)
    return first


def _assemble(n_rows, prompts, comps, scores, cfg, enc, extra=None) -> Encoded:
    stats = EncodeStats(rows_in=n_rows)
    rows, kept_p, kept_c, kept_s, kept_x = [], [], [], [], []
    for i in range(n_rows):
        fitted = _fit(prompts[i], comps[i], cfg, enc.bos, stats)
        if fitted is not None and extra is not None:
            fitted_x = _fit(extra[i][0], [extra[i][1]], cfg, enc.bos, stats)
            if fitted_x is None:  # _fit counted the drop
                fitted = None
            else:
                kept_x.append((fitted_x[0], fitted_x[1][0]))
        if fitted is None:
            continue
        rows.append(i)
        kept_p.append(fitted[0])
        kept_c.append(fitted[1])
        if scores is not None:
            kept_s.append([float(s) for s in scores[i]])
    return Encoded(np.asarray(rows, dtype=np.int64), kept_p, kept_c, kept_s if scores is not None else None,
                   stats, kept_x if extra is not None else None)


def pad_id_of(tokenizer) -> int:
    for t in (tokenizer.pad_token_id, tokenizer.eos_token_id, 0):
        if t is not None:
            return int(t)
    return 0
