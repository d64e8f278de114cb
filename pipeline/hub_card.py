"""The dataset card of an export (docs/export.md): YAML front matter that `datasets` and the Hub read, and a body
that says what is in the data and what is not.

Everything in the card is computed from the exported tables and the stage manifests; nothing is typed in by
hand except the user's own `extra_limitations`. The card carries no timestamps, so exporting the same run twice
gives a byte-identical card (and the Hub sees no change).
"""
from __future__ import annotations

import json
import re
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import polars as pl
import pyarrow as pa
import pyarrow.compute as pc
import yaml

# Config keys whose values say how labels were decided (verifiers, judges, reward models).
LABEL_SOURCE_KEY = re.compile(r"verif|judge|reward_model|scorer|value_fn|labeler|classifier", re.I)
MODEL_KEY = re.compile(r"model", re.I)
# Keys whose values are never written to a card, whatever a config holds.
# Whole words at the end of a key: `hf_token`, `api_key`, `password` match; `max_tokens` does not.
SECRET_KEY = re.compile(r"(^|[_\-.])(token|secret|password|passwd|api_?key|authorization|credentials?)$", re.I)
SIZE_BUCKETS = [(1_000, "n<1K"), (10_000, "1K<n<10K"), (100_000, "10K<n<100K"), (1_000_000, "100K<n<1M"),
                (10_000_000, "1M<n<10M"), (100_000_000, "10M<n<100M"), (1_000_000_000, "100M<n<1B")]
CARD_MARKER = "<!-- written by prefpipe export -->"


@dataclass
class ConfigExport:
    """One dataset config of the export: one stage output holding pairs or ranked lists."""

    name: str
    stage: str
    output: str
    kind: str                                   # "pairs" | "lists" | "sft"
    format: str                                 # conversational | standard | step | messages (hub_rows.py)
    status: dict[str, int]                      # every row in the store, by status
    splits: dict[str, int] = field(default_factory=dict)      # exported (ok) rows per split
    files: dict[str, list[str]] = field(default_factory=dict)  # split -> paths relative to the folder
    stats: dict[str, Any] = field(default_factory=dict)


@dataclass
class StageInfo:
    """What the card says about every stage of the run, exported or not."""

    name: str
    complete: bool
    n_input_rows: int
    outputs: dict[str, str]                     # output -> kind
    rows: dict[str, int]                        # output -> rows in the store
    status: dict[str, dict[str, int]]           # output -> status counts
    fingerprint_inputs: dict
    first_errors: list[str] = field(default_factory=list)


# ---- statistics --------------------------------------------------------------------------------------------
def _describe(values: pl.Series) -> dict[str, Any] | None:
    values = values.drop_nulls().drop_nans() if values.dtype.is_float() else values.drop_nulls()
    if values.len() == 0:
        return None
    return {"count": values.len(), "mean": float(values.mean()), "median": float(values.median()),
            "min": float(values.min()), "max": float(values.max())}


PAIR_STAT_COLUMNS = ("score_margin", "label_confidence", "generator_model", "judge_model", "method", "pair_type")
VERDICTS = ("chosen_correct", "rejected_correct")


def _verdict(table: pa.Table, name: str) -> pa.Array | None:
    """A side's verifier verdict: its own column (self-label), else the same key in `extra` (tree mining)."""
    if name in table.column_names:
        return table.column(name).cast(pa.bool_())
    if "extra" not in table.column_names:
        return None
    found = pl.from_arrow(table.column("extra").combine_chunks()).cast(pl.Utf8).str.json_path_match(f"$.{name}")
    if found.null_count() == len(found):
        return None
    return found.replace_strict({"true": True, "false": False}, default=None, return_dtype=pl.Boolean).to_arrow()


def reduce_pairs(table: pa.Table) -> pa.Table:
    """The few columns the card's pair statistics need (so a large export keeps only these in memory)."""
    cols = {c: table.column(c) for c in PAIR_STAT_COLUMNS if c in table.column_names}
    if "shared_prefix" in table.column_names:
        cols["has_prefix"] = pc.fill_null(pc.greater(pc.utf8_length(table.column("shared_prefix")), 0), False)
    verdicts = [_verdict(table, v) for v in VERDICTS]
    if all(v is not None for v in verdicts):
        cols |= dict(zip(VERDICTS, verdicts))
    return pa.table(cols)


def reduce_sft(table: pa.Table) -> pa.Table:
    text = next(c for c in ("text", "chosen", "gold") if c in table.column_names)
    return pa.table({"answer_chars": pc.utf8_length(table.column(text))})


def sft_stats(reduced: pa.Table) -> dict[str, Any]:
    return {"rows": reduced.num_rows, "answer_chars": _describe(pl.from_arrow(reduced)["answer_chars"])}


def verifier_agreement(df: pl.DataFrame) -> dict[str, int] | None:
    """Over pairs whose two sides were both verified: chosen right and rejected wrong (the label agrees with the
    verifier), the reverse, both right, both wrong."""
    if not set(VERDICTS) <= set(df.columns):
        return None
    both = df.filter(pl.col("chosen_correct").is_not_null() & pl.col("rejected_correct").is_not_null())
    if both.height == 0:
        return None
    c, r = both["chosen_correct"], both["rejected_correct"]
    return {"verified": both.height, "agree": int((c & ~r).sum()), "inverted": int((~c & r).sum()),
            "both_right": int((c & r).sum()), "both_wrong": int((~c & ~r).sum())}


def reduce_lists(table: pa.Table) -> pa.Table:
    scores = table.column("scores")
    return pa.table({"list_size": pc.list_value_length(table.column("responses")),
                     "score_spread": pc.subtract(_list_agg(scores, "max"), _list_agg(scores, "min")),
                     "method": table.column("method")})


def _list_agg(lists: pa.ChunkedArray, how: str) -> pa.Array:
    """Per-row max/min of a list column (null for an empty list)."""
    s = pl.from_arrow(lists.combine_chunks()) if len(lists) else pl.Series([], dtype=pl.List(pl.Float64))
    return (s.list.max() if how == "max" else s.list.min()).cast(pl.Float64).to_arrow()


def pair_stats(reduced: pa.Table) -> dict[str, Any]:
    """Margins (with the share of ties), label confidence, models and shared prefixes of exported pairs."""
    df = pl.from_arrow(reduced)
    out: dict[str, Any] = {"rows": df.height}
    margin = _describe(df["score_margin"]) if "score_margin" in df.columns else None
    if margin:
        margin["ties"] = int((df["score_margin"].drop_nulls() == 0).sum())
        margin["missing"] = df.height - margin["count"]
    out["score_margin"] = margin
    out["label_confidence"] = _describe(df["label_confidence"]) if "label_confidence" in df.columns else None
    out["generator_models"] = _counts(df, "generator_model")
    out["judge_models"] = _counts(df, "judge_model")
    out["methods"] = _counts(df, "method")
    out["pair_types"] = _counts(df, "pair_type")  # tree-search's first_wrong_step / terminal / ... when present
    if "has_prefix" in df.columns and df.height:
        out["shared_prefix_share"] = float(df["has_prefix"].sum()) / df.height
    out["verifier_agreement"] = verifier_agreement(df)
    return out


def list_stats(reduced: pa.Table) -> dict[str, Any]:
    """List sizes and score spreads (max - min score in a list) of exported ranked lists."""
    df = pl.from_arrow(reduced)
    return {"rows": df.height, "methods": _counts(df, "method"), "list_size": _describe(df["list_size"]),
            "score_spread": _describe(df["score_spread"])}


def _counts(df: pl.DataFrame, column: str) -> dict[str, int]:
    if column not in df.columns:
        return {}
    vc = df[column].cast(pl.Utf8).drop_nulls().value_counts(sort=True)
    return {str(k): int(v) for k, v in zip(vc[column].to_list(), vc["count"].to_list())}


# ---- helpers -----------------------------------------------------------------------------------------------
def size_category(n: int) -> str:
    for bound, name in SIZE_BUCKETS:
        if n < bound:
            return name
    return "n>1B"


def redact(obj: Any) -> Any:
    """The config with secret-looking keys blanked (a run config should hold none, but a card is public)."""
    if isinstance(obj, dict):
        return {k: ("<redacted>" if SECRET_KEY.search(str(k)) and v not in (None, "") else redact(v))
                for k, v in obj.items()}
    if isinstance(obj, list):
        return [redact(v) for v in obj]
    return obj


def _walk(obj: Any, path: str = ""):
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield from _walk(v, f"{path}.{k}" if path else str(k))
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            yield from _walk(v, f"{path}[{i}]")
    else:
        yield path, obj


def config_values(stages: list[StageInfo], key: re.Pattern) -> list[tuple[str, str, Any]]:
    """(stage, dotted key, value) for every config leaf whose key matches `key` and has a value."""
    out = []
    for st in stages:
        for path, value in _walk(redact(st.fingerprint_inputs.get("config") or {})):
            leaf = re.split(r"[.\[]", path)[-1]
            if key.search(leaf) and value not in (None, "", False):
                out.append((st.name, path, value))
    return out


def _pct(part: int, total: int) -> str:
    return f"{100.0 * part / total:.1f} %" if total else "n/a"


def _num(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.4g}"


def _fence(text: str) -> str:
    longest = max((len(m) for m in re.findall(r"`+", text)), default=0)
    return "`" * max(3, longest + 1)


class _BlockDumper(yaml.SafeDumper):
    pass


def _str_presenter(dumper: yaml.SafeDumper, data: str):
    # Templates read better as block text than as escaped one-liners; a bare "\n" reads best quoted.
    style = "|" if "\n" in data and data.strip() else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", data, style=style)


_BlockDumper.add_representer(str, _str_presenter)


# ---- the card ----------------------------------------------------------------------------------------------
def front_matter(configs: list[ConfigExport], *, default_config: str, license: str, tags: list[str],
                 pretty_name: str | None) -> dict:
    entries = []
    for c in configs:
        entry: dict[str, Any] = {"config_name": c.name,
                                 "data_files": [{"split": s, "path": f"data/{c.name}/{s}-*"} for s in c.files]}
        if c.name == default_config:
            entry["default"] = True
        entries.append(entry)
    total = sum(sum(c.splits.values()) for c in configs)
    meta: dict[str, Any] = {"configs": entries, "license": license, "task_categories": ["text-generation"],
                            "tags": tags, "size_categories": [size_category(total)]}
    if pretty_name:
        meta["pretty_name"] = pretty_name
    return meta


def render_card(*, title: str, meta: dict, configs: list[ConfigExport], stages: list[StageInfo],
                test_fraction: float, seed: int, limitations: list[str], repo_id: str | None) -> str:
    parts = ["---", yaml.safe_dump(meta, sort_keys=False, allow_unicode=True).rstrip(), "---", "",
             CARD_MARKER, "", f"# {title}", "",
             "Preference data built by prefpipe from one run directory: chosen/rejected "
             "pairs in TRL's formats, ranked lists and SFT conversations, one or more configs per stage output. "
             "Only rows with status `ok` are exported, with the columns a trainer reads plus provenance (ids, "
             "stage, method, pair type, models, scores, verifier verdicts); failed and filtered rows are "
             "counted below.", ""]
    parts += _usage(configs, repo_id)
    parts += _configs_section(configs, test_fraction, seed)
    parts += _trl_section(configs)
    parts += _stage_section(stages)
    parts += _stats_section(configs)
    parts += _agreement_section(configs)
    parts += _models_section(configs, stages)
    parts += _run_config_section(stages)
    parts += ["## Limitations", ""] + [f"- {line}" for line in limitations] + [""]
    return "\n".join(parts)


def _usage(configs: list[ConfigExport], repo_id: str | None) -> list[str]:
    where = repo_id or "path/to/this/folder"
    lines = ["## Usage", "", "```python", "from datasets import load_dataset", ""]
    lines += [f'ds = load_dataset("{where}", name="{c.name}")' for c in configs[:3]]
    return lines + ["```", ""]


STEP_EOS_FIX = """from trl import DPOTrainer


class StepDPOTrainer(DPOTrainer):
    \"\"\"Drops the EOS that TRL appends after a step that does not end the answer.\"\"\"

    def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
        dataset = super()._prepare_dataset(dataset, processing_class, args, dataset_name)

        def drop_eos(row):
            for side in ("chosen", "rejected"):
                if row[f"{side}_is_terminal"] is False:
                    row[f"{side}_ids"] = row[f"{side}_ids"][:-1]
            return row

        return dataset.map(drop_eos)"""


def _trl_section(configs: list[ConfigExport]) -> list[str]:
    formats = {c.format for c in configs}
    lines = ["## Training with TRL", ""]
    if "conversational" in formats:
        lines.append("- `conversational` configs: `prompt` holds the system and user messages, `chosen` and "
                     "`rejected` one assistant message each. TRL's `DPOTrainer` applies the model's chat template "
                     "itself, so the policy sees the prompt as the generator did; `prefpipe train` computes the "
                     "same losses and log-probabilities on these rows.")
    if "standard" in formats:
        lines.append("- `standard` configs: `prompt` is text with the generator's chat template already applied "
                     "(a BOS the template writes is left out when the tokenizer adds its own, so it is not "
                     "doubled); train with the generator's tokenizer. `prompt_messages` holds the conversation.")
    if "step" in formats:
        lines += ["- `step` configs (`-steps`): step pairs in the standard format. `prompt` is the chat-templated "
                  "prompt followed by the verified prefix of the answer; `chosen` and `rejected` hold the next step "
                  "alone. One difference remains: TRL appends EOS to every completion, also after a step that does "
                  "not end the answer (`chosen_is_terminal` / `rejected_is_terminal` false), which teaches the "
                  "policy to stop there; prefpipe's trainer adds none. To avoid it, drop that EOS after TRL "
                  "tokenizes (TRL 1.16):", "", "```python", STEP_EOS_FIX, "```"]
    if "messages" in formats:
        lines.append("- `messages` configs (SFT: chain-of-thought rows, corrected and gold solutions): "
                     "`SFTTrainer(model, train_dataset=load_dataset(path, name=...)[\"train\"])`.")
    return lines + [""]


def _agreement_section(configs: list[ConfigExport]) -> list[str]:
    rows = [(c, a) for c in configs if (a := c.stats.get("verifier_agreement"))]
    if not rows:
        return []
    lines = ["## Verifier agreement", "",
             "Pairs whose chosen and rejected sides a verifier judged (the stage recorded `chosen_correct` / "
             "`rejected_correct`): the label agrees with the verifier when the chosen side is right and the "
             "rejected side wrong.", "",
             "| config | verified pairs | agree | inverted | both right | both wrong |", "|---|---|---|---|---|---|"]
    for c, a in rows:
        n = a["verified"]
        lines.append(f"| `{c.name}` | {n} | " + " | ".join(f"{a[k]} ({_pct(a[k], n)})" for k in
                                                           ("agree", "inverted", "both_right", "both_wrong")) + " |")
    return lines + [""]


def _configs_section(configs: list[ConfigExport], test_fraction: float, seed: int) -> list[str]:
    lines = ["## Configs", "", "| config | stage | output | kind | format | train | test |",
             "|---|---|---|---|---|---|---|"]
    for c in configs:
        lines.append(f"| `{c.name}` | {c.stage} | {c.output} | {c.kind} | {c.format} | {c.splits.get('train', 0)} | "
                     f"{c.splits.get('test', '-') if 'test' in c.splits else '-'} |")
    lines.append("")
    empty = [f"`{c.name}` {s}" for c in configs for s, n in c.splits.items() if n == 0]
    if empty:
        lines += [f"Empty splits, not declared above (a zero-row file cannot be loaded): {', '.join(empty)}.", ""]
    if test_fraction > 0:
        lines += [f"The `test` split holds {test_fraction:.0%} of the distinct prompts of all configs (rounded to "
                  f"a whole prompt; seed {seed}), the first in a seeded hash order of `prompt_id`, so all rows of "
                  "one prompt sit in the same split in every config.", ""]
    return lines


def _stage_section(stages: list[StageInfo]) -> list[str]:
    lines = ["## Row counts and filter rates", "",
             "Every stage output of the run, exported or not. Rates are shares of all rows the stage wrote.", "",
             "| stage | output | kind | rows | ok | failed | filtered | ok rate | failed rate | filtered rate |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for st in stages:
        for output, kind in st.outputs.items():
            counts, total = st.status.get(output, {}), st.rows.get(output, 0)
            ok, failed, filtered = (counts.get(k, 0) for k in ("ok", "failed", "filtered"))
            lines.append(f"| {st.name} | {output} | {kind} | {total} | {ok} | {failed} | {filtered} | "
                         f"{_pct(ok, total)} | {_pct(failed, total)} | {_pct(filtered, total)} |")
    lines.append("")
    for st in stages:
        if not st.complete:
            lines.append(f"- Stage `{st.name}` was **incomplete** when exported ({st.n_input_rows} input rows "
                         "planned; see the counts above).")
        if st.first_errors:
            seen = Counter(e[:200] for e in st.first_errors)
            lines.append(f"- First errors in `{st.name}`: "
                         + "; ".join(f"{e!r}" + (f" (x{n})" if n > 1 else "") for e, n in seen.items()))
    return lines + [""]


def _stats_section(configs: list[ConfigExport]) -> list[str]:
    lines = ["## Margins and label confidence", "",
             "Over the exported rows (all splits). `ties` are pairs with `score_margin == 0`.", "",
             "| config | field | count | mean | median | min | max | ties |", "|---|---|---|---|---|---|---|---|"]
    for c in configs:
        fields = {"pairs": ("score_margin", "label_confidence"), "lists": ("list_size", "score_spread"),
                  "sft": ("answer_chars",)}[c.kind]
        for name in fields:
            d = c.stats.get(name)
            if not d:
                lines.append(f"| `{c.name}` | {name} | 0 | n/a | n/a | n/a | n/a | |")
                continue
            ties = f"{d['ties']} ({_pct(d['ties'], d['count'])})" if "ties" in d else ""
            lines.append(f"| `{c.name}` | {name} | {d['count']} | {_num(d['mean'])} | {_num(d['median'])} | "
                         f"{_num(d['min'])} | {_num(d['max'])} | {ties} |")
    return lines + [""]


def _models_section(configs: list[ConfigExport], stages: list[StageInfo]) -> list[str]:
    lines = ["## Models", ""]
    for c in configs:
        gen = ", ".join(f"`{m}` ({n})" for m, n in c.stats.get("generator_models", {}).items()) or "none recorded"
        judge = ", ".join(f"`{m}` ({n})" for m, n in c.stats.get("judge_models", {}).items()) or "none recorded"
        methods = ", ".join(f"`{m}` ({n})" for m, n in c.stats.get("methods", {}).items()) or "none recorded"
        if c.kind == "pairs":
            types = ", ".join(f"`{m}` ({n})" for m, n in c.stats.get("pair_types", {}).items())
            lines.append(f"- `{c.name}`: generator models {gen}; judge models {judge}; methods {methods}"
                         + (f"; pair types {types}." if types else "."))
        elif c.kind == "lists":
            lines.append(f"- `{c.name}`: methods {methods}.")
    for st in stages:
        mid, wh = st.fingerprint_inputs.get("model_id"), st.fingerprint_inputs.get("weights_hash")
        if mid:
            lines.append(f"- Stage `{st.name}` ran with backend model `{mid}`"
                         + (f" (weights sha256 `{str(wh)[:16]}…`)" if wh else "") + ".")
    for stage, key, value in config_values(stages, MODEL_KEY):
        if isinstance(value, str):
            lines.append(f"- Stage `{stage}` config `{key}`: `{value}`.")
    return lines + [""]


def _run_config_section(stages: list[StageInfo]) -> list[str]:
    lines = ["## Run config", "",
             "Each stage's fingerprint inputs (stage, version, config, model, sampling, templates): what decided "
             "its output. A stage rerun with exactly these reproduces the rows.", ""]
    for st in stages:
        text = yaml.dump(redact(st.fingerprint_inputs), Dumper=_BlockDumper, sort_keys=True, allow_unicode=True)
        fence = _fence(text)
        lines += [f"### {st.name}", "", f"{fence}yaml", text.rstrip(), fence, ""]
    return lines


def default_limitations(configs: list[ConfigExport], stages: list[StageInfo], task_hint: str | None) -> list[str]:
    """An honest list built from the data: what decided the labels, what was dropped, what the data is not."""
    out = []
    sources = config_values(stages, LABEL_SOURCE_KEY)
    if sources:
        named = "; ".join(f"`{s}` {k}=`{json.dumps(v) if not isinstance(v, str) else v}`" for s, k, v in sources)
        out.append(f"Labels are automatic, decided by the verifiers/judges in the run config ({named}); no "
                   "human reviewed them.")
    else:
        out.append("Labels are automatic (chosen/rejected come from the stage's scores); the run config names no "
                   "verifier or judge, and no human reviewed the pairs.")
    if task_hint == "arith":
        out.append("Prompts are synthetic multi-step arithmetic word problems (prefpipe's bundled task) with exact "
                   "step and answer verifiers. The data teaches this task's format and arithmetic, not general "
                   "reasoning or helpfulness, and scores say nothing about safety or style.")
    models = sorted({m for c in configs for m in c.stats.get("generator_models", {})})
    if models:
        out.append(f"Responses come from {', '.join(f'`{m}`' for m in models)}; the pairs are only as good as "
                   "these models' samples, and chosen responses are preferred, not necessarily correct.")
    dropped = {c.name: (c.status.get("failed", 0), c.status.get("filtered", 0)) for c in configs}
    if any(f or g for f, g in dropped.values()):
        detail = ", ".join(f"`{n}`: {f} failed, {g} filtered" for n, (f, g) in dropped.items() if f or g)
        out.append(f"Rows that failed or were filtered were left out ({detail}), so the exported rows are not a "
                   "random sample of the prompts: prompts where generation or verification failed are missing.")
    for c in configs:
        a = c.stats.get("verifier_agreement")
        if a:
            out.append(f"`{c.name}`: the labels agree with the verifier on {_pct(a['agree'], a['verified'])} of the "
                       f"{a['verified']} verified pairs (chosen right, rejected wrong); {a['both_right']} both right, "
                       f"{a['both_wrong']} both wrong, {a['inverted']} inverted.")
        if c.format == "step":
            out.append(f"`{c.name}`: step pairs; TRL appends EOS after each step (see Training with TRL).")
        m = c.stats.get("score_margin")
        if m and m.get("ties"):
            out.append(f"`{c.name}`: {m['ties']} of {m['count']} pairs ({_pct(m['ties'], m['count'])}) have a zero "
                       "score margin (a tie); filter on `score_margin` if you need strict preferences.")
        share = c.stats.get("shared_prefix_share")
        if share:
            out.append(f"`{c.name}`: {share:.0%} of pairs share an assistant prefix; chosen and rejected differ only "
                       "after it. Train on the divergent part (the trainer's prefix-as-prompt option) rather than "
                       "on whole responses.")
    if any(not st.complete for st in stages):
        out.append("At least one stage was incomplete at export time; counts will change if the run is resumed.")
    return out
