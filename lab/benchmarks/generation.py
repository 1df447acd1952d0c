"""`lab stage=bench bench=generate`: how fast a model generates, with and without the KV cache.

For each context length C in `bench.contexts`, a seeded random prompt of C - N tokens is
continued by N = `bench.new_tokens` greedy tokens, so the last token sees C. Per mode
(cache, no cache, and the compiled decode step where hardware.compile would compile a server's),
interleaved over `bench.rounds` rounds, medians of:
- tokens/s: N over the whole generation, prefill included;
- time to first token: the prefill and one sampled token (`max_new_tokens=1`);
and, once: the KV cache's bytes at C, and how many tokens of cache the free memory would hold.
Every mode must produce the same tokens (greedy): the benchmark checks it as it goes.

With `bench.clients` > 0, the OpenAI-compatible server (lab.serving) is started in this
process and that many clients each send `bench.requests` completions at once: requests/s.

`bench=sbd` (`bench_sbd`) weighs Set Block Decoding against token-by-token greedy decoding on
the same prompts (the first `bench.prompt_tokens` tokens of `bench.prompts` held-out
rows of the data group): forward passes per token at each γ of `bench.gammas`, and quality as
the share of tokens equal to greedy's, place by place, and chrF of the text against greedy's.
"""
from __future__ import annotations

import dataclasses
import statistics
import threading
import time
import urllib.request

import torch

from lab.config_stages import Sampling
from lab.errors import ConfigError
from lab.generation import generate
from lab.memory import free_memory
from lab.models.kv_cache import KVCache
from lab.sbd import mask_token
from lab.run import Run


def bench_generation(run: Run, model: torch.nn.Module, tokenizer, compiled: bool = False) -> dict[str, float]:
    """Time generation at each context length (with the compiled decode step too, if `compiled`);
    returns the metrics (also logged and printed)."""
    bc, device = run.cfg.bench, run.accelerator.device
    model = model.to(device).eval()
    new = bc.new_tokens
    metrics: dict[str, float] = {}
    for context in bc.contexts:
        if context - new < 1 or context > model.config.max_seq_len:
            raise ConfigError(f"bench.contexts has {context}: it must exceed bench.new_tokens={new} and fit "
                             f"the model's context (model.max_seq_len={model.config.max_seq_len})")
        prompt = torch.randint(0, model.vocab_size, (context - new,), generator=torch.Generator().manual_seed(context)).tolist()
        modes = ("cache", "nocache", "compiled") if compiled else ("cache", "nocache")
        times: dict[str, list[float]] = {k: [] for m in modes for k in (m, f"ttft_{m}")}
        outputs: dict[str, list[int]] = {}
        if compiled:
            _timed(model, prompt, new, "compiled", device)  # compiled before the rounds
        for r in range(bc.rounds):  # interleaved, in an order that rotates: drift in machine speed hits every mode alike
            for mode in modes[r % len(modes):] + modes[:r % len(modes)]:
                times[f"ttft_{mode}"].append(_timed(model, prompt, 1, mode, device)[0])
                seconds, ids = _timed(model, prompt, new, mode, device)
                times[mode].append(seconds)
                outputs[mode] = ids
        if any(outputs[m] != outputs["nocache"] for m in modes):
            raise RuntimeError(f"at context {context} the KV cache changed the greedy tokens: a bug; please report it")
        kv = KVCache(model, 1, context).nbytes()
        metrics |= {f"bench/gen_{context}/tokens_per_sec_cache": new / statistics.median(times["cache"]),
                    f"bench/gen_{context}/tokens_per_sec_nocache": new / statistics.median(times["nocache"]),
                    f"bench/gen_{context}/ttft_ms_cache": 1000 * statistics.median(times["ttft_cache"]),
                    f"bench/gen_{context}/ttft_ms_nocache": 1000 * statistics.median(times["ttft_nocache"]),
                    f"bench/gen_{context}/kv_cache_mb": kv / 2**20}
        metrics[f"bench/gen_{context}/cache_speedup"] = (metrics[f"bench/gen_{context}/tokens_per_sec_cache"]
                                                         / metrics[f"bench/gen_{context}/tokens_per_sec_nocache"])
        if compiled:
            metrics[f"bench/gen_{context}/tokens_per_sec_compiled"] = new / statistics.median(times["compiled"])
    per_token = KVCache(model, 1, 1).nbytes()
    metrics["bench/kv_bytes_per_token"] = per_token
    free = free_memory(device)
    if free is not None:
        metrics["bench/kv_tokens_in_free_memory"] = free // per_token
    if bc.clients:
        metrics |= _server_throughput(run, model, tokenizer)
    return metrics


def _timed(model, prompt: list[int], new: int, mode: str, device: torch.device) -> tuple[float, list[int]]:
    """Seconds and greedy ids of one generation: with the KV cache (`cache`), without (`nocache`), or
    with the compiled decode step (`compiled`)."""
    _sync(device)
    t0 = time.perf_counter()
    result = generate(model, [prompt], Sampling(max_new_tokens=new, temperature=0.0), use_cache=mode != "nocache",
                      compile=mode == "compiled")
    _sync(device)
    return time.perf_counter() - t0, result.completions[0].ids


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def _server_throughput(run: Run, model, tokenizer) -> dict[str, float]:
    """Requests/s of lab.serving with `bench.clients` concurrent clients."""
    import uvicorn

    from lab.benchmarks.server_load import load
    from lab.inference import TextModel
    from lab.serving import Stats, build_app
    from lab.stages.serve import listen

    bc = run.cfg.bench
    tm = TextModel(model, tokenizer, None, "bench")
    defaults = Sampling(max_new_tokens=bc.new_tokens, temperature=0.0)
    sock = listen("127.0.0.1", 0)
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(build_app(tm, defaults, Stats()), log_level="warning"))
    server.install_signal_handlers = lambda: None  # not the main thread: leave Ctrl-C to lab
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        _wait_healthy(port)
        requests_per_sec, tokens_per_sec = load(f"http://127.0.0.1:{port}/v1", "bench", bc.clients, bc.requests,
                                                bc.new_tokens, prompts=["In the beginning"])
    finally:
        server.should_exit = True
        thread.join(timeout=30)
        sock.close()
    return {"bench/server_requests_per_sec": requests_per_sec, "bench/server_tokens_per_sec": tokens_per_sec}


def _wait_healthy(port: int, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2):
                return
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)


def bench_sbd(run: Run, model: torch.nn.Module, tokenizer, block: int, rows: list[list[int]],
              compiled: bool = False) -> dict[str, float]:
    """Forward passes per token and agreement with greedy decoding, for each γ in bench.gammas; both
    decode through the compiled step and pass when `compiled` (compiled before the timing starts)."""
    import sacrebleu

    bc, device = run.cfg.bench, run.accelerator.device
    model = model.to(device).eval()
    prompts = [r[:bc.prompt_tokens] for r in rows]
    greedy = Sampling(max_new_tokens=bc.new_tokens, temperature=0.0)
    blocks = {gamma: dataclasses.replace(greedy, sbd_gamma=gamma, sbd_block=block) for gamma in bc.gammas}
    mask_id = mask_token(tokenizer)
    if compiled:
        for options in (greedy, blocks[bc.gammas[0]]):
            generate(model, prompts[:1], options, pad_id=mask_id, compile=True)
    t0 = time.perf_counter()  # one prompt at a time, as SBD decodes them: tokens/s compare
    reference = [generate(model, [p], greedy, decode=tokenizer.decode, compile=compiled).completions[0] for p in prompts]
    seconds = time.perf_counter() - t0
    tokens = sum(len(c.ids) for c in reference)
    metrics = {"bench/sbd/greedy_tokens_per_sec": tokens / seconds}
    for gamma, options in blocks.items():
        t0 = time.perf_counter()
        result = generate(model, prompts, options, decode=tokenizer.decode, pad_id=mask_id, compile=compiled)
        seconds = time.perf_counter() - t0
        made = sum(len(c.ids) for c in result.completions)
        same = sum(a == b for c, r in zip(result.completions, reference) for a, b in zip(c.ids, r.ids))
        chrf = sacrebleu.corpus_chrf([c.text for c in result.completions], [[r.text for r in reference]]).score
        metrics |= {f"bench/sbd/gamma_{gamma:g}/passes_per_token": result.forward_passes / made,
                    f"bench/sbd/gamma_{gamma:g}/same_as_greedy": same / max(tokens, 1),
                    f"bench/sbd/gamma_{gamma:g}/chrf_vs_greedy": chrf,
                    f"bench/sbd/gamma_{gamma:g}/tokens_per_sec": made / seconds}
    return metrics