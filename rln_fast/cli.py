"""The rln-fast command: deconvolve, psf, synth, train, bench, info and demo.

Every command reports a failure as one line on stderr ("rln-fast CMD: what went wrong, which
file, what to do"), exits non-zero and leaves no partial output; ``clean_errors`` below is the
one place that turns exceptions into that line.
"""

from __future__ import annotations

import functools
import json
import sys
from collections.abc import Callable
from typing import Any

import click

# Exit codes: 1 bad input or failed run, 130 interrupted (Ctrl-C, as shells report SIGINT).
EXIT_ERROR = 1
EXIT_INTERRUPTED = 130


class CommandError(Exception):
    """A failure already worded for the user: printed as is after "rln-fast CMD: "."""


def _one_line(e: BaseException) -> str:
    text = str(e).strip() or type(e).__name__
    if isinstance(e, FileNotFoundError) and e.filename and str(e.filename) not in text:
        text = f"{text}: {e.filename}"
    if isinstance(e, OSError) and e.errno == 28:  # ENOSPC
        where = f" writing {e.filename}" if e.filename else ""
        text = f"no space left on the device{where}; free space or choose another output folder"
    return " ".join(text.split())


def clean_errors(name: str) -> Callable:
    """Decorator for a command body: known failures become one line on stderr and an exit code.

    Programming errors (anything not listed) still raise with a traceback, so bugs are not
    hidden behind a one-line message.
    """

    def wrap(fn: Callable) -> Callable:
        @functools.wraps(fn)
        def run(*args: Any, **kwargs: Any) -> Any:
            try:
                return fn(*args, **kwargs)
            except KeyboardInterrupt:
                click.echo(f"rln-fast {name}: interrupted; no output was written "
                           "(a tiled run keeps its finished blocks: rerun to resume)", err=True)
                sys.exit(EXIT_INTERRUPTED)
            except (CommandError, ValueError, TypeError, OSError, RuntimeError) as e:
                click.echo(f"rln-fast {name}: {_one_line(e)}", err=True)
                sys.exit(EXIT_ERROR)

        return run

    return wrap


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def main() -> None:
    """Fast 3D deconvolution (RLN and Richardson-Lucy) on PyTorch."""


@main.command()
def info() -> None:
    """Print the compiled backends, CUDA architectures and versions."""
    from . import backend_info

    click.echo(json.dumps(backend_info(), indent=2))


@main.command()
@click.option("--out", "out_dir", default="rln_fast_demo", show_default=True,
              help="Folder for demo.png and demo.json.")
@click.option("--device", default=None, help="cpu or cuda (default: cuda when available).")
@click.option("--iterations", default=30, show_default=True, help="Richardson-Lucy iterations.")
@clean_errors("demo")
def demo(out_dir: str, device: str | None, iterations: int) -> None:
    """Deconvolve a synthetic widefield volume with RL and the shipped RLN; write a comparison."""
    from .demo import run_demo

    m = run_demo(out_dir, device=device, rl_iterations=iterations)
    for name, value in m["psnr_db"].items():
        click.echo(f"  PSNR {name:>6}: {value:6.2f} dB")
    for name, value in m["seconds"].items():
        click.echo(f"  time {name:>6}: {value:6.2f} s")
    click.echo(f"wrote {out_dir}/demo.png and {out_dir}/demo.json")


if __name__ == "__main__":
    main()
