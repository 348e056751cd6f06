"""Per-sample routing to one of several teachers by a field of the training rows (issue 14).

Checked when the run is built, before any model loads: a row naming no known teacher, or
naming none while `fusion.default` is unset, is one loud error naming the row and the
teachers there are."""

from __future__ import annotations

from protege.data import DataError, Row
from protege.fusion_config import FusionConfig


def row_routes(rows: list[Row], names: list[str], fusion: FusionConfig) -> list[int]:
    """Each row's teacher, as an index into `names` (config order)."""
    index = {name: i for i, name in enumerate(names)}
    routes = []
    for number, row in enumerate(rows, start=1):
        named = row.extra.get(fusion.field, fusion.default)
        if named is None:
            raise DataError(
                f"{row.where or f'row {number}'}: fusion.mode=route, but the row has no "
                f"{fusion.field!r} field naming its teacher (one of {names}) and "
                "fusion.default is not set; add the field to every row, or set "
                "fusion.default=<teacher name> for the rows without it"
            )
        if named not in index:
            raise DataError(
                f"{row.where or f'row {number}'}: {fusion.field}={named!r} is not one of the "
                f"teachers {names}; fix the row, or name the teacher in teachers.N.name"
            )
        routes.append(index[named])
    return routes


def row_labels(rows: list[Row], names: list[str], fusion: FusionConfig) -> list[int] | None:
    """fusion.mode=learned: each row's teacher label from the same field (-1 where a row has
    none), the router's diagnostic (`router/agreement`) and optional supervision; None when
    no row has one. A label naming no known teacher is an error, as for routing."""
    if not any(fusion.field in row.extra for row in rows) and fusion.default is None:
        return None
    labelled = [row for row in rows if row.extra.get(fusion.field, fusion.default) is not None]
    known = iter(row_routes(labelled, names, fusion))
    return [
        next(known) if row.extra.get(fusion.field, fusion.default) is not None else -1
        for row in rows
    ]
