"""Memory per request: a budget estimated from the request before any work, and returning freed memory.

A request's budget adds up what it will hold at its peak, estimated from shapes alone: decoded pixels,
model inputs, probe activations, noise and path arrays, the response. Over ``REQUEST_BUDGET_BYTES`` the
request is refused with RESOURCE_EXHAUSTED naming the estimate and the limit, before anything is
allocated. The limits are the server's --max-request-mib and --max-request-pixels (``configure``).

glibc keeps freed heap memory in its arenas (one per thread that ever allocated), so after a large request
idle RSS stays where the peak was. ``release(estimate)`` calls ``malloc_trim(0)`` after requests whose
estimate was large, which hands the free pages back to the system; elsewhere (musl, macOS) it does nothing.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging

from convscope_server.errors import ResourceExhausted

log = logging.getLogger("convscope_server")

REQUEST_BUDGET_BYTES = 1 << 30   # what one request may hold at its peak (estimated before any work)
REQUEST_DECODED_PIXELS = 48_000_000  # pixels one request may decode, all its images together (one image at
                                     # the default --max-image-pixels of 40 M fits)
TRIM_AFTER_BYTES = 32 << 20      # requests estimated above this return freed memory when they end
DECODE_BYTES_PER_PIXEL = 8       # a decoded image: its own mode (<= 4 bytes / pixel) plus the RGB(A)
                                 # conversion (4 bytes / pixel inside Pillow)

MiB = float(1 << 20)


def configure(budget_bytes: int, decoded_pixels: int) -> None:
    """Set the per-request limits for the process (the server's --max-request-mib / --max-request-pixels)."""
    global REQUEST_BUDGET_BYTES, REQUEST_DECODED_PIXELS
    REQUEST_BUDGET_BYTES, REQUEST_DECODED_PIXELS = int(budget_bytes), int(decoded_pixels)


def _malloc_trim():
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.gnu_get_libc_version  # noqa: B018 - only glibc has it
        trim = libc.malloc_trim
    except (OSError, AttributeError):
        return None
    trim.argtypes, trim.restype = [ctypes.c_size_t], ctypes.c_int
    return trim


_TRIM = _malloc_trim()


def trim() -> bool:
    """Return free heap memory to the system (glibc's malloc_trim); False where not available."""
    if _TRIM is None:
        return False
    _TRIM(0)
    return True


def release(estimate: int) -> None:
    """Called when a request ends: trims the heap when its estimated peak was large."""
    if estimate >= TRIM_AFTER_BYTES:
        trim()


class Budget:
    """The estimated peak bytes of one request, item by item; ``add`` refuses once over the limit."""

    def __init__(self, limit: int | None = None, max_decoded_pixels: int | None = None):
        self.limit = REQUEST_BUDGET_BYTES if limit is None else limit
        self.total = 0
        self.max_decoded_pixels = REQUEST_DECODED_PIXELS if max_decoded_pixels is None else max_decoded_pixels
        self.pixels = 0          # decoded so far
        self.decode_peak = 0     # bytes of the largest decode: images are decoded one at a time

    def decoded(self, width: int, height: int, field: str) -> None:
        """Charge decoding a ``width`` x ``height`` image (size read from its header, before decoding)."""
        pixels = int(width) * int(height)
        self.pixels += pixels
        if self.pixels > self.max_decoded_pixels:
            raise ResourceExhausted(f"{field}: decoding {width}x{height} brings this request to {self.pixels:,} "
                                    f"decoded pixels, over the per-request limit of {self.max_decoded_pixels:,}")
        extra = pixels * DECODE_BYTES_PER_PIXEL - self.decode_peak
        if extra > 0:
            self.decode_peak += extra
            self.add(extra, field, f"decoding a {width}x{height} image")

    def add(self, nbytes: int, field: str, what: str) -> None:
        self.total += int(nbytes)
        if self.total > self.limit:
            raise ResourceExhausted(f"{field}: {what} needs about {nbytes / MiB:,.0f} MiB, so this request would "
                                    f"hold about {self.total / MiB:,.0f} MiB, over the per-request memory budget "
                                    f"of {self.limit / MiB:,.0f} MiB")

    def response(self, nbytes: int, field: str, what: str, max_message_bytes: int) -> None:
        """A response part of ``nbytes``: over the message limit is refused now, not after building it."""
        if nbytes > max_message_bytes:
            raise ResourceExhausted(f"{field}: {what} would be {nbytes:,} bytes ({nbytes / MiB:,.0f} MiB), over the "
                                    f"message limit of {max_message_bytes:,} bytes ({max_message_bytes / MiB:,.0f} "
                                    "MiB)")
        self.add(2 * nbytes, field, what)  # the arrays and their serialised copy
