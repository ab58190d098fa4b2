"""What every satkit command shares: user errors become one line and exit code 1."""

from __future__ import annotations

import sys
from typing import Any, Callable

import click

from satdata.errors import SatkitError


def run_cli(fn: Callable[[], Any], *, interrupted: str = "interrupted: nothing was written") -> Any:
    """Call fn; a SatkitError becomes a one-line click error (exit 1), Ctrl-C exit 130."""
    try:
        return fn()
    except SatkitError as e:
        raise click.ClickException(str(e)) from None
    except KeyboardInterrupt:
        click.echo(interrupted, err=True)
        sys.exit(130)
