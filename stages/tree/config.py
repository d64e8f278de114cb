"""Typed settings of Stage 1. Defaults follow the papers (docs/stages.md; PRISM's numbers where it has them, scaled
down for small models: 32-64 MCTS iterations). All fields are flat so each one is a `prefpipe stage tree-search`
option; lists come from the YAML file."""
from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator

from pipeline.backends.base import SamplingParams
from pipeline.config_io import NonEmptyStr
from pipeline.judges.config import JudgeConfig
from pipeline.stage import ADDED_LATER


class SearchConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    variant: Literal["mcts", "best_first", "tpo_list"] = Field(
        "mcts", description="mcts: PRISM MCTS; best_first: Tree-PLV best-first; tpo_list: TPO ranked lists")
    value_fn: Literal["rollout", "step_verifier", "logprob", "reward_model", "judge"] = Field(
        "rollout", description="node value: rollout = share of rollouts reaching the gold answer (terminals: "
                               "answer check); step_verifier = exact task step check; logprob = exp(mean token "
                               "log-prob) of the response; reward_model = sigmoid of a reward model's score of "
                               "prompt + prefix + step (value_model; terminals with a gold answer: answer check); "
                               "judge = P(step correct | problem, steps before it) from an LLM judge (PRISM's "
                               "step judge; `judge`; terminals with a gold answer: answer check)")
    judge: JudgeConfig | None = Field(None, description="value_fn judge: the step judge; list_score judge: the list "
                                                        "judge (YAML; None: the policy's own backend, log-probs when "
                                                        "it has them, else votes)")
    list_score: Literal["verifier", "judge", "reward_model"] = Field(
        "verifier", description="tpo_list: what ranks a list's responses (TPO's preference-list labels). verifier: "
                                "the task's graded check (right share before the first wrong step; else the answer "
                                "check, else the node value), on [0, 1]; judge: a pointwise judge score "
                                "(`judge`, `list_rubric`) on `list_scale`; reward_model: sigmoid of the reward "
                                "model's score (`value_model`) on [0, 1]. Lists declare the scale as "
                                "score_min/score_max, the range the TPO loss maps its labels from",
        json_schema_extra=ADDED_LATER)
    list_rubric: str = Field("how correct, complete and clearly reasoned the response is",
                             description="list_score judge: the rubric of the pointwise score",
                             json_schema_extra=ADDED_LATER)
    list_scale: tuple[int, int] = Field((1, 10), validate_default=True,
                                        description="list_score judge: the judge's integer scale",
                                        json_schema_extra=ADDED_LATER)
    value_model: str | None = Field(
        None, validate_default=True, description="value_fn / list_score reward_model: the reward-model folder "
        "(AutoModelForSequenceClassification, e.g. from `prefpipe train --mode reward`)")
    # --- search shape
    expansion_width: int = Field(3, ge=1, description="continuations sampled per expansion (PRISM width)")
    max_depth: int = Field(8, ge=1, description="deepest step a node may have")
    iterations: int = Field(24, ge=1, description="MCTS iterations per tree (PRISM: 200; 32-64 suit small models)")
    ucb_c: float = Field(1.5, ge=0, description="UCB exploration constant c")
    visit_all_nodes: bool = Field(True, description="MCTS finalisation: evaluate every unvisited node once")
    rollouts: int = Field(8, ge=1, description="rollouts per node for the rollout value (Tree-PLV N)")
    best_first_k: int = Field(4, ge=1, description="candidate next steps per best-first expansion")
    expansion_budget: int = Field(0, ge=0, description="best-first expansions per tree (0: 2 x max_depth)")
    stop_at_terminal: bool = Field(False, description="best-first: stop a tree when a terminal node is popped "
                                                      "(Tree-PLV); off keeps expanding until the budget")
    num_branches: int = Field(3, ge=1, description="tpo_list: continuations branched off the gold prefix")
    list_samples: int = Field(2, ge=0, description="tpo_list: free samples from the root added to each list")
    # --- sampling (PRISM: T 0.8, top_p 0.9, top_k 50)
    temperature: float = Field(0.8, ge=0, description="sampling temperature of steps and rollouts")
    top_p: float = Field(0.9, gt=0, le=1, description="nucleus mass")
    top_k: int = Field(50, ge=0, description="top-k (0: off)")
    greedy_first: bool = Field(False, description=(
        "each expansion's first candidate is decoded greedily (temperature 0), the others are sampled: the greedy "
        "child is the policy's own likeliest next step, so a wrong one is a mistake the policy makes"))
    branch_on_error: bool = Field(False, description=(
        "with greedy_first: sample the other candidates only where the greedy step fails the task's step check "
        "(a greedy line everywhere else, siblings where the policy errs)"))
    step_max_tokens: int = Field(64, ge=1, description="most new tokens of one step")
    rollout_max_tokens: int = Field(256, ge=1, description="most new tokens of a rollout / full response")
    step_stop: list[NonEmptyStr] = Field(default_factory=lambda: ["\n"], description="strings that end a step")
    step_join: str = Field("\n", description="string between steps in a response")
    terminal_regex: str = Field(r"^\s*Answer\s*:", description="a step matching this ends the response")

    @field_validator("value_model")
    @classmethod
    def _model_needs_reward_fn(cls, v: str | None, info: ValidationInfo) -> str | None:
        # value_fn and list_score are declared (so validated) first
        wanted = "reward_model" in (info.data.get("value_fn"), info.data.get("list_score"))
        if (v is None) == wanted:
            raise ValueError("value_model goes with value_fn: reward_model or list_score: reward_model, and each "
                             "needs a value_model")
        # checked here, at load, so a typo fails before the policy loads and the first round is generated.
        # `@ARM` is a run config's training arm (its folder exists only once the arm has trained; flows/config.py
        # checks the name, and the run step passes the arm's folder in its place).
        if v is not None and not v.startswith("@") and not (Path(v) / "config.json").is_file():
            why = "is not a model folder (no config.json)" if Path(v).is_dir() else "does not exist"
            raise ValueError(f"reward-model folder {v!r} {why} (relative paths start at the working directory)")
        return v

    @field_validator("list_scale")
    @classmethod
    def _list_scale(cls, v: tuple[int, int], info: ValidationInfo) -> tuple[int, int]:
        if not v[0] < v[1]:
            raise ValueError(f"list_scale {list(v)}: low must be below high")
        if info.data.get("list_score", "verifier") != "verifier" and info.data.get("variant") != "tpo_list":
            raise ValueError(f"list_score {info.data['list_score']!r} scores TPO lists: it needs variant tpo_list")
        return v

    @field_validator("branch_on_error")
    @classmethod
    def _branch_needs_greedy_first(cls, v: bool, info: ValidationInfo) -> bool:
        if v and not info.data.get("greedy_first"):  # greedy_first is declared (so validated) first
            raise ValueError("branch_on_error needs greedy_first: true (it branches where the greedy step fails)")
        return v

    def step_sampling(self, seed: int) -> SamplingParams:
        return SamplingParams(temperature=self.temperature, top_p=self.top_p, top_k=self.top_k,
                              max_tokens=self.step_max_tokens, stop=list(self.step_stop), seed=seed)

    def rollout_sampling(self, seed: int) -> SamplingParams:
        return SamplingParams(temperature=self.temperature, top_p=self.top_p, top_k=self.top_k,
                              max_tokens=self.rollout_max_tokens, seed=seed)


class MiningConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    step_pairs: Literal["auto", "first_wrong_step", "prism_sibling", "value_gap", "none"] = Field(
        "auto", description="step-level sibling pairs. auto: first_wrong_step when the task has a step "
                            "verifier, else prism_sibling (mcts) or value_gap (best_first). first_wrong_step "
                            "on a task without one labels steps by rollouts (right: a rollout from it reached "
                            "the gold; budget: `rollouts`)")
    terminal_pairs: bool = Field(True, description="PRISM terminal mode: right vs wrong full responses")
    list_pairs: bool = Field(True, description="tpo_list trees: a (best, worst) pair per list (TPO's DPO baseline)")
    v_threshold: float = Field(0.4, ge=0, description="PRISM: min Q gap of a sibling pair; a wrong terminal has "
                                                      "reward <= good_value_threshold - v_threshold")
    good_value_threshold: float = Field(0.8, description="PRISM: min Q of a chosen sibling / reward of a right "
                                                         "terminal (value scale [-1, 1])")
    min_visits: int = Field(1, ge=0, description="PRISM: a non-terminal sibling needs this many visits")
    max_gb_ratio: int = Field(4, ge=1, description="PRISM: most times the shorter terminal list is tiled")
    value_gap_alpha: float = Field(0.375, ge=0, description="Tree-PLV: min success-rate gap of a step pair")
    step_min_margin: float = Field(0.375, ge=0, description=(
        "first_wrong_step: min gap of the [0, 1] scores (rollout shares); the stage aims at validity >= 0.9 "
        "at Tree-PLV's alpha = 0.375. 0 keeps every verified pair (the step verifier alone decides)"))
    step_rejected: Literal["any", "greedy"] = Field(
        "any", description="first_wrong_step: which wrong siblings may be the rejected side. greedy: only the "
                           "greedy child (needs greedy_first), so every rejected line is the policy's own mistake")
    tie_policy: Literal["drop", "keep"] = Field(
        "drop", description="a pair (or list) whose chosen and rejected scores are equal: drop or keep")
    require_verified: bool = Field(True, description="with a gold answer / step verifier: chosen must verify "
                                                     "(every step, when steps can be checked), rejected must not")
    list_size: int = Field(5, ge=2, description="most responses in a ranked list")
    validity_rollouts: int = Field(8, ge=0, description="fresh rollouts per side to re-check each step pair "
                                                        "(0: skip the validity check)")
