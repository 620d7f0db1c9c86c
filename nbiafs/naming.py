"""File and folder names of the tree: sanitising, the two layouts, uniqueness among siblings.

Pure functions, no I/O. Every name produced here is a valid, visible POSIX file name whatever the
server's metadata holds: no ``/``, no NUL or other control characters, never ``.``/``..`` and never
starting with ``.`` (dcm2niix, GDCM and Horos skip hidden names), no leading or trailing spaces, NFC
UTF-8 of at most 255 bytes, never empty.

Layouts:

* ``descriptive`` (default) mirrors the NBIA Data Retriever: ``Collection/PatientID/
  {MM-DD-YYYY-}{StudyID-}{StudyDescription[:53]-}<last 5 of StudyUID>/
  {SeriesNumber-}{SeriesDescription[:53]-}<last 5 of SeriesUID>/1-001.dcm``; empty parts dropped,
  ``/`` and ``\\`` turned into ``-``.
* ``uid``: ``Collection/PatientID/StudyInstanceUID/SeriesInstanceUID/SOPInstanceUID.dcm``.

Siblings that end up with the same name are told apart by :func:`assign_unique`, deterministically
(sorted by UID, suffixed ``-2``, ``-3``...), so names do not depend on the server's answer order.
"""

from __future__ import annotations

import unicodedata
from collections.abc import Callable, Iterable
from typing import TypeVar

from .records import Instance, Series, Study

T = TypeVar("T")

LAYOUTS = ("descriptive", "uid")
#: The longest name most Linux file systems (and FUSE) accept, in bytes.
NAME_MAX = 255
#: What an empty name becomes.
PLACEHOLDER = "_"
#: The Data Retriever keeps the first 53 characters of a description.
DESCRIPTION_CHARS = 53
#: How many trailing UID characters the descriptive layout keeps.
UID_TAIL = 5
#: Characters of the stem kept at the end when a name must be shortened to fit a ``-N`` suffix
#: (covers ``-`` + the 5-character UID tail of descriptive names).
_KEEP_TAIL_ON_SUFFIX = 6
#: Unicode categories replaced by ``_``: controls (NUL, tabs, newlines, DEL, C1), lone surrogates
#: (not encodable in UTF-8) and line/paragraph separators.
_BAD_CATEGORIES = frozenset({"Cc", "Cs", "Zl", "Zp"})


def _check_layout(layout: str) -> None:
    if layout not in LAYOUTS:
        raise ValueError(f"unknown layout {layout!r}: use one of {', '.join(LAYOUTS)}")


def _clean_chars(text: str) -> str:
    """NFC, separators to ``-``, controls/surrogates to ``_`` (no length or edge rules)."""
    # Lone surrogates cannot be normalised or encoded: replace them before anything else.
    text = "".join("_" if unicodedata.category(c) == "Cs" else c for c in text)
    text = unicodedata.normalize("NFC", text)
    out = []
    for c in text:
        if c in "/\\":
            out.append("-")
        elif unicodedata.category(c) in _BAD_CATEGORIES:
            out.append("_")
        else:
            out.append(c)
    return "".join(out)


def _truncate_bytes(text: str, max_bytes: int) -> str:
    """The longest prefix of ``text`` (whole characters) that is at most ``max_bytes`` in UTF-8."""
    if max_bytes <= 0:
        return ""
    raw = text.encode("utf-8")
    if len(raw) <= max_bytes:
        return text
    return raw[:max_bytes].decode("utf-8", errors="ignore")


def _utf8_len(text: str) -> int:
    return len(text.encode("utf-8"))


def safe_component(text: str, max_bytes: int = NAME_MAX, *, tail: str = "") -> str:
    """Turn ``text`` + ``tail`` into one valid, visible path component of at most ``max_bytes``.

    ``tail`` (a UID tail, an extension) is kept whole when the name must be truncated (up to half
    of ``max_bytes``); the text in front of it is cut on a character boundary. Idempotent:
    ``safe_component(safe_component(x)) == safe_component(x)``.
    """
    if max_bytes < 8:
        raise ValueError("max_bytes must be at least 8")
    head = _clean_chars(text or "").lstrip()
    tail = _truncate_bytes(_clean_chars(tail or "").rstrip(), max_bytes // 2)
    if not tail:
        head = head.rstrip()
    elif not head.strip():  # nothing in front of an extension: "_.dcm", not the hidden ".dcm"
        head = PLACEHOLDER
    room = max_bytes - _utf8_len(tail)
    head = _truncate_bytes(head, room)
    # Joining and normalising can change the length (NFC may compose or, rarely, expand): shrink the
    # head until the normalised whole fits.
    while True:
        name = unicodedata.normalize("NFC", head + tail).strip()
        if _utf8_len(name) <= max_bytes:
            break
        room -= max(1, _utf8_len(name) - max_bytes)
        head = _truncate_bytes(head, room)
    if not name:
        return PLACEHOLDER
    if name.startswith("."):  # ".", "..", ".hidden": make it visible (same byte length)
        name = "_" + name[1:]
    return name


def _part(text: object | None, chars: int | None = None) -> str:
    """One part of a descriptive name: stringified, cut to ``chars`` characters, trimmed."""
    if text is None:
        return ""
    value = str(text)
    if chars is not None:
        value = value[:chars]
    return _clean_chars(value).strip()


def _compose(parts: Iterable[str], uid: str | None) -> str:
    """Join the non-empty parts with ``-`` and append the UID tail, which survives truncation."""
    kept = [p for p in parts if p]
    tail = _part((uid or "")[-UID_TAIL:])
    if not tail:
        return safe_component("-".join(kept))
    head = "-".join(kept)
    return safe_component(head, tail="-" + tail) if head else safe_component(tail)


def format_date(value: object | None) -> str:
    """``MM-DD-YYYY`` as the Data Retriever writes it, or ``""`` when unknown."""
    if value is None:
        return ""
    try:
        return f"{value.month:02d}-{value.day:02d}-{value.year:04d}"  # type: ignore[attr-defined]
    except AttributeError:
        return ""


def collection_dirname(name: str, layout: str = "descriptive") -> str:
    """The folder of a collection: its name (both layouts)."""
    _check_layout(layout)
    return safe_component(name)


def patient_dirname(patient_id: str, layout: str = "descriptive") -> str:
    """The folder of a patient: its PatientID (both layouts)."""
    _check_layout(layout)
    return safe_component(patient_id)


def study_dirname(study: Study, layout: str) -> str:
    """``{MM-DD-YYYY-}{StudyID-}{Description[:53]-}<uid[-5:]>``, or the StudyInstanceUID."""
    _check_layout(layout)
    if layout == "uid":
        return safe_component(study.study_uid)
    parts = (format_date(study.date), _part(study.study_id), _part(study.description, DESCRIPTION_CHARS))
    return _compose(parts, study.study_uid)


def series_dirname(series: Series, layout: str) -> str:
    """``{SeriesNumber-}{Description[:53]-}<uid[-5:]>``, or the SeriesInstanceUID."""
    _check_layout(layout)
    if layout == "uid":
        return safe_component(series.series_uid)
    parts = (_part(series.number), _part(series.description, DESCRIPTION_CHARS))
    return _compose(parts, series.series_uid)


def _with_suffix(name: str, suffix: str, ext: str) -> str:
    """``name`` with ``suffix`` inserted before ``ext``, shortened in the middle to fit NAME_MAX."""
    stem = name[: -len(ext)] if ext and name.endswith(ext) else name
    end = ext if ext and name.endswith(ext) else ""
    candidate = stem + suffix + end
    if _utf8_len(candidate) <= NAME_MAX:
        return candidate
    keep = stem[-_KEEP_TAIL_ON_SUFFIX:]
    room = NAME_MAX - _utf8_len(keep + suffix + end)
    front = _truncate_bytes(stem[: -len(keep)], room).rstrip()
    return safe_component(front + keep + suffix + end)


def assign_unique(items: Iterable[T], name_of: Callable[[T], str], key_of: Callable[[T], str],
                  *, ext: str = "") -> dict[str, T]:
    """Name every item uniquely among its siblings, independently of the order of ``items``.

    Items with the same key are one object (the server repeated a row): one of them is kept. When
    several items get the same name, the one with the smallest key keeps it and the others, in key
    order, get ``-2``, ``-3``... (before ``ext``), skipping any name already taken. The result maps
    name -> item, sorted by name.
    """
    by_key: dict[str, T] = {}
    for item in items:
        key = key_of(item)
        if key not in by_key or repr(item) < repr(by_key[key]):
            by_key[key] = item
    groups: dict[str, list[str]] = {}
    for key, item in by_key.items():
        groups.setdefault(name_of(item), []).append(key)
    taken = set(groups)
    result: dict[str, T] = {}
    for name in sorted(groups):
        keys = sorted(groups[name])
        result[name] = by_key[keys[0]]
        n = 2
        for key in keys[1:]:
            while True:
                candidate = _with_suffix(name, f"-{n}", ext)
                n += 1
                if candidate not in taken:
                    break
            taken.add(candidate)
            result[candidate] = by_key[key]
    return dict(sorted(result.items()))


def instance_order(instance: Instance) -> tuple[int, int, str]:
    """Sort key: InstanceNumber, then SOPInstanceUID; instances without a number last."""
    if instance.number is None:
        return (1, 0, instance.sop_uid)
    return (0, instance.number, instance.sop_uid)


def instance_filenames(instances: Iterable[Instance], layout: str) -> dict[str, Instance]:
    """File names of a series' instances, name -> instance, sorted by name.

    ``descriptive``: ``1-001.dcm``, ``1-002.dcm``... by position in InstanceNumber order, zero-padded
    to at least 3 digits and to as many as the count needs so that names sort in instance order.
    ``uid``: ``<SOPInstanceUID>.dcm``.
    """
    _check_layout(layout)
    unique: dict[str, Instance] = {}
    for inst in instances:  # one file per SOP instance, whatever the server repeated
        if inst.sop_uid not in unique or instance_order(inst) < instance_order(unique[inst.sop_uid]):
            unique[inst.sop_uid] = inst
    if layout == "uid":
        return assign_unique(unique.values(), lambda i: safe_component(i.sop_uid, tail=".dcm"),
                             lambda i: i.sop_uid, ext=".dcm")
    ordered = sorted(unique.values(), key=instance_order)
    width = max(3, len(str(len(ordered))))
    return {f"1-{pos:0{width}d}.dcm": inst for pos, inst in enumerate(ordered, start=1)}
