"""mixjax checkpoints (Orbax) — placeholder, filled in next."""

from pathlib import Path

METADATA_FILE = "mixjax.json"


def is_checkpoint(directory: Path) -> bool:
    return (Path(directory) / METADATA_FILE).is_file()
