"""How values become CSV cells and JSON values in every file stn-deploy writes.

The policy, in one place (stn-infer's rows, ``--json`` reports):

* **Missing or not finite.** ``None``, NaN and ±Infinity are written as JSON ``null`` and as
  an empty CSV cell. Strict JSON has no NaN/Infinity, and a bare ``NaN`` would make every
  strict parser reject the whole line or report.
* **Numbers** are written as numbers (``repr`` of the float or int), never quoted or escaped.
* **Text** (paths, labels, error messages) is made writable as UTF-8: a path that is not valid
  UTF-8 (decoded by ``os.fsdecode`` into lone surrogates) shows its undecodable bytes as
  ``\\xNN``. In CSV, a text cell that a spreadsheet would run as a formula (one starting with
  ``=``, ``+``, ``-``, ``@``, a tab or a carriage return), or that starts with an apostrophe, gets
  a leading apostrophe: spreadsheets then show it as text, and :func:`csv_text_value` undoes it.
  A cell holding a comma, a double quote, a newline or a carriage return is quoted (RFC 4180,
  :func:`csv_line`), so every row is one record for any CSV reader.

Torch-free: the runtime and stn-infer use it.
"""

from __future__ import annotations

import math
from typing import Any

# First characters that make Excel, LibreOffice or Google Sheets evaluate a cell (OWASP's list),
# and the apostrophe itself, so that the escape can be undone unambiguously.
FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r", "'")


def text(value: Any) -> str:
    """``value`` as a str that encodes to UTF-8 (lone surrogates from ``os.fsdecode`` become ``\\xNN``)."""
    s = value if isinstance(value, str) else str(value)
    try:
        s.encode("utf-8")
        return s
    except UnicodeEncodeError:
        pass
    try:  # bytes that os.fsdecode carried as surrogates: show them as \xNN
        return s.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
    except UnicodeEncodeError:  # other lone surrogates
        return s.encode("utf-8", "backslashreplace").decode("utf-8")


def csv_text(value: Any) -> str:
    """A text cell: UTF-8-safe, with a leading apostrophe where a spreadsheet would run it."""
    s = text(value)
    return "'" + s if s.startswith(FORMULA_STARTS) else s


def csv_text_value(cell: str) -> str:
    """The text a :func:`csv_text` cell was written from (its apostrophe escape undone)."""
    return cell[1:] if cell.startswith("'") else cell


def csv_line(row: list[str]) -> str:
    """One CSV record (``\n``-terminated) of str cells, quoted as RFC 4180 says.

    Python's ``csv.writer`` (3.11) quotes only the characters of its own line terminator, so a
    carriage return inside a path (a legal file name) split the row for every reader."""
    return ",".join(_quoted(cell) for cell in row) + "\n"


def _quoted(cell: str) -> str:
    if "," in cell or '"' in cell or "\n" in cell or "\r" in cell:  # four substring tests: C speed, no generator
        return '"' + cell.replace('"', '""') + '"'
    return cell


def csv_text_cell(value: Any) -> str:
    """A text value as it stands in a CSV record: :func:`csv_text`, quoted where needed."""
    return _quoted(csv_text(value))


def number(value: Any) -> int | float | None:
    """A finite int/float, or None for a missing or non-finite value (NaN, ±Infinity)."""
    if value is None or isinstance(value, bool):
        return None if value is None else int(value)
    try:
        if isinstance(value, int):
            return int(value)
        f = float(value)
    except (TypeError, ValueError, OverflowError):
        return None
    return f if math.isfinite(f) else None


def csv_number(value: Any) -> str:
    """A number cell: the number, or empty for a missing or non-finite value. (Never quoted: the
    ``repr`` of an int or a finite float holds no comma, quote or line break.)"""
    if type(value) is float:  # the common case (model outputs via tolist()), without number()'s checks
        return repr(value) if math.isfinite(value) else ""
    n = number(value)
    return "" if n is None else repr(n)


def json_safe(obj: Any) -> Any:
    """``obj`` with every non-finite float replaced by None and every str made UTF-8-safe.

    Recurses into dicts, lists and tuples; numpy scalars and arrays become Python values.
    Anything else is returned as it is (``json.dumps``' ``default`` deals with it).
    """
    if isinstance(obj, str):
        return text(obj)
    if isinstance(obj, bool) or obj is None:
        return obj
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, int):
        return obj
    if isinstance(obj, dict):
        return {text(k) if isinstance(k, str) else k: json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    item = getattr(obj, "tolist", None)  # numpy scalars and arrays, without importing numpy
    if callable(item) and type(obj).__module__ == "numpy":
        return json_safe(item())
    return obj
