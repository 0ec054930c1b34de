"""Load on a running `sdrt serve`: throughput and latency per concurrency level, and an overload run.

    python -m sdrt.benchmarks.load --url http://127.0.0.1:7860 --concurrency 1,2,4,8 --requests 32
    python -m sdrt.benchmarks.load --url http://127.0.0.1:7860 --concurrency "" --overload 1000

Sweep: for each concurrency level C, C clients each send their next request as soon as the last is
answered (closed loop) until ``--requests`` have been answered; images/s over the level's wall clock,
p50/p90/p99 of the answered requests' latency, and how many got 503 or failed.

Overload (``--overload N``): N requests arriving at ``--overload-factor`` (default 4) times the capacity
(the best images/s of the sweep, or of a short measurement), on a fixed schedule (open loop) whatever the
server answers. Every request must be answered with an image or a 503 within ``--timeout``: the run counts
the other answers and the timeouts (both should be 0), and reads the server's RSS from /metrics
(``process_resident_memory_bytes``) first, every 100 requests and last.

Requests go to the OpenAI route (``--api openai``, default) or AUTOMATIC1111's (``--api a1111``) with
``--prompt``, ``--steps`` and ``--size`` and a different seed each. Standard library only.
"""

from __future__ import annotations

import argparse
import json
import sys
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

from .stats import percentile


def _post(url: str, body: dict, headers: dict, timeout: float) -> tuple[int, float, int]:
    """(status, seconds, images) of one request; status 0 for a timeout or a broken connection."""
    data = json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json", **headers})
    t0 = time.perf_counter()
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            answer = json.loads(r.read())
            images = len(answer.get("data") or answer.get("images") or [])
            return r.status, time.perf_counter() - t0, images
    except urllib.error.HTTPError as e:
        e.read()
        return e.code, time.perf_counter() - t0, 0
    except (urllib.error.URLError, TimeoutError, ConnectionError, OSError):
        return 0, time.perf_counter() - t0, 0


def rss(base: str, headers: dict) -> float | None:
    """The server's resident memory in MiB, from its /metrics (prometheus-client's process collector)."""
    try:
        with urllib.request.urlopen(urllib.request.Request(base + "/metrics", headers=headers), timeout=30) as r:
            for line in r.read().decode().splitlines():
                if line.startswith("process_resident_memory_bytes "):
                    return float(line.split()[1]) / 2**20
    except (urllib.error.URLError, OSError):
        return None
    return None


class Load:
    def __init__(self, args):
        self.base = args.url.rstrip("/")
        self.headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
        self.args = args
        w, h = (int(x) for x in args.size.split("x"))
        self.seed = 0
        self.lock = threading.Lock()
        if args.api == "openai":
            self.route = self.base + "/v1/images/generations"
            self.body = {"prompt": args.prompt, "size": args.size, "steps": args.steps, "n": args.n}
            self.seed_key = "seed"
        else:
            self.route = self.base + "/sdapi/v1/txt2img"
            self.body = {"prompt": args.prompt, "width": w, "height": h, "steps": args.steps, "batch_size": args.n}
            if args.sampler:
                self.body["sampler_name"] = args.sampler
            self.seed_key = "seed"

    def request(self) -> tuple[int, float, int]:
        with self.lock:
            self.seed += 1
            seed = self.seed
        return _post(self.route, {**self.body, self.seed_key: seed}, self.headers, self.args.timeout)

    def level(self, concurrency: int, total: int) -> dict:
        """``total`` requests from ``concurrency`` closed-loop clients."""
        results, left = [], [total]
        lock = threading.Lock()

        def client():
            while True:
                with lock:
                    if left[0] == 0:
                        return
                    left[0] -= 1
                r = self.request()
                with lock:
                    results.append(r)

        t0 = time.perf_counter()
        threads = [threading.Thread(target=client) for _ in range(concurrency)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        wall = time.perf_counter() - t0
        return summarize(results, wall, concurrency=concurrency)

    def overload(self, total: int, rate: float) -> dict:
        """``total`` requests arriving at ``rate`` per second (open loop)."""
        results, rss_samples = [], [rss(self.base, self.headers)]
        t0 = time.perf_counter()

        def at(i):
            delay = t0 + i / rate - time.perf_counter()
            if delay > 0:
                time.sleep(delay)
            r = self.request()
            if (i + 1) % 100 == 0:
                rss_samples.append(rss(self.base, self.headers))
            return r

        workers = min(total, max(16, int(rate * self.args.timeout) + 1, 256))
        with ThreadPoolExecutor(min(workers, 256)) as pool:
            results = list(pool.map(at, range(total)))
        wall = time.perf_counter() - t0
        rss_samples.append(rss(self.base, self.headers))
        out = summarize(results, wall, rate=rate)
        known = [x for x in rss_samples if x is not None]
        out.update(rss_first_mib=known[0] if known else None, rss_last_mib=known[-1] if known else None,
                   rss_max_mib=max(known) if known else None)
        return out


def summarize(results: list[tuple[int, float, int]], wall: float, **extra) -> dict:
    ok = [r for r in results if r[0] == 200]
    latencies = [s for _, s, _ in ok]
    images = sum(n for _, _, n in ok)
    q = (lambda p: percentile(latencies, p)) if latencies else (lambda p: None)
    return {**extra, "requests": len(results), "ok": len(ok), "rejected_503": sum(r[0] == 503 for r in results),
            "timeouts": sum(r[0] == 0 for r in results),
            "other": sum(r[0] not in (0, 200, 503) for r in results),
            "images": images, "wall_s": wall, "images_per_s": images / wall if wall else 0.0,
            "p50_s": q(50), "p90_s": q(90), "p99_s": q(99)}


def _f(x, fmt="{:.3f}"):
    return "n/a" if x is None else fmt.format(x)


def table(levels: list[dict]) -> str:
    rows = ["| concurrency | requests | images/s | p50 s | p90 s | p99 s | 503 | failed |",
            "|---|---|---|---|---|---|---|---|"]
    for r in levels:
        rows.append(f"| {r['concurrency']} | {r['requests']} | {r['images_per_s']:.2f} | {_f(r['p50_s'])} | "
                    f"{_f(r['p90_s'])} | {_f(r['p99_s'])} | {r['rejected_503']} | {r['timeouts'] + r['other']} |")
    return "\n".join(rows)


def overload_table(r: dict) -> str:
    return "\n".join([
        "| requests | arrival rate /s | images | 503 | other answers | timeouts | p50 s (images) | p99 s | RSS first / last / max MiB |",
        "|---|---|---|---|---|---|---|---|---|",
        f"| {r['requests']} | {r['rate']:.2f} | {r['images']} | {r['rejected_503']} | {r['other']} | {r['timeouts']} | "
        f"{_f(r['p50_s'])} | {_f(r['p99_s'])} | {_f(r['rss_first_mib'], '{:.0f}')} / {_f(r['rss_last_mib'], '{:.0f}')} / "
        f"{_f(r['rss_max_mib'], '{:.0f}')} |",
    ])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m sdrt.benchmarks.load", description=__doc__.split("\n\n")[0])
    ap.add_argument("--url", required=True, help="the server, e.g. http://127.0.0.1:7860")
    ap.add_argument("--concurrency", default="1,2,4,8", help="comma list of client counts (empty: no sweep)")
    ap.add_argument("--requests", type=int, default=32, help="requests per concurrency level (default 32)")
    ap.add_argument("--api", choices=("openai", "a1111"), default="openai")
    ap.add_argument("--api-key")
    ap.add_argument("--prompt", default="a red circle on a blue background")
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--size", default="128x128")
    ap.add_argument("--n", type=int, default=1, help="images a request")
    ap.add_argument("--sampler", help="a1111: sampler_name (default: the model's own scheduler)")
    ap.add_argument("--timeout", type=float, default=300.0, help="seconds before a request counts as hung")
    ap.add_argument("--overload", type=int, default=0, metavar="N", help="then N requests at --overload-factor x capacity")
    ap.add_argument("--overload-factor", type=float, default=4.0)
    ap.add_argument("--json", help="write the results here")
    args = ap.parse_args(argv)
    load = Load(args)
    report = {"url": args.url, "api": args.api, "steps": args.steps, "size": args.size, "n": args.n,
              "command": " ".join(["python -m sdrt.benchmarks.load"] + (argv if argv is not None else sys.argv[1:])),
              "levels": []}
    for c in [int(x) for x in args.concurrency.split(",") if x.strip()]:
        report["levels"].append(load.level(c, args.requests))
        print(f"concurrency {c}: {report['levels'][-1]['images_per_s']:.2f} images/s", file=sys.stderr, flush=True)
    if report["levels"]:
        print(table(report["levels"]))
    if args.overload:
        capacity = max((r["images_per_s"] for r in report["levels"]), default=0.0)
        if capacity <= 0:
            capacity = load.level(4, 8)["images_per_s"]
        rate = args.overload_factor * capacity / args.n
        report["capacity_images_per_s"] = capacity
        report["overload"] = load.overload(args.overload, rate)
        print()
        print(overload_table(report["overload"]))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2)
    bad = sum(r["timeouts"] + r["other"] for r in report["levels"] + [report.get("overload") or {"timeouts": 0, "other": 0}])
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
