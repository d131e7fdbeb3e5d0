"""``report.html``: one self-contained page drawn from a report directory's files.

The page is drawn only from ``targets.csv``, ``history.csv``, ``summary.json`` and
``weight_ratios.csv``, so ``l0calib report DIR`` draws it again at any time. Plots are
drawn by matplotlib (imported here only, when a page is rendered) as SVG and inlined in
the HTML: the page needs no network, no other file and no plotting script, opens offline in
any browser and prints. The only script is a few lines filtering the table of targets.
"""

from __future__ import annotations

import html
import io
import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from l0calib.exceptions import DataError
from l0calib.io import atomic_path

__all__ = ["render_html"]

REQUIRED = ("targets.csv", "history.csv", "summary.json")


def render_html(
    directory: str | os.PathLike[str], output: str | os.PathLike[str] | None = None
) -> Path:
    """Draw ``report.html`` from the files of a report directory.

    Parameters
    ----------
    directory : path
        A directory written by :func:`l0calib.report.write_report`.
    output : path, optional
        Where to write the page (default ``directory / "report.html"``), atomically.

    Returns
    -------
    pathlib.Path
        The page written.

    Raises
    ------
    DataError
        A file the page needs is missing or unreadable.
    """
    d = Path(directory)
    missing = [f for f in REQUIRED if not (d / f).is_file()]
    if missing:
        raise DataError(f"{d}: not a report directory ({', '.join(missing)} missing)")
    reading = d / "summary.json"  # the file a message names
    try:
        summary = json.loads(reading.read_text())
        # Names, groups and flags are text even where they look like numbers (or are empty).
        text = {"name": str, "group": str, "flags": str}
        reading = d / "targets.csv"
        targets = pd.read_csv(reading, dtype=text)
        reading = d / "history.csv"
        history = pd.read_csv(reading)
        ratios = None
        reading = d / "weight_ratios.csv"
        if reading.is_file():
            ratios = pd.read_csv(reading)
    except (ValueError, OSError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        raise DataError(f"{reading}: cannot read this report file: {reason}") from None
    for col in ("name", "target", "estimate", "rel_error", "holdout"):
        if col not in targets.columns:
            raise DataError(f"{d / 'targets.csv'}: column '{col}' is missing")
    page = _page(summary, _normalise(targets), history, ratios)
    out = Path(output) if output is not None else d / "report.html"
    with atomic_path(out) as tmp:
        Path(tmp).write_text(page, encoding="utf-8")
    return out


def _normalise(t: pd.DataFrame) -> pd.DataFrame:
    """Fill the columns an older report lacks, so the page can be drawn from it."""
    t = t.copy()
    for col, default in (("group", ""), ("flags", ""), ("initial_estimate", np.nan),
                         ("initial_rel_error", np.nan), ("tolerance", np.nan),
                         ("within_tolerance", np.nan), ("support", np.nan),
                         ("kept_support", np.nan)):  # fmt: skip
        if col not in t.columns:
            t[col] = default
    for col in ("name", "group", "flags"):
        t[col] = t[col].astype(object).where(t[col].notna(), "").astype(str)
    t["holdout"] = t["holdout"].astype(str).str.lower().isin(["true", "1"])
    t["group_label"] = t["group"].where(t["group"] != "", "(no group)")
    return t


# ---------------------------------------------------------------------------- plots
def _figure(width: float, height: float):
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), layout="constrained")


def _svg(fig) -> str:
    """The figure as an inline ``<svg>`` element: text kept as text (small, searchable),
    no date stamp and fixed ids, so the same report gives the same bytes."""
    import matplotlib

    buf = io.StringIO()
    with matplotlib.rc_context({"svg.fonttype": "none", "svg.hashsalt": "l0calib"}):
        fig.savefig(buf, format="svg", metadata={"Date": None})
    text = buf.getvalue()
    return text[text.index("<svg") :]


def _colors(groups: list[str]) -> dict[str, Any]:
    from matplotlib import colormaps

    cmap = colormaps["tab10" if len(groups) <= 10 else "tab20"]
    return {g: cmap(i % cmap.N) for i, g in enumerate(groups)}


def _fit_plot(t: pd.DataFrame, holdout: bool, colors: dict[str, Any]) -> str | None:
    """Relative error by target, initial weights (grey rings) and final (dots), grouped
    by target group and sorted within it, with the effective tolerance as a band."""
    part = t[t["holdout"] == holdout]
    if part.empty:
        return None
    part = part.assign(_abs=part["rel_error"].abs()).sort_values(
        ["group_label", "_abs"], kind="stable"
    )
    xs, centers, x = [], [], 0
    for _, g in part.groupby("group_label", sort=False):
        xs.extend(range(x, x + len(g)))
        centers.append((x + (len(g) - 1) / 2, g["group_label"].iloc[0], x + len(g)))
        x += len(g) + 2
    xs = np.asarray(xs, dtype=float)
    fig = _figure(11, 4.2)
    ax = fig.add_subplot()
    tol = part["tolerance"].to_numpy(dtype=float)
    band = np.where(np.isfinite(tol), tol, np.nan)
    if np.isfinite(band).any():
        ax.fill_between(xs, -band, band, step="mid", color="#2ca02c", alpha=0.18, lw=0,
                        label="tolerance")  # fmt: skip
    before = part["initial_rel_error"].to_numpy(dtype=float)
    after = part["rel_error"].to_numpy(dtype=float)
    if np.isfinite(before).any():
        ax.scatter(xs, before, s=14, facecolors="none", edgecolors="#888888", lw=0.7,
                   label="initial weights")  # fmt: skip
    ax.scatter(xs, after, s=10, c=[colors[g] for g in part["group_label"]], label="final weights")
    finite = np.abs(np.concatenate([after, before[np.isfinite(before)], band[np.isfinite(band)]]))
    small = finite[finite > 0]
    linthresh = max(float(np.min(small)) if small.size else 1e-3, 1e-4)
    ax.set_yscale("symlog", linthresh=min(linthresh, 1e-2))
    ax.yaxis.set_major_formatter(_percent())
    ax.axhline(0, color="black", lw=0.6)
    for _, _, end in centers[:-1]:
        ax.axvline(end + 0.5, color="#cccccc", lw=0.6)
    ax.set_xticks([c[0] for c in centers])
    rotate = 0 if len(centers) <= 4 else 60
    ax.set_xticklabels([c[1] for c in centers], rotation=rotate,
                       ha="right" if rotate else "center", fontsize=8)  # fmt: skip
    ax.set_xlim(-1, max(x - 1, 1))
    ax.set_ylabel("relative error (estimate - target) / target")
    what = "holdout targets (not fitted)" if holdout else "fitted targets"
    ax.set_title(f"{what}: {len(part)}, grouped, sorted by final error within a group")
    ax.legend(loc="upper left", fontsize=8)
    return _svg(fig)


def _percent():
    from matplotlib.ticker import FuncFormatter

    return FuncFormatter(lambda v, _: f"{v:.3g}" if v == 0 else f"{v * 100:.3g}%")


def _group_plot(t: pd.DataFrame) -> str:
    """Mean |relative error| by target group, initial and final weights."""
    rows = []
    for (name, hold), g in t.groupby(["group_label", "holdout"], sort=True):
        label = f"{name} (holdout)" if hold else name
        rows.append((label, g["initial_rel_error"].abs().mean(), g["rel_error"].abs().mean()))
    rows.reverse()
    fig = _figure(11, 0.9 + 0.32 * len(rows))
    ax = fig.add_subplot()
    y = np.arange(len(rows))
    before = np.array([r[1] for r in rows], dtype=float)
    after = np.array([r[2] for r in rows], dtype=float)
    if np.isfinite(before).any():
        ax.barh(y + 0.2, before, height=0.4, color="#bbbbbb", label="initial weights")
    ax.barh(y - 0.2, after, height=0.4, color="#1f77b4", label="final weights")
    ax.set_yticks(y)
    ax.set_yticklabels([r[0] for r in rows], fontsize=8)
    vals = np.concatenate([before, after])
    if (vals[np.isfinite(vals)] > 0).any():
        ax.set_xscale("log")
    ax.xaxis.set_major_formatter(_percent())
    ax.set_xlabel("mean |relative error| of the group's targets")
    ax.legend(loc="lower right", fontsize=8)
    return _svg(fig)


def _ratio_plot(ratios: pd.DataFrame, bounds: Any) -> str | None:
    if ratios is None or ratios.empty:
        return None
    edges = np.concatenate([ratios["low"].to_numpy(), ratios["high"].to_numpy()[-1:]])
    counts = ratios["count"].to_numpy(dtype=float)
    contiguous = np.allclose(ratios["low"].to_numpy()[1:], ratios["high"].to_numpy()[:-1])
    fig = _figure(7.5, 3.4)
    ax = fig.add_subplot()
    if contiguous:
        ax.stairs(counts, edges, fill=True, color="#1f77b4", alpha=0.8)
    else:  # the empty bins were dropped from the file: draw each bin on its own edges
        ax.hist(np.sqrt(ratios["low"] * ratios["high"]), weights=counts,
                bins=np.unique(np.concatenate([ratios["low"], ratios["high"]])),
                color="#1f77b4", alpha=0.8)  # fmt: skip
    ax.set_xscale("log")
    ax.axvline(1.0, color="black", lw=0.8, ls=":", label="unchanged (w = w0)")
    if bounds:
        for b in bounds:
            if b is not None and np.isfinite(b) and b > 0:
                ax.axvline(b, color="#d62728", lw=1, ls="--")
        ax.plot([], [], color="#d62728", ls="--", label="bounds")
    ax.set_xlabel("new weight / initial weight (log scale)")
    ax.set_ylabel("kept records")
    ax.legend(fontsize=8)
    return _svg(fig)


def _share_plot(t: pd.DataFrame, n_in: int, n_out: int, colors: dict[str, Any]) -> str | None:
    """Each target's share of the records before (support / records in) and after (kept
    support / records kept): points under the diagonal lost records in the selection."""
    s = t[["support", "kept_support", "group_label"]].dropna()
    s = s[s["support"] > 0]
    if s.empty or not n_in or not n_out:
        return None
    before = s["support"].to_numpy(dtype=float) / n_in
    after = s["kept_support"].to_numpy(dtype=float) / n_out
    fig = _figure(7.5, 5)
    ax = fig.add_subplot()
    for g in sorted(set(s["group_label"])):
        m = (s["group_label"] == g).to_numpy()
        ax.scatter(before[m], np.maximum(after[m], 0.5 / n_out), s=12, color=colors[g],
                   label=g, alpha=0.85)  # fmt: skip
    lo = min(before.min(), 0.5 / n_out) * 0.8
    ax.plot([lo, 1], [lo, 1], color="black", lw=0.7, ls=":", label="same share")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.xaxis.set_major_formatter(_percent())
    ax.yaxis.set_major_formatter(_percent())
    ax.set_xlabel(f"share of the {n_in:,} records in (support)")
    ax.set_ylabel(f"share of the {n_out:,} records kept")
    ax.legend(fontsize=7, loc="upper left", ncol=2 if s["group_label"].nunique() > 8 else 1)
    return _svg(fig)


def _history_plot(h: pd.DataFrame) -> str | None:
    if h.empty:
        return None
    if "phase" not in h.columns:
        h = h.assign(phase="train")
    marks = ("initial", "selection", "refit", "final")
    train = h[~h["phase"].isin(marks)]
    ends = h[h["phase"].isin(marks)]
    panels = [("mean_abs_rel_error", "mean |rel error|, fitted targets", True),
              ("max_abs_rel_error", "max |rel error|, fitted targets", True),
              ("loss", "training loss", True),
              ("expected_survivors", "expected survivors", False)]  # fmt: skip
    panels = [p for p in panels if p[0] in h and h[p[0]].notna().any()]
    lam = train["lambda_l0"] if "lambda_l0" in train else pd.Series(dtype=float)
    if lam.notna().any():
        panels.append(("lambda_l0", "L0 strength (lambda_l0)", True))
    elif "gate_shift" in train and train["gate_shift"].notna().any():
        panels.append(("gate_shift", "L0 strength: gate logit shift", False))
    fig = _figure(11, 2.1 * ((len(panels) + 1) // 2) + 0.4)
    axes = fig.subplots((len(panels) + 1) // 2, 2, sharex=True, squeeze=False).ravel()
    markers = {"initial": "s", "selection": "D", "refit": "*", "final": "*"}
    line_label = "training" if (train["phase"] == "train").all() else "iterations"
    for ax, (col, label, log) in zip(axes, panels, strict=False):
        if col in train and train[col].notna().any():
            ax.plot(train["epoch"], train[col], lw=1.1, color="#1f77b4", label=line_label)
        if (
            col == "expected_survivors"
            and "survivor_goal" in train
            and train["survivor_goal"].notna().any()
        ):
            ax.plot(train["epoch"], train["survivor_goal"], lw=0.8, ls="--", color="#888888",
                    label="schedule")  # fmt: skip
        if col in ends:
            for _, r in ends.iterrows():
                if pd.notna(r[col]):
                    ax.plot([r["epoch"]], [r[col]], ls="none", ms=8,
                            marker=markers.get(r["phase"], "o"), label=r["phase"])  # fmt: skip
        if log and (h[col].dropna() > 0).all() and h[col].notna().any():
            ax.set_yscale("log")
        if col in ("mean_abs_rel_error", "max_abs_rel_error"):
            ax.yaxis.set_major_formatter(_percent())
        ax.set_title(label, fontsize=9)
        handles = ax.get_legend_handles_labels()[0]
        if handles:
            ax.legend(fontsize=7)
    for ax in axes[len(panels) :]:
        ax.set_visible(False)
    for ax in axes[-2:]:
        ax.set_xlabel("epoch (iteration)")
    return _svg(fig)


def _strata_plot(strata: dict[str, Any]) -> str | None:
    """Each stratum's share of the records before and after the selection."""
    before = {str(k): float(v) for k, v in (strata.get("records_in") or {}).items()}
    after = {str(k): float(v) for k, v in (strata.get("records_kept") or {}).items()}
    if not before or not sum(after.values()):
        return None
    names = sorted(before, key=lambda k: -before[k])
    n_in, n_out = sum(before.values()), sum(after.values())
    fig = _figure(11, 3.6)
    ax = fig.add_subplot()
    x = np.arange(len(names))
    ax.bar(x - 0.2, [before[k] / n_in for k in names], width=0.4, color="#bbbbbb",
           label=f"all {n_in:,.0f} records")  # fmt: skip
    ax.bar(x + 0.2, [after.get(k, 0.0) / n_out for k in names], width=0.4, color="#1f77b4",
           label=f"the {n_out:,.0f} selected")  # fmt: skip
    ax.set_xticks(x)
    ax.set_xticklabels(names, rotation=90 if len(names) > 12 else 0, fontsize=7)
    ax.yaxis.set_major_formatter(_percent())
    ax.set_ylabel("share of the records")
    ax.set_xlabel(f"stratum ({strata.get('column', '')})")
    ax.legend(fontsize=8)
    return _svg(fig)


def _split_plot(split: dict[str, Any]) -> str | None:
    if not split:
        return None
    fig = _figure(6, 1.6)
    ax = fig.add_subplot()
    names = list(split)
    values = [float(split[n]) for n in names]
    left = 0.0
    for name, v, color in zip(names, values, ("#1f77b4", "#ff7f0e", "#2ca02c"), strict=False):
        ax.barh([0], [v], left=left, color=color, label=f"{name}: {v:,.0f}")
        left += v
    ax.set_yticks([])
    ax.set_xlabel("selected records")
    ax.legend(fontsize=8, loc="upper center", ncol=len(names), bbox_to_anchor=(0.5, 1.5))
    return _svg(fig)


# ---------------------------------------------------------------------------- the page
CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:1.5em auto;
max-width:1100px;color:#222;line-height:1.4;padding:0 1em}
h1{font-size:1.5em;margin-bottom:.2em}h2{border-bottom:1px solid #ddd;padding-bottom:.2em;
margin-top:1.6em}table{border-collapse:collapse;font-size:.85em}
td,th{border:1px solid #ddd;padding:.2em .5em;text-align:left;vertical-align:top}
th{background:#f4f4f4}td.num{text-align:right;font-variant-numeric:tabular-nums}
.verdict{padding:.6em 1em;border-radius:4px;margin:.8em 0}.ok{background:#e6f4ea}
.bad{background:#fdecea}.note{background:#fff8e1}figure{margin:1em 0;page-break-inside:avoid}
figure svg{max-width:100%;height:auto}figcaption{font-size:.85em;color:#555}
#filter{width:100%;padding:.4em;margin:.5em 0;font-size:1em;box-sizing:border-box}
tr.missed td{background:#fdecea}.wide{overflow-x:auto}
#targets td.num{white-space:nowrap}
ul.options{display:flex;flex-wrap:wrap;gap:.3em .6em;
list-style:none;padding:0;margin:.3em 0}ul.options li{background:#f4f4f4;padding:.1em .4em;
border-radius:3px;font-size:.85em}.small{font-size:.8em;color:#555}code{font-size:.9em}
@media print{#filter{display:none}body{max-width:none;margin:0}h2{page-break-after:avoid}}
"""

SCRIPT = """
document.getElementById('filter').addEventListener('input', function (e) {
  var q = e.target.value.toLowerCase(), rows = document.querySelectorAll('#targets tbody tr');
  var shown = 0;
  rows.forEach(function (r) {
    var hit = r.textContent.toLowerCase().indexOf(q) >= 0;
    r.style.display = hit ? '' : 'none';
    if (hit) { shown++; }
  });
  document.getElementById('shown').textContent = shown;
});
"""


def _e(x: Any) -> str:
    return html.escape(str(x), quote=True)


def _pct(x: Any, digits: int = 3) -> str:
    try:
        v = float(x)
    except (TypeError, ValueError):
        return ""
    return "" if not np.isfinite(v) else f"{v:.{digits}%}"


def _num(x: Any, fmt: str | None = None) -> str:
    """A number as a reader wants it: thousands separated, no exponent below 1e15."""
    try:
        v = float(x)
    except (TypeError, ValueError):
        return ""
    if not np.isfinite(v):
        return ""
    if fmt is None:
        fmt = ",.0f" if 1e3 <= abs(v) < 1e15 else ".4g"
    return format(v, fmt)


def _size(n: Any) -> str:
    n = float(n)
    for unit in ("bytes", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:,.0f} {unit}" if unit == "bytes" else f"{n:,.1f} {unit}"
        n /= 1024
    return ""  # pragma: no cover


def _missed(s: dict[str, Any], t: pd.DataFrame) -> list[str]:
    """Fitted targets outside their tolerance: ``summary.json``'s ``missed_targets`` when
    the fit recorded it, else from ``targets.csv``'s ``within_tolerance``."""
    within = t["within_tolerance"].astype(str).str.lower()
    outside = t.loc[~t["holdout"] & (within == "false"), "name"].astype(str).tolist()
    # missed_targets holds the targets missed by far (max_error); --tol misses are in
    # within_tolerance: the verdict names both.
    recorded = [str(m) for m in s.get("missed_targets") or []]
    return recorded + [n for n in outside if n not in set(recorded)]


def _verdict(s: dict[str, Any], t: pd.DataFrame) -> str:
    missed = _missed(s, t)
    converged = bool(s.get("converged"))
    has_tol = s.get("tol") is not None or t["tolerance"].notna().any()
    parts = []
    if converged and not missed:
        tol = "within every requested tolerance" if has_tol else "no tolerance was requested"
        parts.append(f'<div class="verdict ok"><b>Converged</b>: {tol}. Fitted targets: mean '
                     f"|rel error| {_pct(s.get('mean_abs_rel_error'))}, max "
                     f"{_pct(s.get('max_abs_rel_error'))}.</div>")  # fmt: skip
    else:
        shown = ", ".join(_e(m) for m in missed[:50])
        more = f" and {len(missed) - 50} more" if len(missed) > 50 else ""
        why = f"{len(missed)} fitted target(s) outside tolerance: {shown}{more}." if missed else (
            "the final solve did not converge.")  # fmt: skip
        parts.append(f'<div class="verdict bad"><b>Not converged</b>: {why} Fitted targets: '
                     f"mean |rel error| {_pct(s.get('mean_abs_rel_error'))}, max "
                     f"{_pct(s.get('max_abs_rel_error'))}.</div>")  # fmt: skip
    hold = t[t["holdout"]]
    if len(hold):
        before = hold["initial_rel_error"].abs().mean()
        after = hold["rel_error"].abs().mean()
        cls = "note" if np.isfinite(before) and after > before else "ok"
        trend = ""
        if np.isfinite(before):
            trend = " (worse than the initial weights)" if after > before else " (better)"
        parts.append(f'<div class="verdict {cls}">Holdout targets ({len(hold)}, not fitted): '
                     f"mean |rel error| {_pct(before)} with the initial weights, "
                     f"{_pct(after)} with the final weights{trend}.</div>")  # fmt: skip
    return "\n".join(parts)


def _kv(rows: list[tuple[str, str]]) -> str:
    body = "".join(f"<tr><th>{_e(k)}</th><td>{v}</td></tr>" for k, v in rows)
    return f"<table>{body}</table>"


def _header(s: dict[str, Any]) -> str:
    rows = [
        ("command", f"<code>{_e(s.get('command', ''))}</code>"),
        ("method", _e(s.get("method", ""))),
        ("records in / out", f"{_num(s.get('n_records_in'), ',.0f')} / "
                             f"{_num(s.get('n_records_out'), ',.0f')}"),
        ("targets (holdout)", f"{_num(s.get('n_targets'), ',.0f')} "
                              f"({_num(s.get('n_holdout'), ',.0f')})"),
        ("seed", _e(s.get("seed", ""))),
        ("l0calib version", _e(s.get("l0calib_version", ""))),
        ("finished at (UTC)", _e(s.get("finished_at", ""))),
        ("time", f"{_num(s.get('seconds_total', s.get('seconds')), ',.1f')} s"),
    ]  # fmt: skip
    out = [_kv(rows)]
    inputs = s.get("inputs") or []
    if inputs:
        body = "".join(
            f"<tr><td>{_e(i.get('role'))}</td><td>{_e(i.get('name'))}</td>"
            f'<td class="num">{_size(i.get("bytes", 0))}</td>'
            f"<td><code>{_e(i.get('sha256', ''))}</code></td></tr>"
            for i in inputs
        )
        out.append("<h3>Inputs</h3><table><tr><th>role</th><th>file</th><th>size</th>"
                   f"<th>sha256</th></tr>{body}</table>")  # fmt: skip
    # Options as given or defaulted; unset ones (None, empty lists) are left out.
    options = {k: v for k, v in (s.get("options") or {}).items() if v not in (None, [], "")}
    if options:
        items = "".join(f"<li><code>{_e(k)}={_e(v)}</code></li>" for k, v in options.items())
        out.append(f'<h3>Options</h3><ul class="options">{items}</ul>')
    return "\n".join(out)


def _targets_table(t: pd.DataFrame, missed: set[str]) -> str:
    head = "".join(
        f"<th>{c}</th>"
        for c in ("group", "target", "initial estimate", "initial rel error", "final estimate",
                  "final rel error", "tolerance", "support", "kept support")
    )  # fmt: skip
    rows = []
    for r in t.itertuples(index=False):
        flags = [f for f in [r.flags] if f]
        if r.holdout:
            flags.insert(0, "holdout")
        if r.name in missed:
            flags.insert(0, "outside tolerance")
        cls = ' class="missed"' if r.name in missed else ""
        rows.append(
            f"<tr{cls}><td>{_e(r.name)}</td><td>{_e(r.group)}</td>"
            f'<td class="num">{_num(r.target)}</td>'
            f'<td class="num">{_num(r.initial_estimate)}</td>'
            f'<td class="num">{_pct(r.initial_rel_error, 2)}</td>'
            f'<td class="num">{_num(r.estimate)}</td>'
            f'<td class="num">{_pct(r.rel_error, 3)}</td>'
            f'<td class="num">{_pct(r.tolerance, 2)}</td>'
            f'<td class="num">{_num(r.support, ",.0f")}</td>'
            f'<td class="num">{_num(r.kept_support, ",.0f")}</td>'
            f"<td>{_e('; '.join(flags))}</td></tr>"
        )
    return (
        '<input id="filter" type="search" placeholder="Filter targets by any text: name, group, '
        'flag (e.g. holdout, outside tolerance)">'
        f'<p class="small"><span id="shown">{len(t)}</span> of {len(t)} targets shown.</p>'
        '<div class="wide"><table id="targets">'
        f"<thead><tr><th>name</th>{head}<th>flags</th></tr></thead>"
        f"<tbody>{''.join(rows)}</tbody></table></div>"
    )


def _figure_html(plot_id: str, svg: str | None, caption: str) -> str:
    if svg is None:
        return ""
    return f'<figure class="plot" id="{plot_id}">{svg}<figcaption>{caption}</figcaption></figure>'


def _page(s: dict[str, Any], t: pd.DataFrame, h: pd.DataFrame, ratios: Any) -> str:
    groups = sorted(set(t["group_label"]))
    colors = _colors(groups)
    missed = set(_missed(s, t))
    n_in, n_out = int(s.get("n_records_in") or 0), int(s.get("n_records_out") or 0)
    wr = s.get("weight_ratio") or {}
    weights_rows = [
        ("records kept", f"{n_out:,} of {n_in:,}"),
        ("Kish effective sample size", _num(s.get("effective_sample_size"), ",.0f")),
        ("design effect (1 + CV² of the weights)", _num(s.get("design_effect"), ".3f")),
        ("w / w0: min, quartiles, max",
         ", ".join(_num(v, ".3g") for v in [wr.get("min"), *(wr.get("quartiles") or []),
                                              wr.get("max")])),
    ]  # fmt: skip
    if s.get("exchange_swaps") is not None:
        weights_rows.insert(1, ("records exchanged after the refit (exchange rounds)",
                                f"{int(s['exchange_swaps']):,}"))  # fmt: skip
    inflated = s.get("inflated_weight_ratio") or {}
    engine_bounds = (s.get("options") or {}).get("bounds") if not s.get("bounds") else None
    if inflated:
        # reweight --bounds applies to w / (w0 x records in / records out), not to w / w0.
        weights_rows.append((
            "w / inflated w0 (w0 × records in / out): min, quartiles, max",
            ", ".join(_num(inflated.get(k), ".3g") for k in ("min", "q1", "median", "q3", "max")),
        ))  # fmt: skip
    if engine_bounds:
        weights_rows.append(("bounds on w / inflated w0", _e(engine_bounds)))
    else:
        weights_rows.append(
            ("bounds on w / w0", _e(s.get("bounds")) if s.get("bounds") else "none")
        )
    split = s.get("selection_split") or {}
    title = f"l0calib report: {s.get('method', '')}, {n_in:,} → {n_out:,} records"
    sections = [
        f"<h1>{_e(title)}</h1>",
        _verdict(s, t),
        "<h2>Run</h2>",
        _header(s),
        "<h2>Fit by target</h2>",
        '<p class="small">Relative error of every target with the initial weights (grey '
        "rings) and the final weights (dots, coloured by target group); the green band is "
        "the tolerance that applies to it (its own, or <code>--tol</code>). The vertical "
        "axis is linear near zero and logarithmic beyond.</p>",
        _figure_html("fit-fitted", _fit_plot(t, False, colors), "Fitted targets."),
        _figure_html(
            "fit-holdout",
            _fit_plot(t, True, colors),
            "Holdout targets: reported, never fitted; they show how totals the "
            "fit did not see moved.",
        ),
        _figure_html(
            "fit-groups",
            _group_plot(t),
            "Mean |relative error| by target group, initial and final weights.",
        ),
        "<h2>Weights</h2>",
        _kv(weights_rows),
        _figure_html(
            "weight-ratios",
            _ratio_plot(ratios, s.get("bounds")),
            "Distribution of new / initial weight over the kept records.",
        ),
        _figure_html(
            "kept-shares",
            _share_plot(t, n_in, n_out, colors),
            "Kept vs dropped: each target's share of the records (its support) "
            "before and after selection. Points below the diagonal lost more "
            "records than the average stratum; points on the floor kept none.",
        ),
    ]
    if split:
        sections += [
            "<h2>Selection</h2>",
            _figure_html("selection-split", _split_plot(split),
                         "Records chosen by the L0 engine and drawn at random (PPS)."),
            _figure_html("strata", _strata_plot(s.get("strata") or {}),
                         "Each stratum's share of the records, before and after selection."),
        ]  # fmt: skip
    sections += [
        "<h2>Training path</h2>",
        _figure_html("training", _history_plot(h),
                     "By epoch; the markers after the last epoch are the hard selection "
                     "(the kept records with their trained weights) and the refit, whose "
                     "error is the final one. While training, the error is that of the "
                     "gated (expected) weights and rises as records are dropped; the "
                     "refit brings it down.")
        if len(h) > 1 else '<p class="small">No training path (a direct solve).</p>',
        "<h2>Every target</h2>",
        _targets_table(t, missed),
        f'<p class="small">Drawn by l0calib {_e(s.get("l0calib_version", ""))} from '
        "targets.csv, history.csv, summary.json and weight_ratios.csv; redraw with "
        "<code>l0calib report DIR</code>.</p>",
    ]  # fmt: skip
    body = "\n".join(x for x in sections if x)
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>{_e(title)}</title><style>{CSS}</style></head>\n<body>\n{body}\n"
        f"<script>{SCRIPT}</script>\n</body></html>\n"
    )
