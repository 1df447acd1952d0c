"""Serve: an OpenAI-compatible HTTP API for a trained model, until Ctrl-C or SIGTERM. No training.

    lab stage=serve init_from=<run>                  http://127.0.0.1:8000/v1
    lab stage=serve init_from=<run> serve.port=0     any free port (printed)

Any OpenAI client works against it: `OpenAI(base_url="http://127.0.0.1:8000/v1", api_key="-")`. The
API is `lab.serving`. Stopping the server ends its MLflow run FINISHED, with the requests served.
"""
from __future__ import annotations

import errno
import socket

from lab import inference
from lab.errors import ConfigError
from lab.run import Run
from lab.serving import Stats, build_app


def serve(run: Run) -> float:
    """Serve until stopped; returns the number of requests answered."""
    import uvicorn

    cfg = run.cfg
    tm = inference.load_for(run, name=cfg.serve.model_name)
    tm.resolved(cfg.generate)  # settings this model cannot honour stop here, not in every request
    sock = listen(cfg.serve.host, cfg.serve.port)
    host, port = sock.getsockname()[:2]
    stats = Stats()
    server = uvicorn.Server(uvicorn.Config(build_app(tm, cfg.generate, stats), log_level="warning"))
    run.tracker.set_tags({"lab.serve.url": f"http://{host}:{port}/v1", "lab.serve.model": tm.name})
    run.say(f"serving {tm.name!r} (template {tm.template or 'none'}, context {tm.context}) at http://{host}:{port}/v1; "
            "Ctrl-C stops")
    try:
        server.run(sockets=[sock])
    except KeyboardInterrupt:  # uvicorn shut down cleanly, then passed the signal on: stopping is how a server ends
        pass
    finally:
        sock.close()
    run.tracker.log_metrics({"serve/requests": stats.requests, "serve/prompt_tokens": stats.prompt_tokens,
                             "serve/completion_tokens": stats.completion_tokens}, step=0)
    run.say(f"stopped after {stats.requests} request(s)")
    return stats.requests


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
