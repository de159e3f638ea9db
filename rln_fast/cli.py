"""The rln-fast command: deconvolve, psf, synth, train, bench, info and demo.

Every command reports a failure as one line on stderr ("rln-fast CMD: what went wrong, which
file, what to do"), exits non-zero and leaves no partial output; ``clean_errors`` below is the
one place that turns exceptions into that line.

Every command that computes takes ``--threads N`` and ``-q/--quiet``, and those with long
steps ``--progress/--no-progress`` (default: progress bars on stderr when it is a terminal).
Nothing heavy is imported at module level (torch, numpy, the package's modules): ``rln-fast
--help`` and ``rln-fast CMD --help`` answer without loading torch (tests/test_cli.py checks).
"""

from __future__ import annotations

import functools
import inspect
import json
import os
import sys
from collections.abc import Callable
from pathlib import Path
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
    for note in getattr(e, "__notes__", ()):  # what a failed run kept or removed
        text = f"{text}; {note}"
    return " ".join(text.split())


_INTERRUPTED = {
    "deconvolve": "no output was written; its finished blocks are kept: rerun the same command "
                  "to resume",
    "rln": "no output was written; its finished blocks are kept: rerun the same command to resume",
    "train": "the last checkpoint is kept: rerun the same command to resume",
    "synth": "the pairs written so far are complete files: rerun with --skip-existing to finish",
}


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
            except KeyboardInterrupt as e:
                notes = getattr(e, "__notes__", None)
                what = ("no output was written; " + "; ".join(notes) if notes
                        else _INTERRUPTED.get(name, "no output was written"))
                click.echo(f"rln-fast {name}: interrupted; {what}", err=True)
                sys.exit(EXIT_INTERRUPTED)
            except (CommandError, ValueError, TypeError, OSError, RuntimeError) as e:
                click.echo(f"rln-fast {name}: {_one_line(e)}", err=True)
                sys.exit(EXIT_ERROR)

        return run

    return wrap


class _LazyGroup(click.Group):
    """A group whose commands in ``lazy`` are built on first use, by a factory, because their
    option defaults come from a module that imports torch (train: TrainConfig). ``lazy``
    maps a name to (factory, the command's body): the command list in ``--help`` takes the
    one-line summary from the body's docstring instead of building the command."""

    lazy: dict[str, tuple[Callable[[], click.Command], Callable]] = {}

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(set(super().list_commands(ctx)) | set(self.lazy))

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        if name in self.lazy and name not in self.commands:
            self.add_command(self.lazy[name][0](), name)
        return super().get_command(ctx, name)

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        names = self.list_commands(ctx)
        limit = formatter.width - 6 - max(map(len, names), default=0)
        rows = []
        for name in names:
            if name in self.lazy and name not in self.commands:
                doc = inspect.getdoc(self.lazy[name][1]) or ""
                rows.append((name, click.utils.make_default_short_help(doc, limit)))
                continue
            cmd = self.get_command(ctx, name)
            if cmd is not None and not cmd.hidden:
                rows.append((name, cmd.get_short_help_str(limit)))
        if rows:
            with formatter.section("Commands"):
                formatter.write_dl(rows)


@click.group(cls=_LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
def main() -> None:
    """Fast 3D deconvolution (RLN and Richardson-Lucy) on PyTorch."""


# --------------------------------------------------------------------------- talking

_QUIET = "rln_fast.quiet"
_THREAD_VARS = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")


def _echo(message: str) -> None:
    """An informational line on stdout, unless the command runs with -q/--quiet."""
    ctx = click.get_current_context(silent=True)
    if ctx is None or not ctx.meta.get(_QUIET):
        click.echo(message)


def _warn(name: str, message: str) -> None:
    """A warning on stderr, also with -q (it says what rln-fast assumed)."""
    click.echo(f"rln-fast {name}: warning: {message}", err=True)


def _show_progress(progress: bool | None, quiet: bool) -> bool:
    """Progress bars on stderr: never with quiet, as asked by --progress/--no-progress, else
    only when stderr is a terminal (not in pipes, logs or batch jobs)."""
    if quiet:
        return False
    if progress is not None:
        return progress
    return sys.stderr.isatty()


def _set_threads(threads: int | None, torch: bool = True) -> None:
    """Use ``threads`` CPU threads: torch's intra-op pool, and OpenMP in rln_fast's kernels
    (they share torch's libgomp, so torch.set_num_threads sets both); the OMP/MKL/OpenBLAS
    variables also cover what is imported later and child processes."""
    if threads is None:
        return
    for var in _THREAD_VARS:
        os.environ[var] = str(threads)
    if torch:
        import torch as _torch

        _torch.set_num_threads(threads)


def _talk_options(progress: bool = True, torch: bool = True) -> Callable:
    """--threads and -q/--quiet (and --progress/--no-progress when ``progress``) for a command
    that computes; the command body gets ``progress`` as a plain bool."""

    def decorate(fn: Callable) -> Callable:
        @functools.wraps(fn)
        def run(*args: Any, quiet: bool, threads: int | None, **kw: Any) -> Any:
            click.get_current_context().meta[_QUIET] = quiet
            _set_threads(threads, torch=torch)
            if progress:
                kw["progress"] = _show_progress(kw["progress"], quiet)
            return fn(*args, **kw)

        options = [
            click.option("--threads", type=click.IntRange(min=1), default=None, metavar="N",
                         help="CPU threads (torch and rln_fast's OpenMP kernels) [all cores]."),
            click.option("-q", "--quiet", is_flag=True,
                         help="Print nothing but warnings and errors" + (" (no progress)."
                                                                        if progress else ".")),
        ]
        if progress:
            options.append(click.option(
                "--progress/--no-progress", default=None,
                help="Progress bars on stderr [only when stderr is a terminal]."))
        for option in reversed(options):
            run = option(run)
        return run

    return decorate


@main.command()
def info() -> None:
    """Print the compiled backends, CUDA architectures and versions."""
    from . import backend_info

    click.echo(json.dumps(backend_info(), indent=2))


@main.command()
@click.option("--out-dir", default="rln_fast_demo", show_default=True,
              help="Folder for demo.png and demo.json.")
@click.option("--device", default=None, help="cpu or cuda (default: cuda when available).")
@click.option("--num-iter", default=30, show_default=True, help="Richardson-Lucy iterations.")
@_talk_options()
@clean_errors("demo")
def demo(out_dir: str, device: str | None, num_iter: int, progress: bool) -> None:
    """Deconvolve a synthetic widefield volume with RL and the shipped RLN; write a comparison."""
    from .demo import run_demo

    m = run_demo(out_dir, device=device, num_iter=num_iter, progress=progress)
    for name, value in m["psnr_db"].items():
        _echo(f"  PSNR {name:>6}: {value:6.2f} dB")
    for name, value in m["seconds"].items():
        _echo(f"  time {name:>6}: {value:6.2f} s")
    _echo(f"wrote {out_dir}/demo.png and {out_dir}/demo.json")


# --------------------------------------------------------------------------- files

_VOLUME_SUFFIXES = (".tif", ".tiff", ".npy")


def _volume_suffix(path: Path, what: str) -> str:
    suffix = path.suffix.lower()
    if suffix not in _VOLUME_SUFFIXES:
        raise CommandError(
            f"{what} {path}: unknown format {suffix or '(no suffix)'}; "
            "use a name ending in .tif, .tiff or .npy"
        )
    return suffix


def _check_folder_writable(folder: Path, target: Path, *, create: bool) -> None:
    """Fail early unless files can be written into ``folder`` (created later when ``create``)."""
    probe = folder
    if create:
        # The nearest existing ancestor must be a writable folder for the mkdir to succeed.
        while not probe.exists() and probe.parent != probe:
            probe = probe.parent
    elif not probe.exists():
        raise CommandError(
            f"cannot write {target}: folder {folder} does not exist; create it or choose "
            "another output path"
        )
    if not probe.is_dir():
        raise CommandError(
            f"cannot write {target}: {probe} is a file, not a folder; choose another output path"
        )
    if not os.access(probe, os.W_OK | os.X_OK):
        raise CommandError(
            f"cannot write {target}: folder {probe} is not writable; choose another output path"
        )


def _check_output_file(path: Path, what: str) -> None:
    if path.is_dir():
        raise CommandError(f"{what} {path} is a folder; give a file name")
    _check_folder_writable(path.parent, path, create=False)


def _atomic_write(path: Path, write: Callable[[Any], None]) -> None:
    """write(file object) into a hidden sibling, then rename onto ``path``: never a partial file."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            write(f)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def _write_volume(path: Path, arr: Any, voxel_size: tuple[float, float, float]) -> None:
    """float32 (z, y, x) as .npy, or as an ImageJ TIFF carrying the voxel size in µm."""
    import numpy as np

    arr = np.ascontiguousarray(arr, dtype=np.float32)
    if path.suffix.lower() == ".npy":
        _atomic_write(path, lambda f: np.save(f, arr, allow_pickle=False))
        return
    import tifffile

    dz, dy, dx = voxel_size
    _atomic_write(path, lambda f: tifffile.imwrite(
        f, arr, imagej=True, resolution=(1.0 / dx, 1.0 / dy),
        metadata={"axes": "ZYX", "spacing": dz, "unit": "um"},
    ))


def _read_psf(path: Path) -> Any:
    """A PSF file (.tif/.tiff/.npy) as float32 (z, y, x), checked, with errors naming the file."""
    import numpy as np

    what = "--psf"
    if not path.exists():
        raise CommandError(f"{what} {path}: file not found; check the path")
    if path.is_dir():
        raise CommandError(f"{what} {path} is a folder; give a PSF file (.tif, .tiff or .npy)")
    suffix = _volume_suffix(path, what)
    try:
        if suffix == ".npy":
            arr = np.load(path, allow_pickle=False)
        else:
            import tifffile

            arr = tifffile.imread(path)
    except Exception as e:  # noqa: BLE001 - any reader failure means "not an image we can read"
        kind = "NumPy .npy" if suffix == ".npy" else "TIFF"
        raise CommandError(
            f"{what} {path} is not a readable {kind} file ({type(e).__name__}: {e}); "
            "give a 3-D (z, y, x) PSF as .tif, .tiff or .npy"
        ) from e
    arr = np.asarray(arr)
    if arr.dtype.kind not in "biuf":
        raise CommandError(f"{what} {path}: holds {arr.dtype} values; a PSF must be real numbers")
    if arr.ndim != 3 or arr.size == 0:
        raise CommandError(
            f"{what} {path}: the PSF must be 3-D (z, y, x), got shape {arr.shape}; "
            "save the whole z-stack"
        )
    arr = arr.astype(np.float32)
    if not np.isfinite(arr).all() or arr.min() < 0 or arr.sum() <= 0:
        raise CommandError(
            f"{what} {path}: the PSF must be finite, non-negative and not all zero; "
            "subtract the background with rln_fast.psf.prepare first"
        )
    return arr


def _check_device(device: str | None) -> str | None:
    if device is None:
        return None
    import torch

    try:
        dev = torch.device(device)
    except RuntimeError as e:
        raise CommandError(f"--device {device!r} is not a device ({e}); use cpu or cuda") from e
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise CommandError(f"--device {device}: CUDA is not available here; use --device cpu")
    if dev.type not in ("cpu", "cuda"):
        raise CommandError(f"--device {device}: use cpu or cuda")
    return device


# --------------------------------------------------------------------------- PSF options

PSF_MODELS = ("born-wolf", "gibson-lanni", "gaussian", "confocal")
_GL_OPTIONS = ("ns", "ng", "ni0", "ng0", "ti0", "tg", "tg0", "particle_z")
_OPTICS = ("voxel_size", "na", "wavelength", "ex_wavelength", "pinhole", "ni",
           *_GL_OPTIONS, "sigma", "fwhm", "oversample")
_MODEL_OPTIONS = {
    "gaussian": {"voxel_size", "sigma", "fwhm"},
    "born-wolf": {"voxel_size", "na", "wavelength", "ni", "oversample"},
    "gibson-lanni": {"voxel_size", "na", "wavelength", "ni", "oversample", *_GL_OPTIONS},
    "confocal": {"voxel_size", "na", "wavelength", "ex_wavelength", "pinhole", "ni",
                 "oversample", *_GL_OPTIONS},
}
_MODEL_REQUIRED = {
    "gaussian": ("voxel_size",),
    "born-wolf": ("voxel_size", "na", "wavelength"),
    "gibson-lanni": ("voxel_size", "na", "wavelength"),
    "confocal": ("voxel_size", "na", "wavelength", "ex_wavelength"),
}


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _optics_options(fn: Callable) -> Callable:
    """The optics of a generated PSF, shared by psf, synth and train (µm, (z, y, x))."""
    gl = "gibson-lanni/confocal: "
    options = [
        click.option("--voxel-size", nargs=3, type=float, default=None, metavar="DZ DY DX",
                     help="PSF voxel size in µm (z, y, x)."),
        click.option("--na", type=float, default=None, help="Numerical aperture (< --ni)."),
        click.option("--wavelength", "--em-wavelength", "wavelength", type=float,
                     default=None, help="Emission wavelength in µm (e.g. 0.52); --em-wavelength "
                                        "as confocal() spells it."),
        click.option("--ex-wavelength", type=float, default=None,
                     help="confocal: excitation wavelength in µm."),
        click.option("--pinhole", type=float, default=None,
                     help="confocal: pinhole diameter in µm in sample space [0: a point]."),
        click.option("--ni", type=float, default=None,
                     help="Immersion refractive index [1.515]."),
        click.option("--ns", type=float, default=None, help=gl + "sample index [1.33]."),
        click.option("--ng", type=float, default=None, help=gl + "coverslip index [1.515]."),
        click.option("--ni0", type=float, default=None, help=gl + "design immersion index [ni]."),
        click.option("--ng0", type=float, default=None, help=gl + "design coverslip index [ng]."),
        click.option("--ti0", type=float, default=None,
                     help=gl + "design working distance in µm [150]."),
        click.option("--tg", type=float, default=None, help=gl + "coverslip thickness, µm [170]."),
        click.option("--tg0", type=float, default=None,
                     help=gl + "design coverslip thickness, µm [tg]."),
        click.option("--particle-z", type=float, default=None,
                     help=gl + "depth of the source below the coverslip in µm [0]."),
        click.option("--sigma", nargs=3, type=float, default=None, metavar="SZ SY SX",
                     help="gaussian: standard deviation in µm (z, y, x)."),
        click.option("--fwhm", nargs=3, type=float, default=None, metavar="FZ FY FX",
                     help="gaussian: FWHM in µm (z, y, x), instead of --sigma."),
        click.option("--oversample", type=int, default=None,
                     help="Radial samples per lateral voxel of the pupil integral [3]."),
    ]
    for option in reversed(options):
        fn = option(fn)
    return fn


def _given(optics: dict[str, Any]) -> dict[str, Any]:
    # nargs=3 options come back as None or () when absent, depending on the click version.
    return {k: v for k, v in optics.items() if k in _OPTICS and v is not None and v != ()}


def _make_psf(model: str, shape: tuple[int, ...], optics: dict[str, Any]) -> Any:
    """Generate the PSF of ``model`` (one of PSF_MODELS) with rln_fast.psf; errors are one line."""
    from . import psf as psf_models

    name = model.lower().replace("_", "-")
    if name not in PSF_MODELS:
        raise CommandError(f"unknown PSF model {model!r}; choose one of {', '.join(PSF_MODELS)}")
    given = _given(optics)
    extra = sorted(set(given) - _MODEL_OPTIONS[name], key=_OPTICS.index)
    if extra:
        verb = "does" if len(extra) == 1 else "do"
        raise CommandError(
            f"{', '.join(map(_flag, extra))} {verb} not apply to the {name} PSF model; drop it"
        )
    missing = [k for k in _MODEL_REQUIRED[name] if k not in given]
    if missing:
        raise CommandError(f"the {name} PSF model needs {', '.join(map(_flag, missing))}")
    kw = {k: v for k, v in given.items() if k != "voxel_size"}
    shape_t, vs = tuple(shape), tuple(given["voxel_size"])
    if name == "gaussian":
        if ("sigma" in kw) == ("fwhm" in kw):
            raise CommandError(
                "the gaussian PSF model needs one of --sigma SZ SY SX or --fwhm FZ FY FX (µm)"
            )
        return psf_models.gaussian(shape_t, vs, **kw)
    if name == "born-wolf":
        return psf_models.born_wolf(shape_t, vs, **kw)
    if name == "gibson-lanni":
        return psf_models.gibson_lanni(shape_t, vs, **kw)
    kw["em_wavelength"] = kw.pop("wavelength")
    kw["model"] = "gibson_lanni" if set(given) & set(_GL_OPTIONS) else "born_wolf"
    return psf_models.confocal(shape_t, vs, **kw)


def _psf_source_options(fn: Callable) -> Callable:
    """--psf FILE or --psf-model MODEL (+ optics) for the commands that simulate data."""
    options = [
        click.option("--psf", "psf_file", type=click.Path(path_type=Path), default=None,
                     help="Measured or generated PSF (.tif, .tiff, .npy; (z, y, x), sampled at "
                          "the phantom's voxel size)."),
        click.option("--psf-model", default=None, metavar="MODEL",
                     help=f"Generate the PSF instead: {' | '.join(PSF_MODELS)} (with the optics "
                          "options)."),
        click.option("--psf-shape", nargs=3, type=int, default=None, metavar="D H W",
                     help="Shape of a generated PSF [the volume's shape]."),
    ]
    for option in reversed(options):
        fn = option(fn)
    return _optics_options(fn)


def _resolve_psf(psf_file: Path | None, psf_model: str | None, psf_shape: Any,
                 volume_shape: tuple[int, ...], optics: dict[str, Any]) -> tuple[Any, str]:
    """(PSF array or None for the default, a description for the user)."""
    given = _given(optics)
    if psf_file is not None and psf_model is not None:
        raise CommandError("give --psf FILE or --psf-model MODEL, not both")
    if psf_model is None and (given or psf_shape):
        flags = ", ".join(map(_flag, given)) or "--psf-shape"
        raise CommandError(f"{flags}: options of a generated PSF; add --psf-model MODEL")
    if psf_file is not None:
        arr = _read_psf(psf_file)
        return arr, f"{psf_file} {arr.shape}"
    if psf_model is not None:
        shape = tuple(psf_shape) if psf_shape else tuple(volume_shape)
        arr = _make_psf(psf_model, shape, optics)
        return arr, f"{psf_model} {tuple(arr.shape)}"
    return None, "default Gaussian, sigma (z, y, x) = (2, 1, 1) voxels, 15x15x15"


# --------------------------------------------------------------------------- psf


@main.command("psf")
@click.argument("model", metavar="MODEL")
@click.argument("output", type=click.Path(path_type=Path))
@click.option("--shape", nargs=3, type=int, required=True, metavar="D H W",
              help="PSF size in voxels (z, y, x); the peak is at voxel shape // 2.")
@_optics_options
@_talk_options(progress=False, torch=False)
@clean_errors("psf")
def psf_cmd(model: str, output: Path, shape: tuple[int, int, int], **optics: Any) -> None:
    """Generate a PSF: MODEL is born-wolf, gibson-lanni, gaussian or confocal.

    OUTPUT is a float32 .tif/.tiff (ImageJ, with the voxel size in µm) or .npy. The confocal
    model uses Born-Wolf optics, or Gibson-Lanni when any of --ns, --ng, --particle-z, ... is given.

    \b
    Example:
      rln-fast psf born-wolf psf.tif --shape 33 65 65 --voxel-size 0.2 0.1 0.1 \\
          --na 1.4 --wavelength 0.52 --ni 1.515
    """
    _volume_suffix(output, "OUTPUT")
    _check_output_file(output, "OUTPUT")
    arr = _make_psf(model, shape, optics)
    voxel = tuple(optics["voxel_size"])
    _write_volume(output, arr, voxel)  # type: ignore[arg-type]
    if any(s % 2 == 0 for s in arr.shape):
        click.echo("rln-fast psf: note: an even side puts the peak just past the middle (voxel "
                   "shape // 2, where rln_fast expects it); odd sides keep the PSF symmetric",
                   err=True)
    note = " (.npy keeps no voxel size)" if output.suffix.lower() == ".npy" else ""
    _echo(f"wrote {output}: {model} PSF, shape {tuple(arr.shape)} (z, y, x), "
          f"voxel size {voxel} µm{note}")


# --------------------------------------------------------------------------- synth


@main.command("synth")
@click.argument("out_dir", type=click.Path(path_type=Path))
@click.option("--n", "n", type=int, default=100, show_default=True, help="Pairs to write.")
@click.option("--shape", nargs=3, type=int, default=(128, 128, 128), show_default=True,
              metavar="D H W", help="Phantom size in voxels (z, y, x), every side >= 19.")
@click.option("--seed", type=int, default=0, show_default=True,
              help="Pair i is drawn from seed + i.")
@_psf_source_options
@click.option("--device", default=None, help="cpu or cuda for the blur and convolution.")
@click.option("--skip-existing", is_flag=True,
              help="Keep pairs already written (finish a killed run).")
@_talk_options()
@clean_errors("synth")
def synth_cmd(out_dir: Path, n: int, shape: tuple[int, int, int], seed: int,
              psf_file: Path | None, psf_model: str | None, psf_shape: Any,
              device: str | None, skip_existing: bool, progress: bool, **optics: Any) -> None:
    """Write synthetic training pairs OUT_DIR/gt/NNN.tif and OUT_DIR/input/NNN.tif.

    The official RLN phantom recipe: ground truth = phantom blurred by a small Gaussian;
    input = 5 x ground truth convolved with the PSF, Poisson and read noise. Without --psf or
    --psf-model the training default PSF is used. Existing pairs of the same names are
    overwritten, unless --skip-existing (pair i depends only on seed + i and the PSF).
    """
    from . import synth
    from .train import default_psf

    if n < 1:
        raise CommandError(f"--n must be >= 1, got {n}")
    synth.phantom_params(shape, seed)  # checks shape and seed before anything is written
    _check_folder_writable(out_dir, out_dir, create=True)
    if out_dir.exists() and not out_dir.is_dir():
        raise CommandError(f"OUT_DIR {out_dir} is a file; give a folder")
    device = _check_device(device)
    psf_arr, what = _resolve_psf(psf_file, psf_model, psf_shape, shape, optics)
    if psf_arr is None:
        psf_arr = default_psf()
    synth.write_pairs(out_dir, n, psf_arr, shape, seed, device=device, progress=progress,
                      skip_existing=skip_existing)
    _echo(f"wrote {n} pair{'s' * (n != 1)} {tuple(shape)} to {out_dir / 'gt'} and "
          f"{out_dir / 'input'} (seeds {seed}..{seed + n - 1}; PSF: {what})")


# --------------------------------------------------------------------------- train

# TrainConfig field -> the train command's option, to word config errors in the user's terms.
# Every option is the field's name (one spelling in the command and the API).
_TRAIN_FLAGS = {f: "--" + f.replace("_", "-") for f in (
    "data_dir", "n_volumes", "phantom_shape", "data_seed", "n_val", "val_every", "batch_size",
    "crop", "steps", "lr", "checkpoint_every", "seed", "device", "augment", "gradients", "bn")}


def _in_flags(message: str) -> str:
    import re

    message = re.sub(r"TrainConfig\.(\w+)",
                     lambda m: _TRAIN_FLAGS.get(m.group(1), m.group(0)), message)
    message = re.sub(r"\bn_val=", "--n-val ", message)
    message = message.replace("resume=False", "--no-resume")
    return message.replace("another out_dir", "another OUT_DIR")


def _checkpoint_step(path: Path) -> int | None:
    """The step stored in a training checkpoint, or None when it cannot be read (train says why)."""
    import torch

    try:
        blob = torch.load(path, map_location="cpu", weights_only=True)
        return int(blob["step"])
    except Exception:  # noqa: BLE001 - train() reports an unreadable checkpoint itself
        return None


def _clean_failed_run(out_dir: Path, created: bool) -> None:
    """After a failure before the first checkpoint, remove what the run wrote (logs, the folder)."""
    from .train import CHECKPOINT_NAME, LOSS_CSV, LOSS_PNG, VAL_CSV

    if not created or not out_dir.is_dir() or (out_dir / CHECKPOINT_NAME).exists():
        return
    for name in (LOSS_CSV, VAL_CSV, LOSS_PNG):
        (out_dir / name).unlink(missing_ok=True)
    if not any(out_dir.iterdir()):
        out_dir.rmdir()


def _train_default(name: str) -> Any:
    from .train import TrainConfig

    value = getattr(TrainConfig, name)
    return tuple(value) if isinstance(value, tuple) else value


@clean_errors("train")
def train_cmd(out_dir: Path, data_dir: Path | None, synthetic: bool, n_volumes: int,
              phantom_shape: tuple[int, int, int], data_seed: int, n_val: int, steps: int,
              batch_size: int, crop: tuple[int, int, int], lr: float, checkpoint_every: int,
              val_every: int, augment: bool, gradients: str, bn: str, seed: int,
              device: str | None, resume: bool, progress: bool, psf_file: Path | None,
              psf_model: str | None, psf_shape: Any, **optics: Any) -> None:
    """Train an RLN into OUT_DIR (checkpoint.pt, model.pt, loss.csv, val.csv, loss.png).

    Data: --data-dir DIR with gt/ and input/ pairs, or --synthetic phantoms simulated with the
    PSF from --psf / --psf-model (default: a Gaussian). Interrupt at any time and rerun the
    same command to resume from the last checkpoint.
    """
    from . import synth
    from .train import CHECKPOINT_NAME, LOSS_CSV, LOSS_PNG, MODEL_NAME, VAL_CSV, TrainConfig, train

    if data_dir is not None and synthetic:
        raise CommandError("give --data-dir DIR or --synthetic, not both")
    psf_arr = None
    if data_dir is not None:
        if psf_file is not None or psf_model is not None or _given(optics):
            raise CommandError("--psf and the PSF options apply to --synthetic data only; "
                               "the pairs in --data-dir are already simulated or measured")
        if not data_dir.is_dir():
            state = "is not a folder" if data_dir.exists() else "does not exist"
            raise CommandError(f"--data-dir {data_dir} {state}; give a folder with gt/ and input/ "
                               "pairs (rln-fast synth writes one)")
        what = f"pairs in {data_dir}"
    else:
        synth.phantom_params(phantom_shape, data_seed)  # checks the phantom shape early
        psf_arr, psf_what = _resolve_psf(psf_file, psf_model, psf_shape, phantom_shape, optics)
        what = f"{n_volumes} synthetic volumes {tuple(phantom_shape)}, PSF: {psf_what}"
    _check_folder_writable(out_dir, out_dir, create=True)
    if out_dir.exists() and not out_dir.is_dir():
        raise CommandError(f"OUT_DIR {out_dir} is a file; give a folder")
    device = _check_device(device)
    try:
        config = TrainConfig(
            data_dir=None if data_dir is None else os.fspath(data_dir), psf=psf_arr,
            n_volumes=n_volumes, phantom_shape=phantom_shape, data_seed=data_seed, n_val=n_val,
            steps=steps, batch_size=batch_size, crop=crop, lr=lr,
            checkpoint_every=checkpoint_every, val_every=val_every, augment=augment,
            gradients=gradients, bn=bn, seed=seed, device=device,
        )
    except ValueError as e:
        raise CommandError(_in_flags(str(e))) from e

    ckpt = out_dir / CHECKPOINT_NAME
    if resume and ckpt.exists():
        step = _checkpoint_step(ckpt)
        if step is not None:
            _echo(f"resuming from {ckpt} at step {step}")
    _echo(f"training on {what}")
    created = not out_dir.exists()
    last: dict[str, Any] = {}
    try:
        train(config, out_dir, resume=resume, progress=progress,
              callback=lambda step, row: last.update(row))
    except (FloatingPointError, ValueError) as e:  # a diverged loss, or data train() refused
        _clean_failed_run(out_dir, created)
        raise CommandError(_in_flags(str(e))) from e
    except BaseException:
        _clean_failed_run(out_dir, created)
        raise
    if last:
        _echo(f"step {last['step']}: loss {last['loss']:.4f}")
    _echo(f"model: {out_dir / MODEL_NAME}")
    curve = [out_dir / LOSS_CSV] + [out_dir / LOSS_PNG] * (out_dir / LOSS_PNG).exists()
    _echo(f"loss curve: {', '.join(map(str, curve))}")
    if n_val:
        _echo(f"validation: {out_dir / VAL_CSV}")
    _echo(f"checkpoint: {ckpt} (rerun the same command with a larger --steps to continue)")


def _train_command() -> click.Command:
    """The train command, built when it is first asked for: its defaults are TrainConfig's and
    rln_fast.train imports torch (see _LazyGroup)."""
    options = [
        click.argument("out_dir", type=click.Path(path_type=Path)),
        click.option("--data-dir", type=click.Path(path_type=Path), default=None,
                     help="Folder with gt/ and input/ TIFF pairs of the same names (rln-fast synth)."),
        click.option("--synthetic", is_flag=True,
                     help="Generate phantom pairs on the fly (the default without --data-dir)."),
        click.option("--n-volumes", type=int, default=_train_default("n_volumes"),
                     show_default=True, help="Synthetic training volumes."),
        click.option("--phantom-shape", nargs=3, type=int, default=_train_default("phantom_shape"),
                     show_default=True, metavar="D H W", help="Synthetic volume size (z, y, x)."),
        click.option("--data-seed", type=int, default=_train_default("data_seed"), show_default=True,
                     help="Synthetic volume i uses seed data-seed + i."),
        click.option("--n-val", type=int, default=_train_default("n_val"), show_default=True,
                     help="Held-out validation pairs (with --data-dir: the last ones by name)."),
        click.option("--steps", type=int, default=_train_default("steps"), show_default=True,
                     help="Total optimiser steps (a resumed run continues up to this)."),
        click.option("--batch-size", type=int, default=_train_default("batch_size"),
                     show_default=True, help="Crops per step, all from one volume."),
        click.option("--crop", nargs=3, type=int, default=_train_default("crop"), show_default=True,
                     metavar="D H W", help="Crop size in voxels (z, y, x)."),
        click.option("--lr", type=float, default=_train_default("lr"), show_default=True,
                     help="Initial learning rate (held, then decayed)."),
        click.option("--checkpoint-every", type=int, default=_train_default("checkpoint_every"),
                     show_default=True, help="Steps between checkpoints (and loss-curve plots)."),
        click.option("--val-every", type=int, default=_train_default("val_every"),
                     show_default=True, help="Steps between validations."),
        click.option("--augment/--no-augment", default=_train_default("augment"), show_default=True,
                     help="Random flips and xy rotations of the crops."),
        click.option("--gradients", type=click.Choice(["paper", "exact"]),
                     default=_train_default("gradients"), show_default=True,
                     help="paper: the released graph's surrogate RL gradients."),
        click.option("--bn", type=click.Choice(["official", "torch"]), default=_train_default("bn"),
                     show_default=True, help="BatchNorm running-variance update."),
        click.option("--seed", type=int, default=_train_default("seed"), show_default=True,
                     help="Seed of the initialisation and the crop stream."),
        click.option("--device", default=None, help="cpu or cuda (default: cuda when available)."),
        click.option("--resume/--no-resume", default=True, show_default=True,
                     help="Continue from OUT_DIR/checkpoint.pt when present."),
    ]
    cmd = _psf_source_options(_talk_options()(train_cmd))
    for option in reversed(options):
        cmd = option(cmd)
    return click.command("train")(cmd)


main.lazy = {"train": (_train_command, train_cmd)}


# --------------------------------------------------------------------------- bench


@main.command("bench")
@click.option("--device", type=click.Choice(["cpu", "cuda"]), default=None,
              help="Default: cuda when available, else cpu.")
@click.option("--size", nargs=3, type=int, default=None, metavar="D H W",
              help="Volume size (z, y, x) [64 128 128; --quick: 32 64 64].")
@click.option("--quick", is_flag=True, help="Smaller volume, fewer rounds (seconds on a CPU).")
@click.option("--rounds", type=int, default=None, help="Timed runs per method [5; --quick: 2].")
@click.option("--json", "json_path", type=click.Path(path_type=Path), default=None,
              help="Also save the report as JSON here.")
@_talk_options()
@clean_errors("bench")
def bench_cmd(device: str | None, size: Any, quick: bool, rounds: int | None,
              json_path: Path | None, progress: bool) -> None:
    """Time fused RLN inference and Richardson-Lucy against plain PyTorch on this machine.

    Each pair is first checked to give the same result; the speedup is baseline time / ours.
    """
    from .bench import FULL_SIZE, QUICK_SIZE, run_bench

    if json_path is not None:
        _check_output_file(json_path, "--json")
    if rounds is not None and rounds < 1:
        raise CommandError(f"--rounds must be >= 1, got {rounds}")
    device = _check_device(device)
    size_t = tuple(size) if size else (QUICK_SIZE if quick else FULL_SIZE)
    report = run_bench(size_t, device=device, rounds=rounds or (2 if quick else 5),
                       rl_iterations=10 if quick else 20, progress=progress)
    report["quick"] = quick
    _echo(f"rln-fast bench: {report['device_type']} ({report['device']}, "
          f"{report['threads']} threads), torch {report['torch']}, volume "
          f"{'x'.join(map(str, report['size']))}, median of {report['rounds']} "
          f"run{'s' * (report['rounds'] != 1)}")
    labels = {"rln_inference": ("RLN inference", "plain PyTorch RLN"),
              "richardson_lucy": ("Richardson-Lucy", "plain torch FFT loop")}
    for key, r in report["results"].items():
        name, base = labels[key]
        extra = f", {r['iterations']} iterations" if "iterations" in r else ""
        _echo(f"  {name:<16} ours {r['ours_s']:8.4f} s   {base} {r['baseline_s']:8.4f} s   "
              f"speedup {r['speedup']:6.2f}x   (max rel diff {r['max_rel_diff']:.1e}{extra})")
    if json_path is not None:
        text = json.dumps(report, indent=2).encode()
        _atomic_write(json_path, lambda f: f.write(text))
        _echo(f"wrote {json_path}")


# --------------------------------------------------------------------------- deconvolve


def _split(text: Any, flag: str, convert: Callable[[str], Any] = str) -> Any:
    """A per-channel option: one value, or a comma list (one per channel) as a list."""
    if text is None:
        return None
    parts = [p.strip() for p in str(text).split(",")]
    if any(p == "" for p in parts):
        raise CommandError(f"{flag} {text!r}: an empty entry; give one value, or one per "
                           "channel separated by commas")
    try:
        values = [convert(p) for p in parts]
    except ValueError as e:
        raise CommandError(f"{flag} {text!r}: {e}") from None
    return values[0] if len(values) == 1 else values


def _count(text: str) -> int:
    n = int(text)
    if n < 0:
        raise ValueError(f"{n} is negative; give 0 or more")
    return n


def _number(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise ValueError(f"{text!r} is not a number") from None


def _background(text: str) -> Any:
    if text == "auto":
        return text
    try:
        return float(text)
    except ValueError:
        raise ValueError(f"{text!r}: give a number or 'auto'") from None


def _deconvolve(name: str, input_path: Path, output: Path, method: str, **kw: Any) -> None:
    from .distributed import deconvolve_file

    if kw.pop("skip_existing") and output.exists():
        _echo(f"{output} exists; skipped (--skip-existing)")
        return
    if not input_path.exists():
        raise CommandError(f"input {input_path} does not exist; check the path")
    if output.resolve() == input_path.resolve():
        raise CommandError(f"output {output} is the input; choose another output path")
    psf = _split(kw.pop("psf"), "--psf")
    psf_model = kw.pop("psf_model")
    if method == "rl" and psf is None and psf_model is None:
        raise CommandError("--method rl needs --psf PSF.tif (make one with `rln-fast psf`) or "
                           "--psf-model with --na and --wavelength")
    if method == "rln" and (psf is not None or psf_model is not None):
        raise CommandError(f"{'--psf' if psf is not None else '--psf-model'} is for --method "
                           "rl; RLN learned its PSF in training")
    if psf is not None and psf_model is not None:
        raise CommandError("give --psf FILE or --psf-model MODEL, not both")
    wavelength, na = _split(kw.pop("wavelength"), "--wavelength", _number), kw.pop("na")
    if psf_model is None and (wavelength is not None or na is not None or kw["psf_shape"]):
        raise CommandError("--na, --wavelength and --psf-shape describe a generated PSF; add "
                           "--psf-model born-wolf (or gibson-lanni)")
    rl_options = {"acceleration": kw.pop("acceleration"), "edges": kw.pop("edges"),
                  "tv": kw.pop("tv"),
                  "background": _split(kw.pop("background"), "--background", _background)}
    normalize = kw.pop("normalize")
    _say_voxel_sizes(name, input_path, psf, kw["voxel_size"])
    summary = deconvolve_file(
        input_path, output, method=method, rl_options=rl_options,
        normalize=None if normalize == "none" else normalize, device=_check_device(kw.pop("device")),
        voxel_size=kw.pop("voxel_size") or None, tile=kw.pop("tile") or None,
        scheduler=kw.pop("scheduler"), n_workers=kw.pop("n_workers"), resume=kw.pop("resume"),
        overwrite=kw.pop("overwrite"), num_iter=_split(kw.pop("num_iter"), "--num-iter", _count),
        model=_split(kw.pop("model"), "--model"), official_checkpoint=kw.pop("official_checkpoint"),
        psf=psf, psf_model=psf_model, wavelength=wavelength, na=na,
        psf_shape=kw.pop("psf_shape") or None, **kw)
    resumed = summary["resumed_blocks"]
    volumes = f" in {summary['volumes']} volumes" if "volumes" in summary else ""
    _echo(f"wrote {output}: {summary['blocks']} block(s) of {summary['block']}{volumes}"
               + (f", {resumed} kept from an interrupted run" if resumed else "")
               + f", {summary['seconds']:.1f} s")


def _say_voxel_sizes(name: str, input_path: Path, psf: Any, voxel_size: Any,
                     image_said: bool = False) -> None:
    """Warn when the image's or the PSF's voxel size is unknown, saying what is assumed; say
    when the PSF is resampled to the image's voxel size. ``psf``: None, a file or a list of
    files (one per channel; the image's warning is given once)."""
    from . import io

    if isinstance(psf, list):
        for i, p in enumerate(psf):
            _say_voxel_sizes(name, input_path, p, voxel_size, image_said=i > 0)
        return
    psf = None if psf is None else Path(psf)
    psf_vox = None
    if psf is not None:
        try:
            psf_vox = io.read(psf)[1].get("voxel_size")
        except Exception:  # noqa: BLE001 - deconvolve_file reports an unreadable PSF itself
            return
    if voxel_size:
        image_vox = tuple(voxel_size)
    else:
        try:
            image_vox = io.open_stack(input_path).voxel_size
        except Exception:  # noqa: BLE001 - deconvolve_file reports an unreadable input itself
            return
        if image_vox is None and not image_said:
            if psf is None:
                assumed = ""
            elif psf_vox is None:
                assumed = "assuming the image and the PSF share one voxel size (the PSF is used " \
                          "as sampled); "
            else:
                assumed = f"assuming the PSF's, {_um(psf_vox)} (the PSF is used as sampled); "
            _warn(name, f"{input_path} has no voxel size in its metadata; {assumed}the output "
                  "gets none; give --voxel-size DZ DY DX (µm) to set it")
    if psf is None:
        return
    if psf_vox is None:
        at = "" if image_vox is None else f", {_um(image_vox)}"
        _warn(name, f"the PSF {psf} has no voxel size in its metadata; assuming it is sampled "
              f"at the image's voxel size{at}, without resampling")
    elif image_vox is not None and any(abs(a - b) > 1e-3 * abs(b)
                                       for a, b in zip(psf_vox, image_vox, strict=True)):
        _echo(f"resampling the PSF {psf} from {_um(psf_vox)} to the image's {_um(image_vox)}")


def _um(voxel_size: Any) -> str:
    return "(" + ", ".join(f"{v:g}" for v in voxel_size) + ") µm (z, y, x)"


def _deconvolve_options(fn: Callable) -> Callable:
    options = [
        click.argument("input_path", metavar="INPUT", type=click.Path(path_type=Path)),
        click.argument("output", type=click.Path(path_type=Path)),
        click.option("--model", default="default", show_default=True,
                     help="RLN weights: 'default' (shipped) or a .pt file from RLN.save / train; "
                          "a comma list gives one per channel."),
        click.option("--channels", default=None, metavar="SEL",
                     help="Channels to deconvolve, e.g. 0,2 (others are copied through "
                          "unchanged) [all]."),
        click.option("--time", default=None, metavar="SEL",
                     help="Time points to deconvolve and write, e.g. 0:50 or ::2 [all]."),
        click.option("--official-checkpoint", default=None, metavar="PREFIX",
                     help="RLN from the released TF checkpoint (prefix of model.ckpt-N.*)."),
        click.option("--psf", default=None, metavar="FILE[,FILE...]",
                     help="PSF file for --method rl (TIFF/Zarr; resampled when its voxel size "
                          "differs from the image's); a comma list gives one per channel."),
        click.option("--psf-model", type=click.Choice(["born-wolf", "gibson-lanni"]),
                     default=None, help="Generate each channel's PSF at the image's voxel size "
                                        "instead (with --na, --wavelength)."),
        click.option("--na", type=float, default=None, help="Numerical aperture (--psf-model)."),
        click.option("--wavelength", default=None, metavar="UM[,UM...]",
                     help="Emission wavelength in µm (--psf-model); a comma list gives one per "
                          "channel, e.g. 0.461,0.52."),
        click.option("--ni", type=float, default=1.515, show_default=True,
                     help="Immersion refractive index (--psf-model)."),
        click.option("--psf-shape", nargs=3, type=int, default=None, metavar="D H W",
                     help="Generated PSF size [the volume's, at most 65 129 129, cropped to the "
                          "PSF's support]."),
        click.option("--num-iter", default="20", show_default=True, metavar="N[,N...]",
                     help="Richardson-Lucy iterations; a comma list gives one per channel."),
        click.option("--acceleration", type=click.Choice(["shb", "biggs", "none"]), default="shb",
                     show_default=True,
                     help="RL acceleration: scaled heavy ball, Biggs-Andrews or none (plain RL)."),
        click.option("--edges", type=click.Choice(["bertero", "periodic", "reflect"]),
                     default="bertero", show_default=True),
        click.option("--tv", type=float, default=0.0, show_default=True,
                     help="RL-TV weight (0: none)."),
        click.option("--background", default="auto", show_default=True,
                     help="RL background: a number, or 'auto' (the image's 1st percentile); a "
                          "comma list gives one per channel."),
        click.option("--normalize", type=click.Choice(["global", "official", "none"]),
                     default="global", show_default=True,
                     help="RLN input normalisation by the volume's 0.01 and 99.5 percentiles (or "
                          "the ones the model was trained with); "
                          "global maps the output back to input units, official leaves it in "
                          "the network's units, none feeds the raw values."),
        click.option("--voxel-size", nargs=3, type=float, default=None, metavar="DZ DY DX",
                     help="µm; default: read from the input's metadata."),
        click.option("--tile", nargs=3, type=int, default=None, metavar="D H W",
                     help="Block (tile core) sides; default: from --memory-budget."),
        click.option("--memory-budget", default=None, metavar="SIZE",
                     help="Memory for one block's work, e.g. 4GB (default: what is free)."),
        click.option("--device", default=None, help="cpu or cuda (default: cuda when available)."),
        click.option("--scheduler", default=None, metavar="ADDRESS",
                     help="Run on Dask: 'local' (a LocalCluster here) or a scheduler address."),
        click.option("--n-workers", type=click.IntRange(min=1), default=None,
                     help="Workers of the local Dask cluster."),
        click.option("--ngff", type=click.Choice(["0.5", "0.4"]), default="0.5",
                     show_default=True, help="OME-Zarr version of a .zarr output."),
        click.option("--skip-existing", is_flag=True, help="Do nothing when OUTPUT exists."),
        click.option("--resume/--no-resume", default=True, show_default=True,
                     help="Keep the finished blocks of an interrupted run."),
        click.option("--overwrite", is_flag=True,
                     help="Replace whatever is at OUTPUT (default: only a TIFF file or a Zarr "
                          "folder rln_fast wrote); never the input."),
    ]
    for opt in reversed(options):
        fn = opt(fn)
    return fn


@main.command("deconvolve")
@click.option("--method", type=click.Choice(["rln", "rl"]), default="rln", show_default=True)
@_deconvolve_options
@_talk_options()
@clean_errors("deconvolve")
def deconvolve_cmd(input_path: Path, output: Path, method: str, **kw: Any) -> None:
    """Deconvolve INPUT (TIFF, OME-TIFF, OME-Zarr) into OUTPUT (.tif, .ome.tif, .zarr), block by
    block within the memory budget; an interrupted run resumes where it stopped.

    Multi-channel and time-lapse inputs keep their axes, channel names and time step;
    per-channel settings are comma lists (--psf a.tif,b.tif --num-iter 20,40)."""
    _deconvolve("deconvolve", input_path, output, method, **kw)


@main.command("rln")
@_deconvolve_options
@_talk_options()
@clean_errors("rln")
def rln_cmd(input_path: Path, output: Path, **kw: Any) -> None:
    """Same as `deconvolve --method rln`."""
    _deconvolve("rln", input_path, output, "rln", **kw)


def entry() -> None:
    """The ``rln-fast`` executable: main(), then a quick exit. By then every output is written
    and closed; what is left is Python tearing down torch's thousand modules one by one, about
    0.2 s of a 2.5 s RL run on 2 cores. The exit handlers (atexit) still run and the streams are
    flushed; the teardown is skipped unless a non-daemon thread is still running, which the
    normal exit waits for."""
    import atexit  # noqa: PLC0415
    import threading  # noqa: PLC0415

    try:
        main()
        code: Any = 0
    except SystemExit as e:
        code = e.code
    if any(t.is_alive() and not t.daemon for t in threading.enumerate()
           if t is not threading.main_thread()):
        sys.exit(code)
    if code is None:
        code = 0
    elif not isinstance(code, int):  # sys.exit("message"): printed, status 1, as Python does
        print(code, file=sys.stderr)
        code = 1
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # a closed pipe: nothing more can be said
            pass
    os._exit(code)


if __name__ == "__main__":
    entry()
