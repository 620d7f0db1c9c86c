"""The route table: which URL is which endpoint of which API, who may call it, and the server's shape.

Base ``/nbia-api``. ``POST /oauth/token`` and ``GET /logout`` (logins), ``/services/v2/<name>``
(search, bearer token), ``/services/v1/<name>`` and ``/services/v4/<name>`` (search, anonymous:
the caller is the guest), ``/services/<name>`` (advanced, token). Outside it, ``/dois/<doi>``
(DataCite). A :class:`ServerShape` decides which of these exist, so one emulator can stand for
today's public server (``oauth=False``: no logins, no v2, no advanced API; v4 only), an old one
(``v4=False``: no v1/v4) or both (the default). A route that does not exist answers 404, as a
server without it does.

:func:`authorize` turns a request into a :class:`~.replies.Call` (who is calling) and raises the
real server's answers for bad credentials: v2 without an Authorization header is 500 with a 48-byte
body; v2 with a dead token is 401, except on the endpoints that hide it behind an empty 200; the
advanced API with a dead token is 401. v4 parameter names are checked here too.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from . import downloads, drilldowns, listings, oauth, seriesmeta, v4params
from .accounts import GUEST_USER
from .downloads import NO_AUTH_BODY
from .replies import Call, HttpError, Reply, Request

if TYPE_CHECKING:
    from .server import Emulator

Handler = Callable[["Emulator", Request, Call], Reply]

#: v2 endpoints that answer 200 with an empty body (instead of 401) for an expired or unknown token.
HIDES_AUTH_FAILURE = frozenset({"getSeries", "getPatient", "getPatientStudy", "getSOPInstanceUIDs",
                                "getSeriesSize"})

SEARCH: dict[str, Handler] = {
    "getCollectionValues": listings.get_collection_values,
    "getPatient": listings.get_patient,
    "getPatientStudy": listings.get_patient_study,
    "getSeries": listings.get_series,
    "getSOPInstanceUIDs": listings.get_sop_instance_uids,
    "getSeriesSize": listings.get_series_size,
    "getUpdatedSeries": listings.get_updated_series,
    "getSingleImage": downloads.get_single_image,
    "getImage": downloads.get_image,
    "getImageWithMD5Hash": downloads.get_image,
    "getM5HashForImage": downloads.get_m5_hash_for_image,
}
#: What v4 serves beyond the search endpoints (and no getLicenses).
V4_EXTRA: dict[str, Handler] = {
    "getMD5HashForImage": downloads.get_md5_hash_for_image,
    "getMD5Hierarchy": downloads.get_md5_hierarchy,
    "getStudyDrillDownWithSeriesIds": drilldowns.study_drill_down,
    "getImageDrillDown": drilldowns.image_drill_down,
    "getCollectionDescriptions": drilldowns.collection_descriptions,
    "getSeriesMetadata": seriesmeta.get_series_metadata,
}
ADVANCED: dict[str, Handler] = {
    "getStudyDrillDownWithSeriesIds": drilldowns.study_drill_down,
    "getImageDrillDown": drilldowns.image_drill_down,
    "getCollectionDescriptions": drilldowns.collection_descriptions,
    "getLicenses": drilldowns.licenses,
}
API_ENDPOINTS: dict[str, dict[str, Handler]] = {"v1": SEARCH, "v2": SEARCH, "v4": {**SEARCH, **V4_EXTRA},
                                                "advanced": ADVANCED}


@dataclass(frozen=True, slots=True)
class ServerShape:
    """Which APIs the server has: logins (OAuth, v2, advanced), anonymous v1/v4, the DataCite service."""

    oauth: bool = True
    v4: bool = True
    datacite: bool = True

    def __post_init__(self) -> None:
        if not (self.oauth or self.v4):
            raise ValueError("a server needs the v2 API (oauth=True) or the v4 API (v4=True)")

    def has(self, api: str) -> bool:
        if api in ("oauth", "v2", "advanced"):
            return self.oauth
        if api in ("v1", "v4"):
            return self.v4
        if api == "datacite":
            return self.datacite
        return False


@dataclass(frozen=True, slots=True)
class Route:
    api: str
    name: str
    handler: Handler

    @property
    def versioned(self) -> str:
        return f"{self.api}/{self.name}"


def _token(emu: Emulator, req: Request, call: Call) -> Reply:
    return oauth.token(emu, req)


def _logout(emu: Emulator, req: Request, call: Call) -> Reply:
    return oauth.logout(emu, req)


def _doi(emu: Emulator, req: Request, call: Call) -> Reply:
    from .datacite import get_doi

    return get_doi(emu, req)


def resolve(shape: ServerShape, method: str, path: str) -> Route | None:
    """The route of ``method path``, or ``None`` (404) when this server has no such route."""
    route = _lookup(method, path)
    return route if route is not None and shape.has(route.api) else None


def _lookup(method: str, path: str) -> Route | None:
    if path == "/nbia-api/oauth/token" and method == "POST":
        return Route("oauth", "token", _token)
    if path == "/nbia-api/logout":
        return Route("oauth", "logout", _logout)
    if path.startswith("/dois/") and method == "GET":
        return Route("datacite", "dois", _doi)
    prefix = "/nbia-api/services/"
    if not path.startswith(prefix):
        return None
    rest = path[len(prefix):].strip("/").split("/")
    if len(rest) == 2 and rest[0] in ("v1", "v2", "v4"):
        api, name = rest
    elif len(rest) == 1:
        api, name = "advanced", rest[0]
    else:
        return None
    handler = API_ENDPOINTS[api].get(name)
    return None if handler is None else Route(api, name, handler)


def authorize(emu: Emulator, req: Request, route: Route) -> Call:
    """Who calls ``route``; raises the server's answer when the credentials or parameters are refused."""
    api, name = route.api, route.name
    if api == "v2":
        bearer = req.bearer()
        if bearer is None:
            raise HttpError(500, NO_AUTH_BODY)
        user = emu.tokens.user_for(bearer)
        if user is None and name not in HIDES_AUTH_FAILURE:
            raise HttpError(401, b'{"error":"invalid_token","error_description":"Invalid access token"}',
                            "application/json")
        return Call(api, name, user)
    if api == "advanced":
        user = emu.tokens.user_for(req.bearer())
        if user is None:
            raise HttpError(401, b'{"error":"invalid_token","error_description":"Full authentication is '
                                 b'required to access this resource"}', "application/json")
        return Call(api, name, user)
    if api == "v4":
        if name in v4params.POST_ONLY and req.method != "POST":
            raise HttpError(405, b'{"status":405,"error":"Method Not Allowed"}', "application/json",
                            headers=(("Allow", "POST"),))
        v4params.check(name, req)
        return Call(api, name, GUEST_USER)
    if api == "v1":
        return Call(api, name, GUEST_USER)
    return Call(api, name, None)
