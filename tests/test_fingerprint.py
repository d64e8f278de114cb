"""A stage's fingerprint seeds its shards and keys its rows. An option added in a later version, at its default,
leaves the fingerprint as it was, so existing runs resume and reproduce after an upgrade; set, it counts."""
from __future__ import annotations

import stages.catalog  # noqa: F401  (registers the stages)
from pipeline.engine import stage_fingerprint
from pipeline.fingerprint import fingerprint, fingerprint_inputs
from pipeline.stage import ADDED_LATER, get_stage


def _without_added_later(cfg) -> str:
    """The fingerprint the stage had before its ADDED_LATER fields existed."""
    fields = type(cfg).model_fields
    old = {k: v for k, v in cfg.model_dump(mode="json").items() if fields[k].json_schema_extra != ADDED_LATER}
    return fingerprint(fingerprint_inputs("tree-search", cfg.version, old, sampling=cfg.sampling(),
                                          templates=cfg.templates()))


def test_fields_added_later_leave_the_fingerprint_at_their_default():
    spec = get_stage("tree-search")
    added = [k for k, f in spec.config.model_fields.items() if f.json_schema_extra == ADDED_LATER]
    assert added == ["list_score", "list_rubric", "list_scale"]
    default = spec.config(variant="best_first", value_fn="step_verifier")
    assert stage_fingerprint(spec, default, None)[0] == _without_added_later(default)


def test_a_field_added_later_counts_once_set():
    spec = get_stage("tree-search")
    base = spec.config(variant="tpo_list")
    for change in ({"list_rubric": "how short the response is"}, {"list_scale": (0, 5)}):
        changed = spec.config(variant="tpo_list", **change)
        assert stage_fingerprint(spec, changed, None)[0] != stage_fingerprint(spec, base, None)[0], change
