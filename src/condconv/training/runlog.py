"""A training run's logs: ``log.jsonl`` (a record every ``log_every`` steps and one per epoch) and ``log.csv`` (one
row per epoch), written by rank 0 and truncated back to the checkpoint a run resumes from."""

from __future__ import annotations

import contextlib
import csv
import io
import json
from pathlib import Path
from typing import Any

from condconv.utils.fileio import atomic_write_text, output_error

__all__ = ["CSV_FIELDS", "RunLogs", "config_drift", "describe_drift", "recorded_config", "write_if_changed"]

# keys of a run's config.yaml not compared with the checkpoint's record: where the folder is, and the history of
# segments (rewritten when a resumed run opens the folder, before its next checkpoint)
_UNCOMPARED = ("out", "resume", "segments")

CSV_FIELDS = [
    "epoch", "step", "lr", "temperature", "train_loss", "train_acc", "test_loss", "test_top1", "test_top5",
    "epoch_seconds", "train_images_per_s",
]  # fmt: skip


def write_if_changed(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` atomically, unless the file already holds exactly that."""
    with contextlib.suppress(OSError):
        if path.read_bytes() == text.encode("utf-8"):
            return
    atomic_write_text(path, text)


def _plain(value: Any) -> Any:
    """``value`` as JSON would give it back (tuples as lists), so YAML and JSON records compare equal."""
    return json.loads(json.dumps(value, sort_keys=True, default=str))


def config_drift(config_file: Path, recorded: dict[str, Any]) -> dict[str, tuple[Any, Any]]:
    """The keys in which a run folder's ``config.yaml`` differs from the configuration recorded in its checkpoint.

    Args:
        config_file: the run folder's ``config.yaml`` (nothing differs when there is none).
        recorded: the configuration stored with the weights (:func:`condconv.load_checkpoint`'s ``config``).

    Returns:
        ``{key: (recorded value, config.yaml value)}`` over the keys both hold (a key only one holds comes from
        another version of condconv, which records more or fewer derived values, and is not an edit that matters).

    Raises:
        ValueError: ``config.yaml`` cannot be read or is not a mapping (naming the file).
    """
    import yaml

    if not config_file.is_file():
        return {}
    try:
        edited = yaml.safe_load(config_file.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as exc:
        raise ValueError(f"cannot read the run's config {config_file}: {exc}") from exc
    if not isinstance(edited, dict):
        raise ValueError(f"malformed run config {config_file}: expected a mapping, got {type(edited).__name__}")
    edited, recorded = _plain(edited), _plain(recorded)
    return {k: (recorded[k], edited[k]) for k in sorted(set(edited) & set(recorded))
            if k not in _UNCOMPARED and edited[k] != recorded[k]}


def recorded_config(weights: Path) -> dict[str, Any]:
    """The configuration stored in a weights file's metadata (its tensors are not read; ``{}`` if none)."""
    from safetensors import safe_open

    from condconv.models.checkpoint import CONFIG_METADATA_KEY

    try:
        with safe_open(str(weights), framework="pt", device="cpu") as f:
            raw = (f.metadata() or {}).get(CONFIG_METADATA_KEY)
        return json.loads(raw) if raw else {}
    except Exception as exc:  # noqa: BLE001 - safetensors raises its own error types
        raise ValueError(f"corrupt or unreadable weights file {weights}: {exc}") from exc


def describe_drift(drift: dict[str, tuple[Any, Any]], limit: int = 4) -> str:
    """``'epochs (8 -> 10), lr (0.05 -> 0.1)'`` for the first ``limit`` keys."""
    shown = [f"{k} ({old!r} -> {new!r})" for k, (old, new) in list(drift.items())[:limit]]
    return ", ".join(shown) + (f" and {len(drift) - limit} more" if len(drift) > limit else "")


class RunLogs:
    """JSONL (step and epoch records) + CSV (epoch records) in the run folder; rank 0 only."""

    def __init__(self, run_dir: Path, enabled: bool) -> None:
        self.jsonl, self.csv, self.enabled = run_dir / "log.jsonl", run_dir / "log.csv", enabled

    def _records(self) -> list[dict[str, Any]]:
        out = []
        if self.jsonl.is_file():
            for line in self.jsonl.read_text(encoding="utf-8").splitlines():
                with contextlib.suppress(json.JSONDecodeError):  # a line cut by a kill
                    out.append(json.loads(line))
        return out

    def truncate(self, max_step: int) -> None:
        """Drop records after ``max_step`` (written after the checkpoint a run resumes from)."""
        if not self.enabled or not self.jsonl.is_file():
            return
        kept = [r for r in self._records() if int(r.get("step", 0)) <= max_step]
        write_if_changed(self.jsonl, "".join(json.dumps(r) + "\n" for r in kept))
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=CSV_FIELDS, extrasaction="ignore")
        writer.writeheader()
        for r in kept:
            if r.get("type") == "epoch":
                writer.writerow({k: r.get(k, "") for k in CSV_FIELDS})
        write_if_changed(self.csv, buf.getvalue())

    def epoch_record(self, epoch: int, step: int) -> dict[str, Any] | None:
        """The logged record of ``epoch`` (ending at global step ``step``), if there is one."""
        found = [r for r in self._records() if r.get("type") == "epoch" and r.get("epoch") == epoch
                 and r.get("step") == step]
        return found[-1] if found else None

    def write(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        try:
            with open(self.jsonl, "a", encoding="utf-8") as f:
                f.write(json.dumps(record) + "\n")
            if record.get("type") == "epoch":
                new = not self.csv.is_file()
                with open(self.csv, "a", encoding="utf-8", newline="") as f:
                    writer = csv.DictWriter(f, fieldnames=CSV_FIELDS, extrasaction="ignore")
                    if new:
                        writer.writeheader()
                    writer.writerow({k: record.get(k, "") for k in CSV_FIELDS})
        except OSError as exc:
            raise output_error(self.jsonl.parent / "log.jsonl", exc) from None
