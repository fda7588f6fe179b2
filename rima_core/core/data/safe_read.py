"""Readers for untrusted array and image files that never run code and never over-allocate.

Why this exists: ``np.load`` with pickling allowed, on a file from outside, executes whatever
its pickle asks for, an ``.npy`` header may claim a terabyte array (numpy allocates before it
reads), a deflated npz member may inflate a thousandfold (zip bomb) and a PNG may declare
gigapixels. Every loader (and the model server) reads user files through this module only.

Rules, shared by every reader:

- Dtypes: booleans, integers, floats, fixed-width byte/unicode strings. Complex, structured,
  datetime and object arrays are refused, except object arrays of plain ``str``/``int``/
  ``float`` (real FairVision copies store label strings that way), which are read through
  :class:`RestrictedUnpickler` (numpy's array reconstruction and plain scalars only; anything
  else raises before it is called) and returned as ``str``/``int64``/``float64`` arrays.
- Sizes: every ``.npy`` header (shape × itemsize) is checked against ``max_bytes`` BEFORE any
  allocation; bytes are then read in bounded chunks, so a lying header or a member that inflates
  past the cap is refused with at most ``max_bytes`` held. For an npz the cap is on the whole
  file's decompressed members together (so it bounds each member too), and a deflated member
  that inflates more than :data:`MAX_COMPRESSION_RATIO` times beyond
  :data:`RATIO_CHECK_FLOOR` bytes is refused as a zip bomb.
- Files: every reader opens the name once, without blocking (a FIFO would hang a reader that
  waits for a writer), and checks the opened descriptor, not the name: it must be a regular file
  (FIFOs, sockets, devices and folders are refused) and, when the caller passes ``root``, its
  real path must lie inside ``root`` (a symlink or folder swapped in between a name check and
  the read cannot redirect it). All bytes are then read from that descriptor.
- Errors: every refusal or damage is an :class:`UnsafeInputError` whose message names the file
  and the reason; callers turn it into their own per-case error.

Layout: the shared rules (limits, :class:`UnsafeInputError`, opening, the byte budget) are in
:mod:`rima_core.core.data.safe_files`; each format has its reader module (``safe_npy``,
``safe_npz``, ``safe_image``, ``safe_nifti``). Callers import the readers from here.
"""

from __future__ import annotations

from rima_core.core.data.safe_files import (
    DEFAULT_MAX_FILE_BYTES,
    DEFAULT_MAX_IMAGE_PIXELS,
    MAX_COMPRESSION_RATIO,
    MAX_NPZ_MEMBERS,
    RATIO_CHECK_FLOOR,
    UnsafeInputError,
    fd_real_path,
    open_regular,
)
from rima_core.core.data.safe_image import read_image
from rima_core.core.data.safe_nifti import read_nifti
from rima_core.core.data.safe_npy import RestrictedUnpickler, read_npy
from rima_core.core.data.safe_npz import npz_keys, read_npz

__all__ = [
    "DEFAULT_MAX_FILE_BYTES",
    "DEFAULT_MAX_IMAGE_PIXELS",
    "MAX_COMPRESSION_RATIO",
    "MAX_NPZ_MEMBERS",
    "RATIO_CHECK_FLOOR",
    "RestrictedUnpickler",
    "UnsafeInputError",
    "fd_real_path",
    "npz_keys",
    "open_regular",
    "read_image",
    "read_nifti",
    "read_npy",
    "read_npz",
]
