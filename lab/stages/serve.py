"""Serve: an OpenAI-compatible HTTP API for a trained model, until Ctrl-C or SIGTERM. No training.

    lab stage=serve init_from=<run>                  http://127.0.0.1:8000/v1
    lab stage=serve init_from=<run> serve.port=0     any free port (printed)

Any OpenAI client works against it: `OpenAI(base_url="http://127.0.0.1:8000/v1", api_key="-")`. The
API is `lab.serving`. Stopping the server ends its MLflow run FINISHED, with the requests served.
"""
from __future__ import annotations

import errno
import socket
import time

from lab import inference
from lab.batching import Batcher
from lab.errors import ConfigError
from lab.memory import free_memory
from lab.models.kv_cache import RowCache
from lab.run import Run
from lab.serving import Stats, build_app


def serve(run: Run) -> float:
    """Serve until stopped; returns the number of requests answered."""
    import uvicorn

    cfg = run.cfg
    tm = run.text_model(name=cfg.serve.model_name)
    run.say(tm.choose_compile(cfg.hardware.compile, None))  # before the batcher, which builds its step from it
    batcher = Batcher(tm, cfg.serve.max_batch, cfg.serve.max_queue, row_capacity(tm, cfg.serve, run.say))
    stats = Stats()
    app = build_app(tm, cfg.generate, stats, batcher)  # settings this server cannot honour stop here
    sock = listen(cfg.serve.host, cfg.serve.port)  # a port in use stops it now, not after a compile
    try:
        if tm.compile:  # compiled before the first request, not during it
            t0 = time.perf_counter()
            batcher.warm_up()
            run.say(f"decode step compiled in {time.perf_counter() - t0:.1f} s")
        batcher.start()
        host, port = sock.getsockname()[:2]
        server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
        run.tracker.set_tags({"lab.serve.url": f"http://{host}:{port}/v1", "lab.serve.model": tm.name})
        run.say(f"serving {tm.name!r} (template {tm.template or 'none'}, context {tm.context}) at http://{host}:{port}/v1; "
                "Ctrl-C stops")
        server.run(sockets=[sock])
    except KeyboardInterrupt:  # uvicorn shut down cleanly, then passed the signal on: stopping is how a server ends
        pass
    finally:
        sock.close()
    run.tracker.log_metrics({"serve/requests": stats.requests, "serve/prompt_tokens": stats.prompt_tokens,
                             "serve/completion_tokens": stats.completion_tokens}, step=0)
    run.say(f"stopped after {stats.requests} request(s)")
    return stats.requests


def row_capacity(tm: inference.TextModel, sc, say) -> int:
    """Tokens each of serve.max_batch rows holds: the model's context, or what serve.kv_cache_gb leaves
    each; one line when the cache does not fit the device's free memory."""
    per_token = RowCache(tm.model, 1, 1, tm.cache_dtype).nbytes()
    rows = sc.max_batch
    capacity = tm.context if sc.kv_cache_gb is None else min(tm.context, int(sc.kv_cache_gb * 2**30) // (rows * per_token))
    if capacity < 2:
        raise ConfigError(f"serve.kv_cache_gb={sc.kv_cache_gb} holds {int(sc.kv_cache_gb * 2**30) // per_token} tokens "
                          f"({per_token:,} bytes each), too few for serve.max_batch={rows} rows; raise it or lower max_batch")
    need, free = rows * capacity * per_token, free_memory(tm.model.tok_emb.weight.device)
    if free is not None and need > free:
        raise ConfigError(f"the KV cache of serve.max_batch={rows} rows of {capacity} tokens needs {need / 2**30:.2f} GiB, "
                          f"more than the {free / 2**30:.2f} GiB free; lower serve.max_batch, or set serve.kv_cache_gb "
                          "to shorten the rows")
    say(f"KV cache: {rows} rows of {capacity} tokens, {need / 2**20:,.0f} MiB ({per_token:,} bytes a token) "
        f"<serve.max_batch={rows}, serve.kv_cache_gb={sc.kv_cache_gb}>")
    return capacity


def listen(host: str, port: int) -> socket.socket:
    """A listening socket on host:port, or one line saying why not (a port in use, most often)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # a restart need not wait out TIME_WAIT
    try:
        sock.bind((host, port))
        sock.listen(128)
    except OSError as e:
        sock.close()
        if e.errno == errno.EADDRINUSE:
            raise ConfigError(f"serve.port={port} is already in use on {host}; stop what listens there, or pick "
                              f"another port, e.g. serve.port={port + 1} (serve.port=0: any free port)") from None
        raise ConfigError(f"serve.host={host} serve.port={port}: cannot listen there ({e.strerror}); "
                          "check the address (127.0.0.1 is this machine only)") from None
    return sock


STAGE = serve  # what lab.runner calls for stage=serve; conf/stage/serve.yaml declares the rest
