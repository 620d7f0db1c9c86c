"""Drill-downs and collection facts: ``getStudyDrillDownWithSeriesIds``, ``getImageDrillDown``,
``getCollectionDescriptions`` and ``getLicenses``.

The same handlers serve the advanced API (``/services/<name>``, token required, epoch-ms dates) and
v4 (``/services/v4/<name>``, anonymous, ``MM-DD-YYYY`` dates; no ``getLicenses`` there). Both
drill-downs take many series in one call (form ``list``, repeatable). Image rows come in the
database's order, which the emulator imitates with a shuffle seeded by the series' pk id.
"""

from __future__ import annotations

import random
from typing import TYPE_CHECKING, Any

from . import responses as R
from .replies import Call, Reply, Request, bad_request, rows

if TYPE_CHECKING:
    from .server import Emulator


def _list(req: Request) -> list[str]:
    values = [v for v in req.params.get("list", []) if v]
    if not values:
        raise bad_request("A form parameter, list, is required.")
    return values


def study_drill_down(emu: Emulator, req: Request, call: Call) -> Reply:
    arch = emu.archive
    uids = _list(req)
    chosen = [s for s in (arch.series_by_uid(u) for u in dict.fromkeys(uids))
              if s is not None and arch.is_visible(s.collection, call.user)]
    return rows(R.study_drilldown(arch, chosen, call.style))


def image_drill_down(emu: Emulator, req: Request, call: Call) -> Reply:
    arch = emu.archive
    try:
        pks = [int(v) for v in _list(req)]
    except ValueError as exc:
        raise bad_request("list must hold seriesPkId integers") from exc
    found: list[dict[str, Any]] = []
    for pk in dict.fromkeys(pks):
        entry = arch.series_by_pk(pk)
        if entry is None or not arch.is_visible(entry.collection, call.user):
            continue
        study = arch.study_by_uid(entry.study_uid)
        instances = arch.instances_of(entry.uid)
        random.Random(pk).shuffle(instances)  # the real order is the database's, not instance order
        found += [R.image_drilldown_row(entry, inst, call.style, study.date if study else None,
                                        size=emu.reported_size(inst.sop_uid, inst.size))
                  for inst in instances]
    return rows(found)


def collection_descriptions(emu: Emulator, req: Request, call: Call) -> Reply:
    arch = emu.archive
    wanted = req.one("collectionName")
    return rows([R.collection_description_row(c, call.style) for c in arch.visible_collections(call.user)
                 if wanted in (None, c.name)])


def licenses(emu: Emulator, req: Request, call: Call) -> Reply:
    return rows([R.license_row(x) for x in emu.archive.licenses])
