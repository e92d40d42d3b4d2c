"""The five workloads. Each one starts its two backends once, then for every
run and every row starts the row's load balancer, checks it answers, checks
its threads are pinned to the LB CPU, measures, and stops it.

Results: results[sub_workload][row_label] = {"runs": [metrics...],
"errors": [...]} where a sub-workload is for example "tcp_bulk/1".
"""

from __future__ import annotations

import contextlib
import json
import re
import select
import statistics
import time

import netutil
from netutil import LOOPBACK, free_port, wait_until
from peers import (Ctx, Row, query_file, start_http_backend, start_iperf3_server, start_knot,
                   start_lb, start_sink)
from procs import CpuWindow, thread_affinity


def _cpu_fields(m: dict, w: CpuWindow, ctx: Ctx, lb: list, per: float | None, key: str):
    """LB CPU over the window, normalised by `per` units of work."""
    m["window_s"] = round(w.seconds, 3)
    m["gen_cpu_busy_pct"] = w.cpu_busy.get(f"cpu{ctx.gen_cpu}", {}).get("busy_pct")
    m["top_other_processes"] = w.top_others
    m["steal_pct"] = {k: v["steal_pct"] for k, v in w.cpu_busy.items()}
    if not lb:
        return
    m["lb_cpu_s"] = round(w.lb_cpu, 3)
    m["lb_cpu_pct"] = round(100.0 * w.lb_cpu / max(w.seconds, 1e-9), 1)
    m["lb_cpu_other_load_pct"] = w.other_load_pct(ctx.lb_cpu)
    m[key] = (w.lb_cpu / per) if per else None


class Workload:
    name = ""
    subs: list[str] = []
    proto = "tcp"
    balance = "round_robin"
    rows: list[Row] = []

    def __init__(self, ctx: Ctx):
        self.ctx = ctx
        self.backend_procs = []
        self.backend_ports: list[int] = []
        # Entered around the measured part of each measurement (warm-ups
        # excluded), together with the CPU window: the profiler attaches
        # perf there.
        self.hook = contextlib.nullcontext

    @property
    def duration(self) -> int:
        return self.ctx.durations[self.name]

    def setup(self) -> None:
        raise NotImplementedError

    def start_backends(self, start, name: str, what: str, probe, timeout: float = 10) -> None:
        """Two backends on free ports, `start(ctx, f"{name}-{i}", port)`, each
        waited for until `probe(port)` is true."""
        for i in range(2):
            port = free_port()
            p = start(self.ctx, f"{name}-{i}", port)
            wait_until(f"{what} on {port}", lambda: probe(port), timeout, proc=p)
            self.backend_procs.append(p)
            self.backend_ports.append(port)

    def ready(self, port: int, proc) -> None:
        raise NotImplementedError

    def measure(self, port: int, lb: list) -> dict:
        raise NotImplementedError

    def check_backends(self) -> None:
        for p in self.backend_procs:
            if not p.alive():
                raise RuntimeError(f"backend {p.name} exited; log:\n{p.log_tail()}")

    def teardown(self) -> None:
        for p in self.backend_procs:
            self.ctx.reg.stop(p)
        self.backend_procs = []


# --------------------------------------------------------------------------


class TcpBulk(Workload):
    name = "tcp_bulk"
    subs = ["tcp_bulk/1", "tcp_bulk/4"]
    # iperf3's control and data connections must reach the same server:
    # every LB hashes on the client address.
    balance = "source_ip"
    rows = [Row("direct"), Row("sluice", "splice"), Row("sluice", "copy"), Row("sluice", "auto"),
            Row("haproxy"), Row("haproxy", "splice"), Row("nginx")]

    def setup(self):
        self.start_backends(start_iperf3_server, "iperf3-server", "iperf3 server",
                            netutil.tcp_listening)

    def ready(self, port, proc):
        # No probe connection: iperf3 would take it for a test.
        wait_until(f"{proc.name} listening on {port}", lambda: netutil.tcp_listening(port), 10,
                   proc=proc)
        time.sleep(0.2)

    def _iperf(self, port: int, streams: int) -> dict:
        d = self.duration
        argv = ["iperf3", "-c", LOOPBACK, "-p", str(port), "-t", str(d), "-P", str(streams), "-J"]
        window = self.ctx.opts.get("iperf3_window") or "auto"
        if window != "auto":
            # Fixed buffers on both iperf3 ends (the server takes the
            # client's): no receive autotuning at the server, whose outcome
            # otherwise decides a 1-stream run's rate (docs/benchmarks.md).
            argv += ["-w", window]
        last = None
        for _attempt in range(5):
            try:
                txt = self.ctx.reg.run(f"iperf3-P{streams}", argv, cpu=self.ctx.gen_cpu,
                                       timeout=d + 30)
                j = json.loads(txt)
            except RuntimeError as e:
                # iperf3 -J prints its error as JSON and exits 1.
                msg = str(e)
                try:
                    j = json.loads(msg[msg.index("stdout:\n") + 8:])
                except (ValueError, json.JSONDecodeError):
                    raise e from None
            if j.get("error"):
                last = j["error"]
                if "busy" in last:
                    time.sleep(1.0)
                    continue
                raise RuntimeError(f"iperf3: {last}")
            return j
        raise RuntimeError(f"iperf3: {last}")

    streams = (1, 4)

    def measure(self, port, lb):
        out = {}
        for streams in self.streams:
            with self.hook(), CpuWindow(lb) as w:
                j = self._iperf(port, streams)
            s = j["end"]["sum_received"]
            m = {
                "gbps": s["bits_per_second"] / 1e9,
                "bytes": s["bytes"],
                "seconds": s["seconds"],
                "retransmits": j["end"].get("sum_sent", {}).get("retransmits"),
            }
            _cpu_fields(m, w, self.ctx, lb, s["bytes"] / 1e9, "cpu_s_per_gb")
            out[f"tcp_bulk/{streams}"] = m
            time.sleep(0.5)  # let the iperf3 server reset between tests
        return out


# --------------------------------------------------------------------------


_UNITS = {"us": 1e-3, "ms": 1.0, "s": 1e3, "m": 60e3}


def _ms(value: str, unit: str) -> float:
    return float(value) * _UNITS[unit]


def parse_wrk(txt: str) -> dict:
    m: dict = {}
    r = re.search(r"Requests/sec:\s+([\d.]+)", txt)
    if not r:
        raise RuntimeError(f"cannot parse wrk output:\n{txt[-800:]}")
    m["rps"] = float(r.group(1))
    r = re.search(r"(\d+) requests in ([\d.]+)(us|ms|s|m)", txt)
    if r:
        m["requests"] = int(r.group(1))
        m["seconds"] = _ms(r.group(2), r.group(3)) / 1e3
    for pct in ("50", "90", "99"):
        r = re.search(rf"^\s+{pct}%\s+([\d.]+)(us|ms|s|m)\s*$", txt, re.M)
        if r:
            m[f"p{pct}_ms"] = _ms(r.group(1), r.group(2))
    r = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", txt)
    m["socket_errors"] = sum(int(x) for x in r.groups()) if r else 0
    r = re.search(r"Non-2xx or 3xx responses: (\d+)", txt)
    m["non_2xx"] = int(r.group(1)) if r else 0
    return m


class HttpBackends(Workload):
    """Two nginx HTTP servers (one worker each) answering 128-byte bodies."""

    def setup(self):
        self.start_backends(start_http_backend, f"{self.name}-http", "nginx backend",
                            netutil.http_ok)

    def ready(self, port, proc):
        wait_until(f"{proc.name} proxying HTTP on {port}", lambda: netutil.http_ok(port), 10,
                   proc=proc)


class TcpRR(HttpBackends):
    name = "tcp_rr"
    subs = ["tcp_rr"]
    rows = [Row("direct"), Row("sluice", "auto"), Row("sluice", "copy"), Row("sluice", "splice"),
            Row("haproxy"), Row("nginx")]

    def measure(self, port, lb):
        c = self.ctx.opts["rr_connections"]
        url = f"http://{LOOPBACK}:{port}/"
        self.ctx.reg.run("wrk-warmup", ["wrk", "-t1", f"-c{c}", "-d1s", url], cpu=self.ctx.gen_cpu,
                         timeout=30)
        d = self.duration
        with self.hook(), CpuWindow(lb) as w:
            txt = self.ctx.reg.run("wrk", ["wrk", "-t1", f"-c{c}", f"-d{d}s", "--latency", url],
                                   cpu=self.ctx.gen_cpu, timeout=d + 30)
        m = parse_wrk(txt)
        m["connections"] = c
        _cpu_fields(m, w, self.ctx, lb, m.get("requests", 0) / 1e5, "cpu_s_per_100k")
        if m["socket_errors"] or m["non_2xx"]:
            m["warning"] = f"{m['socket_errors']} socket errors, {m['non_2xx']} non-2xx"
        return {"tcp_rr": m}


class TcpConn(HttpBackends):
    name = "tcp_conn"
    subs = ["tcp_conn"]
    rows = [Row("direct"), Row("sluice", "auto"), Row("sluice", "copy"), Row("haproxy"),
            Row("nginx")]

    def measure(self, port, lb):
        c = self.ctx.opts["conn_concurrency"]
        d = self.duration
        argv = [str(self.ctx.bench), "conn", "--target", f"{LOOPBACK}:{port}",
                "--concurrency", str(c), "--warmup", "1s", "--duration", f"{d}s"]
        with self.hook(), CpuWindow(lb) as w:
            txt = self.ctx.reg.run("conn", argv, cpu=self.ctx.gen_cpu, timeout=d + 30)
        j = json.loads(txt.strip().splitlines()[-1])
        m = {
            "cps": j["connections_per_s"],
            "connections": j["connections"],
            "all_connections": j["all_connections"],
            "p50_ms": j["p50_us"] / 1e3 if j["p50_us"] is not None else None,
            "p90_ms": j["p90_us"] / 1e3 if j["p90_us"] is not None else None,
            "p99_ms": j["p99_us"] / 1e3 if j["p99_us"] is not None else None,
            "errors": j["errors"] + j["timeouts"] + j["bad_status"],
            "concurrency": c,
        }
        # The CPU window spans warm-up and measurement: divide by all of them.
        _cpu_fields(m, w, self.ctx, lb, j["all_connections"] / 1e5, "cpu_s_per_100k")
        if m["errors"]:
            m["warning"] = (f"{j['errors']} errors, {j['timeouts']} timeouts, "
                            f"{j['bad_status']} bad status")
        if not j["connections"]:
            raise RuntimeError(f"no connection completed: {j}")
        return {"tcp_conn": m}


# --------------------------------------------------------------------------


def parse_dnsperf(txt: str) -> dict:
    def num(label, cast=float):
        r = re.search(rf"{label}:\s+([\d.]+)", txt)
        return cast(r.group(1)) if r else None

    m = {
        "sent": num("Queries sent", int),
        "completed": num("Queries completed", int),
        "lost": num("Queries lost", int),
        "qps": num("Queries per second"),
        "seconds": num(r"Run time \(s\)"),
    }
    if m["qps"] is None:
        raise RuntimeError(f"cannot parse dnsperf output:\n{txt[-800:]}")
    lat, bad = [], 0
    for line in txt.splitlines():
        if line.startswith("> "):
            f = line.split()
            if f[1] == "T":
                continue
            if f[1] != "NOERROR":
                bad += 1
            try:
                lat.append(float(f[-1]))
            except ValueError:
                pass
    lat.sort()
    if lat:
        def pct(p):
            return lat[max(0, min(len(lat) - 1, int(-(-p * len(lat) // 100)) - 1))] * 1e3
        m["p50_ms"], m["p90_ms"], m["p99_ms"] = pct(50), pct(90), pct(99)
    m["not_noerror"] = bad
    return m


class UdpDns(Workload):
    name = "udp_dns"
    subs = ["udp_dns"]
    proto = "udp"
    rows = [Row("direct"), Row("sluice", "dns"), Row("sluice", "session"), Row("dnsdist"),
            Row("nginx")]

    def setup(self):
        self.qfile = query_file(self.ctx.tmp / "queries.txt")
        self.start_backends(start_knot, "knot", "knotd answering",
                            lambda port: netutil.dns_ok(port, "a1.example.com"), timeout=15)

    def ready(self, port, proc):
        wait_until(f"{proc.name} answering DNS on {port}",
                   lambda: netutil.dns_ok(port, "a1.example.com", timeout=0.3), 10, proc=proc)

    def _dnsperf(self, port: int, seconds: int, verbose: bool, name: str) -> str:
        o = self.ctx.opts
        argv = ["dnsperf", "-s", LOOPBACK, "-p", str(port), "-d", str(self.qfile),
                "-l", str(seconds), "-c", str(o["dns_clients"]), "-T", "1",
                "-q", str(o["dns_outstanding"]), "-t", "2"]
        if verbose:
            argv.append("-v")
        return self.ctx.reg.run(name, argv, cpu=self.ctx.gen_cpu, timeout=seconds + 30)

    def measure(self, port, lb):
        self._dnsperf(port, 1, False, "dnsperf-warmup")
        with self.hook(), CpuWindow(lb) as w:
            txt = self._dnsperf(port, self.duration, True, "dnsperf")
        m = parse_dnsperf(txt)
        _cpu_fields(m, w, self.ctx, lb, (m["completed"] or 0) / 1e5, "cpu_s_per_100k")
        if m["lost"]:
            m["warning"] = f"{m['lost']} lost"
        return {"udp_dns": m}


# --------------------------------------------------------------------------


def _read_json_line(proc, timeout: float) -> dict:
    deadline = time.monotonic() + timeout
    f = proc.popen.stdout
    while time.monotonic() < deadline:
        r, _, _ = select.select([f], [], [], max(0.0, min(0.5, deadline - time.monotonic())))
        if r:
            line = f.readline()
            if not line:
                break
            return json.loads(line)
        if not proc.alive():
            break
    raise RuntimeError(f"{proc.name}: no report within {timeout:.0f}s; log:\n{proc.log_tail()}")


def echo_ok(port: int) -> bool:
    import socket
    try:
        with socket.create_connection((LOOPBACK, port), timeout=1) as s:
            s.sendall(b"ping")
            return s.recv(16) == b"ping"
    except OSError:
        return False


class IdleMem(Workload):
    name = "idle_mem"
    subs = ["idle_mem"]
    rows = [Row("direct"), Row("sluice", "auto"), Row("haproxy"), Row("nginx")]

    def setup(self):
        self.start_backends(start_sink, "sink", "sink", echo_ok)

    def ready(self, port, proc):
        wait_until(f"{proc.name} proxying on {port}", lambda: echo_ok(port), 10, proc=proc)

    def measure(self, port, lb):
        n = self.ctx.opts["idle_conns"]
        time.sleep(0.5)  # let start-up allocations settle before the baseline
        rss0 = sum(p.rss_kb() for p in lb)
        hold = self.ctx.reg.start("hold", [str(self.ctx.bench), "hold", "--target",
                                           f"{LOOPBACK}:{port}", "--count", str(n)],
                                  cpu=self.ctx.gen_cpu, stdin_pipe=True, stdout_pipe=True)
        try:
            j = _read_json_line(hold, 180)
            if j["ready"] < n:
                raise RuntimeError(f"only {j['ready']} of {n} connections came up "
                                   f"({j['errors']} errors, last: {j['last_error']})")
            time.sleep(1.0)  # let the LB finish its per-connection work
            rss1 = sum(p.rss_kb() for p in lb)
            fds = sum(_fd_count(pid) for p in lb for pid in p.pids())
            m = {"connections": j["ready"], "open_seconds": j["seconds"]}
            if lb:
                m.update({
                    "rss_before_kb": rss0,
                    "rss_after_kb": rss1,
                    "kb_per_conn": (rss1 - rss0) / j["ready"],
                    "lb_fds": fds,
                })
            hold.popen.stdin.close()
            try:
                hold.popen.wait(60)
            except Exception:
                pass
        finally:
            self.ctx.reg.stop(hold)
        return {"idle_mem": m}


def _fd_count(pid: int) -> int:
    import os
    try:
        return len(os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        return 0


WORKLOADS = {w.name: w for w in (TcpBulk, TcpRR, TcpConn, UdpDns, IdleMem)}


# --------------------------------------------------------------------------


def _log(msg: str) -> None:
    print(msg, flush=True)


def run_workload(ctx: Ctx, wl: Workload, rows: list[Row], runs: int, results: dict,
                 log=_log) -> None:
    for sub in wl.subs:
        results.setdefault(sub, {})
        for row in rows:
            results[sub].setdefault(row.label, {"runs": [], "errors": []})
    try:
        wl.setup()
    except Exception as e:  # noqa: BLE001 - reported as failed rows
        log(f"  {wl.name}: backends failed to start: {e}")
        for sub in wl.subs:
            for row in rows:
                results[sub][row.label]["errors"].append(f"backends failed: {e}")
        wl.teardown()
        return
    dead_rows: set[str] = set()
    try:
        for run in range(runs):
            for row in rows:
                if row.label in dead_rows:
                    continue
                _run_row(ctx, wl, row, run, results, dead_rows, log)
    finally:
        wl.teardown()


def _run_row(ctx, wl, row, run, results, dead_rows, log):
    t0 = time.monotonic()
    lb = []
    try:
        wl.check_backends()
        if row.lb == "direct":
            port = wl.backend_ports[0]
        else:
            port = free_port()
            lb = start_lb(ctx, row, port, wl.backend_ports, wl.proto, wl.balance)
            try:
                wl.ready(port, lb[0])
            except Exception:
                dead_rows.add(row.label)  # it will not come up next run either
                raise
        pin = _check_pinning(ctx, lb)
        for attempt in range(ctx.steal_retries + 1):
            out = wl.measure(port, lb)
            steal = _steal(out)
            if steal <= ctx.max_steal:
                break
            if attempt == ctx.steal_retries:
                for m in out.values():
                    m["disturbed"] = True
                break
            # The hypervisor took the CPUs away during the window: what was
            # measured is the host, not the row. Kept, but not counted.
            for sub, m in out.items():
                m["run"] = run + 1
                results[sub][row.label].setdefault("discarded", []).append(m)
            log(f"  [{wl.name} run {run + 1}] {row.label:<15} discarded: steal {steal:.1f}% "
                f"of a CPU (> {ctx.max_steal:g}%), measuring again")
        threads = ({k: v for p in lb for k, v in thread_affinity(p.pids()).items()}
                   if lb and run == 0 else None)
        for sub, m in out.items():
            m["run"] = run + 1
            if threads:
                m["thread_cpus"] = threads
            if pin:
                m["pinning_problem"] = pin
            if lb and not all(p.alive() for p in lb):
                m["warning"] = (m.get("warning", "") + " LB exited during the run").strip()
            results[sub][row.label]["runs"].append(m)
        log(f"  [{wl.name} run {run + 1}] {row.label:<15} {_brief(out)}  "
            f"({time.monotonic() - t0:.0f}s)")
    except Exception as e:  # noqa: BLE001 - a failed row is reported, the rest goes on
        msg = str(e).strip()
        for sub in wl.subs:
            results[sub][row.label]["errors"].append(f"run {run + 1}: {msg}")
        first = msg.splitlines()[0] if msg else type(e).__name__
        log(f"  [{wl.name} run {run + 1}] {row.label:<15} FAILED: {first}")
        if ctx.verbose:
            log("    " + msg.replace("\n", "\n    "))
    finally:
        for p in lb:
            ctx.reg.stop(p)


def _steal(out: dict) -> float:
    """The most steal time (% of one CPU) either CPU saw in a measurement."""
    return max((v for m in out.values() for v in (m.get("steal_pct") or {}).values()
                if isinstance(v, (int, float))), default=0.0)


def _check_pinning(ctx: Ctx, lb: list) -> str | None:
    """Every thread of the LB must be allowed on the LB CPU only."""
    want = str(ctx.lb_cpu)
    bad = {k: v for p in lb for k, v in thread_affinity(p.pids()).items() if v != want}
    return json.dumps(bad) if bad else None


def _brief(out: dict) -> str:
    parts = []
    for sub, m in out.items():
        if "gbps" in m:
            s = f"{sub}: {m['gbps']:.2f} Gbit/s"
            if m.get("cpu_s_per_gb") is not None:
                s += f" {m['cpu_s_per_gb']:.3f} s/GB"
        elif "rps" in m:
            s = f"{m['rps']:,.0f} req/s p99 {m.get('p99_ms', 0):.2f} ms"
        elif "cps" in m:
            s = f"{m['cps']:,.0f} conn/s p99 {m.get('p99_ms') or 0:.2f} ms"
        elif "qps" in m:
            s = f"{m['qps']:,.0f} q/s lost {m['lost']} p99 {m.get('p99_ms') or 0:.2f} ms"
        elif "kb_per_conn" in m:
            s = f"{m['connections']} conns, {m['kb_per_conn']:.2f} KB/conn"
        else:
            s = f"{m.get('connections', '?')} conns"
        if m.get("lb_cpu_s") is not None:
            s += f" [LB {m['lb_cpu_pct']:.0f}% CPU]"
        if m.get("warning"):
            s += f" WARNING: {m['warning']}"
        parts.append(s)
    return "; ".join(parts)


def medians(results: dict) -> None:
    """Add results[sub][row]["median"]: the median of every numeric metric
    over the row's successful runs."""
    for rows in results.values():
        for r in rows.values():
            runs = r["runs"]
            med = {}
            if runs:
                keys = {k for m in runs for k, v in m.items()
                        if isinstance(v, (int, float)) and not isinstance(v, bool)}
                for k in sorted(keys):
                    vals = [m[k] for m in runs if isinstance(m.get(k), (int, float))]
                    if vals and k != "run":
                        med[k] = statistics.median(vals)
            r["median"] = med
