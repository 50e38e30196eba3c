#!/usr/bin/env python3
"""Fixed-rate load for bench/contention.sh: GET http://HOST:PORT/api/zmanim?id=N (a query that hits
PostgreSQL) at RATE requests per second, open loop, until STOPFILE exists.

Request i is due at start + i/RATE whatever happened before it; its latency is measured from
that due time, not from when a thread got round to sending it, so a stall shows up as the
latency the clients would have seen (no coordinated omission). THREADS threads share the
schedule, each on its own keep-alive connection (as a load balancer's pool would be); a broken
connection is reopened on the next request.

Prints one JSON line: requests, errors (non-200, refused, reset, timeout; by kind), p50, p90,
p99 and max latency in ms, and the rate achieved; with STEADY_RAW=FILE, every successful
request's latency into FILE too (one per line, ms) so percentiles can be pooled over runs."""
import http.client, json, os, random, sys, threading, time

host, port, rate, threads, stopfile = sys.argv[1], int(sys.argv[2]), float(sys.argv[3]), int(sys.argv[4]), sys.argv[5]
max_id = int(os.environ.get("STEADY_MAX_ID", "1000000"))
lock = threading.Lock()
slot = [0]
lat = []
errors = {}
start = time.monotonic() + 0.2


def worker():
    conn = None
    rng = random.Random()
    while True:
        with lock:
            i = slot[0]
            slot[0] += 1
        due = start + i / rate
        delay = due - time.monotonic()
        if delay > 0:
            time.sleep(delay)
        if os.path.exists(stopfile):
            return
        err = None
        try:
            if conn is None:
                conn = http.client.HTTPConnection(host, port, timeout=10)
            conn.request("GET", "/api/zmanim?id=%d" % rng.randrange(1, max_id))
            r = conn.getresponse()
            r.read()
            if r.status != 200:
                err = "HTTP %d" % r.status
        except Exception as e:  # refused, reset, timeout
            err = type(e).__name__
            try:
                conn.close()
            except Exception:
                pass
            conn = None
        took = (time.monotonic() - due) * 1000
        with lock:
            if err:
                errors[err] = errors.get(err, 0) + 1
            else:
                lat.append(took)


ts = [threading.Thread(target=worker, daemon=True) for _ in range(threads)]
for t in ts:
    t.start()
for t in ts:
    t.join()
elapsed = time.monotonic() - start
lat.sort()


def pct(p):
    return round(lat[min(len(lat) - 1, int(len(lat) * p))], 2) if lat else None


raw = os.environ.get("STEADY_RAW")
if raw:  # every request's latency, one per line (ms), for percentiles pooled over runs
    with open(raw, "w") as f:
        f.write("".join("%.3f\n" % v for v in lat))
print(json.dumps({
    "requests": len(lat) + sum(errors.values()), "errors": sum(errors.values()), "by_kind": errors,
    "p50_ms": pct(0.50), "p90_ms": pct(0.90), "p99_ms": pct(0.99), "max_ms": round(lat[-1], 2) if lat else None,
    "rate": round((len(lat) + sum(errors.values())) / elapsed, 1) if elapsed > 0 else 0,
}))
