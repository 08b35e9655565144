"""Helpers both CLI modules use: tables, progress, status lines, input files, help text, errors and exit codes.

Exit codes (documented in ``convscope --help``): 0 success, 1 other server errors, 2 usage, 3 not found
(model, layer, gallery, file), 4 invalid input (a bad flag value, an unreadable image), 5 server unavailable.
"""

from __future__ import annotations

import argparse
import re
import sys
import time
from pathlib import Path

import numpy as np

from convscope import errors
from convscope.images import eight_bit

EXIT_OK, EXIT_SERVER, EXIT_USAGE, EXIT_NOT_FOUND, EXIT_INVALID, EXIT_UNAVAILABLE = 0, 1, 2, 3, 4, 5

EXIT_CODES_HELP = """exit codes:
  0  success
  1  other server errors (limits, a model that cannot run gradient methods, deadlines, ...)
  2  usage: a flag or argument the CLI does not understand
  3  not found: an unknown model, layer or gallery, or a missing local file
  4  invalid input: a bad flag value, or an image file that cannot be read
  5  the server cannot be reached (address, CONVSCOPE_SERVER, is convscope-server running?)
  6  an audit's --fail-if condition holds
"""

# Request fields the server names in its messages -> the CLI flags that set them (where the mapping is clear).
FIELD_FLAGS = {
    "optimization.steps": "--steps", "optimization.learning_rate": "--lr", "optimization.seed": "--seed",
    "optimization.preview_every": "--steps", "window_h": "--window", "window_w": "--window",
    "stride_h": "--stride", "stride_w": "--stride", "top_k": "--top", "max_filters": "--max-filters",
    "max_channels": "--max-channels", "layers": "--layer", "layer": "--layer", "style_layers": "--style-layer",
    "content_layer": "--content-layer", "tv_weight": "--tv-weight", "blur_every": "--blur-every",
    "render_channels": "--rows", "tile_size": "--tile", "source.limit": "--limit", "source.dataset": "--dataset",
    "thumbnail_size": "--thumbnail", "grid_size": "--grid", "max_points": "--max-points", "target": "--target",
    "channel": "--channel", "channels": "--channel", "epsilon": "--epsilon", "samples": "--samples",
    "noise": "--noise", "steps": "--steps", "octaves": "--octaves", "perplexity": "--perplexity",
    "iterations": "--iterations", "k": "--k", "metric": "--metric", "method": "--method", "jitter": "--jitter",
    "decay": "--decay", "l2": "--l2", "height": "--height", "width": "--width", "optimizer": "--optimizer",
    "baseline": "--baseline", "score": "--score", "style": "--style", "content": "--content",
}


class CliError(Exception):
    """A problem to report in CLI terms with an exit code (no traceback)."""

    def __init__(self, message: str, code: int = EXIT_INVALID):
        super().__init__(message)
        self.code = code


def table(headers: list[str], rows: list[list], right: set[int] = frozenset()) -> str:
    """A plain-text table with a header rule; columns in ``right`` are right-aligned."""
    cells = [[str(c) for c in headers]] + [[str(c) for c in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]

    def line(row):
        return "  ".join(c.rjust(w) if i in right else c.ljust(w) for i, (c, w) in enumerate(zip(row, widths))).rstrip()

    return "\n".join([line(cells[0]), "  ".join("-" * w for w in widths)] + [line(r) for r in cells[1:]])


def safe_name(name: str) -> str:
    """A tensor name or path stem as a file-name part."""
    return "".join(c if c.isalnum() or c in "._-" else "_" for c in name).strip("_") or "tensor"


def status(message: str, stream=None) -> None:
    """One status line on stderr, for phases with no progress of their own."""
    stream = stream or sys.stderr
    stream.write(f"{message}\n")
    stream.flush()


class ProgressBar:
    """A one-line progress bar on stderr: ``bar(step, total, stage)``. The server's stage text is shown; with
    ``parts`` (e.g. the layers of an inversion) each new stage is counted as "layer 2/2"."""

    def __init__(self, label: str, stream=None, parts: int = 0, part_name: str = "layer"):
        self.label = label
        self.stream = stream or sys.stderr
        self.started = time.monotonic()
        self.shown = False
        self.live = hasattr(self.stream, "isatty") and self.stream.isatty()
        self.stage = None
        self.stages: list[str] = []
        self.parts, self.part_name = parts, part_name

    def __call__(self, step: int, total: int, stage: str = "") -> None:
        if stage and total and stage not in self.stages and "convert" not in stage:
            self.stages.append(stage)  # a new part (e.g. the next layer), not a set-up phase
            self.started = time.monotonic()
        if not self.live and stage == self.stage and step < total:
            return  # piped to a file or another program: one line per stage and the end, not every step
        if not self.live and self.shown:
            self.stream.write("\n")
        self.stage = stage
        counted = self.parts > 1 and stage in self.stages and f"/{self.parts}" not in stage  # the server may say it
        part = f"{self.part_name} {len(self.stages)}/{self.parts} " if counted else ""
        if not total:  # a phase without steps (e.g. converting the model): its text alone
            self.stream.write(f"\r{self.label} {part}{stage} ...")
        else:
            width = 30
            done = int(width * min(step, total) / total)
            rate = step / max(time.monotonic() - self.started, 1e-9)
            eta = (total - step) / rate if rate > 0 else 0
            self.stream.write(f"\r{self.label} {part}[{'#' * done}{'.' * (width - done)}] {step}/{total} "
                              f"{stage} {eta:4.0f}s left ")
        self.stream.flush()
        self.shown = True

    def close(self) -> None:
        if self.shown:
            self.stream.write("\n")
            self.stream.flush()
            self.shown = False


def with_progress(label: str, call, parts: int = 0):
    """``call(bar)`` with a progress bar that is closed however the call ends."""
    bar = ProgressBar(label, parts=parts)
    try:
        return call(bar)
    finally:
        bar.close()


def image_file(path) -> Path:
    """A local image path checked before any call: missing (exit 3) or a folder (exit 4) in CLI words."""
    path = Path(path)
    if path.is_dir():
        raise CliError(f"{path}: is a directory, not an image file (give image files, e.g. {path}/*.jpg)")
    if not path.exists():
        raise CliError(f"{path}: no such image file", EXIT_NOT_FOUND)
    return path


def load_photo(path) -> np.ndarray:
    """The image file's pixels (uint8 RGB, its own size); an unreadable file is an error naming it."""
    from PIL import Image, UnidentifiedImageError

    path = image_file(path)
    try:
        with Image.open(path) as image:
            return np.asarray(eight_bit(image).convert("RGB"))
    except UnidentifiedImageError:
        raise CliError(f"{path}: not an image file that Pillow can decode (PNG, JPEG, ...)") from None
    except (OSError, ValueError) as error:
        raise CliError(f"{path}: cannot decode the image ({error})") from None


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Keeps the description's layout and appends "(default: X)" to every flag's help that has a default
    worth showing and does not describe its default already."""

    def _get_help_string(self, action):
        text = action.help or ""
        default = action.default
        if ("default" in text or default is None or default is False or default == "" or default is argparse.SUPPRESS
                or not action.option_strings or isinstance(default, list)):
            return text
        return f"{text} (default: %(default)s)"


def server_hint(address: str) -> str:
    return (f"cannot reach a convscope server at {address}.\n"
            "  start one:  convscope-server --repository models --port 50051\n"
            "  or point the CLI at yours:  --server HOST:PORT, or set CONVSCOPE_SERVER=HOST:PORT")


def in_cli_terms(message: str) -> str:
    """A server message whose field names are proto fields -> the CLI flags that set them."""
    match = re.match(r"([\w.\[\]]+): ", message)
    if match:
        field = re.sub(r"^spec\.", "", re.sub(r"\[\d+\]", "", match.group(1)))
        if field in FIELD_FLAGS:
            return FIELD_FLAGS[field] + message[len(match.group(1)):]
    return message


def exit_code(error: errors.ConvscopeError) -> int:
    if isinstance(error, errors.NotFound):
        return EXIT_NOT_FOUND
    if isinstance(error, errors.InvalidArgument):
        return EXIT_INVALID
    if isinstance(error, errors.Unavailable):
        return EXIT_UNAVAILABLE
    return EXIT_SERVER


def report(error: BaseException, address: str) -> int:
    """Print ``error`` on stderr in CLI terms; return its exit code."""
    if isinstance(error, CliError):
        print(f"convscope: {error}", file=sys.stderr)
        return error.code
    if isinstance(error, errors.ConvscopeError):
        code = exit_code(error)
        if code == EXIT_UNAVAILABLE and "shutting down" not in error.message:
            print(f"convscope: {server_hint(address)}\n  ({error.message})", file=sys.stderr)
        else:
            print(f"convscope: {in_cli_terms(error.message)} ({error.code.name})", file=sys.stderr)
        return code
    if isinstance(error, FileNotFoundError):
        print(f"convscope: {error.filename or error}: no such file", file=sys.stderr)
        return EXIT_NOT_FOUND
    if isinstance(error, IsADirectoryError):
        print(f"convscope: {error.filename}: is a directory, not a file", file=sys.stderr)
        return EXIT_INVALID
    print(f"convscope: {error}", file=sys.stderr)
    return EXIT_INVALID if isinstance(error, (OSError, ValueError, TypeError)) else EXIT_SERVER
