"""Reading TOML files, with every failure a one-line ConfigError naming the file.

Validation is not done here: ``p2pfm.config.schema.decode`` checks the
parsed tables against the schema types.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from p2pfm.core.errors import ConfigError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib


def read_toml(path: Path, what: str) -> dict[str, Any]:
    """Parse a TOML file; problems name the file (and line, from tomllib)."""
    try:
        with path.open("rb") as handle:
            doc: dict[str, Any] = tomllib.load(handle)
            return doc
    except FileNotFoundError:
        raise ConfigError(what, f"file {path} does not exist") from None
    except OSError as exc:
        raise ConfigError(what, f"cannot read {path} ({exc.strerror})") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(what, f"{path} is not valid TOML ({exc})") from None
    except UnicodeDecodeError as exc:
        raise ConfigError(
            what, f"{path} is not UTF-8 text (byte {exc.start}); TOML files must be UTF-8"
        ) from None
