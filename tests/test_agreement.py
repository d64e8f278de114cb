"""pipeline/agreement.py: the one label-vs-verifier count (report, self-label's label_report, tree quality)."""
from pipeline.agreement import label_agreement


def test_each_verdict_kind_is_counted_and_unknown_sides_are_skipped():
    verdicts = [(True, False), (True, False), (False, True), (True, True), (False, False), (None, True),
                (True, None)]
    assert label_agreement(verdicts) == {"agree": 2, "inverted": 1, "both_right": 1, "both_wrong": 1, "n": 5,
                                         "agree_share": 0.4}


def test_nothing_counted_is_none():
    assert label_agreement([]) is None and label_agreement([(None, None)]) is None
