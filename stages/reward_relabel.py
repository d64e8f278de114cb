"""Stage 3: reward-augmented relabeling (docs/stages.md; reference: shenao-zhang/reward-augmented-preference).

Every kept input pair becomes exactly two goal-conditioned rows:

    (a) system = T(chosen_score):   chosen = y_w, rejected = y_l                 (goal_side "chosen")
    (b) system = T(rejected_score): chosen = y_l, rejected = y_w  (flipped)      (goal_side "rejected")

Conditioned on the lower target score the originally rejected response is the better match, so (b) flips the
labels. T is the reference template (`RA_TEMPLATE`); integer scores print without a decimal. With
`system_mode="prepend"` (the reference's `_nosys` variant, for chat templates without a system role) the template
plus a blank line is put in front of the user prompt instead.

Dropped pairs are not lost: they come out as `status="filtered"` rows with the reason in `error` (ties, the
fine-score filter, non-ok input rows), so the run summary counts them. Ties are dropped by default because their
two rows carry the same system prompt with opposite labels (the reference code keeps them: `drop_score_ties=False`).

Scores come from a pluggable `score_source`:
- `columns`  the input's `chosen_score`/`rejected_score`; no model. Their scale is the source's declared range
             (`score_range` in the config, else the row's `score_min`/`score_max`, e.g. [0, 1] for verifier step
             pairs, [-1, 1] for MCTS Q values, else the template's own 1-10, as UltraFeedback's overall scores),
             mapped linearly onto 1-10 and rounded to `goal_decimals`. A score outside its declared range is
             refused (InputError naming the pair and the column): printing a raw 0 or -0.4 into a "scale of
             1-10" template asks the model for a goal the template never defines.
- `verifier` the bundled task's verifier on each response (`meta` column): `verifier_correct_score` when right,
             else `verifier_wrong_score`; `verifier_mode="steps"` gives partial credit by the first wrong step.
- `judge`    with `judge` set: the judge primitive (pipeline/judges) scores each response on `judge_rubric` on
             its declared `judge_scale`, mapped linearly onto 1-10 (votes on a chat-only server, the expected
             score under the answer probabilities with log-probs); an unparseable answer fails the row with the
             raw text. Without `judge`: one generation per response (`JUDGE_TEMPLATE`, parsed "Score: N", 1-10).
- `logprob`  the mean token log-prob of each response under the model, quantile-binned into deciles 1..10 over
             the shard's responses ([reconstructed]; bins depend on the shard, so keep shard_size large).
- `reward_model` a reward-model folder (`score_model`: an AutoModelForSequenceClassification with one output, e.g.
             from `prefpipe train --mode reward`; pipeline/judges/reward_model.py) scores each response, all of a
             shard in one batched scorer. Its scale is the one a Bradley-Terry model is trained on: P(better) =
             σ(score) on [0, 1], mapped linearly onto 1-10 (`score_mapping: deciles` ranks the raw scores).
Model-based sources use the backend the engine passes or, when none (e.g. `prefpipe stage reward-relabel`
without a model), one built from `score_model`.

Input: a pairs table (a stage folder or a file that validates as `pairs`), scored in chosen_score /
rejected_score (and fine_scores_* for the fine-score filter) when score_source is `columns`.
"""
from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import ClassVar, Literal

import pyarrow as pa
from pydantic import Field, model_validator

from pipeline.backends.base import SamplingParams
from pipeline.errors import InputError
from pipeline.judges.config import OWN_MODEL, JudgeConfig, open_judge
from pipeline.stage import StageConfig, StageContext, register_stage
from schemas.pairs import SCORE_MAX, SCORE_MIN, carried, flip_sides, groups_of, make_pairs
from stages._common import now_utc, pair_id

STAGE = "reward_aug"
RA_TEMPLATE = ("You are an assistant that generates responses for the instruction while implicitly achieving the "
               "following target scores (on a scale of 1-10, where 1 is lowest and 10 is highest):\n"
               "Overall score: {score}.")
JUDGE_TEMPLATE = ("Rate how well the response answers the instruction, on a scale of 1-10 (1 is lowest, 10 is "
                  "highest).\n\nInstruction:\n{prompt}\n\nResponse:\n{response}\n\n"
                  "Reply with one line: Score: N")
GOAL_SCALE = (1.0, 10.0)  # the template's "scale of 1-10"
_JUDGE_SCORE = re.compile(r"score\s*[:=]\s*(\d+(?:\.\d+)?)", re.IGNORECASE)

STAGE_FIELDS = [
    pa.field("goal_score", pa.float64()),
    pa.field("goal_side", pa.string()),
    pa.field("flipped", pa.bool_()),
    pa.field("source_pair_id", pa.string()),
    pa.field("score_source", pa.string()),
]


class RewardRelabelConfig(StageConfig):
    version: ClassVar[str] = "2"  # 2: scores mapped from the source's declared range; groups carried through

    score_source: Literal["columns", "verifier", "judge", "logprob", "reward_model"] = Field(
        "columns", description="where the scores come from: input columns, the task verifier, a judge model, "
                               "the model's mean token log-prob, or a reward-model folder (score_model; σ(score) "
                               "on [0, 1])")
    score_mapping: Literal["auto", "range", "identity", "deciles"] = Field(
        "auto", description="map raw scores to the 1-10 goal scale: range = linearly from the declared source "
                            "range; identity = as they are (must lie in 1-10); deciles = rank bins over the "
                            "shard; auto = deciles for logprob, range otherwise")
    score_range: tuple[float, float] | None = Field(
        None, description="columns source: the range [low, high] of the input scores, overriding the rows' "
                          "score_min/score_max; None: the rows' declared range, else 1-10")
    goal_decimals: int = Field(1, ge=0, le=6, description="decimals a goal mapped from another range is rounded "
                                                          "to (it is printed into the template)")
    template: str = Field(RA_TEMPLATE, description="goal-conditioning text; {score} is the goal score")
    system_mode: Literal["system", "prepend"] = Field(
        "system", description="system: the template is the system prompt; prepend: template + blank line in front "
                              "of the first user message (the reference's _nosys variant)")
    drop_score_ties: bool = Field(True, description="drop pairs with chosen_score == rejected_score (their two "
                                                    "rows would contradict each other)")
    filter_fine_scores: bool = Field(True, description="keep only pairs whose mean fine-grained score of chosen "
                                                       ">= rejected's, when fine_scores_* columns are present")
    verifier_mode: Literal["answer", "steps"] = Field(
        "answer", description="verifier scores: answer = right/wrong final answer; steps = partial credit up to "
                              "the first wrong step")
    verifier_correct_score: float = Field(10.0, description="verifier score of a right response")
    verifier_wrong_score: float = Field(1.0, description="verifier score of a wrong response (steps mode: of one "
                                                         "wrong at step 1)")
    judge_template: str = Field(JUDGE_TEMPLATE, description="judge prompt; {prompt} and {response}")
    judge_max_tokens: int = Field(32, ge=1, description="judge tokens per response")
    score_model: str | None = Field(None, description="model for judge/logprob when no backend is passed in; "
                                                     "reward_model: the reward-model folder")
    judge: JudgeConfig | None = Field(None, description="judge source: the judge primitive (its own model, or the "
                                                        "stage's backend when judge.model is unset)")
    judge_rubric: str = Field("how well the response answers the instruction: correct, complete, helpful",
                              description="judge source with `judge`: the rubric of the pointwise score")
    judge_scale: tuple[int, int] = Field((1, 10), description="judge source with `judge`: the judge's declared "
                                                              "integer scale, mapped onto the goal's 1-10")
    score_backend: str = Field("transformers", description="backend kind for score_model")
    method: str = Field("reward_augmented", description="value of the method column")

    @model_validator(mode="after")
    def _check(self) -> "RewardRelabelConfig":
        if "{score}" not in self.template:
            raise ValueError("template must contain {score}")
        for name in ("verifier_correct_score", "verifier_wrong_score"):
            if not GOAL_SCALE[0] <= getattr(self, name) <= GOAL_SCALE[1]:
                raise ValueError(f"{name} {getattr(self, name):g} is off the template's 1-10 scale")
        if self.judge is not None and self.score_source != "judge":
            raise ValueError("`judge` configures score_source 'judge'; it does nothing for "
                             f"{self.score_source!r}")
        if not self.judge_scale[0] < self.judge_scale[1]:
            raise ValueError(f"judge_scale {list(self.judge_scale)}: low must be below high")
        if self.score_source == "reward_model":
            if self.score_model is None or not (Path(self.score_model) / "config.json").is_file():
                raise ValueError(f"score_source 'reward_model' needs score_model, a reward-model folder with a "
                                 f"config.json; got {self.score_model!r}")
            if self.score_mapping == "identity":
                raise ValueError("score_mapping 'identity' keeps scores as they are, and a reward model's σ(score) "
                                 "is on [0, 1], not the template's 1-10: use range or deciles")
        if self.score_range is not None:
            if self.score_source != "columns":
                raise ValueError("score_range declares the range of the input's score columns: it needs "
                                 "score_source 'columns'")
            if not self.score_range[0] < self.score_range[1]:
                raise ValueError(f"score_range {list(self.score_range)}: low must be below high")
        return self

    def templates(self) -> dict[str, str]:
        out = {"goal": self.template}
        if self.score_source == "judge":
            out["judge"] = self.judge_template
        return out

    def sampling(self) -> dict:
        if self.score_source != "judge":
            return {}
        return {"judge": _judge_sampling(self).model_dump(mode="json")}

    def judges(self) -> list[str]:
        if self.score_source == "judge":  # `judge`'s model, else score_model, else the stage's own backend
            return [(self.judge or JudgeConfig()).label(self.score_model or OWN_MODEL)]
        return [f"reward model {self.score_model}"] if self.score_source == "reward_model" else []

    @property
    def mapping(self) -> str:
        if self.score_mapping != "auto":
            return self.score_mapping
        return "deciles" if self.score_source == "logprob" else "range"


def render_score(score: float) -> str:
    """Integer scores without a decimal (8.0 -> "8"), others as Python prints them (8.5 -> "8.5")."""
    return str(int(score)) if float(score).is_integer() else str(float(score))


def goal_text(cfg: RewardRelabelConfig, score: float) -> str:
    return cfg.template.format(score=render_score(score))


def _judge_sampling(cfg: RewardRelabelConfig) -> SamplingParams:
    return SamplingParams(temperature=0.0, max_tokens=cfg.judge_max_tokens, stop=["\n"])


# ----------------------------------------------------------------------------------------------- scores
def _required(rows: list[dict], column: str) -> None:
    for r in rows:
        if r.get(column) is None:
            raise InputError(f"score_source needs a non-null '{column}' (pair_id {r['pair_id']!r})", column=column)


def declared_range(row: dict, cfg: RewardRelabelConfig) -> tuple[tuple[float, float], str]:
    """The range [low, high] a row's column scores are on, and who declared it (for error messages)."""
    if cfg.mapping == "identity":
        return GOAL_SCALE, "the template's 1-10 scale (score_mapping 'identity')"
    if cfg.score_range is not None:
        return (float(cfg.score_range[0]), float(cfg.score_range[1])), "the config's score_range"
    lo, hi = row.get(SCORE_MIN), row.get(SCORE_MAX)
    if lo is not None and hi is not None:
        return (lo, hi), "the row's score_min/score_max"
    return GOAL_SCALE, ("the template's 1-10 scale, as the row declares no other (give the source's range as "
                        "score_min/score_max columns or the score_range option)")


def to_goal_scale(score: float, low: float, high: float, decimals: int) -> float:
    """`score` on [low, high] placed linearly on the template's 1-10; a score already on 1-10 is kept as is."""
    if (low, high) == GOAL_SCALE:
        return score
    g_lo, g_hi = GOAL_SCALE
    return round(g_lo + (g_hi - g_lo) * (score - low) / (high - low), decimals)


def _scores_from_columns(rows: list[dict], cfg: RewardRelabelConfig):
    _required(rows, "chosen_score")
    _required(rows, "rejected_score")
    cs, rs = [], []
    for r in rows:
        (lo, hi), by = declared_range(r, cfg)
        for c, out in (("chosen_score", cs), ("rejected_score", rs)):
            if not math.isfinite(r[c]):
                raise InputError(f"score is {r[c]} (pair_id {r['pair_id']!r})", column=c)
            if cfg.mapping == "deciles":
                out.append(r[c])
                continue
            if not lo <= r[c] <= hi:
                raise InputError(f"score {r[c]:g} is outside [{lo:g}, {hi:g}], {by} (pair_id {r['pair_id']!r})",
                                 column=c)
            out.append(to_goal_scale(r[c], lo, hi, cfg.goal_decimals))
    return cs, rs, [None] * len(rows)


def _verifier_score(text: str, problem, cfg: RewardRelabelConfig) -> float:
    """`problem` is the row bound to its task. Where the task checks steps, "answer" needs every step right and
    "steps" credits the checks passed before the first wrong step; elsewhere "answer" is the answer check and
    "steps" the task's own score (e.g. a reasoning-gym scorer's partial credit)."""
    if problem.has_step_check:
        k = problem.first_wrong_step(text)
        # k-1 of n+1 checks passed (the answer line is check n+1)
        frac = 1.0 if k is None else (k - 1) / (problem.n_steps + 1)
    else:
        frac = problem.check(text).score
    if frac >= 1.0:
        return cfg.verifier_correct_score
    if cfg.verifier_mode == "answer":
        return cfg.verifier_wrong_score
    # steps: linear between the wrong and correct scores.
    return round(cfg.verifier_wrong_score + frac * (cfg.verifier_correct_score - cfg.verifier_wrong_score), 3)


def _scores_from_verifier(rows: list[dict], cfg: RewardRelabelConfig):
    from pipeline.tasks.registry import item_for_row

    _required(rows, "meta")
    cs, rs = [], []
    for r in rows:
        try:
            problem = item_for_row(r)
        except InputError as e:
            raise InputError(f"{e.reason} (pair_id {r['pair_id']!r})", column="meta") from None
        if not problem.has_gold:
            raise InputError(f"score_source 'verifier' needs a task with gold answers, not {problem.task.name!r} "
                             f"(pair_id {r['pair_id']!r})", column="meta")
        cs.append(_verifier_score(r["chosen"], problem, cfg))
        rs.append(_verifier_score(r["rejected"], problem, cfg))
    return cs, rs, [None] * len(rows)


def parse_judge_score(text: str) -> float | None:
    """The last "Score: N" in a judge reply, when 1 <= N <= 10; None otherwise."""
    hits = _JUDGE_SCORE.findall(text)
    if not hits:
        return None
    v = float(hits[-1])
    return v if 1.0 <= v <= 10.0 else None


def _scores_from_judge(rows: list[dict], cfg: RewardRelabelConfig, backend):
    prompts = [cfg.judge_template.format(prompt=r["prompt"], response=r[side])
               for r in rows for side in ("chosen", "rejected")]
    outs = backend.generate(prompts, _judge_sampling(cfg), n=1)  # one batched call for the whole shard
    parsed = [parse_judge_score(o[0].text) for o in outs]
    cs, rs, errors = [], [], []
    for i in range(len(rows)):
        c, r = parsed[2 * i], parsed[2 * i + 1]
        cs.append(c)
        rs.append(r)
        bad = [s for s, v in (("chosen", c), ("rejected", r)) if v is None]
        errors.append(f"judge reply for {' and '.join(bad)} has no 'Score: N' in 1..10" if bad else None)
    return cs, rs, errors


def decile_bins(values: list[float]) -> list[int]:
    """Rank-based bins 1..10 (ties share the lower rank), so the best tenth gets 10 and the worst gets 1."""
    n = len(values)
    if n == 0:
        return []
    order = sorted(values)
    first_rank = {}
    for i, v in enumerate(order):
        first_rank.setdefault(v, i)
    return [1 + (10 * first_rank[v]) // n for v in values]


def _scores_from_logprob(rows: list[dict], cfg: RewardRelabelConfig, backend):
    prompts = [r["prompt"] for r in rows for _ in (0, 1)]
    texts = [r[side] for r in rows for side in ("chosen", "rejected")]
    res = backend.logprobs(prompts, texts)
    means = [x.total / max(1, len(x.per_token)) for x in res]
    return means[0::2], means[1::2], [None] * len(rows)


def _scores_from_judge_primitive(rows: list[dict], cfg: RewardRelabelConfig, backend):
    """Both responses of every pair scored in one batched judge call, on the judge's scale, mapped to 1-10."""
    verdicts = open_judge(cfg.judge, backend).score(
        [(r["prompt"], r[side]) for r in rows for side in ("chosen", "rejected")], cfg.judge_rubric, cfg.judge_scale)
    lo, hi = cfg.judge_scale
    # rounded also on a 1-10 judge scale: with log-probs a score is an expected value, printed into the template
    goal = [None if v.value is None else round(to_goal_scale(v.value, lo, hi, cfg.goal_decimals), cfg.goal_decimals)
            for v in verdicts]
    errors = []
    for c, r in zip(verdicts[0::2], verdicts[1::2]):
        bad = [f"judge on {side}: {v.error}" for side, v in (("chosen", c), ("rejected", r)) if v.error]
        errors.append("; ".join(bad) if bad else None)
    return goal[0::2], goal[1::2], errors


def _scores_from_reward_model(rows: list[dict], cfg: RewardRelabelConfig):
    """Both responses of every pair in one batched scoring call; range mapping reads σ(score) on [0, 1]."""
    from pipeline.judges.reward_model import load_scorer  # torch + transformers only for this source

    raw = load_scorer(cfg.score_model).score([r["prompt"] for r in rows for _ in (0, 1)],
                                             [r[side] for r in rows for side in ("chosen", "rejected")])
    if cfg.mapping == "range":  # σ(s) written through tanh, which cannot overflow
        raw = [to_goal_scale(0.5 * (1.0 + math.tanh(s / 2)), 0.0, 1.0, cfg.goal_decimals) for s in raw]
    return raw[0::2], raw[1::2], [None] * len(rows)


def _score_backend(cfg: RewardRelabelConfig, backend):
    if backend is not None:
        return backend
    if cfg.score_model is None:
        raise InputError(f"score_source '{cfg.score_source}' needs a model: pass a backend or set score_model",
                         column="score_model")
    from pipeline.backends import make_backend
    return make_backend(cfg.score_backend, cfg.score_model)


def score_pairs(rows: list[dict], cfg: RewardRelabelConfig, backend) -> tuple[list, list, list]:
    """(chosen scores, rejected scores, per-row error or None) on the 1-10 goal scale."""
    if cfg.score_source == "columns":
        cs, rs, errs = _scores_from_columns(rows, cfg)
    elif cfg.score_source == "verifier":
        cs, rs, errs = _scores_from_verifier(rows, cfg)
    elif cfg.score_source == "reward_model":
        cs, rs, errs = _scores_from_reward_model(rows, cfg)
    elif cfg.score_source == "judge" and cfg.judge is not None:
        cs, rs, errs = _scores_from_judge_primitive(rows, cfg, backend)
    else:
        model = _score_backend(cfg, backend)
        fn = _scores_from_judge if cfg.score_source == "judge" else _scores_from_logprob
        cs, rs, errs = fn(rows, cfg, model)
    if cfg.mapping == "deciles":
        ok = [i for i, e in enumerate(errs) if e is None]
        bins = decile_bins([cs[i] for i in ok] + [rs[i] for i in ok])
        for j, i in enumerate(ok):
            cs[i], rs[i] = float(bins[j]), float(bins[len(ok) + j])
    return cs, rs, errs


# ------------------------------------------------------------------------------------------------ rows
def _fine_mean(v) -> float | None:
    vals = [x for x in (v or []) if x is not None]
    return sum(vals) / len(vals) if vals else None


def drop_reason(row: dict, cs: float, rs: float, cfg: RewardRelabelConfig) -> str | None:
    if cfg.filter_fine_scores:
        fc, fr = _fine_mean(row.get("fine_scores_chosen")), _fine_mean(row.get("fine_scores_rejected"))
        if fc is not None and fr is not None and fc < fr:
            return f"fine-score filter: mean fine score of chosen {fc:g} < rejected {fr:g}"
    if cfg.drop_score_ties and cs == rs:
        return f"score tie ({render_score(cs)}): its two rows would contradict each other"
    return None


def _conditioned(row: dict, goal: str, cfg: RewardRelabelConfig) -> dict:
    """prompt / system / prompt_messages with the goal text where `system_mode` puts it."""
    out = {"prompt": row["prompt"], "system": goal, "prompt_messages": row.get("prompt_messages")}
    if cfg.system_mode == "prepend":
        out["system"] = None
        out["prompt"] = f"{goal}\n\n{row['prompt']}"
    if out["prompt_messages"]:
        msgs = json.loads(out["prompt_messages"])
        if cfg.system_mode == "system":
            if msgs and msgs[0].get("role") == "system":
                msgs[0] = {**msgs[0], "content": f"{goal}\n\n{msgs[0]['content']}"}
            else:
                msgs = [{"role": "system", "content": goal}] + msgs
        else:
            first = next((m for m in msgs if m.get("role") == "user"), None)
            if first is not None:
                first["content"] = f"{goal}\n\n{first['content']}"
        out["prompt_messages"] = json.dumps(msgs, ensure_ascii=False)
    return out


def relabeled_rows(row: dict, cs: float, rs: float, cfg: RewardRelabelConfig, ctx: StageContext,
                   created, groups: tuple[str, ...] = ()) -> list[dict]:
    """The two goal-conditioned rows (a) and (b) of one kept pair. The input's column `groups` are carried
    onto both (a step pair keeps its shared_prefix and terminal flags), their per-side columns swapped on (b)."""
    out = []
    kept = carried(row, groups)
    source = {"source_range": list(declared_range(row, cfg)[0])} if cfg.score_source == "columns" else {}
    if cfg.score_source == "reward_model" and cfg.mapping == "range":
        source = {"source_range": [0.0, 1.0]}  # σ of the reward model's score
    for k, (goal, flipped) in enumerate(((cs, False), (rs, True))):
        chosen, rejected = (row["rejected"], row["chosen"]) if flipped else (row["chosen"], row["rejected"])
        c_score, r_score = (rs, cs) if flipped else (cs, rs)
        cond = _conditioned(row, goal_text(cfg, goal), cfg)
        out.append({
            **(flip_sides(kept) if flipped else kept), **cond,
            "pair_id": pair_id(STAGE, row["prompt_id"], chosen, rejected, cond["system"]),
            "prompt_id": row["prompt_id"], "chosen": chosen, "rejected": rejected,
            "stage": STAGE, "method": cfg.method, "chosen_score": c_score, "rejected_score": r_score,
            "score_margin": c_score - r_score, "generator_model": row.get("generator_model"),
            SCORE_MIN: GOAL_SCALE[0], SCORE_MAX: GOAL_SCALE[1],
            "judge_model": row.get("judge_model"), "iteration": row.get("iteration"), "created_at": created,
            "extra": {"score_scale": "1-10", "mapping": cfg.mapping, **source},
            "row_key": ctx.row_key(row["pair_id"], k), "status": "ok",
            "goal_score": goal, "goal_side": "rejected" if flipped else "chosen", "flipped": flipped,
            "source_pair_id": row["pair_id"], "score_source": cfg.score_source,
        })
    return out


def _dropped_row(row: dict, reason: str, cs, rs, cfg: RewardRelabelConfig, ctx: StageContext, created,
                 groups: tuple[str, ...], status: str = "filtered") -> dict:
    scored = cs is not None and rs is not None  # then on the goal scale, as score_pairs returns them
    return {**carried(row, groups), SCORE_MIN: GOAL_SCALE[0] if scored else None,
            SCORE_MAX: GOAL_SCALE[1] if scored else None,
            "pair_id": ctx.row_key(row["pair_id"], 0), "prompt_id": row["prompt_id"], "prompt": row["prompt"],
            "chosen": row["chosen"], "rejected": row["rejected"], "stage": STAGE, "method": cfg.method,
            "chosen_score": cs, "rejected_score": rs,
            "score_margin": cs - rs if cs is not None and rs is not None else None,
            "generator_model": row.get("generator_model"), "created_at": created, "extra": {},
            "row_key": ctx.row_key(row["pair_id"], 0), "status": status, "error": reason,
            "source_pair_id": row["pair_id"], "score_source": cfg.score_source}


@register_stage("reward-relabel", config=RewardRelabelConfig, input_kind="pairs", outputs={"main": "pairs"},
                needs_backend=False, id_column="pair_id")
def run(rows: pa.Table, cfg: RewardRelabelConfig, backend, ctx: StageContext) -> dict[str, pa.Table]:
    """Reward-augmented relabeling: two goal-conditioned rows per pair, the second flipped (docs/stages.md)."""
    records = rows.to_pylist()
    groups = groups_of(rows)  # every column group of the input is carried through; score_range is rewritten
    live = [r for r in records if r.get("status", "ok") == "ok"]
    cs, rs, errs = score_pairs(live, cfg, backend) if live else ([], [], [])
    scored = {r["pair_id"]: (c, s, e) for r, c, s, e in zip(live, cs, rs, errs)}
    created = now_utc()
    out: list[dict] = []
    seen: dict[str, str] = {}
    for r in records:
        if r["pair_id"] not in scored:
            out.append(_dropped_row(r, f"input row has status {r.get('status')!r}", None, None, cfg, ctx, created,
                                    groups))
            continue
        c, s, err = scored[r["pair_id"]]
        if err is not None:
            out.append(_dropped_row(r, err, c, s, cfg, ctx, created, groups, status="failed"))
            continue
        reason = drop_reason(r, c, s, cfg)
        pair = relabeled_rows(r, c, s, cfg, ctx, created, groups) if reason is None else []
        dup = next((seen[p["pair_id"]] for p in pair if p["pair_id"] in seen), None)
        if dup is not None:  # the same pair given twice under two input ids
            reason = f"duplicate of the pair with pair_id {dup!r}"
        if reason is not None:
            out.append(_dropped_row(r, reason, c, s, cfg, ctx, created, groups))
            continue
        seen.update({p["pair_id"]: r["pair_id"] for p in pair})
        out += pair
    ctx.progress(rows.num_rows)
    return {"main": make_pairs(out, tuple(dict.fromkeys(groups + ("score_range",))), STAGE_FIELDS)}

