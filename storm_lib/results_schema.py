"""The layout of a results file (:mod:`storm_lib.results`) and its validator.

:data:`SCHEMA` is JSON Schema (draft 2020-12), in the subset :func:`schema_problems`
checks without extra packages; :func:`consistency_problems` adds what a schema cannot say
(every curve has the protocol's horizon). ``docs/results_schema.md`` describes each field.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping
from typing import Any

FORMAT_NAME = "storm_lib-results"
VERSION = 1
FORMAT = f"{FORMAT_NAME}/{VERSION}"
"""The ``format`` field of every file this version writes and reads."""

MODES = ("mode", "sample")
"""The rollout modes every file holds (argmax latents, sampled latents)."""


class ResultsError(ValueError):
    """A results file cannot be read or written; the message names the file and why."""


def _nullable(schema: dict[str, Any]) -> dict[str, Any]:
    return {**schema, "type": [schema["type"], "null"]}


def _per_mode(schema: dict[str, Any]) -> dict[str, Any]:
    props = dict.fromkeys(MODES, schema)
    return {"type": "object", "required": list(MODES), "properties": props,
            "additionalProperties": False}  # fmt: skip


def _record(required: dict[str, Any], optional: dict[str, Any] | None = None) -> dict[str, Any]:
    """A closed object: ``required`` entries must be there, ``optional`` ones may be."""
    props = {**required, **(optional or {})}
    return {"type": "object", "required": list(required), "properties": props,
            "additionalProperties": False}  # fmt: skip


_NUM, _INT, _STR = {"type": "number"}, {"type": "integer"}, {"type": "string"}
_NUMBERS = {"type": "array", "items": _NUM}
_STATS = {"$ref": "#/$defs/stats"}
_NAMED_STATS = {"type": "object", "additionalProperties": _STATS}
_TIMINGS = {
    "type": ["object", "null"],
    "additionalProperties": _record(
        {"lengths": {"type": "array", "items": _INT}, "ms_per_step": _NUMBERS},
        {"kind": _STR, "mode": _STR, "part": _STR, "ms_per_frame": _NUMBERS,
         "batch_size": _INT, "device": _STR, "train_length": _nullable(_INT)},
    ),
}  # fmt: skip
_GAP = dict.fromkeys(
    ("argmax_rollout", "sampled_rollout", "argmax_ceiling", "sample_ceiling",
     "dynamics", "prior_sampling", "posterior_sampling"), _NUM,
)  # fmt: skip
_MODEL = _record(
    {
        "kind": {"type": ["string", "null"], "enum": ["storm", "rssm", None]},
        "psnr": _per_mode(_STATS),
        "ceiling": _per_mode({"anyOf": [_STATS, {"type": "null"}]}),
        "posterior_entropy": _per_mode(_nullable(_NUM)),
        "gap_decomposition": _nullable(_record({**_GAP, "text": _STR})),
        "action_sensitivity": _nullable(
            _record({"real": _STATS, "shuffled": _STATS, "between": _STATS})
        ),
        "fvd": _nullable(_NUM),
        "clip_count": _nullable({"type": "integer", "minimum": 0}),
        "validation": _nullable(
            _record(
                {
                    "step": {"type": "array", "items": _INT},
                    "time": _NUMBERS,
                    "metrics": {
                        "type": "object",
                        "additionalProperties": {"type": "array", "items": _nullable(_NUM)},
                    },
                }
            )
        ),
        "train_ms_per_step": _nullable(_NUM),
        "checkpoint": _nullable(
            _record(
                {
                    "path": _STR,
                    "sha256": _STR,
                    "kind": _nullable(_STR),
                    "step": _nullable(_INT),
                    "total_steps": _nullable(_INT),
                    "profile": _nullable(_STR),
                }
            )
        ),
        "training_data": {"type": ["object", "null"]},
    },
    {"takes_mode": {"type": "boolean"}, "tokens": {"type": ["object", "null"]}},
)
_RUN = _record(
    {
        "label": _STR,
        "command": _STR,
        "profile": _nullable(_STR),
        "config": {"type": ["object", "null"]},
        "device": _STR,
        "device_name": _nullable(_STR),
        "precision": _nullable(
            _record(
                {
                    "training": _STR,
                    "training_autocast": _STR,
                    "evaluation": _STR,
                    "description": _STR,
                }
            )
        ),
        "versions": {"type": "object", "additionalProperties": _nullable(_STR)},
        "git": _record({"commit": _nullable(_STR), "dirty": _nullable({"type": "boolean"})}),
        "date": _STR,
        "duration_s": _nullable(_NUM),
    }
)
SCHEMA: dict[str, Any] = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "title": FORMAT,
    "$defs": {
        "stats": _record(
            {
                "mean": _NUMBERS,
                "half_width": {"type": "array", "items": _nullable(_NUM)},
                "n": {"type": "integer", "minimum": 0},
            }
        ),
    },
    **_record(
        {
            "format": {"const": FORMAT},
            "run": _RUN,
            "protocol": _record(
                {
                    "context": {"type": "integer", "minimum": 1},
                    "horizon": {"type": "integer", "minimum": 1},
                    "count": {"type": "integer", "minimum": 0},
                    "seed": _INT,
                    "modes": {"type": "array", "items": {"enum": list(MODES)}},
                }
            ),
            "models": {"type": "object", "additionalProperties": _MODEL},
            "baselines": _NAMED_STATS,
            "twin_futures": _nullable(
                _record({"psnr": _STATS, "copy_last": _STATS, "identical": _NUMBERS, "cap": _NUM})
            ),
            "step_time_vs_length": _nullable(_record({"model": _TIMINGS, "sequence": _TIMINGS})),
            "fvd": _nullable(_record({"clips": _INT, "frames": _INT, "seconds": _NUM})),
            "notes": {"type": "array", "items": _STR},
        }
    ),
}
"""The layout of a results file, as JSON Schema (draft 2020-12, the subset
:func:`schema_problems` checks: type, const, enum, minimum, properties, required,
additionalProperties, items, anyOf, $ref to $defs)."""

_TYPES = {
    "object": lambda v: isinstance(v, dict),
    "array": lambda v: isinstance(v, list),
    "string": lambda v: isinstance(v, str),
    "boolean": lambda v: isinstance(v, bool),
    "null": lambda v: v is None,
    "integer": lambda v: isinstance(v, int) and not isinstance(v, bool),
    "number": lambda v: (
        isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
    ),
}


def schema_problems(value: Any, schema: Mapping[str, Any], where: str = "") -> Iterator[str]:
    """Every way ``value`` breaks ``schema``, as ``"where: what"`` (nothing when it fits).

    A number must be finite (JSON has no NaN or infinity).
    """
    if "$ref" in schema:
        schema = SCHEMA["$defs"][schema["$ref"].rsplit("/", 1)[-1]]
    where = where or "(top level)"
    if "anyOf" in schema:
        if all(any(schema_problems(value, s, where)) for s in schema["anyOf"]):
            yield f"{where}: fits none of its allowed forms"
        return
    types = schema.get("type")
    if types is not None:
        types = [types] if isinstance(types, str) else types
        if not any(_TYPES[t](value) for t in types):
            found = "NaN or infinity" if isinstance(value, float) else type(value).__name__
            yield f"{where}: expected {' or '.join(types)}, found {found}"
            return
    if "const" in schema and value != schema["const"]:
        yield f"{where}: expected {schema['const']!r}, found {value!r}"
    if "enum" in schema and value not in schema["enum"]:
        yield f"{where}: {value!r} is not one of {schema['enum']}"
    if "minimum" in schema and _TYPES["number"](value) and value < schema["minimum"]:
        yield f"{where}: {value} is below {schema['minimum']}"
    if isinstance(value, dict):
        props = schema.get("properties", {})
        yield from (f"{where}: missing {k!r}" for k in schema.get("required", ()) if k not in value)
        extra = schema.get("additionalProperties", True)
        for key, item in value.items():
            inner = f"{where}.{key}" if where != "(top level)" else str(key)
            if key in props:
                yield from schema_problems(item, props[key], inner)
            elif extra is False:
                yield f"{where}: unexpected entry {key!r}"
            elif isinstance(extra, Mapping):
                yield from schema_problems(item, extra, inner)
    if isinstance(value, list) and "items" in schema:
        for i, item in enumerate(value):
            yield from schema_problems(item, schema["items"], f"{where}[{i}]")


def _stats_in(doc: Mapping[str, Any]) -> Iterator[tuple[str, Mapping[str, Any]]]:
    """``(where, stats)`` of every per-step entry scored on the protocol's windows."""
    for name, model in doc["models"].items():
        for mode in MODES:
            yield f"models.{name}.psnr.{mode}", model["psnr"][mode]
            if model["ceiling"][mode] is not None:
                yield f"models.{name}.ceiling.{mode}", model["ceiling"][mode]
        for key, stats in (model["action_sensitivity"] or {}).items():
            yield f"models.{name}.action_sensitivity.{key}", stats
    for name, stats in doc["baselines"].items():
        yield f"baselines.{name}", stats


def consistency_problems(doc: Mapping[str, Any]) -> Iterator[str]:
    """What the schema cannot say: every curve has ``protocol.horizon`` steps and
    ``protocol.count`` windows, paired lists have equal lengths. Run it on a document
    that fits :data:`SCHEMA`."""
    horizon, count = doc["protocol"]["horizon"], doc["protocol"]["count"]
    for where, stats in _stats_in(doc):
        if len(stats["mean"]) != horizon or len(stats["half_width"]) != horizon:
            yield f"{where}: {len(stats['mean'])} steps, but protocol.horizon is {horizon}"
        if stats["n"] != count:
            yield f"{where}: n = {stats['n']}, but protocol.count is {count}"
    if set(doc["protocol"]["modes"]) != set(MODES):
        yield f"protocol.modes: expected {list(MODES)}"
    for name, model in doc["models"].items():
        val = model["validation"]
        if val and any(len(v) != len(val["step"]) for v in [val["time"], *val["metrics"].values()]):
            yield f"models.{name}.validation: its lists differ in length"
    for part, timings in (doc["step_time_vs_length"] or {}).items():
        for name, t in (timings or {}).items():
            if len(t["lengths"]) != len(t["ms_per_step"]):
                yield f"step_time_vs_length.{part}.{name}: lengths and ms_per_step differ in length"
    twins = doc["twin_futures"]
    if twins and len(twins["identical"]) != len(twins["psnr"]["mean"]):
        yield "twin_futures: identical and psnr differ in length"


def validate(doc: Any, source: str = "results") -> None:
    """Check a results document against :data:`SCHEMA` and :func:`consistency_problems`.

    Raises:
        ResultsError: every problem found, one per line, each with where it is.
    """
    problems = list(schema_problems(doc, SCHEMA))
    if not problems:
        problems = list(consistency_problems(doc))
    if problems:
        shown = "\n  ".join(problems[:20])
        more = f"\n  ... ({len(problems)} problems in all)" if len(problems) > 20 else ""
        raise ResultsError(f"{source}: not a valid {FORMAT} document:\n  {shown}{more}")
