"""Run logs: one CSV per stream (run_dir/train.csv, run_dir/val.csv) and TensorBoard scalars when available.

On resume, rows after the resumed step are dropped (they belong to the killed attempt), so each log reads as one
uninterrupted run; TensorBoard gets the same effect from `purge_step`.
"""

from __future__ import annotations

import csv
from collections.abc import Mapping
from pathlib import Path

from tqdm import tqdm


class RunLogger:
    """Scalar logger for a run folder.

    Args:
        run_dir: the run folder.
        enabled: False on ranks other than 0 (every call is then a no-op).
        tensorboard: also write run_dir/tb when `torch.utils.tensorboard` imports.
        resume_step: steps already done; rows with a larger step are removed from existing CSVs.
    """

    def __init__(self, run_dir: Path, enabled: bool = True, tensorboard: bool = True, resume_step: int = 0) -> None:
        self.run_dir, self.enabled = Path(run_dir), enabled
        self.writer = None
        self._headers: dict[str, list[str]] = {}
        if not enabled:
            return
        for path in self.run_dir.glob("*.csv"):
            header, rows = read_csv(path)
            _write_csv(path, header, [row for row in rows if int(row["step"]) <= resume_step])
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                tqdm.write("tensorboard is not installed: logging to CSV only")
            else:
                purge = resume_step + 1 if resume_step else None
                self.writer = SummaryWriter(str(self.run_dir / "tb"), purge_step=purge)

    def log(self, stream: str, step: int, values: Mapping[str, float]) -> None:
        """Append one row {step, **values} to run_dir/<stream>.csv and the scalars to TensorBoard as <stream>/<key>."""
        if not self.enabled:
            return
        path = self.run_dir / f"{stream}.csv"
        row = {"step": step, **values}
        if stream not in self._headers:
            self._headers[stream] = read_csv(path)[0] if path.is_file() else []
        header = self._headers[stream]
        if header and set(row) <= set(header):
            with path.open("a", newline="") as file:
                csv.DictWriter(file, header).writerow(row)
        else:  # first row, or a new column (e.g. a KD term that starts later): rewrite with the wider header
            rows = read_csv(path)[1] if header else []
            self._headers[stream] = header = header + [key for key in row if key not in header]
            _write_csv(path, header, [*rows, row])
        if self.writer is not None:
            for key, value in values.items():
                self.writer.add_scalar(f"{stream}/{key}", value, step)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def read_csv(path: Path) -> tuple[list[str], list[dict[str, str]]]:
    """Header and rows of a CSV log (values as strings)."""
    with Path(path).open(newline="") as file:
        reader = csv.DictReader(file)
        rows = list(reader)
        return list(reader.fieldnames or []), rows


def _write_csv(path: Path, header: list[str], rows: list[Mapping]) -> None:
    with Path(path).open("w", newline="") as file:
        writer = csv.DictWriter(file, header)
        writer.writeheader()
        writer.writerows(rows)
