#!/usr/bin/env python3
"""Load generator for bench/update.sh: N threads on loopback alternate GET /health and GET
/api/ping against 127.0.0.1:PORT, each request on a fresh connection (the worst case for a
restart), until STOPFILE exists. Prints one JSON line: requests, failures (refused, reset,
timeouts, non-200), longest gap between two successful responses, requests per second."""
import http.client, json, os, sys, threading, time

port, threads, stopfile = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
lock = threading.Lock()
stats = {"requests": 0, "failures": 0, "errors": {}}
last_ok = [time.monotonic()]
longest = [0.0]

def worker(i):
    paths = ["/health", "/api/ping"]
    n = i
    while not os.path.exists(stopfile):
        path = paths[n % 2]
        n += 1
        err = None
        try:
            c = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
            c.request("GET", path)
            r = c.getresponse()
            r.read()
            c.close()
            if r.status != 200:
                err = "HTTP %d" % r.status
        except Exception as e:  # refused, reset, timeout
            err = type(e).__name__
        now = time.monotonic()
        with lock:
            stats["requests"] += 1
            if err:
                stats["failures"] += 1
                stats["errors"][err] = stats["errors"].get(err, 0) + 1
            else:
                longest[0] = max(longest[0], now - last_ok[0])
                last_ok[0] = now
        time.sleep(0.005)

start = time.monotonic()
ts = [threading.Thread(target=worker, args=(i,), daemon=True) for i in range(threads)]
for t in ts: t.start()
for t in ts: t.join()
took = time.monotonic() - start
print(json.dumps({"requests": stats["requests"], "failures": stats["failures"], "errors": stats["errors"],
                  "longest_gap_s": round(longest[0], 3), "rps": round(stats["requests"] / took, 1), "seconds": round(took, 1)}))
