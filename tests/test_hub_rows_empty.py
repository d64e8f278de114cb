"""Export on outputs the SmolLM2 all-stages run made (#25): a pairs file with no ok rows and no terminal-flag
columns (deliberation with every pair filtered) gives an empty boolean step mask, not a null one that `invert`
cannot take; an output without `extra` (SFT generations) still gives the card's task hint."""
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


def test_task_hint_reads_outputs_without_an_extra_column():
    """The card's task hint reads prompt ids and `extra`; SFT generations (deliberation's CoT rows) have no
    `extra`: their ids alone decide."""
    from types import SimpleNamespace

    from pipeline.hub import _task_hint

    def store_of(batch):
        return SimpleNamespace(stage=lambda name: SimpleNamespace(iter_batches=lambda *a, **k: iter([batch])))

    gen = SimpleNamespace(stage="deliberation", output="sft")
    arith = pa.RecordBatch.from_pydict({"prompt_id": ["arith-1", "arith-2"]})
    plain = pa.RecordBatch.from_pydict({"prompt_id": ["gen-000"]})
    assert _task_hint(store_of(arith), [gen]) == "arith"
    assert _task_hint(store_of(plain), [gen]) is None
