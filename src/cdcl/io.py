"""Files in and out: inputs named directly or by folder; atomic writes (text, JSON, PNG), so outputs appear under
their final name only once complete; JSON lines logs whose last line a kill may have cut short."""

from __future__ import annotations

import contextlib
import glob
import json
import logging
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
from PIL import Image

from cdcl.errors import CdclError

Text = TypeVar("Text", str, bytes)

log = logging.getLogger(__name__)


def collect_inputs(inputs: list[str], suffixes: tuple[str, ...], kind: str) -> list[Path]:
    """Files named directly, or found in the named folders (not recursively, sorted; other files are skipped
    with a warning). A missing input, a folder without any ``kind``, or two inputs with the same stem (their
    outputs would collide) is a CdclError."""
    found: list[Path] = []
    for item in map(Path, inputs):
        if item.is_dir():
            files = sorted(p for p in item.iterdir() if p.is_file())
            for skipped in (p for p in files if p.suffix.lower() not in suffixes):
                log.warning("skipping %s (not one of %s)", skipped, ", ".join(suffixes))
            matching = [p for p in files if p.suffix.lower() in suffixes]
            if not matching:
                raise CdclError(f"no {kind} in folder", item)
            found.extend(matching)
        elif item.is_file():
            found.append(item)
        else:
            raise CdclError("no such file or folder", item)
    seen: dict[str, Path] = {}
    for path in found:
        if path.stem in seen:
            raise CdclError(
                f"two inputs share the name '{path.stem}' ({seen[path.stem]}); their outputs would collide", path
            )
        seen[path.stem] = path
    return found


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it onto ``path`` only if the block succeeds.

    Anything the block leaves at the temporary path is removed on failure, so a crash or a kill never
    leaves a truncated file under the final name.
    """
    path = Path(path)
    ensure_writable_dir(path.parent)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    os.chmod(tmp_path, 0o666 & ~_umask())  # mkstemp makes 0600; outputs get the usual permissions
    try:
        yield tmp_path
        with open(tmp_path, "rb+") as fh:
            os.fsync(fh.fileno())
        try:
            os.replace(tmp_path, path)
        except OSError as exc:  # e.g. a folder already has the output's name
            raise CdclError(f"cannot write the output ({exc.strerror or type(exc).__name__})", path) from None
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def remove_leftover_temporaries(path: str | Path) -> None:
    """Delete the temporaries that killed writers of ``path`` left beside it: ``atomic_path`` removes its own
    on any error, but a SIGKILL gives it no chance. Only for files written by one process at a time."""
    path = Path(path)
    for tmp in path.parent.glob(f".{glob.escape(path.name)}.*.tmp"):
        tmp.unlink(missing_ok=True)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_text_atomic(path: str | Path, text: str) -> None:
    """Write ``text`` to ``path`` atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def write_json_atomic(path: str | Path, obj: Any) -> None:
    """Write ``obj`` as indented JSON to ``path`` atomically."""
    write_text_atomic(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def ensure_writable_dir(path: str | Path) -> Path:
    """Create ``path`` if needed and check that files can be written in it; CdclError otherwise."""
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise CdclError(f"cannot create output folder ({exc.strerror or exc})", path) from None
    if not path.is_dir():
        raise CdclError("output path exists and is not a folder", path)
    if not os.access(path, os.W_OK | os.X_OK):
        raise CdclError("output folder is not writable", path)
    return path


def complete_lines(data: Text) -> Text:
    """``data`` (a JSON lines log) up to and including its last newline: a line that a kill cut short has no
    newline yet, and is dropped."""
    newline = b"\n" if isinstance(data, bytes) else "\n"
    return data[: data.rfind(newline) + 1]


def save_png(path: str | Path, array: np.ndarray) -> None:
    """Write ``array`` as a PNG atomically: uint8 grey (HxW) or RGB (HxWx3), or an integer label map (HxW).

    A label map of another integer dtype is stored as 16-bit PNG; ids above 65535 cannot be, which is reported
    as a CdclError (write a TIFF instead). The one PNG writer of the package: Pillow, no plotting library.
    """
    array = np.asarray(array)
    if array.dtype == bool:
        array = array.astype(np.uint8) * 255
    if array.ndim == 3 and (array.dtype != np.uint8 or array.shape[2] != 3):
        raise ValueError(f"RGB PNGs must be HxWx3 uint8, got shape {array.shape} dtype {array.dtype}")
    if array.ndim not in (2, 3) or not np.issubdtype(array.dtype, np.integer):
        raise ValueError(f"cannot write shape {array.shape} dtype {array.dtype} as PNG")
    if array.ndim == 2 and array.dtype != np.uint8:
        if array.size and (array.min() < 0 or array.max() > 65535):
            raise CdclError(f"label ids span {array.min()}..{array.max()}; a 16-bit PNG holds 0..65535", path)
        array = array.astype(np.uint16)
    with atomic_path(path) as tmp:
        Image.fromarray(array).save(tmp, format="PNG")
