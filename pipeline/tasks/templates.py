"""Word-problem templates for the bundled arithmetic task.

A template turns (start, ops) into a story. Every op sentence names the operand exactly once, so the problem's
content is fully determined by (start, ops); the template only changes the wording.
Placeholders: {who} (a name), {pron} (he/she), {poss} (his/her), {item} (plural noun), {n} (start), {k} (operand).
Op phrases start lower-case; the first one is capitalised, the later ones follow "Then ".
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Template:
    name: str
    intro: str
    phrases: dict[str, str]  # op symbol -> sentence fragment
    question: str
    items: tuple[str, ...] = ("things",)


PEOPLE: tuple[tuple[str, str, str], ...] = (
    ("Tom", "he", "his"), ("Ana", "she", "her"), ("Ravi", "he", "his"), ("Mia", "she", "her"),
    ("Leo", "he", "his"), ("Zoe", "she", "her"), ("Omar", "he", "his"), ("Lena", "she", "her"),
)

TEMPLATES: dict[str, Template] = {t.name: t for t in (
    Template(
        name="inventory",
        intro="{who} has {n} {item}.",
        phrases={"+": "{pron} buys {k} more {item}.", "-": "{pron} gives away {k} {item}.",
                 "*": "{pron} ends up with {k} times as many {item}.",
                 "/": "{pron} shares them equally among {k} friends and keeps one share."},
        question="How many {item} does {who} have now?",
        items=("apples", "marbles", "stickers", "pencils", "cards", "shells"),
    ),
    Template(
        name="money",
        intro="{who} has {n} dollars.",
        phrases={"+": "{pron} earns {k} dollars.", "-": "{pron} spends {k} dollars.",
                 "*": "{poss} money grows to {k} times as much.",
                 "/": "{pron} splits the money equally into {k} envelopes and keeps one."},
        question="How many dollars does {who} have now?",
    ),
    Template(
        name="bus",
        intro="A bus carries {n} passengers.",
        phrases={"+": "{k} people get on.", "-": "{k} people get off.",
                 "*": "the number of passengers becomes {k} times as large.",
                 "/": "only one in every {k} passengers stays on."},
        question="How many passengers are on the bus now?",
    ),
    Template(
        name="warehouse",
        intro="A warehouse stores {n} boxes.",
        phrases={"+": "a truck delivers {k} more boxes.", "-": "{k} boxes are shipped out.",
                 "*": "the stock is multiplied by {k}.",
                 "/": "the boxes are split evenly across {k} warehouses and this one keeps its share."},
        question="How many boxes are in the warehouse now?",
    ),
    Template(
        name="score",
        intro="{who} starts a game with {n} points.",
        phrases={"+": "{pron} wins {k} points.", "-": "{pron} loses {k} points.",
                 "*": "{poss} score is multiplied by {k}.", "/": "{poss} score is divided by {k}."},
        question="What is {who}'s score now?",
    ),
    Template(
        name="tank",
        intro="A tank holds {n} liters of water.",
        phrases={"+": "{k} liters are added.", "-": "{k} liters are drained.",
                 "*": "the amount of water is multiplied by {k}.",
                 "/": "the water is shared equally among {k} tanks and we follow one of them."},
        question="How many liters are in the tank now?",
    ),
    # Two terse templates: short prompts keep a char-level policy's sequences short (the tiny preset uses them).
    Template(
        name="compact",
        intro="Start with {n}.",
        phrases={"+": "add {k}.", "-": "subtract {k}.", "*": "multiply by {k}.", "/": "divide by {k}."},
        question="What is the result?",
    ),
    Template(
        name="think",
        intro="{who} thinks of {n}.",
        phrases={"+": "{pron} adds {k}.", "-": "{pron} takes away {k}.", "*": "{pron} multiplies it by {k}.",
                 "/": "{pron} divides it by {k}."},
        question="What number does {who} have now?",
    ),
)}


def render(template: Template, start: int, ops: list[tuple[str, int]], person: tuple[str, str, str],
           item: str) -> str:
    """The question text for (start, ops) in this template's wording."""
    who, pron, poss = person
    fill = dict(who=who, pron=pron, poss=poss, item=item)
    parts = [template.intro.format(n=start, **fill)]
    for i, (op, k) in enumerate(ops):
        s = template.phrases[op].format(k=k, **fill)
        parts.append(s[0].upper() + s[1:] if i == 0 else "Then " + s)
    parts.append(template.question.format(**fill))
    return " ".join(parts)
