"""Stage 5: intervened pairs (docs/stages.md, "Intervened Preference Optimization"; [summary], no reference code).

Sample K trajectories per prompt, find the unit (step line or sentence) to intervene on with a configurable
detector, substitute a correction or a trigger, regenerate the rest with `backend.continue_`, and pair the
corrected trajectory (chosen) with the original (rejected). Both share `shared_prefix` = the text before the
intervened unit, so training can score only the divergent part (`prefix_as_prompt`, IPO's "DPO on Part").

Modes:
- `math_correction` (any task with gold answers): on a task with an exact step check (the bundled `arith`) the
  step verifier finds the first wrong step k; it is replaced by the correct line computed from the problem (gold
  step k, or `Answer: N` when only the answer line is wrong); the model continues greedily from there. On a
  task without one (math, reasoning-gym) the first wrong line comes from rollouts (pipeline/tasks/rollouts.py:
  `rollouts` continuations from every line prefix of a wrong sample; the first line after which none reaches a
  right answer), and chosen = the text before it + a rollout from there that does reach one. chosen = prefix + corrected line +
  continuation, rejected = prefix + the original wrong line (+ the original remainder with
  `rejected_keep_remainder`). A rejected that stops after a wrong step line is marked `rejected_is_terminal`
  false, so the trainer adds no EOS after it (an EOS mid-solution is a token the policy never emits there, and
  pushing it further down only moves mass onto other tokens). Pairs whose chosen does not verify are kept only as
  `filtered` rows.
- `safety_trigger`: rows with `kind` = harmful (or no `kind` column) get the first compliance-cue sentence
  replaced by a trigger from `data/triggers.yaml` (uniformly, without replacement per trajectory); when the new
  continuation still shows a cue it is replaced again, up to `max_interventions`. Rows with `kind` = benign give
  over-refusal pairs (a helpful sample over a refusal) when the K samples contain both.

Harm labels (safety mode). `*_reasoning_harmful` / `*_answer_harmful` come from the cue regex, the same one
that found the cue, unless `harm_judges` are given: then each judge (pipeline/judges) is asked whether the chosen
and the rejected response help with a harmful request (one batched call per judge), `*_answer_harmful` is the
first judge's P(Yes) >= 0.5 on the whole response, every judge's probabilities and raw answers go to
`extra.harm_judges`, and with two judges `extra.harm_agreement` is the share of the two labels they agree on.
An unparseable judge answer filters the pair with the raw text (`judge_error`).

Detectors: `verifier` (math only), `cues` (regex list: a sentence/line matching any pattern), `judge` (the model
is asked for the index of the unit, "Index: N" or "Index: none"). Every sample that gives no pair comes out as a
`filtered` row with the reason, so the summary counts them. All model calls are batched across the shard, one
call per phase (samples, judge, each intervention round).
"""
from __future__ import annotations

import random
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar, Literal

import pyarrow as pa
import yaml
from pydantic import Field, model_validator

from pipeline.backends.base import SamplingParams
from pipeline.errors import InputError
from pipeline.judges.config import JudgeConfig, open_judge
from pipeline.judges.templates import template_version
from pipeline.stage import StageConfig, StageContext, register_stage
from schemas.pairs import make_pairs, model_name
from stages._common import now_utc, pair_id, task_item

STAGE = "intervened"
REPO_ROOT = Path(__file__).resolve().parent.parent
DETECT_TEMPLATE = ("Below is a {what}, split into numbered units.\n{units}\n\n{question}\n"
                   "Reply with one line: Index: N (or Index: none).")
QUESTIONS = {"math_correction": "Which is the first unit that contains a mistake?",
             "safety_trigger": "Which is the first sentence that expresses intent to comply with a harmful request?"}
HARM_TEMPLATE = ("Request: {prompt}\n\nResponse: {response}\n\nDoes the response help with a harmful request "
                 "(it gives harmful content, or shows it is about to)? Answer Yes or No.")
_INDEX = re.compile(r"index\s*[:=]\s*(none|\d+)", re.IGNORECASE)
_SENTENCE = re.compile(r"\S[^.!?\n]*(?:[.!?]+|(?=\n)|$)")

STAGE_FIELDS = [
    pa.field("pair_kind", pa.string()),             # intervention | over_refusal | correction
    pa.field("divergence_char", pa.int32()),
    pa.field("divergence_token", pa.int32()),
    pa.field("compliance_cue", pa.string()),        # safety: the replaced compliance-cue sentence
    pa.field("wrong_line", pa.string()),            # math: the replaced wrong step line
    pa.field("trigger_id", pa.string()),
    pa.field("trigger_text", pa.string()),          # the substituted text (a trigger or the corrected line)
    pa.field("n_interventions", pa.int16()),
    pa.field("rejected_reasoning_harmful", pa.bool_()),
    pa.field("rejected_answer_harmful", pa.bool_()),
    pa.field("chosen_reasoning_harmful", pa.bool_()),
    pa.field("chosen_answer_harmful", pa.bool_()),
    pa.field("detector_model", pa.string()),
    pa.field("wrong_step", pa.int16()),             # math: 1-based first wrong step (n_steps + 1 = answer line)
    pa.field("chosen_verified", pa.bool_()),        # math: chosen passes the step verifier
    pa.field("sample_index", pa.int16()),
]
# step: shared_prefix + terminal flags (math: a rejected that stops after a wrong step line is non-terminal, so
# the trainer adds no EOS after it, as for tree step pairs); verification: `meta`, carried so later stages can
# verify; score_range: math scores are the verifier's 0/1.
GROUPS = ("step", "verification", "score_range")


class InterventionConfig(StageConfig):
    version: ClassVar[str] = "3"  # 2: chosen/rejected_is_terminal (no EOS after a rejected line mid-solution)
    # 3: math mode writes the wrong line to `wrong_line` (compliance_cue is safety only); score_min/score_max

    mode: Literal["math_correction", "safety_trigger"] = Field(
        "math_correction", description="math_correction: replace the first wrong step by the right one (bundled "
                                       "task); safety_trigger: replace the first compliance cue by a trigger")
    detector: Literal["auto", "verifier", "cues", "judge"] = Field(
        "auto", description="how the unit to intervene on is found; auto = verifier (math) or cues (safety)")
    n_samples: int = Field(4, ge=1, description="trajectories sampled per prompt (K)")
    temperature: float = Field(1.0, ge=0, description="sampling temperature of the K trajectories")
    top_p: float = Field(1.0, gt=0, le=1, description="nucleus mass of the K trajectories")
    max_tokens: int = Field(256, ge=1, description="new tokens per trajectory")
    continue_temperature: float = Field(0.0, ge=0, description="temperature of the regenerated continuation "
                                                               "(0 = greedy)")
    continue_max_tokens: int = Field(256, ge=1, description="new tokens per continuation")
    n_continuations: int = Field(1, ge=1, description="math: continuations sampled per corrected prefix; the "
                                                      "first that verifies is kept (needs continue_temperature > 0)")
    rollouts: int = Field(8, ge=1, description="math on a task with no exact step check: rollouts per line prefix "
                                               "of a wrong sample (the step-label budget)")
    rollout_temperature: float = Field(0.8, gt=0, description="temperature of those rollouts")
    rejected_keep_remainder: bool = Field(
        False, description="math: rejected = the whole original text instead of prefix + the wrong line alone")
    keep_unverified: bool = Field(False, description="math: keep pairs whose corrected chosen does not verify")
    max_interventions: int = Field(3, ge=1, description="safety: most trigger substitutions per trajectory")
    over_refusal: bool = Field(True, description="safety: make (helpful > refusal) pairs from benign prompts")
    cue_patterns: list[str] = Field(default_factory=list, description="regexes for the cues detector; empty = "
                                    "the compliance_cues of triggers_file (math mode needs its own)")
    triggers_file: str = Field("data/triggers.yaml", description="triggers, cue and refusal patterns (YAML); "
                                                                 "relative paths are from the repo root")
    judge_template: str = Field(DETECT_TEMPLATE, description="detector prompt: {what}, {units}, {question}")
    judge_max_tokens: int = Field(16, ge=1, description="detector reply tokens")
    harm_judges: list[JudgeConfig] = Field(default_factory=list, max_length=2, description=(
        "safety: one or two judges that label chosen and rejected harmful (instead of the cue regex); with two, "
        "their agreement goes to extra.harm_agreement (YAML)"))
    harm_template: str = Field(HARM_TEMPLATE, description="harm judges' question; {prompt} {response}")

    @model_validator(mode="after")
    def _check(self) -> "InterventionConfig":
        if self.harm_judges and self.mode != "safety_trigger":
            raise ValueError("harm_judges label safety pairs: they need mode safety_trigger")
        if self.n_continuations > 1 and self.continue_temperature == 0:
            raise ValueError("n_continuations > 1 needs continue_temperature > 0 (greedy samples are identical)")
        return self

    def gold_needed(self) -> str | None:
        return "gold answers to find the first wrong step (mode math_correction)" \
            if self.mode == "math_correction" else None

    def judges(self) -> list[str]:
        return [j.label() for j in self.harm_judges]

    def resolved_detector(self) -> str:
        if self.detector == "auto":
            return "verifier" if self.mode == "math_correction" else "cues"
        return self.detector

    def templates(self) -> dict[str, str]:
        out = {"triggers": _triggers_text(self)} if self.mode == "safety_trigger" else {}
        if self.resolved_detector() == "judge":
            out["judge"] = self.judge_template
        if self.harm_judges:
            out["harm"] = self.harm_template
        return out

    def sampling(self) -> dict:
        return {"sample": self.sample_params(0).model_dump(mode="json", exclude={"seed"}),
                "continue": self.continue_params(0).model_dump(mode="json", exclude={"seed"})}

    def sample_params(self, seed: int) -> SamplingParams:
        return SamplingParams(temperature=self.temperature, top_p=self.top_p, max_tokens=self.max_tokens,
                              seed=seed)

    def continue_params(self, seed: int) -> SamplingParams:
        return SamplingParams(temperature=self.continue_temperature, max_tokens=self.continue_max_tokens,
                              seed=seed)


# ------------------------------------------------------------------------------------------ triggers file
def _triggers_path(cfg: InterventionConfig) -> Path:
    p = Path(cfg.triggers_file)
    return p if p.is_absolute() else REPO_ROOT / p


def _triggers_text(cfg: InterventionConfig) -> str:
    path = _triggers_path(cfg)
    if not path.is_file():
        raise InputError("no such triggers file", file=str(path))
    return path.read_text()


@dataclass(frozen=True)
class Patterns:
    triggers: list[tuple[str, str]]   # (id, text)
    cues: list[re.Pattern]
    refusals: list[re.Pattern]


def load_patterns(cfg: InterventionConfig) -> Patterns:
    """Parse the triggers YAML; a bad file is an InputError naming the file and the key."""
    file = str(_triggers_path(cfg))
    try:
        data = yaml.safe_load(_triggers_text(cfg)) or {}
    except yaml.YAMLError as e:
        raise InputError(f"not valid YAML: {e}", file=file) from None
    if not isinstance(data, dict):
        raise InputError("expected a mapping with triggers, compliance_cues, refusal_patterns", file=file)
    trig = data.get("triggers") or []
    if not isinstance(trig, list) or not all(isinstance(t, dict) and t.get("id") and t.get("text") for t in trig):
        raise InputError("triggers must be a list of {id, text}", file=file, column="triggers")

    def compile_all(key: str) -> list[re.Pattern]:
        out = []
        for i, pat in enumerate(data.get(key) or []):
            try:
                out.append(re.compile(str(pat), re.IGNORECASE))
            except re.error as e:
                raise InputError(f"bad regex {pat!r}: {e}", file=file, row=i, column=key) from None
        return out
    if cfg.cue_patterns:
        data["cue_patterns"] = cfg.cue_patterns
    return Patterns([(str(t["id"]), str(t["text"])) for t in trig],
                    compile_all("cue_patterns" if cfg.cue_patterns else "compliance_cues"),
                    compile_all("refusal_patterns"))


# -------------------------------------------------------------------------------------------- segmentation
def line_spans(text: str) -> list[tuple[int, int]]:
    """(start, end) of every non-blank line, end excluding the newline."""
    spans, pos = [], 0
    for ln in text.splitlines(keepends=True):
        body = ln.rstrip("\r\n")
        if body.strip():
            spans.append((pos, pos + len(body)))
        pos += len(ln)
    return spans


def sentence_spans(text: str) -> list[tuple[int, int]]:
    """(start, end) of every sentence: text up to . ! ? (kept) or a line end."""
    return [(m.start(), m.end()) for m in _SENTENCE.finditer(text)]


def first_match(text: str, spans: list[tuple[int, int]], patterns: list[re.Pattern]) -> int | None:
    for i, (a, b) in enumerate(spans):
        if any(p.search(text[a:b]) for p in patterns):
            return i
    return None


def parse_index(reply: str, n_units: int) -> int | None:
    """0-based unit index from a judge reply "Index: N" (1-based), None for "none"/unparsable/out of range."""
    m = _INDEX.search(reply)
    if not m or m.group(1).lower() == "none":
        return None
    k = int(m.group(1))
    return k - 1 if 1 <= k <= n_units else None


def math_wrong_unit(text: str, problem) -> tuple[int, tuple[int, int] | None, str] | None:
    """(wrong step k, span of the line to replace or None, the correct line) or None when the text verifies.
    `problem` is the row bound to a task with an exact step check.

    The line to replace is the k-th step line; when the text has fewer step lines (a step was skipped, or the
    answer line is wrong) it is the first non-blank line after step line k-1.
    """
    k = problem.first_wrong_step(text)
    if k is None:
        return None
    correct = problem.gold_line(k)
    spans = line_spans(text)
    steps = [i for i, (a, b) in enumerate(spans) if problem.step_lines(text[a:b])]
    if len(steps) >= k:
        return k, spans[steps[k - 1]], correct
    after = steps[k - 2] + 1 if k >= 2 else 0
    return k, (spans[after] if after < len(spans) else None), correct


# ------------------------------------------------------------------------------------------------ state
@dataclass
class Trajectory:
    row: int                      # index of the input row in the shard
    sample: int                   # sample index within the prompt
    text: str                     # the original sample
    prefix: str = ""              # text before the intervened unit (shared by chosen and rejected)
    start: int = -1
    wrong: str = ""               # the replaced unit
    substitute: str = ""          # correction or trigger text
    trigger_id: str | None = None
    wrong_step: int | None = None
    assistant_prefix: str = ""    # what the model continues from in the current round
    chosen: str | None = None
    n_interventions: int = 0
    reason: str | None = None     # why this sample gives no pair
    triggers_left: list = field(default_factory=list)
    verified: bool | None = None
    wrong_is_last: bool = False   # math by rollouts: the wrong line ends the sample (rejected ends there too)


def _detect(texts: list[str], spans: list[list[tuple[int, int]]], cfg, backend,
            patterns: Patterns | None) -> list[int | None]:
    """The unit index to intervene on in each text (cues or judge); one batched judge call."""
    if cfg.resolved_detector() == "cues":
        return [first_match(t, s, patterns.cues) for t, s in zip(texts, spans)]
    what = "solution" if cfg.mode == "math_correction" else "reasoning trace"
    prompts = [cfg.judge_template.format(what=what, question=QUESTIONS[cfg.mode],
                                         units="\n".join(f"{i + 1}. {t[a:b]}" for i, (a, b) in enumerate(s)))
               for t, s in zip(texts, spans)]
    if not prompts:
        return []
    replies = backend.generate(prompts, SamplingParams(temperature=0.0, max_tokens=cfg.judge_max_tokens), n=1)
    return [parse_index(r[0].text, len(s)) for r, s in zip(replies, spans)]


# ------------------------------------------------------------------------------------------- math mode
def _math_locate(trajs: list[Trajectory], problems: list, cfg, backend) -> None:
    """Set prefix / wrong / substitute / assistant_prefix of each trajectory, or its `reason`."""
    if cfg.resolved_detector() != "verifier":
        spans = [line_spans(t.text) for t in trajs]
        patterns = None
        if cfg.resolved_detector() == "cues":
            if not cfg.cue_patterns:
                raise InputError("the cues detector in math_correction mode needs cue_patterns",
                                 column="cue_patterns")
            patterns = load_patterns(cfg)
        idx = _detect([t.text for t in trajs], spans, cfg, backend, patterns)
    for j, t in enumerate(trajs):
        problem = problems[t.row]
        if cfg.resolved_detector() == "verifier":
            found = math_wrong_unit(t.text, problem)
            if found is None:
                t.reason = "sample already verifies (no wrong step)"
                continue
            t.wrong_step, span, correct = found
            if span is None:
                t.reason = f"step {t.wrong_step} is missing and nothing follows to replace"
                continue
        else:
            if idx[j] is None:
                t.reason = "detector found no unit to correct"
                continue
            span = spans[j][idx[j]]
            # The flagged line is step m+1 when m step lines precede it; its right version comes from the problem.
            t.wrong_step = sum(bool(problem.step_lines(t.text[a:b])) for a, b in spans[j][:idx[j]]) + 1
            correct = problem.gold_line(t.wrong_step)
        t.start, t.prefix, t.wrong = span[0], t.text[:span[0]], t.text[span[0]:span[1]]
        t.substitute = correct
        if t.wrong.strip() == correct:   # a judge or cue list flagged a line that is already right
            t.reason = "the flagged line is already the correct one"
            continue
        if correct.startswith("Answer:"):
            t.chosen = t.prefix + correct   # the solution ends with the answer line: nothing to continue
        else:
            t.assistant_prefix = t.prefix + correct + "\n"


def task_problems(records: list[dict], cfg: InterventionConfig | None = None) -> list:
    """Every row bound to its task (pipeline.tasks); checked before any model call."""
    problems = [task_item(r) for r in records]
    for r, p in zip(records, problems):
        if p is None:
            raise InputError(f"math_correction needs a task with gold answers (prompt_id {r['prompt_id']!r})",
                             column="meta")
        if cfg is not None and not p.has_step_check and cfg.resolved_detector() != "verifier":
            raise InputError(f"the {cfg.resolved_detector()} detector needs a task with gold step lines, not "
                             f"{p.task.name!r}; use detector: verifier (rollout labels)", column="detector")
    return problems


def _rollout_locate(trajs: list[Trajectory], records: list[dict], problems: list, cfg, backend,
                    ctx: StageContext) -> None:
    """Rollout step labels for rows whose task has no exact step check: the first line after which no rollout
    reaches a right answer is the wrong one; chosen = the text before it + a rollout from there that is right."""
    from pipeline.tasks.rollouts import first_wrong_line, prefix_values

    jobs, owners = [], []  # one job per line prefix (0..L lines) of every wrong sample
    for t in trajs:
        p = problems[t.row]
        if p.correct(t.text):
            t.reason = "sample already verifies (right answer)"
            continue
        spans = line_spans(t.text)
        cuts = [0] + [b for _, b in spans]
        owners.append((t, spans, len(jobs)))
        jobs += [(records[t.row]["prompt"], t.text[:c] + ("\n" if c else ""), p.correct) for c in cuts]
    sp = SamplingParams(temperature=cfg.rollout_temperature, max_tokens=cfg.continue_max_tokens, seed=ctx.seed + 2)
    values = prefix_values(backend, jobs, sp, cfg.rollouts)
    for t, spans, at in owners:
        vals = values[at:at + len(spans) + 1]
        k = first_wrong_line([v.share for v in vals])
        if k is None:
            t.reason = ("no rollout from the prompt reaches a right answer" if vals[0].share == 0 else
                        f"rollouts find no line after which the answer is out of reach ({cfg.rollouts} each)")
            continue
        pre, right = jobs[at + k - 1][1], vals[k - 1].right[0]  # the text before line k, a right rollout from it
        t.wrong_step, t.start, t.prefix, t.wrong = k, len(pre), pre, t.text[len(pre):spans[k - 1][1]]
        t.substitute = right[len(pre):].split("\n", 1)[0]
        t.chosen, t.wrong_is_last = right, k == len(spans)


def _run_math(records: list[dict], problems: list, cfg: InterventionConfig, backend, ctx: StageContext,
              samples) -> list[Trajectory]:
    trajs = [Trajectory(i, s, c.text) for i, comps in enumerate(samples) for s, c in enumerate(comps)]
    exact = [t for t in trajs if problems[t.row].has_step_check]
    _math_locate(exact, problems, cfg, backend)
    _rollout_locate([t for t in trajs if not problems[t.row].has_step_check], records, problems, cfg, backend, ctx)
    todo = [t for t in trajs if t.reason is None and t.chosen is None]
    if todo:
        conts = backend.continue_([records[t.row]["prompt"] for t in todo], [t.assistant_prefix for t in todo],
                                  cfg.continue_params(ctx.seed + 1), n=cfg.n_continuations)
        for t, comps in zip(todo, conts):
            texts = [t.assistant_prefix + c.text for c in comps]
            t.chosen = next((x for x in texts if problems[t.row].steps_ok(x)), texts[0])
    for t in trajs:
        if t.reason is None:
            t.n_interventions = 1
            t.verified = problems[t.row].steps_ok(t.chosen)
            if not t.verified and not cfg.keep_unverified:
                t.reason = "corrected continuation does not verify"
    return trajs


# ----------------------------------------------------------------------------------------- safety mode
def _split_think(text: str) -> tuple[str, str | None]:
    if "</think>" in text:
        a, b = text.split("</think>", 1)
        return a, b
    return text, None


def _harmful(text: str, patterns: Patterns) -> tuple[bool, bool | None]:
    """(reasoning shows a cue, answer shows a cue or None when there is no </think> split)."""
    reasoning, answer = _split_think(text)
    r = first_match(reasoning, sentence_spans(reasoning), patterns.cues) is not None
    a = None if answer is None else first_match(answer, sentence_spans(answer), patterns.cues) is not None
    return r, a


def _run_safety(records: list[dict], cfg: InterventionConfig, backend, ctx: StageContext, samples,
                patterns: Patterns) -> list[Trajectory]:
    if not patterns.triggers:
        raise InputError("safety_trigger mode needs at least one trigger", file=str(_triggers_path(cfg)),
                         column="triggers")
    harmful_rows = {i for i, r in enumerate(records) if (r.get("kind") or "harmful") == "harmful"}
    trajs = [Trajectory(i, s, c.text) for i in sorted(harmful_rows) for s, c in enumerate(samples[i])]
    spans = [sentence_spans(t.text) for t in trajs]
    idx = _detect([t.text for t in trajs], spans, cfg, backend, patterns)
    for t, sp, i in zip(trajs, spans, idx):
        if i is None:
            t.reason = "no compliance cue found (sample treated as safe)"
            continue
        t.start, t.prefix, t.wrong = sp[i][0], t.text[:sp[i][0]], t.text[sp[i][0]:sp[i][1]]
        order = list(patterns.triggers)
        random.Random(ctx.row_seed(records[t.row]["prompt_id"], t.sample)).shuffle(order)
        t.triggers_left = order
        t.assistant_prefix = t.prefix
    active = [t for t in trajs if t.reason is None]
    for round_ in range(cfg.max_interventions):
        if not active:
            break
        for t in active:   # substitute the next trigger (without replacement, cycling if the pool runs out)
            tid, ttext = t.triggers_left[t.n_interventions % len(t.triggers_left)]
            if t.n_interventions == 0:
                t.trigger_id, t.substitute = tid, ttext
            else:
                t.trigger_id = f"{t.trigger_id}+{tid}"
            t.assistant_prefix += ttext + " "
            t.n_interventions += 1
        conts = backend.continue_([records[t.row]["prompt"] for t in active], [t.assistant_prefix for t in active],
                                  cfg.continue_params(ctx.seed + 1 + round_), n=1)
        texts = [c[0].text for c in conts]
        sps = [sentence_spans(x) for x in texts]
        still = []
        for t, x, sp, j in zip(active, texts, sps, _detect(texts, sps, cfg, backend, patterns)):
            if j is None:   # no cue after the trigger: a safe continuation
                t.chosen = t.assistant_prefix + x
            else:           # cut before the new cue; the next round substitutes another trigger there
                t.assistant_prefix += x[:sp[j][0]]
                still.append(t)
        active = still
    for t in active:
        t.reason = f"still shows a compliance cue after {cfg.max_interventions} interventions"
        t.chosen = None
    return trajs


def _over_refusal_pairs(records, samples, patterns: Patterns) -> list[tuple[int, int, int]]:
    """(row, helpful sample, refusal sample) for benign rows whose samples contain both."""
    out = []
    for i, r in enumerate(records):
        if (r.get("kind") or "harmful") != "benign":
            continue
        refuses = [any(p.search(c.text) for p in patterns.refusals) for c in samples[i]]
        if any(refuses) and not all(refuses):
            out.append((i, refuses.index(False), refuses.index(True)))
    return out


def _judge_harm(out: list[dict], cfg: InterventionConfig, backend) -> None:
    """Harm labels of the kept safety pairs from the configured judges (module docstring)."""
    rows = [r for r in out if r["status"] == "ok"]
    if not cfg.harm_judges or not rows:
        return
    prompts = [cfg.harm_template.format(prompt=r["prompt"], response=r[side]) for r in rows
               for side in ("chosen", "rejected")]
    version = template_version("harm", cfg.harm_template)
    per_judge = [open_judge(jc, backend).ask_yes_no(prompts, version) for jc in cfg.harm_judges]
    for k, r in enumerate(rows):
        got = [(vs[2 * k], vs[2 * k + 1]) for vs in per_judge]
        r["extra"] = {**r.get("extra", {}), "harm_judges": [
            {"model": c.model, "template": c.template, "p_chosen": c.value, "p_rejected": rj.value,
             "raw": [c.raw, rj.raw]} for c, rj in got]}
        errors = [v.error for pair in got for v in pair if v.error]
        if errors:
            r["status"], r["error"] = "filtered", f"judge_error: {errors[0]}"
            continue
        labels = [(c.value >= 0.5, rj.value >= 0.5) for c, rj in got]
        r["chosen_answer_harmful"], r["rejected_answer_harmful"] = labels[0]
        r["judge_model"] = got[0][0].model
        if len(labels) == 2:
            r["extra"]["harm_agreement"] = sum(a == b for a, b in zip(*labels)) / 2


# ------------------------------------------------------------------------------------------------- rows
def _base(r: dict, cfg, backend, ctx: StageContext, sample: int, created) -> dict:
    model = model_name(backend)
    return {"prompt_id": r["prompt_id"], "prompt": r["prompt"], "stage": STAGE, "method": cfg.mode,
            "generator_model": model, "created_at": created, "row_key": ctx.row_key(r["prompt_id"], sample),
            "sample_index": sample, "meta": r.get("meta"),
            "detector_model": model if cfg.resolved_detector() == "judge" else cfg.resolved_detector(),
            "judge_model": model if cfg.resolved_detector() == "judge" else None}


def _trajectory_row(t: Trajectory, r: dict, cfg, backend, ctx, created, patterns, seen: set) -> dict:
    row = _base(r, cfg, backend, ctx, t.sample, created)
    rejected = t.text if (cfg.mode == "safety_trigger" or cfg.rejected_keep_remainder) else t.prefix + t.wrong
    reason = t.reason
    if reason is None and t.chosen == rejected:
        reason = "intervention reproduced the original text"
    pid = pair_id(STAGE, r["prompt_id"], t.chosen or "", rejected) if reason is None else None
    if pid is not None and pid in seen:
        reason = "duplicate of another sample's pair"
    if reason is not None:
        return {**row, "chosen": t.chosen, "rejected": t.text,
                "status": "filtered", "error": reason, "wrong_step": t.wrong_step, "chosen_verified": t.verified,
                "extra": {}}
    seen.add(pid)
    row.update(pair_id=pid, chosen=t.chosen, rejected=rejected, shared_prefix=t.prefix or None, status="ok",
               pair_kind="correction" if cfg.mode == "math_correction" else "intervention",
               divergence_char=t.start, trigger_id=t.trigger_id,
               trigger_text=t.substitute, n_interventions=t.n_interventions, wrong_step=t.wrong_step,
               chosen_verified=t.verified, extra={"divergence_fraction": t.start / max(1, len(t.text))})
    if cfg.mode == "math_correction":
        # prefix + the wrong line stops mid-solution unless that line is the answer line (its correction is the
        # `Answer:` line, as in _math_locate) or the remainder is kept
        row.update(chosen_score=1.0 if t.verified else 0.0, rejected_score=0.0, score_min=0.0, score_max=1.0,
                   score_margin=(1.0 if t.verified else 0.0), chosen_is_terminal=True, wrong_line=t.wrong,
                   rejected_is_terminal=cfg.rejected_keep_remainder or t.substitute.startswith("Answer:")
                   or t.wrong_is_last)
    else:
        row["compliance_cue"] = t.wrong
        row["rejected_reasoning_harmful"], row["rejected_answer_harmful"] = _harmful(t.text, patterns)
        row["chosen_reasoning_harmful"], row["chosen_answer_harmful"] = _harmful(t.chosen[len(t.prefix):], patterns)
    return row


@register_stage("intervention", config=InterventionConfig, input_kind="prompts", outputs={"main": "pairs"})
def run(rows: pa.Table, cfg: InterventionConfig, backend, ctx: StageContext) -> dict[str, pa.Table]:
    """Intervened pairs: correct the first wrong step (math) or replace the first compliance cue (safety)."""
    if cfg.mode == "safety_trigger" and cfg.resolved_detector() == "verifier":
        raise InputError("the verifier detector works only in math_correction mode", column="detector")
    records = rows.to_pylist()
    patterns = load_patterns(cfg) if cfg.mode == "safety_trigger" else None
    problems = task_problems(records, cfg) if cfg.mode == "math_correction" else None
    samples = backend.generate([r["prompt"] for r in records], cfg.sample_params(ctx.seed), n=cfg.n_samples)
    if cfg.mode == "math_correction":
        trajs = _run_math(records, problems, cfg, backend, ctx, samples)
    else:
        trajs = _run_safety(records, cfg, backend, ctx, samples, patterns)
    created = now_utc()
    seen: set[str] = set()
    out = [_trajectory_row(t, records[t.row], cfg, backend, ctx, created, patterns, seen) for t in trajs]
    if cfg.mode == "safety_trigger" and cfg.over_refusal:
        for i, good, bad in _over_refusal_pairs(records, samples, patterns):
            r = records[i]
            chosen, rejected = samples[i][good].text, samples[i][bad].text
            out.append({**_base(r, cfg, backend, ctx, good, created), "pair_kind": "over_refusal",
                        "pair_id": pair_id(STAGE, r["prompt_id"], chosen, rejected), "chosen": chosen,
                        "rejected": rejected, "status": "ok", "n_interventions": 0,
                        "extra": {"refusal_sample": bad}})
    if cfg.mode == "safety_trigger":
        _judge_harm(out, cfg, backend)
    ctx.progress(rows.num_rows)
    return {"main": make_pairs(out, GROUPS, STAGE_FIELDS)}
