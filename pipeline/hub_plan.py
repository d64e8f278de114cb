"""Which configs an export holds: one or more per stage output, plus the SFT configs.

    <stage>[-<output>]            pairs (terminal) or ranked lists, conversational or standard
    <stage>[-<output>]-steps      step pairs (a verified prefix, then one step): standard format, prefix in prompt
    <stage>[-<output>]            generations (deliberation's chain-of-thought rows): SFT `messages`
    <intervention stage>-sft      intervention's corrected solutions (the chosen sides): SFT `messages`
    gold-sft                      the task's gold solutions (the run's inputs/prompts.parquet `gold`): `messages`
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipeline.hub_card import StageInfo
from pipeline.hub_out import check_name, inside
from pipeline.hub_rows import Renderer, list_rows, pair_rows, sft_rows, step_rows
from pipeline.store import RunStore

EXPORT_KINDS = ("pairs", "lists", "generations")
GOLD_INPUTS = Path("inputs") / "prompts.parquet"
KEY_COLUMNS = ("prompt_id", "status", "chosen_is_terminal", "rejected_is_terminal")


@dataclass
class Source:
    """One config: which ok store rows it takes (`pick`, a mask over them) and how they become export rows."""

    name: str
    stage: str
    output: str              # the stage output ("" for the gold inputs)
    kind: str                # pairs | lists | sft: the card's statistics
    format: str              # conversational | standard | step | messages
    pick: Callable[[pa.Table], pa.Array]
    convert: Callable[[pa.Table], pa.Table]


def config_name(stage: str, output: str) -> str:
    return stage if output == "main" else f"{stage}-{output}"


def _everything(t: pa.Table) -> pa.Array:
    return pa.array([True] * t.num_rows, pa.bool_())  # typed: an empty shard's mask must still be boolean


def _terminal_chosen(t: pa.Table) -> pa.Array:
    if "chosen_is_terminal" not in t.column_names:
        return _everything(t)
    return pc.fill_null(t.column("chosen_is_terminal"), True).combine_chunks()


def stage_sources(info: StageInfo, output: str, renderer: Renderer, conversational: bool) -> list[Source]:
    kind, base = info.outputs[output], config_name(info.name, output)
    check_name(output, "output name", file=f"{info.name}/manifest.json")
    if kind == "lists":
        return [Source(base, info.name, output, "lists", "conversational" if conversational else "standard",
                       _everything, lambda t: list_rows(t, renderer, conversational))]
    if kind == "generations":
        return [Source(base, info.name, output, "sft", "messages", _everything,
                       lambda t: sft_rows(t, "text", f"{info.name}:{output}", info.name))]
    out = [Source(base, info.name, output, "pairs", "conversational" if conversational else "standard",
                  lambda t: pc.invert(step_rows(t)), lambda t: pair_rows(t, renderer, conversational, False)),
           Source(f"{base}-steps", info.name, output, "pairs", "step", step_rows,
                  lambda t: pair_rows(t, renderer, conversational, True))]
    if info.fingerprint_inputs.get("stage") == "intervention" and output == "main":
        out.append(Source(f"{info.name}-sft", info.name, output, "sft", "messages", _terminal_chosen,
                          lambda t: sft_rows(t, "chosen", "intervention:corrected", info.name)))
    return out


def gold_source(run_dir: Path) -> Source | None:
    """The bundled task's gold solutions, when the run's inputs carry them."""
    path = run_dir / GOLD_INPUTS
    if not path.is_file() or not {"prompt_id", "prompt", "gold"} <= set(pq.read_schema(path).names):
        return None
    return Source("gold-sft", "inputs", "", "sft", "messages", _everything,
                  lambda t: sft_rows(t, "gold", "gold", "inputs"))


def source_files(store: RunStore, src: Source, run_dir: Path) -> list[Path]:
    """The parquet files a config reads; manifest paths must stay inside their stage folder."""
    if not src.output:
        return [run_dir / GOLD_INPUTS]
    st = store.stage(src.stage)
    manifest = str(st.manifest_path)
    shards = st.manifest()["shards"]
    rels = [s["files"][src.output] for _, s in sorted(shards.items(), key=lambda kv: int(kv[0]))
            if src.output in s["files"]]
    return [inside(st.dir, Path(r), "shard path", manifest) for r in rels]


def key_table(files: list[Path]) -> pa.Table:
    """The few columns the plan needs (ids, status, terminal flags) of every file, small enough to hold whole."""
    tables = []
    for f in files:
        names = pq.read_schema(f).names
        t = pq.read_table(f, columns=[c for c in KEY_COLUMNS if c in names])
        if "status" not in t.column_names:
            t = t.append_column("status", pa.array(["ok"] * t.num_rows))
        tables.append(t)
    return pa.concat_tables(tables, promote_options="default") if tables else pa.table({"prompt_id": [],
                                                                                           "status": []})
