#!/usr/bin/env python3
"""Load test for `openuni serve` (Python standard library only).

CLIENTS threads each send POST /v1/images/generations back to back for DURATION seconds and
record every answer's status and latency. Prints requests/s, images/s, latency p50/p90/p99/max of
the successful requests, answers by status (503s are the deliberate overload refusals), and the
server's batch-size histogram from /metrics.

    python3 tools/loadtest.py --url http://127.0.0.1:8080 --clients 64 --duration 60 \
        --size 64x64 --steps 4 [--api-key KEY] [--json out.json]
"""

import argparse
import json
import threading
import time
import urllib.error
import urllib.request


def percentile(sorted_values, q):
    """Nearest-rank percentile of an ascending list (q in [0, 100])."""
    if not sorted_values:
        return float("nan")
    k = max(0, min(len(sorted_values) - 1, int(round(q / 100 * len(sorted_values) + 0.5)) - 1))
    return sorted_values[k]


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--url", default="http://127.0.0.1:8080")
    ap.add_argument("--clients", type=int, default=64)
    ap.add_argument("--duration", type=float, default=60.0, help="seconds of load")
    ap.add_argument("--size", default="64x64")
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--n", type=int, default=1, help="images per request")
    ap.add_argument("--timeout", type=float, default=300.0, help="client timeout per request (s)")
    ap.add_argument("--api-key")
    ap.add_argument("--json", help="also write the summary as JSON to this file")
    a = ap.parse_args()

    headers = {"Content-Type": "application/json"}
    if a.api_key:
        headers["Authorization"] = f"Bearer {a.api_key}"
    lock = threading.Lock()
    results = []  # (status, latency seconds)
    stop_at = time.monotonic() + a.duration

    def client(cid):
        i = 0
        while time.monotonic() < stop_at:
            body = json.dumps({"prompt": f"load test client {cid} request {i}", "size": a.size, "steps": a.steps, "n": a.n, "seed": cid * 1_000_000 + i}).encode()
            req = urllib.request.Request(a.url + "/v1/images/generations", data=body, headers=headers, method="POST")
            t0 = time.monotonic()
            try:
                with urllib.request.urlopen(req, timeout=a.timeout) as r:
                    payload = json.loads(r.read())
                    status = r.status if len(payload.get("data", [])) == a.n else -2
            except urllib.error.HTTPError as e:
                status = e.code
                e.read()
                if status == 503:
                    # Honour Retry-After, as a well-behaved client does.
                    time.sleep(min(float(e.headers.get("Retry-After", "1")), max(0.0, stop_at - time.monotonic())))
            except Exception:  # connection errors, timeouts
                status = -1
            with lock:
                results.append((status, time.monotonic() - t0))
            i += 1

    t_start = time.monotonic()
    threads = [threading.Thread(target=client, args=(c,)) for c in range(a.clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.monotonic() - t_start

    ok = sorted(lat for s, lat in results if s == 200)
    by_status = {}
    for s, _ in results:
        by_status[str(s)] = by_status.get(str(s), 0) + 1
    summary = {
        "clients": a.clients,
        "duration_s": a.duration,
        "wall_s": round(wall, 2),
        "size": a.size,
        "steps": a.steps,
        "n": a.n,
        "requests_ok": len(ok),
        "requests_per_s": round(len(ok) / wall, 2),
        "images_per_s": round(len(ok) * a.n / wall, 2),
        "latency_p50_s": round(percentile(ok, 50), 3),
        "latency_p90_s": round(percentile(ok, 90), 3),
        "latency_p99_s": round(percentile(ok, 99), 3),
        "latency_max_s": round(ok[-1], 3) if ok else None,
        "answers_by_status": by_status,
    }
    try:
        with urllib.request.urlopen(a.url + "/metrics", timeout=10) as r:
            text = r.read().decode()
        summary["server_batch_size"] = {
            line.split("le=")[1].split("}")[0].strip('"'): float(line.split()[-1])
            for line in text.splitlines()
            if line.startswith("openuni_batch_size_bucket")
        }
        summary["server_batches"] = next(float(l.split()[-1]) for l in text.splitlines() if l.startswith("openuni_batch_size_count"))
    except Exception as e:  # the summary stands without the server's view
        summary["server_metrics_error"] = str(e)
    print(json.dumps(summary, indent=2))
    if a.json:
        with open(a.json, "w") as f:
            json.dump(summary, f, indent=2)
    # Anything but successes and deliberate 503s is a failure of the run.
    bad = sum(c for s, c in by_status.items() if s not in ("200", "503"))
    raise SystemExit(1 if bad else 0)


if __name__ == "__main__":
    main()
