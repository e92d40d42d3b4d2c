"""Where sluice's time goes, and how it compares with its peers in system
calls per unit of work.

For each (workload, load balancer) pair, with the workload's own backends
and load:

1. `perf record -e cpu-clock -g` on the LB's processes during one
   measurement window, summarised by `perf report` (self time by symbol and
   shared object, inclusive time through the kernel's call chains);
2. every LB: `perf stat` of system calls, io_uring submissions and polls
   armed, and context switches during one window, divided by the requests
   (or queries, connections) served in it;
3. every LB: `perf trace -s` (per-syscall counts) during a short window.
   perf trace slows the LB down a lot: only its counts are used.

perf runs on the generator CPU.
"""

from __future__ import annotations

import contextlib
import re
import shutil
import signal
import subprocess
import time
from pathlib import Path

from netutil import free_port
from peers import Row, start_lb
from workloads import WORKLOADS

TARGETS = [
    ("tcp_bulk", [Row("sluice", "splice"), Row("sluice", "auto"), Row("haproxy", "splice")]),
    ("tcp_rr", [Row("sluice", "auto"), Row("haproxy")]),
    ("tcp_conn", [Row("sluice", "auto"), Row("haproxy")]),
    ("udp_dns", [Row("sluice", "dns"), Row("dnsdist")]),
]
STAT_EVENTS = ["raw_syscalls:sys_enter", "io_uring:io_uring_submit_req",
               "io_uring:io_uring_queue_async_work", "context-switches"]
UNIT = {"tcp_bulk": ("bytes", "GB"), "tcp_rr": ("requests", "request"), "tcp_conn": ("connections", "connection"),
        "udp_dns": ("completed", "query")}


def _report(data: Path, args: list[str]) -> str:
    r = subprocess.run(["perf", "report", "-i", str(data), "--stdio", *args],
                       capture_output=True, text=True, timeout=600)
    lines = [ln.rstrip() for ln in r.stdout.splitlines()
             if ln.strip() and not ln.startswith("#")]
    return "\n".join(lines)


def _work_done(wl_name: str, m: dict) -> float:
    if wl_name == "tcp_bulk":
        return float(m.get("bytes") or 0) / 1e9
    if wl_name == "tcp_conn":
        # The conn tool's warm-up runs inside perf's window: count it too.
        return float(m.get("all_connections") or m.get("connections") or 0)
    return float(m.get(UNIT[wl_name][0]) or 0)


def _measure(ctx, wl, port, lb, seconds):
    saved = dict(ctx.durations)
    ctx.durations[wl.name] = seconds
    try:
        out = wl.measure(port, lb)
    finally:
        ctx.durations.clear()
        ctx.durations.update(saved)
    return out[wl.subs[0]]


def _perf_while(ctx, name, argv_fn, wl, port, lb, seconds, out_path):
    """Run perf, attached to the LB's processes, over the measured part of
    one measurement (warm-ups excluded); it stops on SIGINT."""

    @contextlib.contextmanager
    def attached():
        pids = ",".join(str(p) for pr in lb for p in pr.pids())
        perf = ctx.reg.start(name, argv_fn(pids, out_path), cpu=ctx.gen_cpu)
        try:
            time.sleep(0.5)  # perf attaches and opens its events
            yield
            perf.popen.send_signal(signal.SIGINT)
            perf.popen.wait(300)
        finally:
            ctx.reg.stop(perf)

    wl.hook = attached
    try:
        return _measure(ctx, wl, port, lb, seconds)
    finally:
        wl.hook = contextlib.nullcontext


def profile_pair(ctx, wl_name: str, row: Row, seconds: int, out_dir: Path, log) -> dict:
    wl = WORKLOADS[wl_name](ctx)
    if wl_name == "tcp_bulk":
        wl.streams = (1,)  # one stream: the target's case
    lb = []
    res: dict = {"workload": wl_name, "lb": row.label}
    wl.setup()
    try:
        port = free_port()
        lb = start_lb(ctx, row, port, wl.backend_ports, wl.proto, wl.balance)
        wl.ready(port, lb[0])
        tag = f"{wl_name}-{row.label.replace(' ', '-')}"
        unit = UNIT[wl_name][1]
        # 1. perf record (peers too: their kernel profile is the baseline).
        data = ctx.tmp / f"perf-{tag}.data"
        m = _perf_while(ctx, f"perf-record-{tag}", lambda pids, o: [
            "perf", "record", "-e", "cpu-clock", "-F", "1999", "-g", "-p", pids,
            "-o", str(o)], wl, port, lb, seconds, data)
        res["record_load"] = m
        res["flat"] = _report(data, ["--no-children", "--sort", "dso,sym", "-g", "none",
                                     "--percent-limit", "0.7"])
        res["dso"] = _report(data, ["--no-children", "--sort", "dso", "-g", "none"])
        res["inclusive"] = _report(data, ["--children", "--sort", "sym", "-g", "none",
                                          "--percent-limit", "5"])

        # 2. perf stat: events per unit of work.
        stat_out = ctx.tmp / f"perf-stat-{tag}.csv"
        m = _perf_while(ctx, f"perf-stat-{tag}", lambda pids, o: [
            "perf", "stat", "-x", ",", "-o", str(o), "-e", ",".join(STAT_EVENTS), "-p", pids],
            wl, port, lb, seconds, stat_out)
        work = _work_done(wl_name, m)
        per = {}
        for line in stat_out.read_text().splitlines():
            f = line.split(",")
            if len(f) > 2 and f[0].strip().replace(".", "").isdigit():
                per[f[2]] = float(f[0]) / work if work else None
        res["stat_load"] = m
        res[f"per_{unit}"] = per

        # 3. perf trace -s: which system calls.
        trace_out = ctx.tmp / f"perf-trace-{tag}.txt"
        short = max(2, seconds // 3)
        m = _perf_while(ctx, f"perf-trace-{tag}", lambda pids, o: [
            "perf", "trace", "-s", "-p", pids, "-o", str(o)],
            wl, port, lb, short, trace_out)
        work = _work_done(wl_name, m)
        calls: dict[str, int] = {}
        for line in trace_out.read_text(errors="replace").splitlines():
            r = re.match(r"^\s+([a-z_0-9]+)\s+(\d+)\s+\d+\s+[\d.]+", line)
            if r:
                calls[r.group(1)] = calls.get(r.group(1), 0) + int(r.group(2))
        res["syscalls_per_" + unit] = {k: round(v / work, 3) for k, v in
                                       sorted(calls.items(), key=lambda kv: -kv[1])
                                       if work and v / work >= 0.01}
        res["trace_load_note"] = "perf trace slows the LB: only the ratios are meaningful"

        text = [f"# {row.label} under {wl_name}", ""]
        if "flat" in res:
            text += [f"## perf record ({seconds}s, cpu-clock 1999 Hz); load: "
                     f"{_brief(res['record_load'])}", "", "### self time by dso, symbol",
                     res["flat"], "", "### self time by dso", res["dso"], "",
                     "### inclusive (children), >= 5%", res["inclusive"], ""]
        text += [f"## perf stat per {unit} ({seconds}s); load: {_brief(res['stat_load'])}"]
        text += [f"  {k:<40} {v:10.3f}" for k, v in per.items() if v is not None]
        text += ["", f"## system calls per {unit} (perf trace -s, {short}s)"]
        text += [f"  {k:<24} {v:8.3f}" for k, v in res["syscalls_per_" + unit].items()]
        out = out_dir / f"profile-{tag}.txt"
        out.write_text("\n".join(text) + "\n")
        res["file"] = str(out)
        log(f"  {row.label:<12} under {wl_name:<8}: "
            + ", ".join(f"{k.split(':')[-1]} {v:.2f}/{unit}" for k, v in per.items()
                        if v is not None) + f"  ({out.name})")
        return res
    except Exception as e:  # noqa: BLE001 - reported, the run goes on
        msg = str(e).strip()
        log(f"  {row.label} under {wl_name}: FAILED: {msg.splitlines()[0] if msg else e!r}")
        res["error"] = msg
        return res
    finally:
        for p in lb:
            ctx.reg.stop(p)
        wl.teardown()


def _brief(m: dict) -> str:
    keys = ("gbps", "rps", "cps", "qps", "p50_ms", "p99_ms", "lb_cpu_pct", "lost")
    return ", ".join(f"{k} {m[k]:.3g}" for k in keys if isinstance(m.get(k), (int, float)))


def profile_all(ctx, seconds: int, out_dir: Path, workloads: list[str], lbs=None,
                log=None) -> dict:
    """Profile every (workload, LB) pair of TARGETS whose workload is in
    `workloads` and whose row passes the `lbs(row)` filter."""
    log = log or (lambda msg: print(msg, flush=True))
    if not shutil.which("perf"):
        log("  perf is not installed (apt-get install linux-perf): no profiles")
        return {"error": "perf not installed"}
    out_dir.mkdir(parents=True, exist_ok=True)
    res = {}
    for wl_name, rows in TARGETS:
        if wl_name not in workloads:
            continue
        for row in rows:
            if lbs is not None and not lbs(row):
                continue
            res[f"{wl_name}/{row.label}"] = profile_pair(ctx, wl_name, row, seconds, out_dir, log)
    return res
