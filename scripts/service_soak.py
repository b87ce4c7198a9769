"""Soak `abcd-edge serve` on the shipped demo and write the figures for the README (Markdown + JSON).

    .venv/bin/python scripts/service_soak.py                      # 2,000 requests, 4 clients, 150ms
    .venv/bin/python scripts/service_soak.py --requests 400 --clients 2

Starts the service in a subprocess (export/demo, profiles/cpu-2t.json, calibration/demo, 2 threads),
sends --warmup requests, reads the server's RSS, then --requests requests from --clients closed-loop
clients (a refused client waits the server's predicted wait before its next request); every
--short-every-th request asks --short-budget, a budget that only fits when nothing is ahead of it.
Latencies are measured twice: by the server from arrival to response ready, by the client from
sending to the whole answer read. Writes <out>/soak.md and <out>/soak.json atomically.
"""
from __future__ import annotations

import argparse
import datetime
import os
import shlex
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from abcd_edge.core.budget import parse_budget  # noqa: E402
from abcd_edge.device.hardware import cpu_counts, cpu_model  # noqa: E402
from abcd_edge.io import write_bytes_atomic, write_json_atomic  # noqa: E402
from abcd_edge.service.loadgen import free_port, run_clients, start_server, stop_server  # noqa: E402


def _q(values, q):
    return round(float(np.quantile(values, q)), 2) if len(values) else None


def _rows(answers) -> dict:
    """Per budget: what the clients saw."""
    out = {}
    for budget in sorted({a.budget for a in answers}, key=lambda b: parse_budget(b).ms):
        mine = [a for a in answers if a.budget == budget]
        ok = [a for a in mine if a.status == 200]
        reasons: dict[str, int] = {}
        for a in mine:
            if a.status != 200:
                reasons[a.reason or str(a.status)] = reasons.get(a.reason or str(a.status), 0) + 1
        server = [a.latency_ms for a in ok]
        client = [a.elapsed_ms for a in ok]
        out[budget] = {
            "requests": len(mine), "answered": len(ok), "refused_or_dropped": reasons,
            "late_server": sum(a.latency_ms > a.budget_ms for a in ok),
            "over_budget_client": sum(a.elapsed_ms > a.budget_ms for a in ok),
            "server_latency_p50_ms": _q(server, 0.5), "server_latency_p99_ms": _q(server, 0.99),
            "server_latency_max_ms": round(max(server), 2) if server else None,
            "client_latency_p50_ms": _q(client, 0.5), "client_latency_p99_ms": _q(client, 0.99),
            "client_latency_max_ms": round(max(client), 2) if client else None,
            "queue_wait_p50_ms": _q([a.queue_wait_ms for a in ok], 0.5),
            "queue_wait_p99_ms": _q([a.queue_wait_ms for a in ok], 0.99),
            "steps_mean": round(float(np.mean([a.steps for a in ok])), 2) if ok else None,
            "refusal_rtt_p50_ms": _q([a.elapsed_ms for a in mine if a.status != 200], 0.5),
        }
    return out


def _markdown(result: dict) -> str:
    s, h0, h1 = result["settings"], result["health_after_warmup"], result["health_end"]
    c = {k: h1[k] - h0[k] for k in ("accepted", "refused", "completed", "dropped", "late", "failed")}
    by_reason = ", ".join(f"{k}: {v - h0['refused_by_reason'].get(k, 0)}"
                          for k, v in sorted(h1["refused_by_reason"].items())) or "none"
    lines = [
        "# `abcd-edge serve` soak",
        "",
        f"Measured {result['started_utc']} UTC on {result['machine']} ({s['artifact']}, {s['profile']}, "
        f"{s['controller']}, {s['threads']} ORT threads, backend ort-cpu), load average "
        f"{result['loadavg_start']:.2f} at the start and {result['loadavg_end']:.2f} at the end "
        "(the machine is shared).",
        "",
        f"`{result['command']}`",
        "",
        f"{s['requests']} requests from {s['clients']} closed-loop clients after {s['warmup']} of warm-up "
        f"(a refused client waits the server's predicted wait), every {s['short_every']}th at {s['short_budget']}, "
        f"the others at {s['budget']}; {result['duration_s']:.1f} s.",
        "",
        "| counted by the server | |",
        "| --- | --- |",
        f"| accepted | {c['accepted']} |",
        f"| refused at arrival (503; 422 below the minimum) | {c['refused']} ({by_reason}) |",
        f"| answered with an image | {c['completed']} |",
        f"| dropped (admitted, 503 without an image) | {c['dropped']} |",
        f"| late (answered after arrival + budget) | {c['late']} |",
        f"| failed (500) | {c['failed']} |",
        f"| server RSS after warm-up -> end | {h0['rss_mb']:.1f} -> {h1['rss_mb']:.1f} MiB "
        f"({result['rss_growth']:+.2%}) |",
        f"| overhead outside the runtime (99th percentile of the last 256 answers, at the end) | "
        f"{h1['overhead_ms']:.2f} ms |",
        "",
        "| budget | requests | with image | refused / dropped | late (server) | over budget (client) | "
        "server p50 / p99 / max ms | client p50 / p99 / max ms | queue wait p50 / p99 ms | mean steps |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for budget, r in result["per_budget"].items():
        r = {k: ("n/a" if v is None else v) for k, v in r.items()}
        refused = ", ".join(f"{k} {v}" for k, v in sorted(r["refused_or_dropped"].items())) or "0"
        lines.append(
            f"| {budget} | {r['requests']} | {r['answered']} | {refused} | {r['late_server']} | "
            f"{r['over_budget_client']} | {r['server_latency_p50_ms']} / {r['server_latency_p99_ms']} / "
            f"{r['server_latency_max_ms']} | {r['client_latency_p50_ms']} / {r['client_latency_p99_ms']} / "
            f"{r['client_latency_max_ms']} | {r['queue_wait_p50_ms']} / {r['queue_wait_p99_ms']} | "
            f"{r['steps_mean']} |")
    lines += ["", "Server latency: from the request's arrival at the app to the response ready; client latency: "
              "from just before sending to the whole answer read (adds the HTTP transport, outside the "
              "server's clock). No GPU; no power meter.", ""]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--requests", type=int, default=2000)
    ap.add_argument("--clients", type=int, default=4)
    ap.add_argument("--budget", default="150ms")
    ap.add_argument("--short-budget", default="60ms")
    ap.add_argument("--short-every", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=200)
    ap.add_argument("--artifact", default="export/demo")
    ap.add_argument("--profile", default="profiles/cpu-2t.json")
    ap.add_argument("--controller", default="calibration/demo")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default="bench/service")
    ap.add_argument("--machine-note", default="", help="Added to the machine's description (e.g. 'KVM guest').")
    args = ap.parse_args()
    if args.requests % args.clients or args.warmup % args.clients:
        ap.error("--requests and --warmup must be multiples of --clients")
    for b in (args.budget, args.short_budget):
        parse_budget(b)
    import httpx

    os.chdir(ROOT)
    port = free_port()
    proc = start_server(["--artifact", args.artifact, "--profile", args.profile, "--controller", args.controller,
                         "--threads", str(args.threads), "--power", "none"], port)
    url = f"http://127.0.0.1:{port}"
    per = args.requests // args.clients

    def budget_for(k: int, i: int) -> str:
        return args.short_budget if (k * per + i) % args.short_every == args.short_every - 1 else args.budget

    started = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M")
    load0 = os.getloadavg()[0]
    try:
        run_clients(url, args.clients, args.warmup // args.clients, lambda k, i: args.budget, seed0=1_000_000)
        h0 = httpx.get(f"{url}/health").json()
        t0 = time.perf_counter()
        answers = run_clients(url, args.clients, per, budget_for)
        duration = time.perf_counter() - t0
        h1 = httpx.get(f"{url}/health").json()
    finally:
        log = stop_server(proc)
    logical, usable = cpu_counts()
    result = {
        "started_utc": started, "command": "python scripts/service_soak.py " + shlex.join(sys.argv[1:]),
        "machine": f"{cpu_model()}, {logical} logical cores ({usable} usable), {os.uname().sysname} "
                   f"{os.uname().release}" + (f", {args.machine_note}" if args.machine_note else ""),
        "settings": {k: v for k, v in vars(args).items() if k not in ("out", "machine_note")},
        "duration_s": duration, "loadavg_start": load0, "loadavg_end": os.getloadavg()[0],
        "health_after_warmup": h0, "health_end": h1,
        "rss_growth": (h1["rss_mb"] - h0["rss_mb"]) / h0["rss_mb"],
        "per_budget": _rows(answers),
        "server_notes": [line for line in log.splitlines() if line.startswith("note:")],
    }
    out = Path(args.out)
    write_json_atomic(out / "soak.json", result)
    md = _markdown(result)
    write_bytes_atomic(out / "soak.md", md.encode())
    print(md)


if __name__ == "__main__":
    main()
