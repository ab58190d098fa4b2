"""What every satkit command shares: any failure becomes one line and a non-zero exit.

A user who gives a bad option, a damaged store, a crafted checkpoint or a full disk sees
one line on stderr, ``Error: <what>, <where>``, never a Python traceback: known errors
(SatkitError, click's usage errors, the usual OS, text, JSON and unpickling errors) are
worded for the user; anything else is named by its type and followed by a hint. The
traceback is still one flag away for bug reports: ``--debug`` on ``satdata`` or
``sattrain`` (before the command), or ``SATKIT_DEBUG=1`` in the environment.
"""

from __future__ import annotations

import contextvars
import errno as errno_mod
import json
import os
import pickle
import re
import sys
import unicodedata
from typing import Any, Callable, Sequence, TypeVar

import click

from satdata.errors import SatkitError

DEBUG_ENV = "SATKIT_DEBUG"
DEBUG_HINT = f"(run with --debug or {DEBUG_ENV}=1 for the traceback)"
# Longest error line printed: a crafted store can put megabytes into a name.
MAX_LINE = 1000

# Set by the group's --debug option for the duration of one CLI call (a context variable,
# not a global, so that tests invoking the CLI many times in one process do not leak it).
_DEBUG_FLAG: contextvars.ContextVar[bool] = contextvars.ContextVar("satkit_debug", default=False)

F = TypeVar("F", bound=Callable[..., Any])


def debug_requested() -> bool:
    """Whether the user asked for tracebacks: ``--debug`` given, or SATKIT_DEBUG set to 1/true/yes/on."""
    if os.environ.get(DEBUG_ENV, "").strip().lower() in ("1", "true", "yes", "on"):
        return True
    return _DEBUG_FLAG.get()


def _set_debug(ctx: click.Context, param: click.Parameter, value: bool) -> None:
    if value:
        _DEBUG_FLAG.set(True)


def debug_option(f: F) -> F:
    """The global ``--debug`` flag of a command group (given before the command name)."""
    return click.option(
        "--debug", is_flag=True, expose_value=False, is_eager=True, callback=_set_debug,
        help=f"On an error, show the Python traceback instead of one line (also: {DEBUG_ENV}=1).",
    )(f)


def _printable(text: str) -> str:
    """``text`` with control characters escaped: a crafted name must not drive the terminal."""
    out = []
    for ch in text:
        if ch in "\n\t" or unicodedata.category(ch)[0] != "C":
            out.append(ch)
        else:
            out.append(ascii(ch)[1:-1])
    return "".join(out)


def _is_torch_advice(line: str) -> bool:
    """torch's suggestion to load a refused file unsafely: never relayed to the user."""
    low = line.lower()
    return "weights_only" in low or "arbitrary code" in low or "trusted source" in low or "add_safe_globals" in low


def one_line(message: str) -> str:
    """A message as one printable line of at most MAX_LINE characters.

    Lines are joined with spaces, sentences holding torch's advice to load a refused file with
    ``weights_only=False`` is dropped, and control characters are escaped.
    """
    sentences = [sent.strip() for ln in _printable(message).splitlines() for sent in re.split(r"(?<=\.)\s+", ln)]
    text = " ".join(sent for sent in sentences if sent and not _is_torch_advice(sent))
    text = text.replace("\t", " ")
    if len(text) > MAX_LINE:
        text = text[: MAX_LINE - 3] + "..."
    return text


STORAGE_OPTION_HELP = (
    "For a store at a URL: an fsspec storage option, KEY=VALUE (repeatable), e.g. "
    "-S endpoint_url=http://127.0.0.1:9000 -S key=ID -S secret=SECRET for an S3-compatible "
    "server, -S anon=true for a public bucket. AWS_* environment variables work too.")


def storage_option(f: F) -> F:
    """``--storage-option/-S KEY=VALUE`` (repeatable): endpoint and credentials of a store at a URL."""
    return click.option("--storage-option", "-S", "storage_options", multiple=True, metavar="KEY=VALUE",
                        help=STORAGE_OPTION_HELP)(f)


# Storage options that are always strings, whatever they look like (an all-digit access key).
_TEXT_OPTIONS = frozenset({"key", "secret", "token", "username", "password", "profile", "endpoint_url"})


def parse_storage_options(items: Sequence[str] | None, option: str = "--storage-option") -> dict[str, Any]:
    """``KEY=VALUE`` strings as fsspec storage options.

    A value that reads as JSON (``true``, ``3``, ``{"region_name": "eu"}``, ``"007"``) is
    that JSON value; anything else is the string itself (``endpoint_url=http://...``).
    Credentials (``key``, ``secret``, ``token``, ``username``, ``password``, ``profile``) are
    always strings: an all-digit access key stays text. A nested key
    ``client_kwargs.region_name=eu`` sets one entry of a dict option.
    """
    out: dict[str, Any] = {}
    for item in items or ():
        key, sep, raw = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise SatkitError(f"{option} {item!r}: expected KEY=VALUE (e.g. endpoint_url=http://127.0.0.1:9000)")
        parts = key.split(".")
        try:
            value: Any = json.loads(raw)
        except ValueError:
            value = raw
        if parts[-1] in _TEXT_OPTIONS and not isinstance(value, str):
            value = raw
        target = out
        for p in parts[:-1]:
            nxt = target.setdefault(p, {})
            if not isinstance(nxt, dict):
                raise SatkitError(f"{option} {item!r}: {p} is already set to a value, not an object")
            target = nxt
        target[parts[-1]] = value
    return out


def open_store_arg(path: Any, storage_options: Any = ()) -> Any:
    """Open the store a command was given (directory, .zip or URL) with its ``--storage-option``s."""
    from satdata.store import open_store

    return open_store(str(path), storage_options=parse_storage_options(storage_options))


def _errno_name(code: int | None) -> str:
    return errno_mod.errorcode.get(code, "") if code is not None else ""


def _os_error(e: OSError) -> str:
    """'<what> (<ERRNO>), <file>': an OSError in words, naming the file where it is known."""
    what = (e.strerror or str(e) or type(e).__name__).rstrip(".")
    what = what[:1].lower() + what[1:]
    name = _errno_name(e.errno)
    if name:
        what += f" ({name})"
    where = [str(f) for f in (e.filename, e.filename2) if f is not None]
    return what + (", " + " -> ".join(where) if where else "")


def error_line(e: BaseException) -> tuple[str, bool]:
    """(one-line message without the 'Error: ' prefix, whether ``e`` is a failure we expect).

    Unexpected failures (most likely a satkit bug) are named by type, and the CLI adds
    the hint that --debug shows the traceback.
    """
    where = getattr(e, "satkit_where", None)  # set by code that knows the file an error is about
    suffix = f", {where}" if where else ""
    if isinstance(e, SatkitError):
        return one_line(str(e)), True
    if isinstance(e, click.ClickException):
        msg = e.format_message()
        ctx = getattr(e, "ctx", None)
        if isinstance(e, click.UsageError) and ctx is not None:
            msg += f" (see '{ctx.command_path} --help')"
        return one_line(msg), True
    if isinstance(e, MemoryError):
        return one_line(f"out of memory (MemoryError{': ' + str(e) if str(e) else ''}){suffix}"), True
    if isinstance(e, RecursionError):
        return one_line(f"data nested too deeply to read (RecursionError){suffix}"), True
    if isinstance(e, UnicodeDecodeError):
        byte = e.object[e.start:e.start + 1].hex() if isinstance(e.object, (bytes, bytearray)) else "?"
        return one_line(f"text is not valid {e.encoding} (byte 0x{byte} at position {e.start}){suffix}"), True
    if isinstance(e, json.JSONDecodeError):
        return one_line(f"not valid JSON ({e.msg} at line {e.lineno} column {e.colno}){suffix}"), True
    if isinstance(e, pickle.UnpicklingError):
        first = one_line(str(e)).split(". ")[0].rstrip(".")
        return one_line(f"refused to unpickle: {first}{suffix}"), True
    if isinstance(e, OSError):
        return one_line(_os_error(e)), True
    from satdata.remote import network_problem

    problem = network_problem(e)  # botocore's and others' errors that are not OSErrors
    if problem is not None:
        return one_line(f"reading a remote store: {problem}{suffix}"), True
    text = str(e)
    module = type(e).__module__ or ""
    if "decompression" in text.lower() or module.startswith(("numcodecs", "zarr")):
        return one_line(f"stored data cannot be decoded ({type(e).__name__}: {text}){suffix}; the store is damaged "
                        "(`satdata verify STORE` names the array and samples)"), True
    return one_line(f"unexpected {type(e).__name__}{': ' + text if text else ''}{suffix}"), False


def format_error(e: BaseException) -> str:
    """The whole line the CLI prints for ``e`` (without the 'Error: ' prefix), hint included."""
    msg, expected = error_line(e)
    return msg if expected else f"{msg} {DEBUG_HINT}"


def run_cli(fn: Callable[[], Any], *, interrupted: str = "interrupted: nothing was written") -> Any:
    """Call fn; any exception becomes a one-line click error (exit 1), Ctrl-C exit 130.

    With --debug or SATKIT_DEBUG=1 the exception propagates and Python prints its traceback.
    """
    try:
        return fn()
    except KeyboardInterrupt:
        click.echo(interrupted, err=True)
        sys.exit(130)
    except (click.exceptions.Exit, click.exceptions.Abort):
        raise
    except click.ClickException as e:
        if debug_requested():
            raise
        line = click.ClickException(format_error(e))
        line.exit_code = e.exit_code
        raise line from None
    except Exception as e:  # noqa: BLE001 - the one place that turns every failure into a line
        if debug_requested():
            raise
        raise click.ClickException(format_error(e)) from None


class SatkitGroup(click.Group):
    """A click group whose every failure, usage errors included, is one ``Error:`` line.

    click prints a usage error as a usage block, a blank line and the message; a user of
    satkit sees the message on one line with a pointer to ``--help``. Exceptions that
    escape a command (a bug, or an error raised outside ``run_cli``) end the same way
    unless --debug or SATKIT_DEBUG=1 asks for the traceback.
    """

    def main(self, args: Any = None, prog_name: str | None = None, complete_var: str | None = None,
             standalone_mode: bool = True, **extra: Any) -> Any:
        if not standalone_mode:
            return super().main(args, prog_name, complete_var, standalone_mode, **extra)
        token = _DEBUG_FLAG.set(False)
        try:
            try:
                rv = super().main(args, prog_name, complete_var, False, **extra)
            except click.ClickException as e:
                click.echo(f"Error: {format_error(e)}", err=True)
                sys.exit(e.exit_code or 1)
            except click.exceptions.Abort:
                click.echo("Error: aborted", err=True)
                sys.exit(1)
            except Exception as e:  # noqa: BLE001 - last net: one line, not a traceback
                if debug_requested():
                    raise
                click.echo(f"Error: {format_error(e)}", err=True)
                sys.exit(1)
        finally:
            _DEBUG_FLAG.reset(token)
        sys.exit(rv if isinstance(rv, int) and not isinstance(rv, bool) else 0)


__all__ = ["DEBUG_ENV", "DEBUG_HINT", "STORAGE_OPTION_HELP", "SatkitGroup", "debug_option", "debug_requested",
           "error_line", "format_error", "one_line", "open_store_arg", "parse_storage_options", "run_cli",
           "storage_option"]


# --------------------------------------------------------------------------- progress

PROGRESS_ENV = "SATKIT_PROGRESS"  # "bar", "lines" or "off"; unset: a bar on a terminal, lines otherwise
PROGRESS_LINE_SECONDS = 30.0


class ProgressLines:
    """A progress bar's interface (update, set_postfix, write, close) printing a plain line
    every PROGRESS_LINE_SECONDS (and one at the end) instead of redrawing a bar: what a log
    file, a batch job's output or CI should hold, rather than thousands of carriage returns."""

    def __init__(self, total: int | None, desc: str, unit: str, initial: int = 0, unit_scale: bool = False,
                 every: float = PROGRESS_LINE_SECONDS) -> None:
        import time

        self.total, self.desc, self.unit, self.n, self.scale = total, desc, unit, initial, unit_scale
        self.every = every
        self._clock = time.monotonic
        self._t0 = self._last = self._clock()
        self._post = ""
        self._closed = False

    def __enter__(self) -> "ProgressLines":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def _amount(self, v: float) -> str:
        if not self.scale:
            return f"{int(v):,}"
        for unit in ("", "Ki", "Mi", "Gi", "Ti"):
            if abs(v) < 1024 or unit == "Ti":
                return f"{v:.1f} {unit}{self.unit}" if unit else f"{int(v)} {self.unit}"
            v /= 1024
        return str(v)  # pragma: no cover

    def _line(self) -> None:
        elapsed = max(1e-9, self._clock() - self._t0)
        of = f"/{self._amount(self.total)}" if self.total else ""
        pct = f" ({100 * self.n / self.total:.0f}%)" if self.total else ""
        rate = self.n / elapsed
        unit = "" if self.scale else f" {self.unit}"
        print(f"{self.desc}: {self._amount(self.n)}{of}{unit}{pct}, {self._amount(rate)}{unit}/s, "
              f"{elapsed:.0f} s{self._post}", file=sys.stderr, flush=True)
        self._last = self._clock()

    def update(self, n: float = 1) -> None:
        self.n += n
        if self._clock() - self._last >= self.every:
            self._line()

    def set_postfix(self, ordered_dict: Any = None, refresh: bool = True, **kw: Any) -> None:
        items = dict(ordered_dict or {}, **kw)
        self._post = "; " + ", ".join(f"{k} {v}" for k, v in items.items()) if items else ""

    def set_description(self, desc: str, refresh: bool = True) -> None:
        self.desc = desc

    def refresh(self) -> None:
        pass

    @staticmethod
    def write(text: str, file: Any = None) -> None:
        print(text, file=file or sys.stderr, flush=True)

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            if self._clock() - self._t0 >= self.every:  # short steps say nothing more than their result
                self._line()


def progress_bar(total: int | None = None, desc: str = "", unit: str = "it", *, enabled: bool = True,
                 initial: int = 0, unit_scale: bool = False, **tqdm_kw: Any) -> Any:
    """The progress display of every long step: a tqdm bar on a terminal (stderr a TTY), a
    plain line every 30 s otherwise (ProgressLines), nothing when ``enabled`` is False.
    ``SATKIT_PROGRESS=bar|lines|off`` overrides the choice."""
    from tqdm.auto import tqdm

    mode = os.environ.get(PROGRESS_ENV, "").strip().lower()
    if not enabled or mode == "off":
        return tqdm(total=total, disable=True)
    if mode == "lines" or (mode != "bar" and not _is_tty(sys.stderr)):
        return ProgressLines(total, desc, unit, initial, unit_scale)
    kw = {"unit_divisor": 1024} if unit_scale else {}
    return tqdm(total=total, desc=desc, unit=unit, initial=initial, unit_scale=unit_scale, file=sys.stderr,
                dynamic_ncols=True, leave=False, **kw, **tqdm_kw)


def _is_tty(stream: Any) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):
        return False


# --------------------------------------------------------------------------- --json

JSON_HELP = "Print the result as one JSON object on stdout (progress and warnings stay on stderr)."


def json_option(f: F) -> F:
    """``--json``: the command's result as one JSON object on stdout, instead of its text."""
    return click.option("--json", "as_json", is_flag=True, help=JSON_HELP)(f)  # type: ignore[return-value]


def echo_json(obj: Any) -> None:
    click.echo(json.dumps(obj, indent=1, default=str))
