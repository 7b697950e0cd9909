"""Statistics of the distillation-gain benchmark (benchmarks/distill_gain.py): per-row means, the paired comparison
with the baseline (mean ΔRMSE over seeds, its standard error, gap closure, significance), DisDepth diagnostics and
run costs averaged over runs."""

from __future__ import annotations

import math

DIAGNOSED = ("disdepth", "disdepth_lgconv")  # rows whose runs report DisDepth's diagnostics


def mean_metrics(per_seed: list[dict]) -> dict[str, float]:
    """Mean of each metric over the seeds that scored ({} when none did)."""
    scored = [m for m in per_seed if "rmse" in m]
    if not scored:
        return {}
    return {key: round(sum(m[key] for m in scored) / len(scored), 4) for key in scored[0]}


def paired(rows: dict[str, dict], teacher_rmse: float) -> dict[str, dict]:
    """Per row: paired mean ΔRMSE vs the baseline over the seeds both scored, its SE, gap closure, significance."""
    base = rows["baseline"]["per_seed"]
    base_rmse = rows["baseline"]["mean"].get("rmse")
    result = {}
    for name, row in rows.items():
        diffs = [r["rmse"] - b["rmse"] for r, b in zip(row["per_seed"], base) if "rmse" in r and "rmse" in b]
        if name == "baseline" or not diffs or base_rmse is None:
            continue
        delta = sum(diffs) / len(diffs)
        sd = math.sqrt(sum((d - delta) ** 2 for d in diffs) / (len(diffs) - 1)) if len(diffs) > 1 else math.inf
        se = sd / math.sqrt(len(diffs))
        # A teacher no better than the baseline leaves no gap to close: the ratio would flip sign, so it is None.
        gap = -delta / (base_rmse - teacher_rmse) if base_rmse > teacher_rmse else None
        result[name] = {
            "delta_rmse": round(delta, 4),
            "delta_rmse_se": round(se, 4) if se < math.inf else None,  # one seed: no SE
            "gap_closure": None if gap is None else round(gap, 4),
            "significant": bool(delta < -2 * se),
        }
    return result


def summarise_diagnostics(results: dict[tuple[str, str, int], dict]) -> dict[str, dict]:
    """Per diagnosed row: ghost advantage and LAM support averaged over every regime and seed, and per regime."""
    out = {}
    for row in DIAGNOSED:
        runs = {key: r["diagnostics"] for key, r in results.items() if key[1] == row and "diagnostics" in r}
        if not runs:
            continue

        def average(picked: list[dict]) -> dict:
            ghost = {k: _mean([d["ghost_advantage"][k] for d in picked]) for k in ("warmup_end", "last")}
            levels = zip(*(d["lam_support"] for d in picked))
            return {"ghost_advantage": ghost, "lam_support": [round(sum(v) / len(v), 4) for v in levels]}

        regimes = sorted({key[0] for key in runs})
        per_regime = {regime: average([d for key, d in runs.items() if key[0] == regime]) for regime in regimes}
        out[row] = {**average(list(runs.values())), "per_regime": per_regime}
    return out


def row_cost(results: dict[tuple[str, str, int], dict]) -> dict[str, dict[str, float]]:
    """Training cost per regime/row: mean wall and CPU seconds per run over the seeds."""
    costs: dict[str, list[dict]] = {}
    for (regime, row, _), result in results.items():
        if "cost" in result:
            costs.setdefault(f"{regime}/{row}", []).append(result["cost"])
    return {name: {key: _mean([c[key] for c in runs]) for key in ("wall_s", "cpu_s")} for name, runs in costs.items()}


def _mean(values: list[float | None]) -> float | None:
    kept = [v for v in values if v is not None]
    return round(sum(kept) / len(kept), 4) if kept else None
