"""The benchmark's report: text tables, the PNG chart, and the JSON and PNG files."""

from __future__ import annotations

import functools
import json
import shutil
from pathlib import Path
from typing import Any, Callable

from .scenarios import MIB, STATE_ORDER


def format_table(header: list[str], rows: list[list[str]]) -> str:
    """Left-aligned first column, right-aligned others."""
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    lines = []
    for row in [header, *rows]:
        cells = [row[0].ljust(widths[0])] + [c.rjust(w) for c, w in zip(row[1:], widths[1:])]
        lines.append("  ".join(cells).rstrip())
    return "\n".join(lines)


def _fmt(value: Any, digits: int = 2) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:,.{digits}f}"
    return f"{value:,}" if isinstance(value, int) else str(value)


class _Columns:
    """Builds table rows: a cell per Sluice run, then the reference's cell when there is one."""

    def __init__(self, runs: list[dict[str, Any]], ref: dict[str, Any] | None) -> None:
        self.runs = runs
        self.ref = ref

    def row(
        self, label: str, get: Callable[[dict[str, Any]], Any], ref_value: Any = None, digits: int = 2
    ) -> list[str]:
        """``label``, ``get(run)`` for every run, and ``ref_value`` in the reference column."""
        cells = [label] + [_fmt(get(r), digits) for r in self.runs]
        return cells + ([_fmt(ref_value, digits)] if self.ref is not None else [])

    def heading(self, label: str) -> list[str]:
        """A row with a label and empty cells."""
        return [label] + [""] * (len(self.runs) + (self.ref is not None))


def _metric_rows(runs: list[dict[str, Any]], ref: dict[str, Any] | None) -> list[list[str]]:
    cols = _Columns(runs, ref)
    names = sorted({n for r in runs for n in r["cpu"]}, key=_process_order)
    return [*_time_rows(cols, ref), *_cpu_rows(cols, ref, names), *_rss_rows(cols, ref, names), *_redis_rows(cols)]


def _time_rows(cols: _Columns, ref: dict[str, Any] | None) -> list[list[str]]:
    rows = [
        cols.row("lines/s (end to end)", lambda r: r["lines_per_s"], ref and ref["lines_per_s"], 1),
        cols.row("seconds (create -> completed)", lambda r: r["e2e_s"], ref and ref["seconds"]),
        cols.row("upload s", lambda r: r["upload_s"]),
        cols.row("create -> in_progress s", lambda r: r["create_to_in_progress_s"]),
        cols.row("upload + to in_progress s", lambda r: r["ingest_s"]),
        cols.row("ingest MB/s", lambda r: r["ingest_mb_per_s"], None, 1),
    ]
    for state in STATE_ORDER[:-1]:
        rows.append(cols.row(f"time {state} s", functools.partial(_state_s, state)))
    return rows


def _cpu_rows(cols: _Columns, ref: dict[str, Any] | None, names: list[str]) -> list[list[str]]:
    rows = [cols.heading("CPU s per 1,000 lines")]
    for name in names:
        ref_cpu = ref["cpu"]["per_1000_lines"] if ref is not None and name == "total" else None
        rows.append(cols.row(f"  {name}", functools.partial(_cpu_per_1000_lines, name), ref_cpu, 3))
    rows.append(
        cols.row("  (mock provider, not counted)", lambda r: r["mock_provider_cpu_s"] * 1000 / r["lines"], None, 3)
    )
    rows.append(
        cols.row(
            "Redis calls per line (scripts' inner calls too)",
            lambda r: r.get("redis_calls_per_line", {}).get("total"),
            None,
            2,
        )
    )
    return rows


def _rss_rows(cols: _Columns, ref: dict[str, Any] | None, names: list[str]) -> list[list[str]]:
    rows = [cols.heading("peak RSS MB (VmHWM / max sampled)")]
    for name in [n for n in names if n != "total"]:
        rows.append(cols.row(f"  {name}", functools.partial(_rss_mb, name)))
    if ref is not None:
        rows.append(cols.row("  reference process", lambda r: None, f"- / {_fmt(ref['rss_mb']['max_sampled'], 1)}"))
    return rows


def _redis_rows(cols: _Columns) -> list[list[str]]:
    rows = [cols.heading("Redis used_memory MB")]
    for key, label in (
        ("idle", "idle"),
        ("peak_minus_idle", "peak - idle (sampled)"),
        ("info_peak_minus_idle", "used_memory_peak - idle"),
        ("after_minus_idle", "after delete - idle"),
    ):
        rows.append(cols.row(f"  {label}", functools.partial(_redis_memory_mb, key)))
    rows.append(cols.row("  after - idle: dataset / clients", _after_breakdown))
    rows.append(cols.row("  keys after delete (bytes)", _keys_after))
    return rows


# One cell of a run each; the first argument is bound per row (functools.partial).
def _state_s(state: str, run: dict[str, Any]) -> Any:
    return run["state_seconds"][state]


def _cpu_per_1000_lines(name: str, run: dict[str, Any]) -> Any:
    return run["cpu"].get(name, {}).get("per_1000_lines")


def _rss_mb(name: str, run: dict[str, Any]) -> str | None:
    return _hwm(run["rss_mb"].get(name))


def _redis_memory_mb(key: str, run: dict[str, Any]) -> Any:
    return run["redis_memory_mb"][key]


def _keys_after(run: dict[str, Any]) -> str:
    size = sum(g["bytes"] for g in run["redis_keys_after_delete"])
    return f"{run['redis_after_delete']['keys']} ({size:,} B)"


def _after_breakdown(run: dict[str, Any]) -> str:
    idle, after = run["redis_idle"], run["redis_after_delete"]
    delta = [(after[k] - idle[k]) / MIB for k in ("used_memory_dataset", "mem_clients_normal")]
    return " / ".join(f"{d:.2f}" for d in delta)


def _process_order(name: str) -> tuple[int, int]:
    # web, workers by number, finalizer, redis-server, then the total
    rank = {"web": 0, "finalizer": 2, "redis-server": 3, "total": 4}
    if name.startswith("worker-"):
        return 1, int(name.removeprefix("worker-"))
    return rank.get(name, 5), 0


def _hwm(rss: dict[str, Any] | None) -> str | None:
    return None if rss is None else f"{_fmt(rss['hwm'], 1)} / {_fmt(rss['max_sampled'], 1)}"


def render_scenario(result: dict[str, Any]) -> str:
    """The scenario's table and targets as text."""
    cfg = result["config"]
    title = (
        f"=== {result['name']}: {cfg['lines']:,} lines ({_fmt(cfg['file_mb'])} MB), mock latency "
        f"{cfg['mock_latency_ms']:g} ms, {'/'.join(map(str, cfg['workers']))} worker(s) x "
        f"{cfg['worker_concurrency']}, "
        + (
            f"{cfg['batches']} batch(es) on "
            + ("a local Redis Cluster ===" if cfg.get("redis") == "cluster" else "a single Redis ===")
            if cfg.get("batches")
            else f"reference x {cfg['reference_concurrency']} ==="
        )
    )
    runs, ref = result["sluice_runs"], result.get("reference")
    parts = [title]
    if result["config"].get("batches"):
        from .cluster import render

        for run in runs:
            parts.extend(render(run))
    elif runs:
        header = ["", *(r["label"] for r in runs)] + (["reference"] if ref else [])
        parts.append(format_table(header, _metric_rows(runs, ref)))
    if result.get("error"):
        return "\n".join([*parts, f"FAILED: {result['error']}"])
    ratio_text = ", ".join(f"{k} {v:.3f}" for k, v in result["ratios"].items() if v is not None)
    if ratio_text:
        parts.append(f"ratios Sluice/reference: {ratio_text}")
    parts.append("targets:")
    for t in result["targets"]:
        parts.append(
            f"  {'PASS' if t['pass'] else 'FAIL'}  {t['target']}: {_fmt(t['measured'], 3)} {t['unit']} "
            f"(target {t['op']} {t['threshold']:g})"
        )
    return "\n".join(parts)


def plot(results: list[dict[str, Any]], path: Path, title: str) -> None:
    """One subplot per scenario: completed lines over time, Sluice and the reference."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(results), 1, figsize=(9, 3.4 * len(results)), squeeze=False)
    for ax, result in zip(axes[:, 0], results):
        ax.set_title(
            f"{result['name']}: {result['config']['lines']:,} lines, latency {result['config']['mock_latency_ms']:g} ms"
        )
        series = [*result.get("sluice_runs", []), *([result["reference"]] if result.get("reference") else [])]
        for run in series:
            t, done = zip(*((p[0], p[1]) for p in run["progress"])) if run["progress"] else ((), ())
            ax.plot(t, done, label=f"{run['label']} ({run['lines_per_s']:,.0f} lines/s)")
        if result.get("error"):
            ax.text(0.5, 0.5, "FAILED", transform=ax.transAxes, ha="center", color="red", fontsize=16)
        since = "the first upload" if result["config"].get("batches") else "create"
        ax.set_xlabel(f"seconds since {since} (Sluice) / since start (reference)")
        ax.set_ylabel("completed lines")
        ax.grid(alpha=0.3)
        if series:
            ax.legend(loc="lower right")
    fig.suptitle(title, fontsize=13)
    fig.tight_layout(h_pad=1.5, rect=(0, 0, 1, 0.985))  # keep a strip for the suptitle
    fig.savefig(path, dpi=100)
    plt.close(fig)


def write_outputs(report: dict[str, Any], out_dir: Path, stamp: str) -> tuple[Path, Path]:
    """``bench-<stamp>.json`` and ``.png``, copied to ``latest.json`` / ``latest.png``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    json_path, png_path = out_dir / f"bench-{stamp}.json", out_dir / f"bench-{stamp}.png"
    json_path.write_text(json.dumps(report, indent=2) + "\n")
    title = f"Sluice benchmark {stamp}" + (" (smoke)" if report["smoke"] else "")
    plot(report["scenarios"], png_path, title)
    # Copies, not symlinks: they survive the directory being moved or archived.
    shutil.copyfile(json_path, out_dir / "latest.json")
    shutil.copyfile(png_path, out_dir / "latest.png")
    return json_path, png_path
