"""Store rows -> the rows of an export, in the formats TRL's trainers read.

- conversational (the default when the generator has a chat template): `prompt` = the system + user messages,
  `chosen` / `rejected` = one assistant message each. TRL applies the chat template itself, so it sees exactly
  the text the generator saw (a plain-text prompt would be fed without the template).
- standard: `prompt` = the prompt text with the generator's chat template already applied (plain text without
  one), `chosen` / `rejected` = the response texts.
- step pairs (a side marked non-terminal: a verified prefix, then one step) are always standard: the template
  is applied to the prompt, the shared prefix appended, and `chosen` / `rejected` hold the step alone. As a
  conversation, TRL would render the step as a new assistant turn after an EOS.
- messages (SFT): `messages` = the prompt messages + the assistant's answer (TRL's SFTTrainer format).

Only what a user trains on and provenance (ids, stage, method, pair type, models, scores, verifier verdicts)
goes out; `row_key`, `status`, `error`, `extra` and `created_at` stay in the store.
"""
from __future__ import annotations

import json
from dataclasses import dataclass

import pyarrow as pa
import pyarrow.compute as pc

MESSAGE = pa.struct([pa.field("role", pa.string()), pa.field("content", pa.string())])
MESSAGES = pa.list_(MESSAGE)
FORMATS = ("auto", "conversational", "standard")

# Besides the prompt and the two responses: what some losses train on (the RDPO rationale and its prompt, the
# shared prefix), then provenance.
PAIR_PROVENANCE = ("shared_prefix", "rationale", "rationale_prompt", "pair_id", "prompt_id", "stage", "method",
                   "pair_type", "pair_kind", "generator_model", "judge_model", "chosen_score", "rejected_score",
                   "score_margin", "goal_score", "label_confidence", "chosen_correct", "rejected_correct",
                   "iteration")
# What a string-prompt row needs besides: the conversation its prompt renders (so `prefpipe train` can rebuild
# the store row) and which sides end the response (TRL adds EOS to both; see the card).
STANDARD_PROVENANCE = ("prompt_messages", "chosen_is_terminal", "rejected_is_terminal")
LIST_PROVENANCE = ("steps", "prompt_id", "method")
SFT_PROVENANCE = ("prompt_id", "stage", "source", "generator_model", "pair_id")


@dataclass
class Renderer:
    """The generator's chat template (None: the generator has none, prompts stay plain text)."""

    tokenizer: object | None = None

    @property
    def has_template(self) -> bool:
        return bool(getattr(self.tokenizer, "chat_template", None))

    def text(self, messages: list[dict]) -> str:
        """The prompt as the generator saw it. TRL tokenizes a standard prompt with the tokenizer's special
        tokens, so a BOS the template writes is left out when the tokenizer adds its own (else it is doubled)."""
        if not self.has_template:
            return "\n\n".join(m["content"] for m in messages)  # what prefpipe train renders without a template
        text = self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        bos = self.tokenizer.bos_token
        if bos and text.startswith(bos) and self._adds_bos():
            text = text[len(bos):]
        return text

    def _adds_bos(self) -> bool:
        ids = self.tokenizer("a")["input_ids"]
        return bool(ids) and ids[0] == self.tokenizer.bos_token_id


def load_renderer(model: str | None) -> Renderer:
    """The tokenizer of a local model folder or built-in name; a generator that is not a local model (a fake or
    remote backend) gives a renderer without a template."""
    from pipeline.errors import InputError
    from pipeline.models import resolve_model

    if not model:
        return Renderer()
    try:
        path = resolve_model(model)
    except InputError:
        return Renderer()
    from transformers import AutoTokenizer

    return Renderer(AutoTokenizer.from_pretrained(str(path), local_files_only=True))


def _strings(table: pa.Table, name: str) -> list:
    return table.column(name).to_pylist() if name in table.column_names else [None] * table.num_rows


def prompt_messages(table: pa.Table) -> list[list[dict]]:
    """Each row's conversation before the answer: `prompt_messages` when the store has it, else [system?, user]."""
    out = []
    for prompt, system, stored in zip(_strings(table, "prompt"), _strings(table, "system"),
                                      _strings(table, "prompt_messages")):
        out.append(json.loads(stored) if stored else
                   ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}])
    return out


def assistant(texts: pa.ChunkedArray | pa.Array) -> pa.Array:
    """One assistant message per text, as a list column (vectorised: offsets 0, 1, 2, ...)."""
    texts = texts.combine_chunks() if isinstance(texts, pa.ChunkedArray) else texts
    roles = pa.array(["assistant"] * len(texts), pa.string())
    values = pa.StructArray.from_arrays([roles, texts.cast(pa.string())], fields=list(MESSAGE))
    return pa.ListArray.from_arrays(pa.array(range(len(texts) + 1), pa.int32()), values, type=MESSAGES)


def step_rows(table: pa.Table) -> pa.Array:
    """True where a side is marked non-terminal (a step of a longer answer); unmarked sides count as terminal."""
    flags = [pc.equal(pc.fill_null(table.column(c), True), False) for c in ("chosen_is_terminal",
                                                                             "rejected_is_terminal")
             if c in table.column_names]
    if not flags:
        return pa.array([False] * table.num_rows, pa.bool_())  # typed: [] alone is a null array (no ok rows)
    return pc.or_(*flags) if len(flags) == 2 else flags[0]


def _provenance(table: pa.Table, names: tuple[str, ...]) -> dict[str, pa.Array]:
    out = {}
    for n in names:
        if n in table.column_names:
            col = table.column(n)
            out[n] = col.cast(col.type.value_type) if pa.types.is_dictionary(col.type) else col
    return out


def pair_rows(table: pa.Table, renderer: Renderer, conversational: bool, steps: bool) -> pa.Table:
    """Export rows of store pairs (all terminal, or all step pairs with `steps`)."""
    messages = prompt_messages(table)
    if steps:
        prefixes = [p or "" for p in _strings(table, "shared_prefix")]
        chosen = [c[len(p):] if c.startswith(p) else c for c, p in zip(table.column("chosen").to_pylist(), prefixes)]
        rejected = [r[len(p):] if r.startswith(p) else r
                    for r, p in zip(table.column("rejected").to_pylist(), prefixes)]
        cols = {"prompt": pa.array([renderer.text(m) + p for m, p in zip(messages, prefixes)], pa.string()),
                "chosen": pa.array(chosen, pa.string()), "rejected": pa.array(rejected, pa.string())}
    elif conversational:
        cols = {"prompt": pa.array(messages, MESSAGES), "chosen": assistant(table.column("chosen")),
                "rejected": assistant(table.column("rejected"))}
    else:
        cols = {"prompt": pa.array([renderer.text(m) for m in messages], pa.string()),
                "chosen": table.column("chosen").cast(pa.string()),
                "rejected": table.column("rejected").cast(pa.string())}
    cols |= _provenance(table, PAIR_PROVENANCE)
    if steps or not conversational:
        cols["prompt_messages"] = pa.array([json.dumps(m, ensure_ascii=False) for m in messages], pa.string())
        cols |= _provenance(table, STANDARD_PROVENANCE[1:])
    return pa.table(cols)


def list_rows(table: pa.Table, renderer: Renderer, conversational: bool) -> pa.Table:
    messages = prompt_messages(table)
    prompt = pa.array(messages, MESSAGES) if conversational else pa.array([renderer.text(m) for m in messages])
    cols = {"prompt": prompt, "responses": table.column("responses"), "scores": table.column("scores")}
    cols |= _provenance(table, LIST_PROVENANCE)
    if not conversational:
        cols["prompt_messages"] = pa.array([json.dumps(m, ensure_ascii=False) for m in messages], pa.string())
    return pa.table(cols)


def sft_rows(table: pa.Table, answer: str, source: str, stage: str) -> pa.Table:
    """SFT rows in TRL's `messages` format: the prompt's messages, then `answer`'s text as the assistant turn."""
    convs = [m + [{"role": "assistant", "content": a}]
             for m, a in zip(prompt_messages(table), table.column(answer).to_pylist())]
    model = "generator_model" if "generator_model" in table.column_names else "model"
    cols = {"messages": pa.array(convs, MESSAGES), "prompt_id": table.column("prompt_id").cast(pa.string()),
            "stage": pa.array([stage] * table.num_rows, pa.string()),
            "source": pa.array([source] * table.num_rows, pa.string()),
            "generator_model": (table.column(model).cast(pa.string()) if model in table.column_names
                                else pa.nulls(table.num_rows, pa.string())),
            "pair_id": (table.column("pair_id").cast(pa.string()) if "pair_id" in table.column_names
                        else pa.nulls(table.num_rows, pa.string()))}
    return pa.table(cols)
