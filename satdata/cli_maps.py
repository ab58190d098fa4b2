"""`satdata saliency`, `satdata compare`, `satdata export`: click commands (registered on satdata.cli.main).

Each only parses options and calls one library function: satdata.saliency.generate.generate_maps,
satdata.compare.compare_maps, satdata.export.export_h5. Heavy imports (torch) happen
inside the commands, so `satdata --help` stays fast.
"""

from __future__ import annotations

import json
from pathlib import Path

import click

from satdata.clikit import echo_json, json_option, open_store_arg, run_cli, storage_option

# The names of satdata.saliency.methods.ALGORITHMS (kept here so the CLI does not import torch to
# build its help; tests/test_saliency.py checks the two agree).
METHOD_NAMES = ("gradcampp", "gradcam", "gbp", "smoothgrad", "smoothgrad-abs", "guided-gradcampp")


def _split_list(text: str | None) -> tuple[str, ...] | None:
    if not text:
        return None
    parts = tuple(p.strip() for p in text.split(",") if p.strip())
    return parts or None


EPILOG_SALIENCY = """\b
Methods (docs/method.md, "S from a store's map"):
  gradcampp         Grad-CAM++ at the last conv stage, min-max to [0, 1]   (unit, 1 channel)
  gradcam           Grad-CAM, the same way                                 (unit, 1 channel)
  gbp               sign of the guided-backprop gradient, +-1              (signed, 3 channels)
  smoothgrad        SmoothGrad as in SAT: 10 samples, sigma 0.15 of the
                    range, signed mean gradient, min-max over all channels (unit, 3 channels)
  smoothgrad-abs    not the paper's: mean |SmoothGrad| over channels       (unit, 1 channel)
  guided-gradcampp  Grad-CAM++ where the guided sign is +1, -1 elsewhere   (signed, 3 channels)

\b
Examples:
  satdata saliency cifar10.zarr --teacher runs/resnet34-adv --method gradcampp --name gcpp_adv
  satdata saliency tiny.zarr --arch resnet50 --weights resnet50.pth --method gbp --device cuda

\b
Before any map, the teacher is scored (eval mode) on the store's test split, else val, on
a seeded subset of at most 1,000 samples; a warning follows when it is below halfway
between chance and 1, (1 + 1/K) / 2 for K classes: such a teacher's maps are mostly noise.
Each map is stored with the class it was computed for (`satdata preview` shows it).
"""


@click.command("saliency", epilog=EPILOG_SALIENCY)
@click.argument("store")
@click.option("--teacher", "-t", help="A sattrain run directory or checkpoint file.")
@click.option("--arch", help="A torchvision classification architecture (with --weights), e.g. resnet50.")
@click.option("--weights", type=click.Path(path_type=Path, dir_okay=False),
              help="Local weights file for --arch (read with weights_only=True; nothing is downloaded).")
@click.option("--method", "-m", type=click.Choice(METHOD_NAMES), required=True, help="Saliency method.")
@click.option("--name", default=None, help="Name of the new map.  [default: the method's name]")
@click.option("--splits", default=None,
              help="Comma-separated splits to compute; a subset only when replacing a map (--overwrite), "
                   "whose other splits are kept.  [default: all]")
@click.option("--target", type=click.Choice(["predicted", "label"]), default="predicted", show_default=True,
              help="Class the map explains: the teacher's prediction, or the true label.")
@click.option("--batch-size", "-b", type=click.IntRange(min=1), default=256, show_default=True,
              help="Images per batch on the device (SmoothGrad runs 10 such passes).")
@click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda or cuda:N.")
@click.option("--layer", default=None,
              help="Grad-CAM layer (a module name of the teacher).  [default: the last conv stage, or the "
                   "last stage of at least 2x2]")
@click.option("--seed", type=int, default=0, show_default=True, help="SmoothGrad's noise seed.")
@click.option("--dask", "dask_address", default=None, metavar="ADDRESS",
              help="Compute on Dask workers: local:N starts N on this machine, or a scheduler's address; every "
                   "worker must see the store and the teacher at the same paths. Same maps as one process.")
@click.option("--overwrite", is_flag=True, help="Replace an existing map of that name (once the new one is complete).")
@click.option("--quiet", "-q", is_flag=True, help="No progress bar.")
@json_option
def saliency_cmd(store: str, teacher: str | None, arch: str | None, weights: Path | None, method: str,
                 name: str | None, splits: str | None, target: str, batch_size: int, device: str,
                 layer: str | None, seed: int, dask_address: str | None, overwrite: bool, quiet: bool,
                 as_json: bool) -> None:
    """Add maps from a frozen teacher to a local store.

    The maps are computed in batches on the device and written under a fresh name, then
    committed with one atomic write of the store's attributes: a failure, Ctrl-C or kill
    leaves the store exactly as it was, and `satdata verify` passes. The teacher's
    held-out accuracy is printed first (and recorded), with a warning when it is low.
    """
    def go() -> None:
        from satdata.saliency.generate import SaliencyConfig, generate_maps

        cfg = SaliencyConfig(store=store, method=method, name=name, teacher=teacher, arch=arch,
                             weights=str(weights) if weights else None, splits=_split_list(splits),
                             target=target, batch_size=batch_size, device=device, overwrite=overwrite,
                             layer=layer, seed=seed, progress=not quiet, dask=dask_address)
        res = generate_maps(cfg, log=lambda m: click.echo(m, err=True))
        mi = res.info.maps[res.name]
        computed = mi.provenance.get("splits_computed", [])
        counts = ", ".join(f"{s} {res.info.splits[s]:,}" for s in computed)
        acc = ", ".join(f"{s} {a:.3f}" for s, a in res.teacher_accuracy.items())
        if res.teacher_check is not None and res.teacher_check.low:
            acc += " (LOW: see the warning above)"
        layer_txt = f", layer {res.cam_layer.name} {res.cam_layer.hw[0]}x{res.cam_layer.hw[1]}" if res.cam_layer else ""
        if as_json:
            echo_json({"path": str(res.path), "map": res.name, "method": res.method, "encoding": mi.encoding,
                       "channels": mi.channels, "splits": {s: res.info.splits[s] for s in computed},
                       "layer": None if not res.cam_layer else {"name": res.cam_layer.name,
                                                                 "size": list(res.cam_layer.hw)},
                       "teacher_accuracy": res.teacher_accuracy,
                       "teacher_low": bool(res.teacher_check is not None and res.teacher_check.low),
                       "device": str(res.device), "seconds": round(res.seconds, 3)})
            return
        click.echo(f"added map {res.name} to {res.path}: {res.method} ({mi.encoding}, {mi.channels} channel"
                   f"{'s' if mi.channels > 1 else ''}{layer_txt}) for {counts} on {res.device} in {res.seconds:.1f} s"
                   + (f"; teacher accuracy {acc}" if acc else ""))

    run_cli(go)


@click.command("compare")
@click.argument("store")
@click.option("--map", "map_a", required=True, help="The map to score (e.g. gradcampp).")
@click.option("--against", "map_b", required=True, help="The map whose object is the reference (e.g. a mask or boxes).")
@click.option("--split", "split", default=None, help="Comma-separated splits.  [default: every split]")
@click.option("--threshold", type=click.FloatRange(0.0, 1.0), default=0.5, show_default=True,
              help="IoU counts pixels where --map, in [0, 1], is at least this.")
@click.option("--json", "as_json", is_flag=True, help="Print the scores as JSON.")
@storage_option
def compare_cmd(store: str, map_a: str, map_b: str, split: str | None, threshold: float, as_json: bool,
                storage_options: tuple[str, ...]) -> None:
    """Score how well one map agrees with another, per class and overall.

    Pointing game (is the map's maximum inside the other map's object), IoU of the map
    thresholded with the object, and the share of the map's positive energy inside the
    object. Images whose reference object is empty are left out and counted.
    """
    def go() -> None:
        from satdata.compare import compare_maps
        c = compare_maps(open_store_arg(store, storage_options), map_a, map_b, splits=_split_list(split), threshold=threshold)
        click.echo(json.dumps(c.to_json(), indent=2) if as_json else c.format())

    run_cli(go)


@click.command("export")
@click.argument("store")
@click.option("--out", "-o", "out", type=click.Path(dir_okay=False), default=None,
              help="HDF5 file to write (satkit's h5 layout; `satdata build --source h5` reads it).  [required]")
@click.option("--to", "to", type=click.Path(dir_okay=False), default=None, hidden=True)  # the older spelling
@click.option("--splits", default=None, help="Comma-separated splits.  [default: all]")
@click.option("--maps", default=None, help="Comma-separated maps.  [default: all]")
@click.option("--overwrite", is_flag=True, help="Replace --out if it exists (once the new file is complete).")
@click.option("--quiet", "-q", is_flag=True, help="No progress bar.")
@json_option
@storage_option
def export_cmd(store: str, out: str | None, to: str | None, splits: str | None, maps: str | None, overwrite: bool,
               quiet: bool, as_json: bool, storage_options: tuple[str, ...]) -> None:
    """Export a store to one HDF5 file: images, labels, ids, boxes and maps, bit for bit."""
    def go() -> None:
        from satdata.export import export_h5
        from satdata.remote import refuse_remote_output

        if out is not None and to is not None:
            raise click.UsageError("give the HDF5 file once: --out (--to is its older name)")
        dest = out if out is not None else to
        if dest is None:
            raise click.UsageError("Missing option '--out' / '-o': the HDF5 file to write.")
        refuse_remote_output(dest, "--out", what="an HDF5 file")
        st = open_store_arg(store, storage_options)
        split_list = _split_list(splits)
        map_list = list(_split_list(maps) or ()) if maps is not None else None
        path = export_h5(st, dest, splits=split_list, maps=map_list, overwrite=overwrite, progress=not quiet)
        counts = ", ".join(f"{s} {n:,}" for s, n in st.info.splits.items() if not split_list or s in split_list)
        shown = map_list if map_list is not None else sorted(st.info.maps)
        if as_json:
            echo_json({"path": str(path), "splits": {s: n for s, n in st.info.splits.items()
                                                     if not split_list or s in split_list}, "maps": list(shown)})
        else:
            click.echo(f"wrote {path}: {counts} (maps: {', '.join(shown) or 'none'})")

    run_cli(go)


@click.command("gc")
@click.argument("store")
@click.option("--dry-run", is_flag=True, help="List what would be removed and the bytes freed; remove nothing.")
@click.option("--wait", type=click.FloatRange(min=0), default=0, show_default=True, metavar="SECONDS",
              help="Wait up to this long for readers of the store (training runs) to finish, instead of refusing.")
@json_option
def gc_cmd(store: str, dry_run: bool, wait: float, as_json: bool) -> None:
    """Remove the arrays a local store keeps that its attributes no longer name.

    A replaced map (`satdata saliency --overwrite`) keeps its old arrays, so that a training
    run which opened the store before keeps reading the version it started with
    (docs/store-format.md, "Readers and writers together"); so do the arrays of an
    interrupted change. This removes them, each array's zarr.json before its chunks, and
    prints what it removed and the bytes freed. While a reader (a training run) holds the
    store it refuses, naming the reader's process, or waits with --wait.
    """
    def go() -> None:
        from satdata.gc import collect, format_bytes

        res = collect(store, dry_run=dry_run, wait=wait, log=(lambda m: click.echo(m, err=True)) if as_json else click.echo)
        n = len(res.removed)
        if as_json:
            echo_json({"store": store, "dry_run": dry_run, "removed": [str(r) for r in res.removed],
                       "freed_bytes": res.freed})
        elif not n:
            click.echo(f"{store}: nothing to remove (every array is named by the store's attributes)")
        elif dry_run:
            click.echo(f"{store}: would remove {n} entr{'y' if n == 1 else 'ies'}, freeing {format_bytes(res.freed)} "
                       "(dry run: nothing removed)")
        else:
            click.echo(f"{store}: removed {n} entr{'y' if n == 1 else 'ies'}, freed {format_bytes(res.freed)}")

    run_cli(go)


__all__ = ["METHOD_NAMES", "compare_cmd", "export_cmd", "gc_cmd", "saliency_cmd"]
