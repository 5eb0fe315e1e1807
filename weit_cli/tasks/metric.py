"""A task's metric described for results and for people (torch-free: the CLI's rendering reads it)."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any


@dataclass(frozen=True)
class Metric:
    """What a task's score is, for results and for people: commands key results by role
    (`val_metric`, `test_metric_by_epoch`) and write this description beside them (`to_dict`, the
    results' `metric_info`), so that a renderer formats any task's score without knowing its name.

    `name` is the short name that also keys the legacy result entries (`val_acc`, `val_loss`);
    `label` names it for people ("accuracy"); `short` is the label of compact rows (default: the
    label); `percent` shows a fraction as a percentage, otherwise 4 decimals."""

    name: str
    label: str
    higher_is_better: bool = True
    percent: bool = False
    short: str = ""

    @property
    def row_label(self) -> str:
        return self.short or self.label

    def format(self, value: float | None) -> str:
        if value is None:
            return "–"
        return f"{100 * value:.2f}%" if self.percent else f"{value:.4f}"

    def entries(self, pattern: str, value: Any) -> dict[str, Any]:
        """`value` under its role key and its legacy metric-named key: `entries("val_{}_after", v)` →
        {"val_acc_after": v, "val_metric_after": v}. The metric-named keys are kept for pipelines
        that read them (deprecated; CHANGELOG)."""
        return {pattern.format(self.name): value, pattern.format("metric"): value}

    def to_dict(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if k != "short"} | {"short": self.row_label}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Metric:
        return cls(str(d["name"]), str(d["label"]), bool(d.get("higher_is_better", True)), bool(d.get("percent", False)),
                   str(d.get("short") or ""))
