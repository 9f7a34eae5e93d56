"""Calibration prompts: a text file, one prompt per line."""

from __future__ import annotations

from pathlib import Path

from ..errors import BitfluxError


def read_prompts(path: str | Path) -> list[str]:
    """The non-blank lines of a UTF-8 text file, stripped; a one-line BitfluxError if there are none."""
    path = Path(path)
    try:
        text = path.read_bytes().decode("utf-8-sig")  # a BOM (Windows editors) is no part of the first prompt
    except FileNotFoundError:
        raise BitfluxError(f"{path}: no such prompt file") from None
    except IsADirectoryError:
        raise BitfluxError(f"{path}: is a folder, expected a text file with one prompt per line") from None
    except UnicodeDecodeError as exc:
        raise BitfluxError(f"{path}: not UTF-8 text (byte {exc.start}); save the prompt file as UTF-8") from None
    except OSError as exc:
        raise BitfluxError(f"{path}: cannot read prompt file ({exc.strerror})") from None
    prompts = [line.strip() for line in text.splitlines() if line.strip()]
    if not prompts:
        raise BitfluxError(f"{path}: no prompts (the file is empty or blank); write one prompt per line")
    return prompts
