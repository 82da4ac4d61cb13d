"""Files that may live on Cloud Storage: one way to tell a URL and to write a file whole."""
from __future__ import annotations

import io
from typing import Callable

from etils import epath


def is_remote(path: str) -> bool:
    """A URL (gs://...) rather than a local path."""
    return "://" in str(path)


def atomic_write(path: str | epath.Path, write: Callable) -> None:
    """Writes through `write(binary file)` so that a reader never sees half a file and a run
    killed while writing leaves none: locally a temporary file renamed over the target; on
    Cloud Storage the object itself, which appears only once its upload completes. There the
    bytes are put together in memory first: writers that seek (zip files: np.savez,
    torch.save) cannot seek in an object being uploaded."""
    path = epath.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if is_remote(str(path)):
        buffer = io.BytesIO()
        write(buffer)
        path.write_bytes(buffer.getvalue())
        return
    tmp = path.parent / f".{path.name}.tmp"
    with tmp.open("wb") as f:
        write(f)
    tmp.replace(path)


def bucket(path: str) -> str:
    """`gs://bucket` of a URL."""
    scheme, _, rest = str(path).partition("://")
    return f"{scheme}://{rest.split('/', 1)[0]}"


def unreachable(path: str) -> str | None:
    """None when the storage holding `path` answers, else why not (after the storage layer's own
    retries: TensorFlow's GCS_RETRY_CONFIG_* settings bound them)."""
    try:
        epath.Path(path).exists()
    except Exception as err:  # noqa: BLE001 - each file system raises its own types
        return " ".join(str(err).split())[:200]
    return None
