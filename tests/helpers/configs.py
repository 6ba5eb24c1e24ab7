"""Gateway config files for tests that run the gateway or its CLI from a file."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml


def write_config(path: Path, data: dict[str, Any]) -> Path:
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path
