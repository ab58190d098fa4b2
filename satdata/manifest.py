"""Manifests: a recipe to build a store, and what the result must contain.

A manifest (``manifests/*.json``) pins a published setting — the paper's Tiny ImageNet
with boxes at 32x32, VOC 2012 with segmentation masks, ... — so that two people who
build it from their own copy of the dataset can check they hold the same thing. It has
two halves: ``recipe`` says how to build (``satdata build --manifest``), ``expect``
says what a correct store holds (``satdata verify --manifest``, and the build checks it
too)::

    {
      "manifest_version": 1,                    required, 1
      "name": "digits",                         required, non-empty string
      "description": "...",                     optional string
      "recipe": {                               required
        "source": "digits",                     required, a registered source
        "options": {"unmasked": "skip"},        optional, SourceOptions fields the source takes;
                                                a repeatable flag is a list of strings
                                                ("annotations": ["train=a.json", ...])
        "size": [32, 32],                       optional [H, W]; default: expect.image_size
        "fit": "stretch",                       optional, stretch | crop | pad; default stretch
        "splits": ["train", "test"]             optional; default: the keys of expect.splits
      },
      "expect": {                               required
        "classes": ["0", "1", ...],             class names in label order, or
        "num_classes": 10,                      only their number (at least one of the two)
        "label_kind": "single",                 optional, single | multi
        "image_size": [32, 32],                 required [H, W]
        "splits": {"train": 1442, "test": 355}, required: split -> sample count, or null
                                                (the split must exist, any count)
        "total": 1797,                          optional: samples over all splits
        "maps": ["ink", "box"],                 required (may be []): the map names
        "digests": {"train/images": "<sha256>"} optional: array path -> the store's
      },                                        recorded whole-array sha256
      "notes": "..."                            optional string or list of strings
    }

Loading is strict: an unknown key, a value of the wrong type, an unknown source, split,
fit mode or option, a map the source does not produce, or a digest for an array the
manifest does not expect is an error naming the manifest file and the key
(``manifests/x.json: recipe.size: ...``).

Digest keys are array paths as in :mod:`satdata.store` (``train/images``,
``train/labels``, ``train/ids``, ``train/boxes``, ``train/saliency/<map name>``,
``train/map_targets/<map name>``) and the
values are the whole-array sha256 a store records in its attributes (over the decoded
values, so independent of the codec). :func:`check_store` compares expectations with what
the store *records*; :func:`satdata.verify.verify_digests` checks that the data still
matches those records. ``satdata verify --manifest`` runs both.

:func:`draft_manifest` writes the ``expect`` half (digests included) from a store, for
maintainers who add or refresh a manifest.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping

from satdata.errors import SatkitError
from satdata.geometry import FIT_MODES
from satdata.store import (FIELDS, LABEL_KINDS, MAPS_GROUP, SPLIT_ORDER, SPLITS, TARGETS_GROUP, Store, array_path,
                           parse_array_path, path_split)

if TYPE_CHECKING:  # pragma: no cover
    from satdata.build import BuildConfig

MANIFEST_VERSION = 1

TOP_KEYS = ("manifest_version", "name", "description", "recipe", "expect", "notes")
RECIPE_KEYS = ("source", "options", "size", "fit", "splits")
EXPECT_KEYS = ("classes", "num_classes", "label_kind", "image_size", "splits", "total", "maps", "digests")

# The closed choices of SourceOptions fields (the CLI's click.Choice lists the same).
OPTION_CHOICES: dict[str, tuple[str, ...]] = {
    "label": ("multi", "largest"),
    "unmasked": ("skip", "whole"),
}

_SHA256 = re.compile(r"^[0-9a-f]{64}$")
_SHOWN_HEX = 16  # how much of a sha256 a problem message shows


@dataclass(frozen=True)
class Manifest:
    """A validated manifest. Build one with :func:`load_manifest`."""

    path: str
    name: str
    source: str
    image_size: tuple[int, int]
    split_counts: dict[str, int | None]
    maps: tuple[str, ...]
    description: str = ""
    options: dict[str, Any] = field(default_factory=dict)
    size: tuple[int, int] | None = None
    fit: str = "stretch"
    splits: tuple[str, ...] | None = None
    classes: tuple[str, ...] | None = None
    num_classes: int | None = None
    label_kind: str | None = None
    total: int | None = None
    digests: dict[str, str] = field(default_factory=dict)
    notes: tuple[str, ...] = ()

    def recipe_config(self) -> dict[str, Any]:
        """The build settings of the recipe, as ``satdata build --manifest`` starts from.

        Keys: ``source``, ``options`` (SourceOptions fields), ``size`` ([H, W]), ``fit``
        and ``splits`` (always present: the recipe's, else the expected splits).
        """
        return {
            "source": self.source,
            "options": dict(self.options),
            "size": list(self.size or self.image_size),
            "fit": self.fit,
            "splits": list(self.build_splits),
        }

    @property
    def build_splits(self) -> tuple[str, ...]:
        """The splits the recipe builds, in store order."""
        names = self.splits if self.splits is not None else tuple(self.split_counts)
        return tuple(sorted(names, key=lambda s: SPLIT_ORDER.get(s, 99)))

    def check_config(self, cfg: "BuildConfig") -> None:
        """Refuse a build whose settings contradict the recipe (before any work is done).

        The user may choose where and how fast to build (--root, --out, --workers,
        --overwrite, --skip-bad); what decides the contents (source, size, fit, splits,
        source options) must be the recipe's, or the result is not what the manifest
        describes. Build a variant without --manifest instead.
        """
        where = self.path
        hint = "; build a variant without --manifest"
        if cfg.source != self.source:
            raise SatkitError(f"--source {cfg.source} contradicts {where}: its recipe builds {self.source}{hint}")
        size = (int(cfg.size[0]), int(cfg.size[1]))
        if size != self.image_size:
            h, w = self.image_size
            raise SatkitError(
                f"--size {size[0]}x{size[1]} contradicts {where}: it expects {h}x{w} images"
                + (" (and fixes their digests)" if self.digests else "") + hint
            )
        if cfg.fit != self.fit:
            raise SatkitError(f"--fit {cfg.fit} contradicts {where}: its recipe uses fit {self.fit}{hint}")
        if cfg.splits is not None and set(cfg.splits) != set(self.build_splits):
            raise SatkitError(
                f"--splits {','.join(cfg.splits)} contradicts {where}: it expects the splits "
                f"{','.join(self.build_splits)}{hint}"
            )
        from satdata.sources import SourceOptions

        want = SourceOptions(**self.options)
        for f in fields(SourceOptions):
            got_v, want_v = getattr(cfg.options, f.name), getattr(want, f.name)
            if got_v != want_v:
                flag = "--" + f.name.replace("_", "-")
                raise SatkitError(
                    f"{flag} {_show(got_v)} contradicts {where}: its recipe has {f.name}={_show(want_v)}{hint}"
                )


def _show(v: Any) -> str:
    return json.dumps(v) if not isinstance(v, str) else v


# --------------------------------------------------------------------------- loading


class _Checker:
    """Type checks that raise one-line errors naming the manifest and the key."""

    def __init__(self, path: str) -> None:
        self.path = path

    def fail(self, key: str, problem: str) -> SatkitError:
        return SatkitError(f"{self.path}: {key}: {problem}")

    def obj(self, v: Any, key: str, known: tuple[str, ...]) -> dict[str, Any]:
        if not isinstance(v, dict):
            raise self.fail(key, f"expected an object, got {_type(v)}")
        for k in v:
            if k not in known:
                kk = f"{key}.{k}" if key != "(top level)" else k
                raise self.fail(kk, f"unknown key (known: {', '.join(known)})")
        return v

    def string(self, v: Any, key: str, *, empty_ok: bool = False) -> str:
        if not isinstance(v, str):
            raise self.fail(key, f"expected a string, got {_type(v)}")
        if not empty_ok and not v.strip():
            raise self.fail(key, "must not be empty")
        return v

    def integer(self, v: Any, key: str, minimum: int = 0) -> int:
        if isinstance(v, bool) or not isinstance(v, int):
            raise self.fail(key, f"expected an integer, got {_type(v)}")
        if v < minimum:
            raise self.fail(key, f"must be at least {minimum}, got {v}")
        return v

    def hw(self, v: Any, key: str) -> tuple[int, int]:
        if (not isinstance(v, list) or len(v) != 2
                or any(isinstance(x, bool) or not isinstance(x, int) or x < 1 for x in v)):
            raise self.fail(key, f"expected [H, W] with two positive integers, got {json.dumps(v)}")
        return int(v[0]), int(v[1])

    def str_list(self, v: Any, key: str, *, nonempty: bool = False) -> list[str]:
        if not isinstance(v, list):
            raise self.fail(key, f"expected a list of strings, got {_type(v)}")
        for i, x in enumerate(v):
            self.string(x, f"{key}[{i}]")
        if len(set(v)) != len(v):
            dup = next(x for x in v if v.count(x) > 1)
            raise self.fail(key, f"lists {dup!r} twice")
        if nonempty and not v:
            raise self.fail(key, "must not be empty")
        return list(v)


def _type(v: Any) -> str:
    if v is None:
        return "null"
    return {bool: "a boolean", int: "an integer", float: "a number", str: "a string",
            list: "a list", dict: "an object"}.get(type(v), type(v).__name__)


def load_manifest(path: str | Path) -> Manifest:
    """Read and validate a manifest file; raise SatkitError naming the file and the key."""
    where = str(path)
    p = Path(path)
    if not p.is_file():
        raise SatkitError(f"{where}: no such manifest file")
    try:
        raw = json.loads(p.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise SatkitError(f"{where}: not valid JSON (line {e.lineno}, column {e.colno}: {e.msg})") from None
    except RecursionError:
        raise SatkitError(f"{where}: not a manifest (its JSON is nested too deeply to read)") from None
    except (OSError, UnicodeDecodeError) as e:
        raise SatkitError(f"{where}: cannot read the manifest ({e})") from None
    return parse_manifest(raw, where)


def parse_manifest(raw: Any, where: str) -> Manifest:
    """Validate a manifest already parsed from JSON (``where`` names it in errors)."""
    c = _Checker(where)
    top = c.obj(raw, "(top level)", TOP_KEYS)
    for k in ("manifest_version", "name", "recipe", "expect"):
        if k not in top:
            raise c.fail(k, "missing (required)")
    version = c.integer(top["manifest_version"], "manifest_version", 1)
    if version > MANIFEST_VERSION:
        raise c.fail("manifest_version", f"version {version} is newer than this satkit reads "
                                         f"(version {MANIFEST_VERSION}); upgrade satkit")
    name = c.string(top["name"], "name")
    description = c.string(top.get("description", ""), "description", empty_ok=True)
    notes_raw = top.get("notes", [])
    if isinstance(notes_raw, str):
        notes: tuple[str, ...] = (notes_raw,)
    elif isinstance(notes_raw, list):
        notes = tuple(c.str_list(notes_raw, "notes"))
    else:
        raise c.fail("notes", f"expected a string or a list of strings, got {_type(notes_raw)}")

    # ---- expect (first: the recipe is checked against it)
    ex = c.obj(top["expect"], "expect", EXPECT_KEYS)
    for k in ("image_size", "splits", "maps"):
        if k not in ex:
            raise c.fail(f"expect.{k}", "missing (required)")
    image_size = c.hw(ex["image_size"], "expect.image_size")
    classes = tuple(c.str_list(ex["classes"], "expect.classes", nonempty=True)) if "classes" in ex else None
    num_classes = c.integer(ex["num_classes"], "expect.num_classes", 1) if "num_classes" in ex else None
    if classes is None and num_classes is None:
        raise c.fail("expect.classes", "missing: give the class names (classes) or their number (num_classes)")
    if classes is not None and num_classes is not None and len(classes) != num_classes:
        raise c.fail("expect.num_classes", f"is {num_classes} but expect.classes lists {len(classes)} names")
    label_kind = None
    if "label_kind" in ex:
        label_kind = c.string(ex["label_kind"], "expect.label_kind")
        if label_kind not in LABEL_KINDS:
            raise c.fail("expect.label_kind", f"unknown label kind {label_kind!r} (one of {', '.join(LABEL_KINDS)})")
    splits_raw = ex["splits"]
    if not isinstance(splits_raw, dict) or not splits_raw:
        raise c.fail("expect.splits", f"expected a non-empty object split -> count, got {_type(splits_raw)}")
    split_counts: dict[str, int | None] = {}
    for s in sorted(splits_raw, key=lambda s: SPLIT_ORDER.get(s, 99)):
        if s not in SPLITS:
            raise c.fail(f"expect.splits.{s}", f"unknown split (one of {', '.join(SPLITS)})")
        n = splits_raw[s]
        split_counts[s] = None if n is None else c.integer(n, f"expect.splits.{s}", 1)
    total = c.integer(ex["total"], "expect.total", 1) if "total" in ex else None
    if total is not None and all(v is not None for v in split_counts.values()):
        s_sum = sum(v for v in split_counts.values() if v is not None)
        if s_sum != total:
            raise c.fail("expect.total", f"is {total} but the split counts add up to {s_sum}")
    maps = tuple(c.str_list(ex["maps"], "expect.maps"))
    digests: dict[str, str] = {}
    if "digests" in ex:
        d = ex["digests"]
        if not isinstance(d, dict):
            raise c.fail("expect.digests", f"expected an object array path -> sha256, got {_type(d)}")
        for key, value in d.items():
            _check_digest_key(c, key, split_counts, maps)
            v = c.string(value, f"expect.digests.{key}")
            if not _SHA256.match(v):
                raise c.fail(f"expect.digests.{key}", "expected a sha256: 64 lowercase hex digits")
            digests[key] = v

    # ---- recipe
    rc = c.obj(top["recipe"], "recipe", RECIPE_KEYS)
    if "source" not in rc:
        raise c.fail("recipe.source", "missing (required)")
    source = c.string(rc["source"], "recipe.source")
    from satdata.sources import get_source_class, source_names

    if source not in source_names():
        raise c.fail("recipe.source", f"unknown source {source!r} (known: {', '.join(source_names())})")
    cls = get_source_class(source)
    options = _check_options(c, rc.get("options", {}), cls.options, source)
    size = c.hw(rc["size"], "recipe.size") if "size" in rc else None
    if size is not None and size != image_size:
        raise c.fail("recipe.size", f"is {size[0]}x{size[1]} but expect.image_size is "
                                    f"{image_size[0]}x{image_size[1]}")
    fit = "stretch"
    if "fit" in rc:
        fit = c.string(rc["fit"], "recipe.fit")
        if fit not in FIT_MODES:
            raise c.fail("recipe.fit", f"unknown fit mode {fit!r} (one of {', '.join(FIT_MODES)})")
    splits = None
    if "splits" in rc:
        splits = tuple(c.str_list(rc["splits"], "recipe.splits", nonempty=True))
        for s in splits:
            if s not in SPLITS:
                raise c.fail("recipe.splits", f"unknown split {s!r} (one of {', '.join(SPLITS)})")
        if set(splits) != set(split_counts):
            raise c.fail("recipe.splits", f"builds {', '.join(splits)} but expect.splits lists "
                                          f"{', '.join(split_counts)}")
    produced = getattr(cls, "maps", None)
    if isinstance(produced, dict) and set(produced) != set(maps):
        raise c.fail("expect.maps", f"lists {', '.join(maps) or 'no maps'} but source {source!r} "
                                    f"produces {', '.join(produced) or 'no maps'}")
    return Manifest(
        path=where, name=name, description=description, source=source, options=options,
        size=size, fit=fit, splits=splits, image_size=image_size, split_counts=split_counts,
        maps=maps, classes=classes, num_classes=num_classes, label_kind=label_kind,
        total=total, digests=digests, notes=notes,
    )


def _check_options(c: _Checker, raw: Any, accepted: tuple[str, ...], source: str) -> dict[str, Any]:
    from satdata.sources import SourceOptions

    known = tuple(f.name for f in fields(SourceOptions))
    opts = c.obj(raw, "recipe.options", known)
    defaults = {f.name: f.default for f in fields(SourceOptions)}
    out: dict[str, Any] = {}
    for k, v in opts.items():
        key = f"recipe.options.{k}"
        if k not in accepted:
            raise c.fail(key, f"not an option of source {source!r} (it takes: {', '.join(accepted) or 'none'})")
        d = defaults[k]
        if isinstance(d, bool):
            if not isinstance(v, bool):
                raise c.fail(key, f"expected true or false, got {_type(v)}")
        elif isinstance(d, tuple):  # a repeatable flag (--annotations SPLIT=FILE ...): a list of strings
            v = tuple(c.str_list(v, key))
        elif v is not None or d is not None:
            if not isinstance(v, str):
                raise c.fail(key, f"expected a string, got {_type(v)}")
            if k in OPTION_CHOICES and v not in OPTION_CHOICES[k]:
                raise c.fail(key, f"unknown value {v!r} (one of {', '.join(OPTION_CHOICES[k])})")
        out[k] = v
    return out


def _check_digest_key(c: _Checker, key: str, split_counts: Mapping[str, Any], maps: tuple[str, ...]) -> None:
    what = f"expect.digests.{key}"
    split = path_split(key)
    if split not in split_counts:
        raise c.fail(what, f"names split {split!r}, which expect.splits does not list")
    parsed = parse_array_path(key)
    if parsed is not None and parsed.map_name is None:
        return
    if parsed is not None:
        if parsed.map_name not in maps:
            raise c.fail(what, f"names map {parsed.map_name!r}, which expect.maps does not list")
        return
    raise c.fail(what, f"not an array path: expected <split>/{'|'.join(FIELDS)}, <split>/{MAPS_GROUP}/<map> "
                       f"or <split>/{TARGETS_GROUP}/<map>")


# --------------------------------------------------------------------------- checking


def check_store(store: Store, manifest: Manifest) -> list[str]:
    """Every way the store differs from the manifest's expectations ([] when it matches).

    Each problem names what differs (image_size, classes, label_kind, maps, a split, the
    total, or an array path) with the expected and the found value. Digests are compared
    with the sha256 the store records; run :func:`satdata.verify.verify_digests` to check
    the data still matches its records.
    """
    info = store.info
    problems: list[str] = []
    if tuple(info.image_size) != manifest.image_size:
        problems.append(f"image_size: expected {_hw(manifest.image_size)}, found {_hw(info.image_size)}")
    if manifest.classes is not None:
        exp, got = list(manifest.classes), list(info.classes)
        if len(exp) != len(got):
            problems.append(f"classes: expected {len(exp)} classes, found {len(got)}")
        else:
            diff = [i for i, (a, b) in enumerate(zip(exp, got)) if a != b]
            if diff:
                i = diff[0]
                more = f" (and {len(diff) - 1} more differ)" if len(diff) > 1 else ""
                problems.append(f"classes: class {i} expected {exp[i]!r}, found {got[i]!r}{more}")
    elif manifest.num_classes is not None and manifest.num_classes != len(info.classes):
        problems.append(f"classes: expected {manifest.num_classes} classes, found {len(info.classes)}")
    if manifest.label_kind is not None and manifest.label_kind != info.label_kind:
        problems.append(f"label_kind: expected {manifest.label_kind}, found {info.label_kind}")
    if set(manifest.maps) != set(info.maps):
        problems.append(f"maps: expected {', '.join(sorted(manifest.maps)) or 'none'}, "
                        f"found {', '.join(sorted(info.maps)) or 'none'}")
    for split, n in manifest.split_counts.items():
        if split not in info.splits:
            problems.append(f"split {split}: expected {'a split' if n is None else f'{n:,} samples'}, "
                            f"the store has no such split (it has: {', '.join(info.splits)})")
        elif n is not None and info.splits[split] != n:
            problems.append(f"split {split}: expected {n:,} samples, found {info.splits[split]:,}")
    for split, n in info.splits.items():
        if split not in manifest.split_counts:
            problems.append(f"split {split}: found {n:,} samples, but the manifest expects no such split")
    if manifest.total is not None and sum(info.splits.values()) != manifest.total:
        problems.append(f"total: expected {manifest.total:,} samples over all splits, "
                        f"found {sum(info.splits.values()):,}")
    for key, want in manifest.digests.items():
        path = _store_path(info, key)
        rec = info.digests.get(path) if path is not None else None
        if rec is None:
            problems.append(f"{key}: expected sha256 {want[:_SHOWN_HEX]}..., but the store has no such array")
        elif rec.get("sha256") != want:
            problems.append(f"{key}: expected sha256 {want[:_SHOWN_HEX]}..., "
                            f"found {str(rec.get('sha256'))[:_SHOWN_HEX]}...")
    return problems


def _hw(hw: Any) -> str:
    return f"{int(hw[0])}x{int(hw[1])}"


def _store_path(info: Any, key: str) -> str | None:
    """A manifest digest key -> the store's array path (maps may live under another name)."""
    parsed = parse_array_path(key)
    if parsed is not None and parsed.map_name is not None:
        m = info.maps.get(parsed.map_name)
        return array_path(parsed.split, parsed.field, m.array_name) if m is not None else None
    return key


def draft_manifest(store: Store, *, name: str, description: str = "",
                   digests: bool = True, notes: list[str] | None = None) -> dict[str, Any]:
    """A manifest (as a JSON-able dict) that the given store satisfies, from its attributes.

    For maintainers: build with the recipe, then ``json.dump(draft_manifest(...))``; edit
    the description and notes. With ``digests=False`` only counts and shapes are pinned
    (for datasets whose decoders may differ between machines).
    """
    info = store.info
    prov = info.provenance
    recipe: dict[str, Any] = {"source": prov.get("source", info.dataset)}
    if prov.get("options"):
        recipe["options"] = dict(prov["options"])
    recipe.update(size=list(info.image_size), fit=prov.get("fit", "stretch"), splits=list(info.splits))
    expect: dict[str, Any] = {
        "classes": list(info.classes),
        "label_kind": info.label_kind,
        "image_size": list(info.image_size),
        "splits": dict(info.splits),
        "total": sum(info.splits.values()),
        "maps": list(info.maps),
    }
    if digests:
        by_array = {m.array_name: m.name for m in info.maps.values()}
        out = {}
        for path, rec in info.digests.items():
            parsed = parse_array_path(path)
            if parsed is not None and parsed.map_name is not None:
                path = array_path(parsed.split, parsed.field, by_array.get(parsed.map_name, parsed.map_name))
            out[path] = rec["sha256"]
        expect["digests"] = dict(sorted(out.items(), key=lambda kv: (SPLIT_ORDER.get(path_split(kv[0]), 99), kv[0])))
    d: dict[str, Any] = {"manifest_version": MANIFEST_VERSION, "name": name}
    if description:
        d["description"] = description
    d["recipe"] = recipe
    d["expect"] = expect
    if notes:
        d["notes"] = list(notes)
    return d


__all__ = ["MANIFEST_VERSION", "Manifest", "check_store", "draft_manifest", "load_manifest", "parse_manifest"]
