"""The nightly flow's gates, as plain functions: data quality before training, champion vs challenger after."""

from __future__ import annotations

from dataclasses import dataclass, field

from recsys_pretrain.config import GateConfig


@dataclass
class GateResult:
    passed: bool
    reasons: list[str] = field(default_factory=list)
    figures: dict[str, float] = field(default_factory=dict)


def quality_gate(report: dict, previous: dict | None, known_items: set | None, items_tonight: set,
                 cfg: GateConfig) -> GateResult:
    """Compare tonight's ingest report with last night's. The first night only checks the quarantine rate."""
    figures = {"events": report["rows_accepted"],
               "quarantine_rate": report["rows_quarantined"] / max(report["rows_read"], 1)}
    reasons = []
    if figures["quarantine_rate"] > cfg.max_quarantine_rate:
        reasons.append(f"quarantine rate {figures['quarantine_rate']:.3f} > {cfg.max_quarantine_rate}")
    if previous is not None:
        change = report["rows_accepted"] / max(previous["rows_accepted"], 1) - 1.0
        figures["volume_change"] = change
        if abs(change) > cfg.max_volume_change:
            reasons.append(f"event volume changed by {change:+.1%} (bound +-{cfg.max_volume_change:.0%})")
    if known_items is not None and items_tonight:
        unknown = len(items_tonight - known_items) / len(items_tonight)
        figures["unknown_item_share"] = unknown
        if unknown > cfg.max_unknown_item_share:
            reasons.append(f"{unknown:.1%} of tonight's items are unknown (bound {cfg.max_unknown_item_share:.0%})")
    return GateResult(passed=not reasons, reasons=reasons, figures=figures)


def promotion_gate(challenger: float, champion: float | None, cfg: GateConfig) -> GateResult:
    """Promote when there is no champion, or the challenger beats it by more than the margin."""
    figures = {"challenger": challenger}
    if champion is None:
        return GateResult(True, ["no champion yet"], figures)
    figures["champion"] = champion
    if challenger > champion + cfg.margin:
        return GateResult(True, [f"{cfg.metric} {challenger:.4f} beats the champion's {champion:.4f} "
                                 f"by more than {cfg.margin}"], figures)
    return GateResult(False, [f"{cfg.metric} {challenger:.4f} does not beat the champion's {champion:.4f} "
                              f"by more than {cfg.margin}; the champion stays"], figures)
