"""Archive profiles: which archive to build, named or spelled out as a spec string.

``NAME`` or ``NAME:key=value,key=value``. Names:

==============  ==========================================================================  ===========
``sample``      today's sample archive (:mod:`.samples`): 4 collections, hostile metadata      ~5 MB
``synthetic``   a generic synthetic collection, every parameter yours                         (small)
``ct200``       one 200-instance CT series, 512x512 16-bit slices of ~525 KB                   ~105 MB
``headers``     20 series of 10-20 instances (256x256) in 4 patients: header-scan benchmarks  ~40 MB
``multiframe``  one Enhanced CT instance of 380 512x512 frames                                ~200 MB
``wide``        100 patients x 5 series x 60 instances of 16x16 pixels (30,000 files)          ~40 MB
==============  ==========================================================================  ===========

Parameters (every synthetic profile takes all of them; a name only sets the defaults):
``patients``, ``studies`` (per patient), ``series`` (per study), ``instances`` (per series),
``instances_max`` (series get between ``instances`` and this many, deterministically; 0 = all
``instances``), ``rows``, ``cols`` (0 = ``rows``), ``frames`` (1 = single-frame CT Image Storage;
more = Enhanced CT multi-frame instances), ``modality`` (``CT`` or ``MR``, single-frame only).
So ``ct200:instances=5,rows=32`` is a tiny ct200 for a test. The canonical spec (every parameter
written out, in a fixed order) is what an archive records; two specs that mean the same archive
have the same canonical form.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import ConfigError

SAMPLE = "sample"

_PARAMS = ("patients", "studies", "series", "instances", "instances_max", "rows", "cols", "frames", "modality")
_LIMITS = {"patients": (1, 10_000), "studies": (1, 100), "series": (1, 1000), "instances": (1, 100_000),
           "instances_max": (0, 100_000), "rows": (1, 4096), "cols": (0, 4096), "frames": (1, 4000)}


@dataclass(frozen=True, slots=True)
class SyntheticSpec:
    """A synthetic archive: one collection, its size and shape."""

    name: str = "synthetic"
    patients: int = 1
    studies: int = 1
    series: int = 1
    instances: int = 10
    instances_max: int = 0
    rows: int = 64
    cols: int = 0
    frames: int = 1
    modality: str = "CT"

    @property
    def collection(self) -> str:
        return {"synthetic": "Synthetic", "ct200": "Bench-CT200", "headers": "Bench-Headers",
                "multiframe": "Bench-Multiframe", "wide": "Bench-Wide"}[self.name]

    @property
    def width(self) -> int:
        return self.cols or self.rows

    @property
    def canonical(self) -> str:
        return f"{self.name}:" + ",".join(f"{key}={getattr(self, key)}" for key in _PARAMS)

    def series_length(self, index: int) -> int:
        """How many instances the ``index``-th series (0-based, over the whole archive) holds."""
        top = max(self.instances_max, self.instances)
        return self.instances + (index * 7) % (top - self.instances + 1)


@dataclass(frozen=True, slots=True)
class SampleSpec:
    """The sample archive (no parameters)."""

    name: str = SAMPLE

    @property
    def canonical(self) -> str:
        return SAMPLE


PRESETS: dict[str, dict[str, int | str]] = {
    "synthetic": {},
    "ct200": {"patients": 1, "series": 1, "instances": 200, "rows": 512},
    "headers": {"patients": 4, "series": 5, "instances": 10, "instances_max": 20, "rows": 256},
    "multiframe": {"patients": 1, "series": 1, "instances": 1, "rows": 512, "frames": 380},
    "wide": {"patients": 100, "series": 5, "instances": 60, "rows": 16},
}

Profile = SyntheticSpec | SampleSpec


def parse_profile(text: str) -> Profile:
    """``"ct200"``, ``"wide:patients=3,instances=2"``... -> a spec; ConfigError for anything else."""
    name, _, rest = text.strip().partition(":")
    name = name.strip().lower()
    if name == SAMPLE:
        if rest.strip():
            raise ConfigError("the sample profile takes no parameters")
        return SampleSpec()
    if name not in PRESETS:
        raise ConfigError(f"unknown emulator profile {name!r}: use one of {', '.join([SAMPLE, *PRESETS])}")
    values: dict[str, int | str] = dict(PRESETS[name])
    for item in filter(None, (part.strip() for part in rest.split(","))):
        key, sep, value = item.partition("=")
        key = key.strip()
        if not sep or key not in _PARAMS:
            raise ConfigError(f"bad profile parameter {item!r}: use key=value with key one of {', '.join(_PARAMS)}")
        if key == "modality":
            values[key] = value.strip().upper()
            continue
        try:
            values[key] = int(value)
        except ValueError as exc:
            raise ConfigError(f"profile parameter {key} must be an integer, not {value!r}") from exc
    spec = SyntheticSpec(name=name, **values)  # type: ignore[arg-type]
    for key, (low, high) in _LIMITS.items():
        if not low <= int(getattr(spec, key)) <= high:
            raise ConfigError(f"profile parameter {key} must be between {low} and {high}")
    if spec.modality not in ("CT", "MR"):
        raise ConfigError("profile parameter modality must be CT or MR")
    if spec.frames > 1 and spec.modality != "CT":
        raise ConfigError("multi-frame instances are Enhanced CT: modality must be CT")
    return spec

