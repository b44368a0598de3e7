"""Export the reviewed preference data as Parquet for other trainers.

Three formats, all built from :func:`hscr.preferences.load_preferences`, so reviewer edits (the
latest version wins), reranking, excluded answers and rejected samples are applied the same way
training applies them:

``trl``
    TRL's conversational vision preference format: ``prompt``, ``chosen`` and ``rejected``
    message lists and ``images`` (a list with the sample's image). One row per chosen/rejected
    pair, so a sample with three ranked rejected answers gives three rows.
``listwise``
    One row per sample with the HSCR data no public format holds: ``chosen``, the ordered
    ``rejected`` list (least wrong first), their ``similarities`` to the chosen answer, and the
    reference log-probs ``ref_chosen_logp`` and ``ref_rejected_logps`` (null where a reviewer
    edited the text, so a trainer must recompute them).
``rlaif-v``
    Rows shaped like the RLAIF-V dataset: ``image``, ``question``, ``chosen`` and ``rejected``
    as plain strings, with ``ds_name``, ``origin_dataset``, ``origin_split``, ``idx`` and
    ``image_path``. One row per pair.

Images are embedded as PNG bytes in the ``{"bytes", "path"}`` struct of the Hugging Face
``datasets`` Image feature, and the file carries the ``datasets`` feature metadata, so
``datasets.load_dataset("parquet", data_files=PATH)`` decodes them as PIL images.

    python -m hscr export --db data/hscr.duckdb --format trl --output prefs.parquet --reviewed-only
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, Callable

from hscr.errors import DataError, HSCRError
from hscr.preferences import PreferenceRow, load_preferences
from hscr.store import Store

logger = logging.getLogger(__name__)

FORMATS = ("trl", "listwise", "rlaif-v")


class _ImageBytes:
    """Read each stored image file once per export."""

    def __init__(self) -> None:
        self._cache: dict[str, dict[str, Any]] = {}

    def __call__(self, image_path: str) -> dict[str, Any]:
        if image_path not in self._cache:
            path = Path(image_path)
            try:
                data = path.read_bytes()
            except OSError as exc:
                raise DataError(f"cannot read stored image {path}: {exc.strerror}; re-import the dataset") from None
            self._cache[image_path] = {"bytes": data, "path": path.name}
        return self._cache[image_path]


def _message(role: str, text: str, with_image: bool = False) -> dict[str, Any]:
    content = [{"type": "image", "text": None}] if with_image else []
    content.append({"type": "text", "text": text})
    return {"role": role, "content": content}


def trl_rows(rows: list[PreferenceRow], image_bytes: Callable[[str], dict[str, Any]]) -> list[dict[str, Any]]:
    """Return TRL vision preference rows: one per (chosen, rejected) pair."""
    out = []
    for row in rows:
        image = image_bytes(row.image_path)
        prompt = [_message("user", row.question, with_image=True)]
        chosen = [_message("assistant", row.chosen)]
        for rejected in row.rejected:
            out.append({"prompt": prompt, "chosen": chosen, "rejected": [_message("assistant", rejected)], "images": [image]})
    return out


def listwise_rows(rows: list[PreferenceRow], image_bytes: Callable[[str], dict[str, Any]]) -> list[dict[str, Any]]:
    """Return one row per sample with the ordered rejected list, similarities and reference log-probs."""
    return [
        {
            "sample_id": row.sample_id,
            "dataset": row.dataset,
            "split": row.split,
            "image": image_bytes(row.image_path),
            "question": row.question,
            "answer_type": row.answer_type,
            "chosen": row.chosen,
            "rejected": list(row.rejected),
            "similarities": list(row.similarities),
            "ref_chosen_logp": row.ref_chosen_logp,
            "ref_rejected_logps": list(row.ref_rejected_logps),
            "run_id": row.run_id,
            "model": row.model,
        }
        for row in rows
    ]


def rlaif_v_rows(rows: list[PreferenceRow], image_bytes: Callable[[str], dict[str, Any]]) -> list[dict[str, Any]]:
    """Return RLAIF-V style rows with plain-string answers, one per pair."""
    out = []
    for row in rows:
        image = image_bytes(row.image_path)
        for rank, rejected in enumerate(row.rejected, start=1):
            out.append(
                {
                    "ds_name": "hscr",
                    "image": image,
                    "question": row.question,
                    "chosen": row.chosen,
                    "rejected": rejected,
                    "origin_dataset": row.dataset,
                    "origin_split": row.split,
                    "idx": f"{row.sample_id}-{rank}",
                    "image_path": image["path"],
                }
            )
    return out


def _schemas() -> dict[str, Any]:
    import pyarrow as pa

    image = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    content = pa.list_(pa.struct([("type", pa.string()), ("text", pa.string())]))
    messages = pa.list_(pa.struct([("role", pa.string()), ("content", content)]))
    return {
        "trl": pa.schema([("prompt", messages), ("chosen", messages), ("rejected", messages), ("images", pa.list_(image))]),
        "listwise": pa.schema(
            [
                ("sample_id", pa.string()), ("dataset", pa.string()), ("split", pa.string()), ("image", image),
                ("question", pa.string()), ("answer_type", pa.string()), ("chosen", pa.string()),
                ("rejected", pa.list_(pa.string())), ("similarities", pa.list_(pa.float64())),
                ("ref_chosen_logp", pa.float64()), ("ref_rejected_logps", pa.list_(pa.float64())),
                ("run_id", pa.string()), ("model", pa.string()),
            ]
        ),
        "rlaif-v": pa.schema(
            [
                ("ds_name", pa.string()), ("image", image), ("question", pa.string()), ("chosen", pa.string()),
                ("rejected", pa.string()), ("origin_dataset", pa.string()), ("origin_split", pa.string()),
                ("idx", pa.string()), ("image_path", pa.string()),
            ]
        ),
    }


def hf_features(arrow_type: Any) -> dict[str, Any] | Any:
    """Translate an Arrow type to the ``datasets`` feature description stored in Parquet metadata.

    A struct of exactly ``bytes`` and ``path`` becomes the Image feature.
    """
    import pyarrow as pa

    if pa.types.is_struct(arrow_type):
        names = [arrow_type.field(i).name for i in range(arrow_type.num_fields)]
        if names == ["bytes", "path"]:
            return {"_type": "Image"}
        return {name: hf_features(arrow_type.field(name).type) for name in names}
    if pa.types.is_list(arrow_type):
        return {"feature": hf_features(arrow_type.value_type), "_type": "List"}
    dtype = {"double": "float64", "float": "float32"}.get(str(arrow_type), str(arrow_type))
    return {"dtype": dtype, "_type": "Value"}


def write_parquet(records: list[dict[str, Any]], schema: Any, output: Path) -> Path:
    """Write records with ``datasets`` feature metadata, through a temporary file."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    features = {field.name: hf_features(field.type) for field in schema}
    schema = schema.with_metadata({"huggingface": json.dumps({"info": {"features": features}})})
    table = pa.Table.from_pylist(records, schema=schema)
    output.parent.mkdir(parents=True, exist_ok=True)
    tmp = output.with_name(output.name + ".tmp")
    pq.write_table(table, tmp)
    tmp.replace(output)
    return output


BUILDERS = {"trl": trl_rows, "listwise": listwise_rows, "rlaif-v": rlaif_v_rows}


def export(
    store: Store,
    fmt: str,
    output: str | Path,
    reviewed_only: bool = False,
    dataset: str | None = None,
) -> dict[str, Any]:
    """Write the effective preference data in ``fmt`` to ``output`` (a ``.parquet`` file).

    Returns ``{"format", "output", "samples", "rows"}``. Raises when there is nothing to export,
    naming the filter that removed everything.
    """
    if fmt not in FORMATS:
        raise HSCRError(f"unknown export format {fmt!r}; supported: {', '.join(FORMATS)}")
    output = Path(output)
    if output.suffix != ".parquet":
        raise HSCRError(f"invalid output {output}: the export writes Parquet, so name the file *.parquet")
    rows = load_preferences(store, reviewed_only=reviewed_only, dataset=dataset)
    if not rows:
        hint = "approve samples in the review view or drop --reviewed-only" if reviewed_only else (
            "run `python -m hscr generate` first"
        )
        scope = f"dataset {dataset!r}" if dataset else str(store.db_path)
        raise HSCRError(f"no preference data to export in {scope}; {hint}")
    records = BUILDERS[fmt](rows, _ImageBytes())
    write_parquet(records, _schemas()[fmt], output)
    logger.info("exported %d rows from %d samples as %s to %s", len(records), len(rows), fmt, output)
    return {"format": fmt, "output": str(output), "samples": len(rows), "rows": len(records)}
