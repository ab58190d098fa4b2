"""`satdata`: build, inspect, verify and preview satkit stores.

Each command only parses options and calls one library function; errors a user can fix
are printed on one line with a non-zero exit.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import click

from satdata import __version__
from satdata.clikit import SatkitGroup, debug_option, echo_json, json_option, open_store_arg, run_cli, storage_option
from satdata.errors import SatkitError

EPILOG_BUILD = """\b
Sources (see `satdata sources`):
  digits               scikit-learn's handwritten digits; needs no --root
  voc-boxes            VOCdevkit/VOC20xx: Annotations, JPEGImages, ImageSets/Main
  voc-masks            VOCdevkit/VOC20xx: SegmentationClass, ImageSets/Segmentation
  coco-boxes/-masks    annotations/instances_<split>20xx.json + <split>20xx/ images,
                       or any layout: --annotations SPLIT=FILE --images SPLIT=DIR per split
  tiny-imagenet-boxes  tiny-imagenet-200/ (wnids.txt, train/*/*_boxes.txt, val/)
  flowers17-masks      Oxford 17 Flowers: jpg/ and trimaps/
  folder-masks         images/<class>/x.jpg beside masks/<class>/x.png
  cifar10, cifar100    the python-pickle batches (no maps)
  h5                   an HDF5 file in satkit's h5 layout (--root is the file)

\b
Examples:
  satdata build --source digits --out digits.zarr
  satdata build --source voc-boxes --root VOCdevkit --out voc.zarr --workers 2
  satdata build --manifest manifests/voc2012-boxes.json --root VOCdevkit --out voc.zarr

\b
Your own classes (a VOC-style export of CVAT, Label Studio, ...; or part of COCO):
  satdata build --source voc-boxes --root export --out mine.zarr --classes auto
  satdata build --source voc-masks --root export --out mine.zarr --classes classes.txt
  satdata build --source coco-boxes --root coco --out animals.zarr --classes animals.txt --skip-unknown-classes
  satdata build --source coco-masks --root export --out mine.zarr \\
      --annotations train=ann/train.json --images train=img/train \\
      --annotations val=ann/val.json --images val=img/val
A class file has one name per line, in class-index order (blank lines and # lines are
ignored); for voc-masks, mask index i+1 is class i. auto sorts the names the annotations
use by Unicode code point. Every split expected (VOC: train, val; COCO: train, val, or those
--annotations names) must have its files: a missing one is an error, never a smaller store
(--splits builds fewer on purpose).
"""


@click.group(cls=SatkitGroup, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, prog_name="satdata")
@debug_option
def main() -> None:
    """Turn datasets' own annotations into saliency stores for SAT training.

    A store is a Zarr v3 directory holding images, labels and saliency maps per split,
    with provenance and digests (docs/store-format.md). Train on it with `sattrain run`.
    """


@main.command(epilog=EPILOG_BUILD)
@click.option("--source", "-s", help="Dataset format to read (see `satdata sources`).")
@click.option("--root", "-r", type=click.Path(path_type=Path), help="The dataset's directory on disk.")
@click.option("--out", "-o", type=click.Path(), required=True,
              help="Store to write: a new local directory, e.g. voc.zarr (share it with `satdata pack`).")
@click.option("--manifest", type=click.Path(path_type=Path, dir_okay=False),
              help="Build the recipe of a manifest (manifests/*.json) and check the result against it.")
@click.option("--size", default=None, help="Stored image size: N or HxW.  [default: 32, the paper's]")
@click.option("--fit", type=click.Choice(["stretch", "crop", "pad"]), default=None,
              help="How images (and their maps) reach --size: stretch keeps every pixel and box, "
                   "crop cuts the centre, pad adds a black border.  [default: stretch]")
@click.option("--splits", default=None, help="Comma-separated splits to build, e.g. train,val.  [default: all the source has]")
@click.option("--workers", "-j", type=click.IntRange(min=0), default=0, show_default=True,
              help="Processes that decode images in parallel (0: decode in this process).")
@click.option("--dask", "dask_address", default=None, metavar="ADDRESS",
              help="Decode and write on Dask workers: local:N starts N on this machine, or a scheduler's "
                   "address (tcp://host:8786) whose workers all mount --out's file system. Needs satkit[dask].")
@click.option("--shard", default=None, metavar="I/N",
              help="Write only part I of N (counted from 1) into a hidden shared directory beside --out, "
                   "for job arrays without a scheduler; then `satdata finalize OUT` makes the store.")
@click.option("--overwrite", is_flag=True,
              help="Replace --out if it is an existing store (through a symlink: the store it names), only once "
                   "the new one is complete and only if nothing else changed it meanwhile.")
@click.option("--skip-bad", is_flag=True, help="Skip bad samples (and list them) instead of stopping at the first.")
@click.option("--label", type=click.Choice(["multi", "largest"]), default=None,
              help="voc-*, coco-*: multi-hot labels over all classes present (multi), or the class of the largest object (largest).  [default: multi]")
@click.option("--drop-difficult", is_flag=True, default=None, help="voc-boxes: ignore objects marked <difficult>1</difficult>.")
@click.option("--unmasked", type=click.Choice(["skip", "whole"]), default=None,
              help="flowers17-masks: images with no trimap are skipped, or get a whole-image map.  [default: skip]")
@click.option("--year", default=None, help="voc-*: which VOC20xx under --root.  [default: the only one, or the newest]")
@click.option("--classes", default=None, metavar="auto|FILE",
              help="voc-*, coco-*: the class list. auto: the names the annotations use, sorted; FILE: one "
                   "name per line, in index order (blank and # lines ignored).  [default: PASCAL's 20 "
                   "classes (VOC), the categories sorted by id (COCO)]")
@click.option("--skip-unknown-classes", is_flag=True, default=None,
              help="voc-*, coco-*: leave out objects of classes the list lacks (counted in the store's notes) "
                   "instead of stopping at the first.")
@click.option("--annotations", multiple=True, metavar="SPLIT=FILE",
              help="coco-*: a split's instances JSON, relative to --root, instead of "
                   "annotations/instances_<split>20xx.json; repeat per split, each with --images.")
@click.option("--images", multiple=True, metavar="SPLIT=DIR",
              help="coco-*: the folder the split's file_names are relative to (relative to --root).")
@click.option("--full-decode", is_flag=True,
              help="Decode every JPEG at full size. By default a JPEG much larger than --size is "
                   "decoded at a reduced DCT scale (still at least twice the resize target): "
                   "same geometry, several times faster, pixels within a few grey levels.")
@click.option("--quiet", "-q", is_flag=True, help="No progress bars.")
@json_option
def build(source: str | None, root: Path | None, out: str, manifest: Path | None, size: str | None,
          fit: str | None, splits: str | None, workers: int, dask_address: str | None, shard: str | None,
          overwrite: bool, skip_bad: bool,
          label: str | None, drop_difficult: bool | None, unmasked: str | None, year: str | None,
          classes: str | None, skip_unknown_classes: bool | None, annotations: tuple[str, ...],
          images: tuple[str, ...], full_decode: bool, quiet: bool, as_json: bool) -> None:
    """Build a store from a dataset on disk.

    Images and maps are resized together to --size, written in whole chunks to a hidden
    temporary directory, digested, and renamed onto --out only when complete: a failed or
    interrupted build leaves no store behind and never touches an existing one.

    \b
    On many workers (the same store, byte for byte, as one process writes):
      satdata build ... --dask local:4            # a Dask cluster on this machine
      satdata build ... --dask tcp://sched:8786    # an existing Dask scheduler
      satdata build ... --shard 2/3                # one job of an array; then:
      satdata finalize OUT                         # commits once all shards are done
    """
    def go() -> None:
        from satdata.build import BuildConfig, build as do_build, parse_size, resolve_splits
        from satdata.remote import refuse_remote_output
        from satdata.sources import SourceOptions

        refuse_remote_output(out, "--out")

        given = {k: v for k, v in dict(label=label, drop_difficult=drop_difficult,
                                       unmasked=unmasked, year=year, classes=classes,
                                       skip_unknown_classes=skip_unknown_classes,
                                       annotations=tuple(annotations) or None,
                                       images=tuple(images) or None).items() if v is not None}
        base: dict[str, Any] = {}
        man = None
        if manifest is not None:
            from satdata.manifest import load_manifest

            man = load_manifest(manifest)
            base = man.recipe_config()
        src = source or base.get("source")
        if not src:
            raise SatkitError("--source: required (or give --manifest)")
        if manifest is not None and source and source != base.get("source"):
            raise SatkitError(f"--source {source} contradicts the manifest's source {base.get('source')}")
        opts_dict = {**base.get("options", {}), **given}
        from satdata.sources import get_source_class

        needs_root = getattr(get_source_class(src), "needs_root", True)
        if needs_root and root is None:
            raise SatkitError(f"--root: required for source {src!r} (the dataset's directory)")
        try:
            opts = SourceOptions(**opts_dict)
        except TypeError as e:
            raise SatkitError(f"{manifest}: bad recipe options ({e})") from None
        cfg = BuildConfig(
            source=src,
            root=str(root) if root is not None else "",
            out=str(out),
            size=parse_size(size) if size else tuple(base.get("size", (32, 32))),
            fit=fit or base.get("fit", "stretch"),
            splits=resolve_splits(splits) or (tuple(base["splits"]) if base.get("splits") else None),
            workers=workers,
            dask=dask_address,
            overwrite=overwrite,
            skip_bad=skip_bad,
            options=opts,
            given_options=tuple(opts_dict),
            progress=not quiet,
            reduced_decode=not full_decode,
        )
        if man is not None:
            man.check_config(cfg)
        if shard is not None:
            from satdata.shards import build_shard, parse_shard

            r = build_shard(cfg, parse_shard(shard))
            left = r.shards - len(r.done)
            if as_json:
                echo_json({"shard": r.shard, "shards": r.shards, "samples": r.samples, "ranges": r.ranges,
                           "path": str(r.path), "seconds": round(r.seconds, 3), "shards_left": left,
                           "skipped": [list(b) for b in r.bad]})
                return
            click.echo(f"shard {r.shard}/{r.shards}: wrote {r.samples:,} samples ({r.ranges} range{'s' if r.ranges != 1 else ''}) into {r.path} "
                       f"in {r.seconds:.1f} s; " + (f"{left} of {r.shards} shards still to run, then "
                                                   if left else "all shards done: run ") + f"`satdata finalize {out}`")
            _echo_bad(r.bad)
            return
        _report_build(do_build(cfg), out, manifest, man, as_json)

    run_cli(go)


def _report_build(res: Any, out: str | Path, manifest: Path | None, man: Any, as_json: bool = False) -> None:
    """Check a finished build against its manifest (if any) and print what was written."""
    if man is not None:
        from satdata.manifest import check_store
        from satdata.store import open_store

        problems = check_store(open_store(res.path), man)
        if problems:
            raise SatkitError(f"{out}: built, but does not match {manifest}: " + "; ".join(problems))
    info = res.info
    if as_json:
        echo_json({"path": str(res.path), "dataset": info.dataset, "splits": info.splits, "classes": info.classes,
                   "image_size": list(info.image_size), "label_kind": info.label_kind, "maps": list(info.maps),
                   "notes": res.notes, "skipped": [list(b) for b in res.bad], "seconds": round(res.seconds, 3),
                   "manifest": None if manifest is None else str(manifest)})
        return
    counts = ", ".join(f"{s} {n:,}" for s, n in info.splits.items())
    click.echo(f"wrote {res.path}: {counts} ({len(info.classes)} classes, "
               f"{info.image_size[0]}x{info.image_size[1]}, maps: {', '.join(info.maps) or 'none'}) "
               f"in {res.seconds:.1f} s")
    for split, note in res.notes.items():
        if note:
            click.echo(f"  {split}: " + ", ".join(f"{k.replace('_', ' ')} {v:,}" if isinstance(v, int)
                                                  else f"{k.replace('_', ' ')} {v}" for k, v in note.items()))
    _echo_bad(res.bad)


def _echo_bad(bad: list[tuple[str, str]]) -> None:
    if bad:
        click.echo(f"skipped {len(bad)} bad samples:", err=True)
        for path, problem in bad[:50]:
            click.echo(f"  {path}: {problem}", err=True)
        if len(bad) > 50:
            click.echo(f"  ... and {len(bad) - 50} more (satdata info --json lists them)", err=True)


@main.command()
@click.argument("out", type=click.Path())
@click.option("--manifest", type=click.Path(path_type=Path, dir_okay=False),
              help="Also check the finished store against this manifest.")
@json_option
def finalize(out: str, manifest: Path | None, as_json: bool) -> None:
    """Make the store OUT from a build run as shards (`satdata build ... --shard I/N`).

    Checks that every shard has finished, closes the gaps of samples skipped with
    --skip-bad, writes digests and provenance and renames the store onto OUT, as a
    one-process build does. Until then nothing at OUT opens as a store.

    \b
    Example (three jobs, e.g. a SLURM array with --array=1-3):
      satdata build --source digits --out digits.zarr --shard $SLURM_ARRAY_TASK_ID/3
      satdata finalize digits.zarr
    """
    def go() -> None:
        from satdata.shards import finalize as do_finalize

        man = None
        if manifest is not None:
            from satdata.manifest import load_manifest

            man = load_manifest(manifest)
        _report_build(do_finalize(out), out, manifest, man, as_json)

    run_cli(go)


@main.command()
@click.argument("store")
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON.")
@storage_option
def info(store: str, as_json: bool, storage_options: tuple[str, ...]) -> None:
    """Summarise a store: dataset, classes, splits, maps, provenance.

    STORE is a directory, a packed .zip, or a URL (https://..., s3://...).
    """
    def go() -> None:
        from satdata.inspect import describe, format_info

        d = describe(open_store_arg(store, storage_options))
        click.echo(json.dumps(d, indent=2) if as_json else format_info(d))

    run_cli(go)


@main.command()
@click.argument("store")
@click.option("--manifest", type=click.Path(path_type=Path, dir_okay=False),
              help="Also check counts, classes and digests against this manifest.")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
@storage_option
def verify(store: str, manifest: Path | None, as_json: bool, storage_options: tuple[str, ...]) -> None:
    """Recompute every digest; name the array and samples that differ (exit 1 if any).

    STORE is a directory, a packed .zip, or a URL (https://..., s3://...): a store on a
    server is checked where it is, each chunk fetched once.
    """
    def go() -> None:
        from satdata.verify import Problem, verify_digests

        st = open_store_arg(store, storage_options)
        rep = verify_digests(st)
        if manifest is not None:
            from satdata.manifest import check_store, load_manifest

            for p in check_store(st, load_manifest(manifest)):
                rep.problems.append(Problem(str(manifest), p))
        if as_json:
            click.echo(json.dumps(rep.to_json(), indent=2))
        elif rep.ok:
            click.echo(f"{store}: OK ({len(rep.checked)} arrays match their digests"
                       + (f", matches {manifest}" if manifest else "") + ")")
        if not rep.ok:
            if not as_json:
                for p in rep.problems:
                    click.echo(f"{store}: {p}", err=True)
            raise SatkitError(f"{store}: verification failed ({len(rep.problems)} problems)")

    run_cli(go)


@main.command()
@click.argument("store")
@click.option("--out", "-o", type=click.Path(dir_okay=False), default="preview.png", show_default=True,
              help="PNG file to write.")
@click.option("--split", default=None, help="Split to show.  [default: the first]")
@click.option("--map", "map_name", default=None, help="Which map to overlay.  [default: the first]")
@click.option("--samples", "-n", "count", type=click.IntRange(1, 400), default=32, show_default=True,
              help="How many samples.")
@click.option("--seed", type=int, default=0, show_default=True, help="Which samples (a random pick, reproducible).")
@click.option("--scale", type=click.IntRange(1, 16), default=None, help="Upscale factor per tile.  [default: to ~128 px]")
@json_option
@storage_option
def preview(store: str, out: str, split: str | None, map_name: str | None, count: int, seed: int,
            scale: int | None, as_json: bool, storage_options: tuple[str, ...]) -> None:
    """Write a contact sheet: images, their map overlaid, and class names.

    For a teacher map (one that records each sample's target class), each tile also says
    "teacher: <class>"; where that is not the label it is red, the tile is framed in red,
    and the count is printed.
    """
    def go() -> None:
        from satdata.preview import check_sheet_out, make_sheet, save_sheet
        from satdata.remote import refuse_remote_output

        refuse_remote_output(out, "--out", what="a contact sheet")
        check_sheet_out(out)
        sheet = make_sheet(open_store_arg(store, storage_options), split=split, map_name=map_name, n=count, seed=seed, scale=scale)
        path = save_sheet(sheet, out)
        shown = sheet.with_teacher
        extra = (f" (the teacher's class differs from the label on {sheet.wrong} of {shown} tiles)"
                 if shown else "")
        if as_json:
            echo_json({"path": str(path), "tiles": count, "with_teacher": sheet.with_teacher,
                       "teacher_differs": sheet.wrong})
        else:
            click.echo(f"wrote {path}{extra}")

    run_cli(go)


@main.command()
@json_option
def sources(as_json: bool) -> None:
    """List the dataset formats `satdata build --source` reads."""
    from satdata.sources import get_source_class, source_names

    if as_json:
        echo_json({name: {"summary": get_source_class(name).summary,
                          "options": ["--" + o.replace("_", "-") for o in get_source_class(name).options]}
                   for name in source_names()})
        return
    for name in source_names():
        cls = get_source_class(name)
        opts = ", ".join("--" + o.replace("_", "-") for o in cls.options)
        click.echo(f"{name:<22} {cls.summary}" + (f"  [options: {opts}]" if opts else ""))


from satdata.cli_maps import compare_cmd, export_cmd, saliency_cmd  # noqa: E402

main.add_command(saliency_cmd, "saliency")
main.add_command(compare_cmd, "compare")
main.add_command(export_cmd, "export")
from satdata.cli_share import fetch_cmd, pack_cmd  # noqa: E402
main.add_command(pack_cmd, "pack")
main.add_command(fetch_cmd, "fetch")
from satdata.cli_maps import gc_cmd  # noqa: E402
main.add_command(gc_cmd, "gc")

if __name__ == "__main__":  # pragma: no cover
    main()
