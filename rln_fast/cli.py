"""The rln-fast command: info and demo (deconvolve, psf, synth, train follow the API of the same names)."""

from __future__ import annotations

import json
import sys

import click


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
def demo(out_dir: str, device: str | None, iterations: int) -> None:
    """Deconvolve a synthetic widefield volume with RL and the shipped RLN; write a comparison."""
    from .demo import run_demo

    try:
        m = run_demo(out_dir, device=device, rl_iterations=iterations)
    except (ValueError, FileNotFoundError, RuntimeError) as e:
        click.echo(f"rln-fast demo: {e}", err=True)
        sys.exit(1)
    for name, value in m["psnr_db"].items():
        click.echo(f"  PSNR {name:>6}: {value:6.2f} dB")
    for name, value in m["seconds"].items():
        click.echo(f"  time {name:>6}: {value:6.2f} s")
    click.echo(f"wrote {out_dir}/demo.png and {out_dir}/demo.json")


if __name__ == "__main__":
    main()
