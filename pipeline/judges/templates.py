"""The judge's prompt templates. Each ends by asking for a one-word (or one-number) answer, so the same
prompt serves the votes mode (the answer is parsed) and the logprobs mode (the answer's tokens are scored).
A template's version is its name plus a hash of its text; every verdict records it."""
from __future__ import annotations

import hashlib

from pydantic import BaseModel, ConfigDict, Field

POINTWISE = ("Rate the response to the question on this rubric: {rubric}\n\nQuestion: {question}\n\n"
             "Response: {response}\n\nGive one whole number from {low} to {high}. Reply with only the number.")
PAIRWISE = ("Which response answers the question better?\n\nQuestion: {question}\n\nResponse A: {a}\n\n"
            "Response B: {b}\n\nReply with only the letter A or B.")
STEP = ("Problem: {question}\n\nSteps so far:\n{prefix}\n\nNext step: {step}\n\nGiven the steps so far, is the "
        "next step correct? Reply with only Yes or No.")
YES_NO = "{question}\n\nReply with only Yes or No."
ARGUES_FOR = ("Question: {question}\n\nResponse A: {a}\n\nResponse B: {b}\n\nExplanation: {text}\n\n"
              "Which response does the explanation argue is better? Reply with only the letter A or B.")


class JudgeTemplates(BaseModel):
    """Judge prompt templates (YAML `templates:` under a judge); they go into the stage's fingerprint."""

    model_config = ConfigDict(extra="forbid")
    pointwise: str = Field(POINTWISE, description="{rubric} {question} {response} {low} {high}")
    pairwise: str = Field(PAIRWISE, description="{question} {a} {b}; answer A or B")
    step: str = Field(STEP, description="{question} {prefix} {step}; answer Yes or No (PRISM step judge)")
    yes_no: str = Field(YES_NO, description="{question}; answer Yes or No")
    argues_for: str = Field(ARGUES_FOR, description="{question} {a} {b} {text}: which side a text argues for")

    def version(self, name: str) -> str:
        return template_version(name, getattr(self, name))


def template_version(name: str, text: str) -> str:
    return f"{name}-{hashlib.sha1(text.encode()).hexdigest()[:8]}"
