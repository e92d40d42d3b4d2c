"""Turning results into the table, the verdicts on the issue's targets, a
Markdown version for docs/benchmarks.md, and the PNG chart (gnuplot)."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

SUB_ORDER = ["tcp_bulk/1", "tcp_bulk/4", "tcp_rr", "tcp_conn", "udp_dns", "idle_mem"]
SUB_TITLE = {
    "tcp_bulk/1": "tcp_bulk 1 stream",
    "tcp_bulk/4": "tcp_bulk 4 streams",
    "tcp_rr": "tcp_rr",
    "tcp_conn": "tcp_conn",
    "udp_dns": "udp_dns",
    "idle_mem": "idle_mem",
}
COLUMNS = ["workload", "row", "result", "p50", "p99", "LB CPU", "LB CPU cost", "notes", "runs"]


def _f(v, fmt, suffix=""):
    return "-" if v is None else f"{v:{fmt}}{suffix}"


def _cells(sub: str, label: str, r: dict) -> list[str]:
    med = r.get("median") or {}
    nruns, nerr = len(r["runs"]), len(r["errors"])
    runs = f"{nruns}/{nruns + nerr}"
    if not nruns:
        err = r["errors"][0] if r["errors"] else "not run"
        err = err.split(": ", 1)[-1].splitlines()[0][:70]
        return [SUB_TITLE[sub], label, "FAILED", "-", "-", "-", "-", err, runs]
    cpu = _f(med.get("lb_cpu_pct"), ".0f", "%")
    p50 = _f(med.get("p50_ms"), ".3f", " ms")
    p99 = _f(med.get("p99_ms"), ".3f", " ms")
    notes = []
    if sub.startswith("tcp_bulk"):
        result = _f(med.get("gbps"), ".2f", " Gbit/s")
        cost = _f(med.get("cpu_s_per_gb"), ".3f", " s/GB")
        p50 = p99 = "-"
    elif sub == "tcp_rr":
        result = _f(med.get("rps"), ",.0f", " req/s")
        cost = _f(med.get("cpu_s_per_100k"), ".2f", " s/100k req")
    elif sub == "tcp_conn":
        result = _f(med.get("cps"), ",.0f", " conn/s")
        cost = _f(med.get("cpu_s_per_100k"), ".2f", " s/100k conn")
        if med.get("errors"):
            notes.append(f"errors {med['errors']:.0f}")
    elif sub == "udp_dns":
        result = _f(med.get("qps"), ",.0f", " q/s")
        cost = _f(med.get("cpu_s_per_100k"), ".2f", " s/100k q")
        notes.append(f"lost {med.get('lost', 0):.0f}")
    else:  # idle_mem
        result = _f(med.get("connections"), ".0f", " conns")
        cost = "-"
        cpu = "-"
        if med.get("kb_per_conn") is not None:
            notes.append(f"{med['kb_per_conn']:.2f} KB/conn "
                         f"(RSS {med['rss_before_kb'] / 1024:.1f} -> "
                         f"{med['rss_after_kb'] / 1024:.1f} MB)")
        else:
            notes.append("no LB")
    other = med.get("lb_cpu_other_load_pct")
    if other is not None and other >= 5:
        notes.append(f"other load on LB CPU {other:.0f}%")
    if r.get("discarded"):
        notes.append(f"{len(r['discarded'])} re-measured (steal)")
    if any(m.get("disturbed") for m in r["runs"]):
        notes.append("disturbed (steal)")
    if any(m.get("pinning_problem") for m in r["runs"]):
        notes.append("PINNING?")
    if any(m.get("warning") for m in r["runs"]) and sub != "udp_dns":
        notes.append("warnings")
    return [SUB_TITLE[sub], label, result, p50, p99, cpu, cost, "; ".join(notes), runs]


def table_rows(results: dict) -> list[list[str]]:
    rows = []
    for sub in SUB_ORDER:
        for label, r in results.get(sub, {}).items():
            rows.append(_cells(sub, label, r))
    return rows


def text_table(results: dict) -> str:
    rows = table_rows(results)
    widths = [max(len(c[i]) for c in rows + [COLUMNS]) for i in range(len(COLUMNS))]
    right = {2, 3, 4, 5, 6}

    def line(cells):
        return "  ".join(c.rjust(w) if i in right else c.ljust(w)
                         for i, (c, w) in enumerate(zip(cells, widths))).rstrip()

    out = [line(COLUMNS), line(["-" * w for w in widths])]
    prev = None
    for c in rows:
        if prev is not None and c[0] != prev:
            out.append("")
        out.append(line(c))
        prev = c[0]
    return "\n".join(out)


def markdown_table(results: dict) -> str:
    rows = table_rows(results)
    out = ["| " + " | ".join(COLUMNS) + " |",
           "| " + " | ".join("---:" if i in (2, 3, 4, 5, 6) else "---"
                             for i in range(len(COLUMNS))) + " |"]
    for c in rows:
        out.append("| " + " | ".join(x.replace("|", "\\|") for x in c) + " |")
    return "\n".join(out)


# --------------------------------------------------------------------------
# Verdicts on the targets (same run, medians).


def _med(results, sub, label):
    r = results.get(sub, {}).get(label)
    return (r or {}).get("median") or None


def _pct(a, b):
    return 100.0 * (a - b) / b if b else float("nan")


def _ahead(results, sub, label, peer, key, higher_is_better):
    """Run by run (rows are interleaved, so run k of both ran side by side):
    in how many runs `label` was at least as good as `peer` on `key`, as
    "k/n". The medians can hide that a margin is smaller than the host's
    noise; this shows it."""
    def by_run(lbl):
        r = results.get(sub, {}).get(lbl) or {}
        return {m["run"]: m[key] for m in r.get("runs", [])
                if isinstance(m.get(key), (int, float)) and "run" in m}
    a, b = by_run(label), by_run(peer)
    both = sorted(set(a) & set(b))
    wins = sum(1 for k in both if (a[k] >= b[k] if higher_is_better else a[k] <= b[k]))
    return f"{wins}/{len(both)}"


def verdicts(results: dict) -> list[dict]:
    out = []

    def add(target, ok, detail):
        out.append({"target": target,
                    "verdict": "n/a" if ok is None else ("met" if ok else "NOT MET"),
                    "detail": detail})

    # tcp_bulk 1 stream: some sluice mode at least as fast as haproxy with
    # splice, at no more CPU per GB. Met if one mode does both; otherwise
    # the mode closest to it is shown.
    hs = _med(results, "tcp_bulk/1", "haproxy splice")
    modes = {lbl: m for lbl in ("sluice splice", "sluice copy", "sluice auto")
             if (m := _med(results, "tcp_bulk/1", lbl))}
    if hs and modes:
        def score(m):
            return (max(0.0, hs["gbps"] - m["gbps"]) / hs["gbps"]
                    + max(0.0, m["cpu_s_per_gb"] - hs["cpu_s_per_gb"]) / hs["cpu_s_per_gb"])

        best_lbl, best = min(modes.items(), key=lambda kv: (score(kv[1]), -kv[1]["gbps"]))
        others = "; ".join(f"{lbl} {m['gbps']:.2f} Gbit/s {m['cpu_s_per_gb']:.3f} s/GB"
                           for lbl, m in modes.items() if lbl != best_lbl)
        add("tcp_bulk 1 stream: a sluice mode >= haproxy splice Gbit/s at no more CPU/GB",
            best["gbps"] >= hs["gbps"] and best["cpu_s_per_gb"] <= hs["cpu_s_per_gb"],
            f"{best_lbl}: {best['gbps']:.2f} Gbit/s vs {hs['gbps']:.2f} "
            f"({_pct(best['gbps'], hs['gbps']):+.1f}%), {best['cpu_s_per_gb']:.3f} vs "
            f"{hs['cpu_s_per_gb']:.3f} s/GB ({_pct(best['cpu_s_per_gb'], hs['cpu_s_per_gb']):+.1f}%)"
            f"; runs ahead: Gbit/s "
            f"{_ahead(results, 'tcp_bulk/1', best_lbl, 'haproxy splice', 'gbps', True)}, "
            f"s/GB {_ahead(results, 'tcp_bulk/1', best_lbl, 'haproxy splice', 'cpu_s_per_gb', False)}"
            f" [{others}]")
    else:
        add("tcp_bulk 1 stream", None, "not measured in this run")

    h = _med(results, "tcp_rr", "haproxy")
    s = _med(results, "tcp_rr", "sluice auto")
    if h and s:
        ok = s["cpu_s_per_100k"] <= h["cpu_s_per_100k"] and s["p99_ms"] <= h["p99_ms"]
        add("tcp_rr: sluice CPU/request <= haproxy, p99 no worse", ok,
            f"sluice auto {s['cpu_s_per_100k']:.2f} vs {h['cpu_s_per_100k']:.2f} s/100k req "
            f"({_pct(s['cpu_s_per_100k'], h['cpu_s_per_100k']):+.1f}%), p99 {s['p99_ms']:.3f} vs "
            f"{h['p99_ms']:.3f} ms ({_pct(s['p99_ms'], h['p99_ms']):+.1f}%); runs ahead: CPU "
            f"{_ahead(results, 'tcp_rr', 'sluice auto', 'haproxy', 'cpu_s_per_100k', False)}, p99 "
            f"{_ahead(results, 'tcp_rr', 'sluice auto', 'haproxy', 'p99_ms', False)}")
    else:
        add("tcp_rr", None, "not measured in this run")

    h = _med(results, "tcp_conn", "haproxy")
    s = _med(results, "tcp_conn", "sluice auto")
    if h and s:
        add("tcp_conn: sluice conn/s >= haproxy", s["cps"] >= h["cps"],
            f"sluice auto {s['cps']:,.0f} vs {h['cps']:,.0f} conn/s "
            f"({_pct(s['cps'], h['cps']):+.1f}%); LB CPU {s['cpu_s_per_100k']:.2f} vs "
            f"{h['cpu_s_per_100k']:.2f} s/100k conn; p99 {s['p99_ms']:.3f} vs {h['p99_ms']:.3f} ms; "
            f"runs ahead {_ahead(results, 'tcp_conn', 'sluice auto', 'haproxy', 'cps', True)}")
    else:
        add("tcp_conn", None, "not measured in this run")

    d = _med(results, "udp_dns", "dnsdist")
    s = _med(results, "udp_dns", "sluice dns")
    if d and s:
        ok = s["qps"] >= d["qps"] and s["lost"] == 0 and s["p99_ms"] <= d["p99_ms"]
        add("udp_dns: sluice dns >= dnsdist QPS, 0 lost, p99 no worse", ok,
            f"sluice dns {s['qps']:,.0f} vs {d['qps']:,.0f} q/s ({_pct(s['qps'], d['qps']):+.1f}%), "
            f"lost {s['lost']:.0f}, p99 {s['p99_ms']:.3f} vs {d['p99_ms']:.3f} ms; runs ahead: "
            f"q/s {_ahead(results, 'udp_dns', 'sluice dns', 'dnsdist', 'qps', True)}, p99 "
            f"{_ahead(results, 'udp_dns', 'sluice dns', 'dnsdist', 'p99_ms', False)}")
    else:
        add("udp_dns", None, "not measured in this run")

    h = _med(results, "idle_mem", "haproxy")
    s = _med(results, "idle_mem", "sluice auto")
    if h and s and "kb_per_conn" in s and "kb_per_conn" in h:
        add("idle_mem: sluice KB/conn <= haproxy", s["kb_per_conn"] <= h["kb_per_conn"],
            f"sluice {s['kb_per_conn']:.2f} vs haproxy {h['kb_per_conn']:.2f} KB/conn")
    else:
        add("idle_mem", None, "not measured in this run")
    return out


def verdict_text(vs: list[dict]) -> str:
    return "\n".join(f"  [{v['verdict']:>7}] {v['target']}\n            {v['detail']}" for v in vs)


def verdict_markdown(vs: list[dict]) -> str:
    return "\n".join(f"| {v['target']} | **{v['verdict']}** | {v['detail']} |" for v in vs)


# --------------------------------------------------------------------------
# Chart


COLORS = {"direct": 0x969696, "sluice": 0xE6550D, "sluice-base": 0xFDAE6B, "haproxy": 0x3182BD, "nginx": 0x31A354,
          "dnsdist": 0x756BB1}

PANELS = [
    ("tcp_bulk/1", "gbps", "tcp_bulk 1 stream: Gbit/s (higher is better)", "%.1f"),
    ("tcp_bulk/1", "cpu_s_per_gb", "tcp_bulk 1 stream: LB CPU s/GB (lower is better)", "%.2f"),
    ("tcp_bulk/4", "gbps", "tcp_bulk 4 streams: Gbit/s (higher is better)", "%.1f"),
    ("tcp_bulk/4", "cpu_s_per_gb", "tcp_bulk 4 streams: LB CPU s/GB (lower is better)", "%.2f"),
    ("tcp_rr", "rps", "tcp_rr: requests/s (higher is better)", "%.0f"),
    ("tcp_rr", "cpu_s_per_100k", "tcp_rr: LB CPU s per 100k req (lower is better)", "%.2f"),
    ("tcp_rr", "p99_ms", "tcp_rr: p99 ms (lower is better)", "%.2f"),
    ("tcp_conn", "cps", "tcp_conn: connections/s (higher is better)", "%.0f"),
    ("tcp_conn", "cpu_s_per_100k", "tcp_conn: LB CPU s per 100k conn (lower is better)", "%.1f"),
    ("udp_dns", "qps", "udp_dns: queries/s (higher is better)", "%.0f"),
    ("udp_dns", "p99_ms", "udp_dns: p99 ms (lower is better)", "%.2f"),
    ("idle_mem", "kb_per_conn", "idle_mem: KB RSS per idle connection (lower is better)",
     "%.2f"),
]


def chart(results: dict, png: Path, workdir: Path, title: str) -> str | None:
    """Write the PNG; returns an error string or None."""
    if not shutil.which("gnuplot"):
        return "gnuplot is not installed (apt-get install gnuplot-nox)"
    workdir.mkdir(parents=True, exist_ok=True)
    cmds = [
        'set terminal pngcairo noenhanced size 1500,1750 font "sans,9"',
        f"set output '{png}'",
        f'set multiplot layout 4,3 title "{title}" font "sans,12"',
        "set style fill solid 0.85 border -1",
        "set boxwidth 0.7",
        "set grid ytics lc rgb '#dddddd'",
        "set xtics rotate by -30 left nomirror",
        "set ytics nomirror",
        "set border 3",
        "set yrange [0:*]",
        "set offsets 0.5, 0.5, graph 0.12, 0",
        "set bmargin 5",
    ]
    for i, (sub, key, ttl, fmt) in enumerate(PANELS):
        pts = []
        for label, r in results.get(sub, {}).items():
            v = (r.get("median") or {}).get(key)
            if v is None:
                continue
            pts.append((label, v, COLORS.get(label.split()[0], 0)))
        cmds.append(f'set title "{ttl}"')
        if not pts:
            cmds += ['set label 1 "no data" at graph 0.5,0.5 center',
                     "plot [0:1] [0:1] NaN notitle", "unset label 1"]
            continue
        dat = workdir / f"panel{i}.dat"
        dat.write_text("".join(f'"{lbl}" {v} {c}\n' for lbl, v, c in pts))
        cmds.append(f"plot '{dat}' using 0:2:3:xtic(1) with boxes lc rgb variable notitle, "
                    f"'' using 0:2:(sprintf('{fmt}', $2)) with labels offset 0,0.6 "
                    f"font 'sans,8' notitle")
    cmds.append("unset multiplot")
    script = workdir / "chart.gp"
    script.write_text("\n".join(cmds) + "\n")
    png.parent.mkdir(parents=True, exist_ok=True)
    r = subprocess.run(["gnuplot", str(script)], capture_output=True, text=True, timeout=60)
    if r.returncode != 0:
        return f"gnuplot failed: {r.stderr.strip()[-500:]}"
    return None
