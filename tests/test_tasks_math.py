"""The `math` task: answers checked with math-verify (equivalences accepted, corrupted answers rejected) and
GSM8K / MATH / custom column conventions read from files."""
from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.errors import InputError
from pipeline.tasks.math_task import extract_answer, last_boxed
from pipeline.tasks.registry import get_task, item_for_row

# (response, gold): each pair is the same answer in another form.
EQUIVALENT = [
    ("Janet sells 16 - 3 - 4 = 9 eggs and makes 9 * 2 = $18 every day.\n#### 18", "18"),  # GSM8K ####
    ("#### 1,080", "1080"),
    ("The answer is $\\frac{1}{2}$.", "0.5"),                     # LaTeX fraction vs decimal
    ("So we get \\boxed{\\frac{1}{2}}.", "1/2"),                  # boxed LaTeX vs slash fraction
    ("so \\boxed{\\dfrac{3}{4}}.", "0.75"),
    ("The answer is 0.75.", "\\frac{3}{4}"),                      # decimal vs LaTeX gold
    ("The discount is 25%.", "0.25"),                             # percent vs share
    ("The discount is 25\\%.", "25"),                             # LaTeX percent
    ("Answer: -7", "-7"),                                         # negative
    ("It dropped to -3.5 degrees.", "-7/2"),                      # negative decimal vs fraction, in prose
    ("She has 1,000 stickers.", "1000"),                          # thousands separator, in prose
    ("\\boxed{3.50}", "3.5"),                                     # trailing zero
    ("the answer is x = 4", "4"),                                 # an equation's right side
    ("\\boxed{2\\sqrt{2}}", "\\sqrt{8}"),                         # simplified radical
    ("\\boxed{\\{1, 2\\}}", "\\{2, 1\\}"),                        # sets, any order
    ("\\boxed{(1, 2]}", "(1,2]"),                                 # interval
    ("The answer is 6 apples.", "6"),                             # unit word after the number
]
# (response, gold): the answer corrupted.
CORRUPTED = [
    ("#### 19", "18"),
    ("So we get \\boxed{\\frac{1}{3}}.", "0.5"),
    ("Answer: 7", "-7"),
    ("She has 100 stickers.", "1000"),
    ("\\boxed{(1, 2)}", "(1,2]"),
    ("\\boxed{\\{1, 3\\}}", "\\{2, 1\\}"),
    ("\\boxed{2\\sqrt{3}}", "\\sqrt{8}"),
    ("I do not know.", "5"),
]


@pytest.fixture(scope="module")
def task():
    return get_task("math")


@pytest.mark.parametrize("response,gold", EQUIVALENT)
def test_equivalent_answers_accepted(task, response, gold):
    assert task.check(response, {"gold_answer": gold}).correct


@pytest.mark.parametrize("response,gold", CORRUPTED)
def test_corrupted_answers_rejected(task, response, gold):
    c = task.check(response, {"gold_answer": gold})
    assert (c.correct, c.score) == (False, 0.0)


def test_extraction_order():
    assert extract_answer("I think 3.\n#### 4") == "4"                       # #### beats any number
    assert extract_answer("1 + 1 = 2, so \\boxed{2} and 7 more") == "2"     # boxed beats the last number
    assert extract_answer("Step 1: 2+2=4\nThe answer is 4.") == "4"
    assert last_boxed("\\boxed{\\frac{1}{\\sqrt{2}}}") == "\\frac{1}{\\sqrt{2}}"  # nested braces
    assert extract_answer("no digits") is None


def _jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_gsm8k_columns_without_mapping(tmp_path, task):
    f = _jsonl(tmp_path / "gsm.jsonl", [
        {"question": "Tom has 3 apples and buys 4. How many?", "answer": "3 + 4 = <<3+4=7>>7\n#### 7"},
        {"question": "Ana has 10 dollars and spends 2.5. How much is left?", "answer": "10 - 2.5 = 7.5\n#### 7.5"}])
    t = task.load(f)
    assert t.column("gold_answer").to_pylist() == ["7", "7.5"]
    assert t.column("prompt").to_pylist()[0] == "Tom has 3 apples and buys 4. How many?"
    row = t.to_pylist()[1]
    assert item_for_row(row).task.name == "math"          # the row names its task in meta
    assert item_for_row(row).correct("She has $7.50 left.") and not item_for_row(row).correct("7.25")


def test_math_columns_and_level_from_parquet(tmp_path, task):
    pq.write_table(pa.table({"problem": ["Compute 1/2 + 1/4.", "What is 2^3?"],
                             "solution": ["We add: $\\boxed{\\frac{3}{4}}$.", "It is $\\boxed{8}$."],
                             "level": ["Level 2", "Level 1"]}), tmp_path / "m.parquet")
    t = task.load(tmp_path / "m.parquet", limit=1)
    assert t.num_rows == 1
    assert t.to_pylist()[0]["gold_answer"] == "\\frac{3}{4}" and t.to_pylist()[0]["difficulty"] == "Level 2"
    assert task.check("The sum is 0.75", t.to_pylist()[0]).correct


def test_named_columns_and_errors(tmp_path, task):
    f = _jsonl(tmp_path / "own.jsonl", [{"q": "2+2?", "a": "4"}, {"q": "3+3?", "a": " "}])
    with pytest.raises(InputError, match="no known question/answer columns"):
        task.load(f)
    with pytest.raises(InputError) as e:
        task.load(f, prompt_column="q", answer_column="a")
    assert (e.value.row, e.value.column) == (2, "a") and "empty answer" in str(e.value)
    t = task.load(f, prompt_column="q", answer_column="a", limit=1)
    assert t.column("gold_answer").to_pylist() == ["4"]
