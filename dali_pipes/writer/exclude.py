"""The list of images that a repack leaves out on purpose (``tools.repack --exclude excluded.csv``).

The file is what ``tools.clean`` writes: a CSV with at least the columns ``product_id`` and ``image_index``
(the image's position in the product's BSON document, as in the records and in quarantine.csv) and
optionally ``reason``. Each listed image is left out of every split and listed in quarantine.csv with the
reason ``excluded: <reason>`` (``excluded: listed in <file>`` without a reason column).
"""
from __future__ import annotations

import csv
import os
from typing import Dict

REQUIRED = ("product_id", "image_index")


class ExcludeError(ValueError):
    """An exclude list that cannot be used; the message names the file and the line."""


def read_exclude(path: str) -> Dict[int, Dict[int, str]]:
    """``{product_id: {image_index: quarantine reason}}`` of the listed images."""
    if not os.path.isfile(path):
        raise ExcludeError(f"{path}: no such file; pass the excluded.csv written by `python -m tools.clean`")
    out: Dict[int, Dict[int, str]] = {}
    default = f"listed in {os.path.basename(path)}"
    with open(path, newline="", encoding="utf-8-sig") as f:
        reader = csv.DictReader(f)
        missing = [c for c in REQUIRED if c not in (reader.fieldnames or [])]
        if missing:
            raise ExcludeError(f"{path}: no column {', '.join(missing)}; an exclude list needs the columns "
                               "product_id,image_index (as tools.clean writes them)")
        for line, row in enumerate(reader, start=2):
            try:
                pid, j = int(row["product_id"]), int(row["image_index"])
            except (TypeError, ValueError):
                raise ExcludeError(f"{path}:{line}: product_id {row['product_id']!r} and image_index "
                                   f"{row['image_index']!r} must be integers") from None
            if j < 0:
                raise ExcludeError(f"{path}:{line}: product {pid}: image_index {j} is negative")
            out.setdefault(pid, {})[j] = "excluded: " + ((row.get("reason") or "").strip() or default)
    return out
