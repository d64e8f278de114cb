"""Stage 2: rationale enrichment for RDPO (docs/stages.md; reference: reds-lab/preference-learning-with-rationales).

Each input pair (x, y_w, y_l) gets a rationale r: a short machine-written explanation of why y_w wins. The
trainer adds a likelihood term for r conditioned on `rationale_prompt` (pipeline/train/losses/rationale.py).

Position shortcut. The reference code always shows the chosen response first ("Response above"). Here the
order is drawn per row (`order="random"`, seeded by the stage fingerprint and the pair id, so a resumed or
re-sharded run draws the same order) and recorded in `rationale_order` (chosen_first | rejected_first). The
prompts therefore name the responses "A" and "B" and state which one is preferred (a random order
needs the labels in the rationale prompt). `order="chosen_first"` reproduces the reference layout.

Generation. One batched call per attempt for all pairs of a shard. By default the model writes freely: a lead
such as "Response B is better because" (the `lead` option) keeps a small model on format but fixes the verdict
before the model writes, so the stance check could never catch a rationale that argues the other way. Greedy by
default; rows whose rationale fails the checks are regenerated up to `max_attempts` times at
`retry_temperature` (reject and regenerate).

Stance. With `judge` set, a judge (pipeline/judges) reads each rationale in both orders of the responses (the
rationale's A/B labels swapped with them) and decides which side it argues for; a verdict that flips with the
order is "neither". A rationale for the rejected side (`argues_rejected`) or for neither (`argues_neither`) is
filtered and counted; the judge's model, template version, raw answers and P(argues for the preferred side) go
into `extra`. Without a judge the regex reader `stages._judge.argued_for` decides (`label_mismatch`).

Checks (stages._judge; every failure is kept as a row with status `filtered` and an error text whose first
word is the category, `stages._judge.error_category`):
  empty / too_short / refusal  the text itself;
  echo                         most of its 4-grams are copied from the prompt or the responses;
  label_mismatch               (no judge) it argues for the rejected response, or for both equally;
  argues_rejected / argues_neither / judge_error   (judge) the judge's reading, or its unparseable answer.
The prompt names the preferred label, so a rationale that argues the other way is a mismatch, not a guess.
"""
from __future__ import annotations

import hashlib
import json
import random
from typing import ClassVar, Literal

import pyarrow as pa
from pydantic import Field, model_validator

from pipeline.backends.base import SamplingParams
from pipeline.config_io import NonEmptyStr
from pipeline.errors import InputError
from pipeline.judges.config import JudgeConfig, open_judge
from pipeline.stage import StageConfig, StageContext, register_stage
from schemas.pairs import group_fields, model_name
from stages._common import now_utc, pair_id
from stages._judge import Parsed, argued_for, fail, generate_parsed, parse_text, words

STAGE = "rationale"

GENERAL_TEMPLATE = ("Question: {prompt}\n\nResponse A: {a}\n\nResponse B: {b}\n\n"
                    "Response {preferred} is better. In one or two sentences, explain at a high level why "
                    "Response {preferred} is better than Response {other}.")
SPECIFIC_TEMPLATE = ("Question: {prompt}\n\nResponse A: {a}\n\nResponse B: {b}\n\n"
                     "Response {preferred} is better. Explain in detail why: name the specific parts of Response "
                     "{preferred} that are correct, helpful or appropriate, and the specific errors, omissions or "
                     "problems in Response {other}. Do not invent content.")
# The conditioning prompt the trainer uses for r (the reference's prompt_rat, worded with the same A/B labels
# as the generation so r's references resolve, but without saying which one is preferred).
TRAIN_TEMPLATE = ("Given the prompt:\n{prompt}\nWhich of the following assistant's responses is more preferable "
                  "and strictly follows the prompt question?\nResponse A: \"{a}\"\nor\nResponse B: \"{b}\"?")
LEAD = "Response {preferred} is better because"

# The pair contract's `rationale` group (rationale + rationale_prompt: what the trainer reads), then this stage's
# own columns. The input table's columns, every other group included, pass through unchanged.
STAGE_FIELDS = group_fields(("rationale",)) + [
    pa.field("rationale_style", pa.string()),
    pa.field("rationale_template_id", pa.string()),
    pa.field("rationale_model", pa.string()),
    pa.field("rationale_order", pa.string()),        # the order used: chosen_first | rejected_first
    pa.field("rationale_valid", pa.bool_()),
    pa.field("rationale_stance", pa.string()),       # preferred | other | tied | none
    pa.field("rationale_attempts", pa.int16()),
]
_OWN = {f.name for f in STAGE_FIELDS}


class RationaleConfig(StageConfig):
    version: ClassVar[str] = "1"

    style: Literal["general", "specific"] = Field(
        "general", description="general: a short high-level reason (orcaratgen); specific: point by point, "
                               "citing both responses (orcaratspec)")
    order: Literal["random", "chosen_first"] = Field(
        "random", description="random: A/B order drawn per pair (seeded) and recorded; chosen_first: the "
                              "reference layout (a position shortcut)")
    general_template: str = Field(GENERAL_TEMPLATE, description="generation prompt of the general style; fields "
                                  "{prompt} {a} {b} {preferred} {other}")
    specific_template: str = Field(SPECIFIC_TEMPLATE, description="generation prompt of the specific style")
    train_template: str = Field(TRAIN_TEMPLATE, description="rationale_prompt written for the trainer; fields "
                                "{prompt} {a} {b}")
    lead: str = Field("", description="assistant text the rationale starts with ({preferred}, {other}), e.g. "
                                      f"{LEAD!r} (it fixes the verdict before the model writes); empty: the "
                                      "model writes from scratch")
    judge: JudgeConfig | None = Field(None, description="judge that reads each rationale in both orders and "
                                                        "decides which side it argues for; None: the regex reader")
    temperature: float = Field(0.0, ge=0.0, description="first attempt (0 = greedy)")
    retry_temperature: float = Field(0.7, ge=0.0, description="temperature of the regeneration attempts")
    max_attempts: int = Field(2, ge=1, description="attempts per pair before it is filtered")
    max_tokens: int | None = Field(None, ge=1, description="rationale tokens; None: 256 general, 512 specific")
    stop: list[NonEmptyStr] | None = Field(
        None, description="stop strings; None: a blank line for general, none for specific")
    min_words: int = Field(3, ge=1, description="fewest words the model must write (after the lead)")
    max_copy_ratio: float = Field(0.6, ge=0.0, le=1.0, description="most of the rationale's 4-grams that may be "
                                                                   "copied from the prompt and responses")

    @model_validator(mode="after")
    def _check(self) -> "RationaleConfig":
        for name, fields in (("general_template", ("{a}", "{b}", "{preferred}")),
                             ("specific_template", ("{a}", "{b}", "{preferred}")),
                             ("train_template", ("{a}", "{b}"))):
            missing = [f for f in fields if f not in getattr(self, name)]
            if missing:
                raise ValueError(f"{name} must contain {missing}")
        return self

    @property
    def template(self) -> str:
        return self.general_template if self.style == "general" else self.specific_template

    @property
    def template_id(self) -> str:
        return f"rdpo-{self.style}-{hashlib.sha1(self.template.encode()).hexdigest()[:8]}"

    def templates(self) -> dict[str, str]:
        return {"generation": self.template, "train": self.train_template, "lead": self.lead}

    def judges(self) -> list[str]:
        return [self.judge.label()] if self.judge else []  # without one, the regex reader decides: no judge

    def sampling_params(self, attempt: int, seed: int) -> SamplingParams:
        max_tokens = self.max_tokens or (256 if self.style == "general" else 512)
        stop = self.stop if self.stop is not None else (["\n\n"] if self.style == "general" else [])
        temp = self.temperature if attempt == 0 else self.retry_temperature
        return SamplingParams(temperature=temp, max_tokens=max_tokens, stop=stop, seed=seed + attempt)

    def sampling(self) -> dict:
        return {"first": self.sampling_params(0, 0).model_dump(mode="json", exclude={"seed"}),
                "retry": self.sampling_params(1, 0).model_dump(mode="json", exclude={"seed"})}


# ----------------------------------------------------------------------------------------------- prompts
def layout(row: dict, cfg: RationaleConfig, ctx: StageContext) -> dict:
    """The A/B assignment of one pair: drawn from a per-pair seed (random) or chosen first."""
    chosen_first = cfg.order == "chosen_first" or random.Random(ctx.row_seed(row["pair_id"], "order")).random() < .5
    a, b = (row["chosen"], row["rejected"]) if chosen_first else (row["rejected"], row["chosen"])
    preferred, other = ("A", "B") if chosen_first else ("B", "A")
    fields = {"prompt": row["prompt"], "a": a, "b": b, "preferred": preferred, "other": other}
    return {"order": "chosen_first" if chosen_first else "rejected_first", "fields": fields,
            "generation_prompt": cfg.template.format(**fields),
            "train_prompt": cfg.train_template.format(**fields),
            "lead": cfg.lead.format(**fields)}


def join_lead(lead: str, continuation: str) -> str:
    """Lead + continuation as one text (a space between them unless the continuation starts with punctuation)."""
    if not lead or not continuation:
        return (lead or continuation).strip()
    sep = "" if continuation[0] in ",.;:!?" else " "
    return f"{lead.rstrip()}{sep}{continuation.lstrip()}"


def check_rationale(continuation: str, lay: dict, cfg: RationaleConfig, judged: bool = False) -> Parsed:
    """Parse one generated continuation; value = (rationale text incl. lead, stance). With `judged`, only the
    text is checked here (stance None): the judge reads it afterwards."""
    f = lay["fields"]
    body = parse_text(continuation, min_words=cfg.min_words, sources=[f["prompt"], f["a"], f["b"]],
                      max_copy=cfg.max_copy_ratio)
    text = join_lead(lay["lead"], body.value or "")
    stance = None if judged else argued_for(text, f["preferred"], f["other"])
    if not body.ok or judged:
        return Parsed(body.status, (text, stance), body.error)
    if stance != "preferred":
        what = {"other": f"Response {f['other']}, the rejected one", "tied": "both responses equally",
                "none": "neither response by name"}[stance]
        return fail("label_mismatch", f"the rationale argues for {what} (preferred: {f['preferred']})",
                    (text, stance))
    return Parsed("ok", (text, stance))


def _generate(layouts: list[dict], cfg: RationaleConfig, backend, seed: int, attempts: range,
              judged: bool) -> tuple[list[Parsed], list[int]]:
    return generate_parsed(
        backend, [lay["generation_prompt"] for lay in layouts],
        lambda i, text: check_rationale(text, layouts[i], cfg, judged),
        lambda a: cfg.sampling_params(attempts.start + a, seed),
        prefixes=[lay["lead"] for lay in layouts] if cfg.lead else None, max_attempts=len(attempts))


def judge_stances(judge, layouts: list[dict], parsed: list[Parsed]) -> list[Parsed]:
    """The judge's reading of every rationale that passed the text checks, in one batched call (both orders).
    value = (text, stance, judge record for `extra`)."""
    todo = [i for i, p in enumerate(parsed) if p.ok]
    items = [(lay["fields"]["prompt"], lay["fields"]["a"], lay["fields"]["b"], parsed[i].value[0])
             for i in todo for lay in (layouts[i],)]
    out = list(parsed)
    for i, v in zip(todo, judge.argues_for(items)):
        text, pref = parsed[i].value[0], layouts[i]["fields"]["preferred"]
        p_pref = None if v.p_a is None else (v.p_a if pref == "A" else 1 - v.p_a)
        record = {"judge_model": v.model, "judge_template": v.template, "judge_raw": list(v.raw),
                  "judge_p_preferred": p_pref}
        if not v.ok:
            out[i] = fail("judge_error", v.error, (text, None, record))
            continue
        stance = "none" if v.winner == "tie" else ("preferred" if (v.winner == "a") == (pref == "A") else "other")
        if stance == "preferred":
            out[i] = Parsed("ok", (text, stance, record))
        elif stance == "other":
            out[i] = fail("argues_rejected", f"the judge reads it as arguing for the rejected response "
                                             f"(P(preferred) {p_pref:.2f})", (text, stance, record))
        else:
            out[i] = fail("argues_neither", f"the judge's reading flips with the order of the responses "
                                            f"(P(preferred) {p_pref:.2f})", (text, stance, record))
    return out


def generate_rationales(layouts: list[dict], cfg: RationaleConfig, backend, seed: int,
                        judge=None) -> tuple[list[Parsed], list[int]]:
    """All pairs in one batched call per attempt; only failed pairs are retried. Returns (parsed, attempts).
    With a judge, each attempt's rationales are judged (one batched call) before the failures are retried."""
    if judge is None:
        return _generate(layouts, cfg, backend, seed, range(cfg.max_attempts), False)
    results: list[Parsed] = [fail("not_run", "no attempt")] * len(layouts)
    used = [0] * len(layouts)
    todo = list(range(len(layouts)))
    for attempt in range(cfg.max_attempts):
        if not todo:
            break
        sub = [layouts[i] for i in todo]
        parsed, _ = _generate(sub, cfg, backend, seed, range(attempt, attempt + 1), True)
        for i, p in zip(todo, judge_stances(judge, sub, parsed)):
            results[i], used[i] = p, attempt + 1
        todo = [i for i in todo if not results[i].ok]
    return results, used


# --------------------------------------------------------------------------------------------------- run
def _check_input(rows: list[dict]) -> None:
    for i, r in enumerate(rows):
        if r.get("status", "ok") != "ok":
            continue
        for col in ("prompt", "chosen", "rejected"):
            if not words(r[col] or ""):
                raise InputError(f"empty {col} text: a rationale needs both responses and the prompt "
                                 f"(pair_id {r['pair_id']!r})", row=i, column=col)


def _merge_extra(raw: str | None, **more) -> str:
    try:
        base = json.loads(raw) if raw else {}
    except json.JSONDecodeError:
        base = {"source_extra": raw}
    if not isinstance(base, dict):
        base = {"source_extra": base}
    return json.dumps({**base, **more}, sort_keys=True, ensure_ascii=False)


def _output_table(rows: pa.Table, updates: dict[str, list], stage_cols: dict[str, list]) -> pa.Table:
    """The input table with `updates` replacing columns, any old stage columns dropped, the new ones appended."""
    table = rows.drop_columns([c for c in rows.column_names if c in _OWN])
    for name, values in updates.items():
        field = table.schema.field(name)
        arr = pa.array(values, pa.string()).dictionary_encode().cast(field.type) \
            if pa.types.is_dictionary(field.type) else pa.array(values, field.type)
        table = table.set_column(table.schema.get_field_index(name), field, arr)
    for f in STAGE_FIELDS:
        table = table.append_column(f, pa.array(stage_cols[f.name], f.type))
    return table


@register_stage("rationales", config=RationaleConfig, input_kind="pairs", outputs={"main": "pairs"},
                id_column="pair_id")
def run(rows: pa.Table, cfg: RationaleConfig, backend, ctx: StageContext) -> dict[str, pa.Table]:
    """RDPO rationales: why the chosen response wins, A/B order randomised and recorded (docs/stages.md)."""
    records = rows.to_pylist()
    _check_input(records)
    live = [i for i, r in enumerate(records) if r.get("status", "ok") == "ok"]
    layouts = {i: layout(records[i], cfg, ctx) for i in live}
    judge = open_judge(cfg.judge, backend) if cfg.judge is not None else None
    parsed, attempts = generate_rationales([layouts[i] for i in live], cfg, backend, ctx.seed, judge)
    by_row = {i: (p, a) for i, p, a in zip(live, parsed, attempts)}
    model = model_name(backend)
    created = now_utc()
    upd = {k: [] for k in ("pair_id", "stage", "method", "row_key", "status", "error", "extra", "created_at")}
    cols: dict[str, list] = {f.name: [] for f in STAGE_FIELDS}
    seen: dict[str, str] = {}
    for i, r in enumerate(records):
        key = ctx.row_key(r["pair_id"])
        new_id = pair_id(STAGE, r["prompt_id"], r["chosen"], r["rejected"], r.get("system"))
        lay = layouts.get(i)
        p, n_att = by_row.get(i, (None, 0))
        pid = key  # rows that are not a new pair keep a unique id of their own
        if p is None:
            status, error = "filtered", f"input_status: input row has status {r.get('status')!r}"
        elif new_id in seen:
            status, error = "filtered", f"duplicate: same pair as pair_id {seen[new_id]!r}"
        else:
            seen[new_id], pid = r["pair_id"], new_id
            status, error = ("ok", None) if p.ok else ("filtered", p.error)
        text, stance, *judged = p.value if p is not None and p.value else (None, None)
        upd["pair_id"].append(pid)
        upd["stage"].append(STAGE)
        upd["method"].append(f"rdpo_{cfg.style}")
        upd["row_key"].append(key)
        upd["status"].append(status)
        upd["error"].append(error)
        upd["created_at"].append(created)
        upd["extra"].append(_merge_extra(
            r.get("extra"), source_pair_id=r["pair_id"], source_stage=r.get("stage"),
            source_method=r.get("method"), rationale_order_mode=cfg.order,
            preferred_label=lay["fields"]["preferred"] if lay else None, **(judged[0] if judged else {})))
        cols["rationale"].append(text)
        cols["rationale_prompt"].append(lay["train_prompt"] if lay else None)
        cols["rationale_style"].append(cfg.style)
        cols["rationale_template_id"].append(cfg.template_id)
        cols["rationale_model"].append(model)
        cols["rationale_order"].append(lay["order"] if lay else None)
        cols["rationale_valid"].append(bool(p is not None and p.ok))
        cols["rationale_stance"].append(stance)
        cols["rationale_attempts"].append(n_att)
    ctx.progress(rows.num_rows)
    return {"main": _output_table(rows, upd, cols)}
