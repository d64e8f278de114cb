"""Export planning on a pairs file with no ok rows and no terminal-flag columns (deliberation's pairs when every
pair was filtered, found by the SmolLM2 all-stages run): the step mask is an empty boolean array, not a null one
that `invert` cannot take."""
import pyarrow as pa
import pyarrow.compute as pc

from pipeline.hub_rows import step_rows


def test_step_rows_of_an_empty_table_without_flags_is_boolean():
    empty = pa.table({"prompt_id": pa.array([], pa.string()), "status": pa.array([], pa.string())})
    mask = step_rows(empty)
    assert mask.type == pa.bool_() and len(mask) == 0
    assert pc.invert(mask).to_pylist() == []
    two = pa.table({"prompt_id": ["a", "b"]})
    assert pc.invert(step_rows(two)).to_pylist() == [True, True]
