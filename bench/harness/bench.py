#!/usr/bin/env python3
"""sluice benchmark harness: sluice against HAProxy, NGINX stream and
dnsdist on loopback, same machine, same run. See docs/benchmarks.md.

The load balancer under test runs with one worker pinned to --lb-cpu;
backends, load generators and this script run on --gen-cpu. Every process
started is stopped on exit (also on Ctrl-C / SIGTERM), and dies with the
harness if it is killed (PR_SET_PDEATHSIG).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.dont_write_bytecode = True  # keep the checkout clean
sys.path.insert(0, str(HERE))

import perfprof as prof  # noqa: E402
import report  # noqa: E402
from peers import Ctx, Row  # noqa: E402
import procs  # noqa: E402
from procs import Registry  # noqa: E402
from workloads import WORKLOADS, medians, run_workload  # noqa: E402

REPO = HERE.parent.parent
ALL_LBS = ["direct", "sluice", "haproxy", "nginx", "dnsdist"]
TOOLS = {
    "tcp_bulk": ["iperf3"],
    "tcp_rr": ["wrk", "nginx"],
    "tcp_conn": ["nginx"],
    "udp_dns": ["dnsperf", "knotd"],
    "idle_mem": [],
}
LB_TOOLS = {"haproxy": "haproxy", "nginx": "nginx", "dnsdist": "dnsdist"}
PACKAGES = ["haproxy", "nginx", "libnginx-mod-stream", "dnsdist", "iperf3", "wrk", "dnsperf",
            "knot", "gnuplot-nox", "linux-perf"]


def parse_args(argv):
    p = argparse.ArgumentParser(prog="scripts/bench.sh", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--runs", type=int, default=None, help="runs per row (default 3; --quick: 1)")
    p.add_argument("--quick", action="store_true",
                   help="smoke mode: 2 s windows, 1 run, 1000 idle connections")
    p.add_argument("--duration", type=int, default=None,
                   help="seconds per measurement window (default 10; --quick: 2)")
    p.add_argument("--workloads", default=",".join(WORKLOADS),
                   help=f"comma list from {','.join(WORKLOADS)}")
    p.add_argument("--lbs", default=",".join(ALL_LBS),
                   help="comma list of rows to run by load balancer "
                        f"({','.join(ALL_LBS)}); 'sluice' may be 'sluice:copy' etc.")
    p.add_argument("--sluice", type=Path, default=None,
                   help="sluice binary (default $CARGO_TARGET_DIR/release/sluice)")
    p.add_argument("--base-sluice", type=Path, default=None, metavar="BINARY",
                   help="a second sluice build (e.g. the commit before a change): every "
                        "sluice row gets a 'sluice-base <mode>' row run with it, "
                        "interleaved, for A/B comparisons")
    p.add_argument("--bench-bin", type=Path, default=None,
                   help="sluice-bench helper binary (default next to sluice)")
    p.add_argument("--nice", type=int, default=0,
                   help="nice value for every process the harness starts (e.g. -10 on a "
                        "shared machine: all rows get the same priority over other work)")
    p.add_argument("--lb-cpu", type=int, default=1)
    p.add_argument("--gen-cpu", type=int, default=0)
    p.add_argument("--rr-connections", type=int, default=32, help="wrk connections (tcp_rr)")
    p.add_argument("--conn-concurrency", type=int, default=32,
                   help="connections in flight (tcp_conn)")
    p.add_argument("--iperf3-window", default="4M", metavar="SIZE",
                   help="iperf3 -w (tcp_bulk): fixed socket buffers on both iperf3 ends "
                        "(default 4M, net.core.rmem_max here); 'auto' leaves them to the "
                        "kernel's autotuning, whose outcome at the server decides a "
                        "1-stream run's rate (docs/benchmarks.md)")
    p.add_argument("--dns-clients", type=int, default=8, help="dnsperf -c (udp_dns)")
    p.add_argument("--dns-outstanding", type=int, default=100, help="dnsperf -q (udp_dns)")
    p.add_argument("--idle-conns", type=int, default=None,
                   help="idle connections held (default 5000; --quick: 1000)")
    p.add_argument("--max-steal", type=float, default=1.0, metavar="PCT",
                   help="a measurement during which the hypervisor took more than PCT%% of "
                        "either CPU (steal time) is discarded and taken again, for every row "
                        "alike (default 1.0; kept in the JSON under 'discarded')")
    p.add_argument("--steal-retries", type=int, default=2, metavar="N",
                   help="at most N such repeats per row and run; after them the last "
                        "measurement counts, marked 'disturbed' (default 2)")
    p.add_argument("--profile", action="store_true",
                   help="after the runs, perf-profile sluice (and count system calls of "
                        "sluice, haproxy, dnsdist) under tcp_bulk, tcp_rr, tcp_conn and "
                        "udp_dns (those of --workloads, rows of --lbs)")
    p.add_argument("--profile-only", action="store_true", help="only the profiles")
    p.add_argument("--profile-seconds", type=int, default=None,
                   help="measurement window of each profile (default 10; --quick: 3)")
    p.add_argument("--results-dir", type=Path, default=REPO / "bench" / "results")
    p.add_argument("--chart", type=Path, default=REPO / "docs" / "benchmarks.png")
    p.add_argument("--no-chart", action="store_true")
    p.add_argument("--keep-tmp", action="store_true", help="keep configs and logs")
    p.add_argument("--report", type=Path, default=None, metavar="JSON",
                   help="run nothing: print the table and verdicts of a saved results file, "
                        "rewrite its .md and, unless --no-chart, the chart")
    p.add_argument("-v", "--verbose", action="store_true", help="print commands and full errors")
    a = p.parse_args(argv)
    a.runs = a.runs if a.runs is not None else (1 if a.quick else 3)
    a.duration = a.duration if a.duration is not None else (2 if a.quick else 10)
    a.idle_conns = a.idle_conns if a.idle_conns is not None else (1000 if a.quick else 5000)
    a.profile_seconds = a.profile_seconds or (3 if a.quick else 10)
    if a.runs < 1 or a.duration < 1 or a.idle_conns < 1:
        p.error("--runs, --duration and --idle-conns must be >= 1")
    a.workloads = [w for w in a.workloads.split(",") if w]
    for w in a.workloads:
        if w not in WORKLOADS:
            p.error(f"unknown workload {w}; expected some of {','.join(WORKLOADS)}")
    a.lbs = [x for x in a.lbs.split(",") if x]
    for x in a.lbs:
        if x.split(":")[0] not in ALL_LBS:
            p.error(f"unknown load balancer {x}; expected some of {','.join(ALL_LBS)}")
    if a.lb_cpu == a.gen_cpu:
        p.error("--lb-cpu and --gen-cpu must differ")
    if os.cpu_count() is not None and max(a.lb_cpu, a.gen_cpu) >= os.cpu_count():
        p.error(f"this machine has {os.cpu_count()} CPUs")
    target = Path(os.environ.get("CARGO_TARGET_DIR", REPO / "target"))
    a.sluice = a.sluice or target / "release" / "sluice"
    a.bench_bin = a.bench_bin or a.sluice.parent / "sluice-bench"
    return a


def row_selected(row: Row, lbs: list[str]) -> bool:
    for x in lbs:
        lb, _, mode = x.partition(":")
        if lb == row.lb and (not mode or mode == row.mode):
            return True
    return False


def _cmd_out(argv) -> str:
    try:
        r = subprocess.run(argv, capture_output=True, text=True, timeout=20)
        return (r.stdout + r.stderr).strip()
    except (OSError, subprocess.TimeoutExpired):
        return ""


def environment(args, argv) -> dict:
    cpu_model = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu_model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    versions = {}
    for pkg in PACKAGES:
        v = _cmd_out(["dpkg-query", "-W", "-f", "${Version}", pkg])
        versions[pkg] = v if v and "no packages" not in v else None
    git = _cmd_out(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"])
    dirty = _cmd_out(["git", "-C", str(REPO), "status", "--porcelain", "--untracked-files=no"])
    mem_kb = 0
    try:
        mem_kb = int(Path("/proc/meminfo").read_text().split()[1])
    except (OSError, ValueError, IndexError):
        pass
    tcp = {}
    for key in ("net/ipv4/tcp_congestion_control", "net/ipv4/tcp_rmem", "net/ipv4/tcp_wmem",
                "net/core/rmem_max", "net/core/wmem_max"):
        try:
            tcp[key.rsplit("/", 1)[1]] = " ".join(Path("/proc/sys", key).read_text().split())
        except OSError:
            tcp[key.rsplit("/", 1)[1]] = None
    return {
        "date_utc": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC"),
        "host": platform.node(),
        "kernel": platform.release(),
        "cpu_model": cpu_model,
        "cpus": os.cpu_count(),
        "memory_gb": round(mem_kb / 1024 / 1024, 1),
        "loadavg_start": Path("/proc/loadavg").read_text().split()[:3],
        "sluice_git": git + (" (uncommitted changes)" if dirty else ""),
        "sluice_binary": str(args.sluice),
        "base_sluice_binary": str(args.base_sluice) if args.base_sluice else None,
        "rustc": _cmd_out(["rustc", "--version"]),
        "tcp_sysctls": tcp,
        "versions": versions,
        # scripts/bench.sh passes the arguments it was given (it adds
        # --sluice and --bench-bin itself).
        "command": "scripts/bench.sh " + os.environ.get(
            "SLUICE_BENCH_ARGS", " ".join(shlex.quote(x) for x in argv)).strip(),
        "nice": args.nice,
        "lb_cpu": args.lb_cpu,
        "gen_cpu": args.gen_cpu,
        "runs": args.runs,
        "duration_s": args.duration,
        "settings": {
            "rr_connections": args.rr_connections,
            "conn_concurrency": args.conn_concurrency,
            "dns_clients": args.dns_clients,
            "dns_outstanding": args.dns_outstanding,
            "idle_conns": args.idle_conns,
            "iperf3_window": args.iperf3_window,
            "max_steal_pct": args.max_steal,
            "steal_retries": args.steal_retries,
        },
    }


MIN_FREE_BYTES = 2 << 30


def _on_signal(signum, _frame):
    raise SystemExit(128 + signum)


def write_markdown(md: Path, env: dict, results: dict, verdicts: list) -> None:
    md.write_text(f"Run {env['date_utc']} on {env['host']} ({env['cpu_model']}, {env['cpus']} "
                  f"CPUs, kernel {env['kernel']}), sluice {env['sluice_git']}.\n\n"
                  f"Command: `{env['command']}`\n\n{report.markdown_table(results)}\n\n"
                  f"| target | verdict | detail |\n| --- | --- | --- |\n"
                  f"{report.verdict_markdown(verdicts)}\n")


def chart_title(env: dict) -> str:
    return (f"sluice vs peers, {env['date_utc'][:10]}, {env['cpu_model']}, 1 worker pinned, "
            f"median of {env['runs']}")


def rerender(args) -> int:
    """--report: table, verdicts, Markdown and chart from a saved JSON."""
    doc = json.loads(args.report.read_text())
    results, env = doc["results"], doc["environment"]
    medians(results)
    vs = report.verdicts(results)
    print(report.text_table(results))
    print()
    print("targets (medians, same run):")
    print(report.verdict_text(vs))
    md = args.report.with_suffix(".md")
    write_markdown(md, env, results, vs)
    print(f"markdown: {md}")
    if not args.no_chart:
        with tempfile.TemporaryDirectory(prefix="sluice-bench-chart-") as tmp:
            err = report.chart(results, args.chart, Path(tmp), chart_title(env))
        print(f"chart: {err or args.chart}")
    return 0


def main(argv) -> int:
    args = parse_args(argv)
    if args.report:
        return rerender(args)
    for binary in (args.sluice, args.bench_bin) + ((args.base_sluice,) if args.base_sluice
                                                   else ()):
        if not binary.is_file():
            print(f"error: {binary} not found (build it: cargo build --release -p sluice "
                  f"-p sluice-bench)", file=sys.stderr)
            return 2
    # Ctrl-C stops everything, even when started from a script that set
    # SIGINT to ignored for background jobs.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, _on_signal)
    signal.signal(signal.SIGHUP, _on_signal)
    # The harness itself stays off the LB CPU.
    os.sched_setaffinity(0, {args.gen_cpu})
    if not -20 <= args.nice <= 19:
        print("error: --nice must be in -20..19", file=sys.stderr)
        return 2
    procs.NICE = args.nice

    stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    args.results_dir.mkdir(parents=True, exist_ok=True)
    json_path = args.results_dir / f"{stamp}.json"
    tmp = Path(tempfile.mkdtemp(prefix="sluice-bench-"))
    (tmp / "logs").mkdir()
    reg = Registry(tmp / "logs", verbose=args.verbose)
    ctx = Ctx(reg=reg, tmp=tmp, sluice=args.sluice.resolve(), bench=args.bench_bin.resolve(),
              sluice_base=args.base_sluice.resolve() if args.base_sluice else None,
              lb_cpu=args.lb_cpu, gen_cpu=args.gen_cpu, quick=args.quick, verbose=args.verbose,
              max_steal=args.max_steal, steal_retries=max(0, args.steal_retries),
              durations={w: args.duration for w in WORKLOADS},
              opts={"rr_connections": args.rr_connections,
                    "conn_concurrency": args.conn_concurrency,
                    "dns_clients": args.dns_clients, "dns_outstanding": args.dns_outstanding,
                    "idle_conns": args.idle_conns, "iperf3_window": args.iperf3_window})
    env = environment(args, argv)
    doc = {"environment": env, "results": {}, "verdicts": [], "profiles": {}}
    results = doc["results"]
    t_start = time.monotonic()

    def save():
        medians(results)
        doc["verdicts"] = report.verdicts(results)
        doc["environment"]["loadavg_end"] = Path("/proc/loadavg").read_text().split()[:3]
        doc["environment"]["elapsed_s"] = round(time.monotonic() - t_start)
        json_path.write_text(json.dumps(doc, indent=2, default=str) + "\n")

    print(f"sluice bench: {env['date_utc']}, {env['cpu_model']} x{env['cpus']}, "
          f"kernel {env['kernel']}; LB on CPU {args.lb_cpu}, load on CPU {args.gen_cpu}; "
          f"{args.runs} run(s) x {args.duration}s; logs in {tmp / 'logs'}", flush=True)
    # Configs, logs and generator output go under the temporary directory:
    # a disk that fills up mid-run fails rows (seen once, at 14:02 on
    # 2026-11-21), so say so before starting.
    low = sorted({str(p) for p in (tmp, args.results_dir)
                  if shutil.disk_usage(p).free < MIN_FREE_BYTES})
    if low:
        print(f"warning: less than {MIN_FREE_BYTES >> 30} GiB free under {', '.join(low)}; "
              "rows fail if the disk fills up during the run", flush=True)
    code = 0
    try:
        if not args.profile_only:
            for name in args.workloads:
                missing = [t for t in TOOLS[name] if not shutil.which(t)]
                rows = [r for r in WORKLOADS[name].rows if row_selected(r, args.lbs)]
                if args.base_sluice:
                    rows = [x for r in rows for x in
                            ([r, Row("sluice-base", r.mode)] if r.lb == "sluice" else [r])]
                missing_lb = {r.label: LB_TOOLS[r.lb] for r in rows
                              if r.lb in LB_TOOLS and not shutil.which(LB_TOOLS[r.lb])}
                print(f"{name}: {', '.join(r.label for r in rows)}", flush=True)
                if missing:
                    print(f"  skipped: missing {', '.join(missing)} (scripts/bench.sh installs "
                          "them)", flush=True)
                    for sub in WORKLOADS[name].subs:
                        results[sub] = {r.label: {"runs": [], "errors": [
                            f"missing tool {', '.join(missing)}"]} for r in rows}
                    continue
                for label, tool in missing_lb.items():
                    for sub in WORKLOADS[name].subs:
                        results.setdefault(sub, {})[label] = {"runs": [], "errors": [
                            f"missing tool {tool}"]}
                rows = [r for r in rows if r.label not in missing_lb]
                run_workload(ctx, WORKLOADS[name](ctx), rows, args.runs, results)
                save()
        if args.profile or args.profile_only:
            print(f"profiles (perf; files in {args.results_dir / stamp}):", flush=True)
            doc["profiles"] = prof.profile_all(
                ctx, args.profile_seconds, args.results_dir / stamp, args.workloads,
                lambda row: row_selected(row, args.lbs))
            save()
    except KeyboardInterrupt:
        print("interrupted: stopping everything", file=sys.stderr)
        code = 130
    except SystemExit as e:
        print("terminated: stopping everything", file=sys.stderr)
        code = int(e.code) if isinstance(e.code, int) else 1
    finally:
        reg.stop_all()

    save()
    if results:
        print()
        print(report.text_table(results))
        print()
        print("targets (medians, same run):")
        print(report.verdict_text(doc["verdicts"]))
    md = args.results_dir / f"{stamp}.md"
    write_markdown(md, env, results, doc["verdicts"])
    if not args.no_chart and not args.profile_only:
        err = report.chart(results, args.chart, tmp / "chart", chart_title(env))
        print(f"chart: {err or args.chart}")
    print(f"json: {json_path}\nmarkdown: {md}")
    if args.keep_tmp:
        print(f"configs and logs kept in {tmp}")
    else:
        shutil.rmtree(tmp, ignore_errors=True)
    return code


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
