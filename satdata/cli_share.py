"""`satdata pack`, `satdata fetch`: click commands (registered on satdata.cli.main).

Each only parses options and calls one library function: satdata.share.pack and
satdata.share.fetch.
"""

from __future__ import annotations

import click

from satdata.clikit import echo_json, json_option, run_cli, storage_option

EPILOG_PACK = """\b
Examples:
  satdata pack digits.zarr --out digits.zip
  satdata verify digits.zip                 # a packed store is a store: info, verify,
  sattrain run digits.zip --method sat      # preview and sattrain read it in place
  aws s3 cp digits.zip s3://lab/digits.zip  # share it; others read it where it is:
  satdata info https://example.org/digits.zip

\b
The zip holds exactly what the store's attributes name: every array's zarr.json and
chunk files, the groups' zarr.json and, last, the root zarr.json (nothing else in the
directory: no leftovers of interrupted changes, no lock files). Entries are stored
uncompressed (chunks are compressed already, or raw images that barely compress),
sorted, with a fixed date and permissions: the same store packs to the same bytes on
any machine. Every chunk file is checked against its recorded digest on the way in.
"""

EPILOG_FETCH = """\b
Examples:
  satdata fetch https://example.org/stores/voc.zarr --out voc.zarr
  satdata fetch s3://lab/voc.zarr --out voc.zarr -S endpoint_url=http://127.0.0.1:9000
  satdata fetch https://example.org/digits.zip --out digits.zarr   # unpacked to a directory
  satdata fetch https://example.org/digits.zip --out digits.zip    # kept as the .zip

\b
URL is a store directory (no listing needed: the files come from the store's own
attributes) or a packed .zip. A .zip is downloaded whole and then, for an --out that
does not end in .zip, unpacked into the directory --out (the usual choice: a directory
loads fastest); for an --out ending in .zip it is kept as it is.

\b
Nothing is moved to --out until every chunk file matched its recorded digest as it
arrived and the whole store verified (as `satdata verify` does). The download lives in
the hidden .NAME.fetch-partial (a .zip in .NAME.fetch-partial.zip) beside --out; after
a failure, Ctrl-C or a kill, run the same command again: it keeps what is there and
matches its digest (a .zip resumes from the bytes already there) and fetches only the
rest. Remove that directory to give up on a download.
"""


@click.command("pack", epilog=EPILOG_PACK)
@click.argument("store")
@click.argument("out_arg", metavar="[OUT]", required=False)
@click.option("--out", "-o", "out", default=None, help="The .zip to write (OUT, as the second argument, also works).")
@click.option("--overwrite", is_flag=True, help="Replace --out if it is an existing packed satkit store or an empty file (once the new zip "
                   "is complete); any other file is refused.")
@click.option("--quiet", "-q", is_flag=True, help="No progress bar.")
@json_option
def pack_cmd(store: str, out_arg: str | None, out: str | None, overwrite: bool, quiet: bool, as_json: bool) -> None:
    """Pack the store directory STORE into one file, --out (.zip), to share.

    The same store always packs to the same bytes. OUT is written beside its final name
    and renamed into place when complete: an interrupted pack leaves no zip behind.
    """
    def go() -> None:
        from satdata.share import pack

        if out is not None and out_arg is not None and out != out_arg:
            raise click.UsageError(f"two outputs given ({out_arg} and --out {out}); give one")
        dest = out if out is not None else out_arg
        if dest is None:
            raise click.UsageError("Missing option '--out' / '-o': the .zip to write.")
        res = pack(store, dest, overwrite=overwrite, progress=not quiet)
        if as_json:
            echo_json({"path": str(res.path), "files": res.files, "bytes": res.bytes, "store_digest": res.store_digest})
            return
        click.echo(f"wrote {res.path}: {res.files} files, {res.bytes / 1e6:.1f} MB "
                   f"(store digest {res.store_digest[:16]})")

    run_cli(go, interrupted="interrupted: no zip was written")


@click.command("fetch", epilog=EPILOG_FETCH)
@click.argument("url")
@click.option("--out", "-o", required=True,
              help="Where to put the store: a new local directory (or, for a .zip URL, NAME.zip to keep the archive).")
@click.option("--overwrite", is_flag=True,
              help="Replace --out if it is an existing store or an empty directory (for a .zip --out: a packed "
                   "store or an empty file), only once the new one has verified; anything else is refused.")
@click.option("--workers", "--jobs", "-j", "jobs", type=click.IntRange(1, 64), default=16, show_default=True,
              help="Downloads in flight at once (--jobs: its older name).")
@click.option("--retries", type=click.IntRange(0, 10), default=2, show_default=True,
              help="Further attempts per file after a dropped connection, a timeout or a server error "
                   "(not after not found or forbidden).")
@storage_option
@click.option("--quiet", "-q", is_flag=True, help="No progress bar.")
@json_option
def fetch_cmd(url: str, out: str, overwrite: bool, jobs: int, retries: int, storage_options: tuple[str, ...],
              quiet: bool, as_json: bool) -> None:
    """Download the store at URL into --out, verifying every file; resumable.

    URL: https://..., s3://... or any fsspec URL of a store directory or a packed .zip.
    """
    from pathlib import Path

    from satdata.share import fetch_partial, fetch_partial_zip

    kept = fetch_partial_zip(Path(out)) if url.lower().rstrip("/").endswith(".zip") else fetch_partial(Path(out))

    def go() -> None:
        from satdata.clikit import parse_storage_options
        from satdata.share import fetch

        res = fetch(url, out, storage_options=parse_storage_options(storage_options), overwrite=overwrite,
                    jobs=jobs, retries=retries, progress=not quiet)
        reused = ""
        if res.reused:
            reused = (f", resumed after {res.reused / 1e6:.1f} MB already downloaded" if url.lower().endswith(".zip")
                      else f", {res.reused} kept from an earlier run")
        if as_json:
            echo_json({"path": str(res.path), "downloaded": res.downloaded, "bytes": res.bytes, "reused": res.reused,
                       "seconds": round(res.seconds, 3)})
            return
        click.echo(f"wrote {res.path}: {res.downloaded} files downloaded ({res.bytes / 1e6:.1f} MB){reused}, "
                   f"verified in {res.seconds:.1f} s")

    run_cli(go, interrupted=f"interrupted: nothing was written to {out}; what was downloaded and verified is "
                            f"kept in {kept}, and the same command resumes from there")


__all__ = ["fetch_cmd", "pack_cmd"]
