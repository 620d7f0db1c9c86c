"""Instance bytes and checksums: ``getSingleImage``, the series zips, and the md5 endpoints.

* ``getSingleImage`` answers the stored file byte for byte, streamed from disk (500 for an unknown
  or unauthorized instance).
* ``getImage`` streams ``LICENSE`` then the images in instance order (``00000001.dcm``..., or
  ``1-001.dcm``... with ``NewFileNames=Yes``); on v4, ``IncludeMD5=Yes`` adds a final
  ``md5hashes.csv`` (``Filename,MD5Hash``, file names as in the zip). ``getImageWithMD5Hash`` is the
  v2 form (``%08d.dcm`` names, always the csv, no LICENSE). Unauthorized -> 400.
* ``getM5HashForImage?SOPInstanceUid=`` (v2 spelling, typos and all) and v4's
  ``getMD5HashForImage?SOPInstanceUID=``: one instance's md5 as plain text.
* v4 ``getMD5Hierarchy`` (POST, one of ``SeriesInstanceUID``, ``StudyInstanceUID``, ``PatientID``
  (optionally with ``Collection``), ``Collection``): one md5 for a level. The emulator's definition:
  **the md5 of the concatenated lower-case hex md5s of the level's instances (visible to the
  caller), sorted as strings, with no separator**; an unknown level answers 200 with an empty body.

Faults: a truncated zip is short (half the images, status 200: what the server sends when files
are missing); a corrupted zip has its first image's bytes flipped inside a well-formed entry,
while md5hashes.csv and the md5 endpoints keep the true md5s.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from typing import TYPE_CHECKING

from . import responses as R
from .archive import Archive, InstanceEntry
from .control import corrupt_offsets
from .listings import visible_series
from .replies import Call, HttpError, Reply, Request, bad_request, iter_file
from .shaping import CHUNK_SIZE
from .zipstream import Member, Reader, iter_zip

if TYPE_CHECKING:
    from .server import Emulator

#: The exact body of a v2 call made without an Authorization header, and of an unknown instance (48 bytes).
NO_AUTH_BODY = b"Server was not able to process your request\nnull"


def get_single_image(emu: Emulator, req: Request, call: Call) -> Reply:
    arch = emu.archive
    series_uid = req.one("SeriesInstanceUID", required=True) or ""
    sop_uid = req.one("SOPInstanceUID", required=True) or ""
    entry = visible_series(arch, series_uid, call.user)
    inst = arch.instance_by_uid(sop_uid)
    if entry is None or inst is None or inst.series_uid != entry.uid:
        raise HttpError(500, NO_AUTH_BODY)
    emu.served_instance(sop_uid)
    return Reply(200, content_type="application/dicom", file=inst.path, file_size=inst.size,
                 headers=(("Content-Disposition", f'attachment; filename="{sop_uid}.dcm"'),))


def _member(inst: InstanceEntry, corrupt: bool) -> Reader:
    marks = corrupt_offsets(inst.size) if corrupt else ()
    return lambda: iter_file(inst.path, CHUNK_SIZE, marks)


def _bytes_member(data: bytes) -> Reader:
    return lambda: (data,)


def _zip_reply(members: Iterable[tuple[str, object]], filename: str) -> Reply:
    return Reply(200, content_type="application/zip", stream=iter_zip(members),  # type: ignore[arg-type]
                 headers=(("Content-Disposition", f'attachment; filename="{filename}"'),))


def get_image(emu: Emulator, req: Request, call: Call) -> Reply:
    arch = emu.archive
    entry = visible_series(arch, req.one("SeriesInstanceUID", required=True) or "", call.user)
    if entry is None:
        raise bad_request("series not found or not authorized")
    instances = arch.instances_of(entry.uid)
    fault = req.fault
    if fault is not None and fault.truncate:  # what the real server does when files are missing
        instances = instances[: len(instances) // 2]
    corrupt = fault is not None and fault.corrupt
    if call.name == "getImageWithMD5Hash":
        names = [f"{pos:08d}.dcm" for pos in range(1, len(instances) + 1)]
        members: list[Member] = []
        with_md5 = True
    else:
        new_names = (req.one("NewFileNames") or "").lower() == "yes"
        names = [R.zip_name(pos, new_names) for pos in range(1, len(instances) + 1)]
        license_text = R.license_text(arch, entry).encode("utf-8")
        members = [("LICENSE", _bytes_member(license_text))]
        with_md5 = call.api == "v4" and (req.one("IncludeMD5") or "").lower() == "yes"
    members += [(name, _member(inst, corrupt and pos == 0)) for pos, (name, inst) in enumerate(zip(names, instances))]
    if with_md5:
        csv = "Filename,MD5Hash\n" + "".join(f"{name},{inst.md5}\n" for name, inst in zip(names, instances))
        members.append(("md5hashes.csv", _bytes_member(csv.encode("ascii"))))
    return _zip_reply(members, f"{entry.uid}.zip")


def _visible_instance(arch: Archive, sop_uid: str, user: str | None) -> InstanceEntry | None:
    inst = arch.instance_by_uid(sop_uid)
    if inst is None or visible_series(arch, inst.series_uid, user) is None:
        return None
    return inst


def get_m5_hash_for_image(emu: Emulator, req: Request, call: Call) -> Reply:
    """v2's (and v1/v4's old) ``getM5HashForImage?SOPInstanceUid=``: unknown -> 500."""
    inst = _visible_instance(emu.archive, req.one("SOPInstanceUid", required=True) or "", call.user)
    if inst is None:
        raise HttpError(500, NO_AUTH_BODY)
    return Reply(200, inst.md5.encode(), "text/plain")


def get_md5_hash_for_image(emu: Emulator, req: Request, call: Call) -> Reply:
    """v4's ``getMD5HashForImage?SOPInstanceUID=``: unknown -> 200 with an empty body (as the source does)."""
    inst = _visible_instance(emu.archive, req.one("SOPInstanceUID", required=True) or "", call.user)
    return Reply(200, b"" if inst is None else inst.md5.encode(), "text/plain")


def hierarchy_md5(md5s: Iterable[str]) -> str | None:
    """The emulator's getMD5Hierarchy definition (see the module docstring); ``None`` for no instances."""
    ordered = sorted(m.lower() for m in md5s)
    if not ordered:
        return None
    return hashlib.md5("".join(ordered).encode("ascii")).hexdigest()


def level_instances(arch: Archive, user: str | None, *, series_uid: str | None = None,
                    study_uid: str | None = None, patient_id: str | None = None,
                    collection: str | None = None) -> list[InstanceEntry]:
    """The instances of one level, visible to ``user`` (a patient may be narrowed to a collection)."""
    if series_uid is not None:
        chosen = [s for s in arch.series if s.uid == series_uid]
    elif study_uid is not None:
        chosen = [s for s in arch.series if s.study_uid == study_uid]
    elif patient_id is not None:
        chosen = [s for s in arch.series if s.patient_id == patient_id and collection in (None, s.collection)]
    elif collection is not None:
        chosen = [s for s in arch.series if s.collection == collection]
    else:
        chosen = []
    return [i for s in chosen if arch.is_visible(s.collection, user) for i in arch.instances_of(s.uid)]


def get_md5_hierarchy(emu: Emulator, req: Request, call: Call) -> Reply:
    levels = {key: req.one(key) for key in ("SeriesInstanceUID", "StudyInstanceUID", "PatientID", "Collection")}
    given = [k for k, v in levels.items() if v is not None]
    if not given:
        raise bad_request("one of SeriesInstanceUID, StudyInstanceUID, PatientID, Collection is required")
    if len(given) > 1 and set(given) != {"PatientID", "Collection"}:
        raise bad_request("only one object level can be specified (PatientID may come with its Collection)")
    instances = level_instances(emu.archive, call.user, series_uid=levels["SeriesInstanceUID"],
                                study_uid=levels["StudyInstanceUID"], patient_id=levels["PatientID"],
                                collection=levels["Collection"])
    digest = hierarchy_md5(i.md5 for i in instances)
    return Reply(200, b"" if digest is None else digest.encode("ascii"), "text/plain")
