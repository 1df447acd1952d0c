"""Throughput of OpenAI-compatible servers under concurrent clients: requests/s and completion tokens/s.

    python -m lab.benchmarks.server_load --server new=http://127.0.0.1:8000/v1 --server old=http://127.0.0.1:8001/v1 \\
        --clients 1 4 16 32 --max-tokens 64

Each of N clients sends `--requests` greedy completions of `--max-tokens` tokens, one after another,
all clients at once; requests/s and tokens/s (the servers' own `usage` counts) are over the time from
the first request to the last answer. Every server is measured at every N in each round, in an
order that rotates from round to round (machine drift hits all alike); the table gives medians of
`--rounds`. Any OpenAI-compatible server can be measured: lab's, an older lab's, llama.cpp's.
"""
from __future__ import annotations

import argparse
import json
import statistics
import threading
import time
import urllib.request
from typing import Sequence

PROMPTS = ["In the beginning", "And God said", "And the earth was without form", "And Noah", "Now the serpent",
           "And Abram", "And it came to pass", "These are the generations"]


def load(url: str, model: str, clients: int, requests: int, max_tokens: int,
         prompts: Sequence[str] = PROMPTS) -> tuple[float, float]:
    """(requests/s, completion tokens/s) of `clients` concurrent clients, each sending `requests` greedy
    completions of `prompts` (in turn) one after another; RuntimeError if any request failed."""
    tokens: list[int] = []
    failures: list[BaseException] = []

    def client(k: int) -> None:
        try:
            for r in range(requests):
                body = {"model": model, "prompt": prompts[(k + r) % len(prompts)], "max_tokens": max_tokens,
                        "temperature": 0}
                request = urllib.request.Request(f"{url}/completions", json.dumps(body).encode(),
                                                 {"Content-Type": "application/json"})
                with urllib.request.urlopen(request, timeout=3600) as response:
                    tokens.append(json.load(response)["usage"]["completion_tokens"])
        except BaseException as e:  # noqa: BLE001 -- reported once all clients are done
            failures.append(e)

    threads = [threading.Thread(target=client, args=(k,)) for k in range(clients)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    seconds = time.perf_counter() - start
    if failures:
        raise RuntimeError(f"{url}: {failures[0]}")
    return clients * requests / seconds, sum(tokens) / seconds


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--server", action="append", required=True, help="name=url of an OpenAI-compatible /v1")
    p.add_argument("--clients", type=int, nargs="+", default=[1, 4, 16, 32])
    p.add_argument("--requests", type=int, default=2, help="requests each client sends, one after another")
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--rounds", type=int, default=3)
    args = p.parse_args(argv)
    servers = dict(s.split("=", 1) for s in args.server)
    models = {}
    for name, url in servers.items():
        with urllib.request.urlopen(f"{url}/models") as response:
            models[name] = json.load(response)["data"][0]["id"]
    results: dict[tuple[str, int], list[tuple[float, float]]] = {}
    names = list(servers)
    for r in range(args.rounds):
        for n in args.clients:
            for name in names[r % len(names):] + names[:r % len(names)]:
                try:
                    measured = load(servers[name], models[name], n, args.requests, args.max_tokens)
                except RuntimeError as e:
                    raise SystemExit(str(e)) from None
                results.setdefault((name, n), []).append(measured)
    print(f"{args.max_tokens}-token greedy completions, {args.requests} per client; medians of {args.rounds} rounds")
    print(f"{'clients':>7} " + " ".join(f"{name + ' req/s':>14} {name + ' tok/s':>14}" for name in names) +
          ("" if len(names) < 2 else f" {names[0] + '/' + names[1]:>12}"))
    for n in args.clients:
        med = {name: [statistics.median(x[i] for x in results[(name, n)]) for i in (0, 1)] for name in names}
        row = f"{n:>7} " + " ".join(f"{med[name][0]:>14.2f} {med[name][1]:>14.0f}" for name in names)
        if len(names) >= 2:
            row += f" {med[names[0]][0] / med[names[1]][0]:>12.2f}"
        print(row)


if __name__ == "__main__":
    main()
