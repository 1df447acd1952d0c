"""lab.batching through lab.serving: concurrent clients of the OpenAI API decoded together, each
answer what its request gets alone; a full queue answers 429; a client that goes away frees its row.
A seeded micro model with a character tokenizer, served by uvicorn in this process."""
from __future__ import annotations

import threading
import time
import urllib.request
from contextlib import contextmanager

import openai
import pytest

from labtest import make


class Chars:
    """Printable ASCII, a character a token (ids 3..96); 0 pads, 1 begins, 2 ends."""

    pad_id, bos_id, eos_id = 0, 1, 2

    def encode(self, text: str) -> list[int]:
        return [3 + ord(c) - 32 for c in text]

    def decode(self, ids) -> str:
        return "".join(chr(i - 3 + 32) for i in ids if i >= 3)


@contextmanager
def serving(max_batch: int, max_queue: int, start: bool = True, slow: float = 0.0):
    """(client, batcher, url) of a server on a free port; `slow` seconds added to every forward pass."""
    import uvicorn

    from lab.batching import Batcher
    from lab.inference import TextModel
    from lab.config_stages import Sampling
    from lab.serving import Stats, build_app
    from lab.stages.serve import listen

    model = make(max_seq_len=128)
    if slow:
        model.register_forward_pre_hook(lambda *_: time.sleep(slow))
    tm = TextModel(model, Chars(), None, "micro")
    batcher = Batcher(tm, max_batch, max_queue, tm.context)
    if start:
        batcher.start()
    sock = listen("127.0.0.1", 0)
    server = uvicorn.Server(uvicorn.Config(build_app(tm, Sampling(max_new_tokens=16), Stats(), batcher),
                                           log_level="warning"))
    server.install_signal_handlers = lambda: None
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{sock.getsockname()[1]}/v1"
    while not server.started:
        time.sleep(0.01)
    try:
        yield openai.OpenAI(base_url=url, api_key="-", max_retries=0), batcher, url
    finally:
        server.should_exit = True
        thread.join(timeout=10)
        sock.close()


PROMPTS = ["In the beginning", "And God said", "Let there be light, and there was", "The earth was",
           "Noah", "And the evening and the morning were the first day", "Abram went", "Jacob"]


def _ask(client, i: int, stream: bool, **sampling) -> str:
    body = dict(model="micro", prompt=PROMPTS[i], max_tokens=12 + 5 * i, **sampling)
    if stream:
        return "".join(c.choices[0].text for c in client.completions.create(stream=True, **body))
    return client.completions.create(**body).choices[0].text


@pytest.mark.parametrize("sampling", [dict(temperature=0), dict(temperature=1.0, top_p=0.9, seed=5)],
                         ids=["greedy", "seeded"])
def test_concurrent_clients_each_get_what_they_get_alone(sampling):
    with serving(max_batch=4, max_queue=16) as (client, batcher, _):
        alone = [_ask(client, i, stream=i % 2 == 0, **sampling) for i in range(8)]
        steps_alone = batcher.steps
        together: dict[int, str] = {}
        threads = [threading.Thread(target=lambda i=i: together.__setitem__(i, _ask(client, i, i % 2 == 1, **sampling)))
                   for i in range(8)]
        [t.start() for t in threads]
        [t.join() for t in threads]
        steps_together = batcher.steps - steps_alone
    assert [together[i] for i in range(8)] == alone  # streamed or whole, alone or beside 7 others
    assert len(set(alone)) == 8 and all(alone)
    assert steps_together < steps_alone / 2  # decoded together: 8 clients in 4 rows share their steps


def test_a_full_queue_answers_429_and_a_client_that_leaves_frees_its_row():
    with serving(max_batch=1, max_queue=1, start=False, slow=0.01) as (client, batcher, url):
        first = client.completions.create(model="micro", prompt="Noah", max_tokens=100, stream=True)  # for the row
        second = client.completions.create(model="micro", prompt="Esau", max_tokens=4, stream=True)  # for the queue
        with pytest.raises(openai.RateLimitError) as refused:
            client.completions.create(model="micro", prompt="Jacob", max_tokens=4)
        assert refused.value.code == "rate_limit_exceeded" and "serve.max_queue=1" in refused.value.message
        assert refused.value.response.headers["Retry-After"] == "1"
        with pytest.raises(openai.BadRequestError, match="this request has 3 prompts, and this server holds at most 2"):
            client.completions.create(model="micro", prompt=["Jacob", "Esau", "Adam"], max_tokens=4)  # would never fit
        batcher.start()
        next(iter(first))  # decoding has begun ...
        first.close()  # ... and the client goes away
        assert "".join(c.choices[0].text for c in second)  # the queued request is served once the row is free
        deadline = time.monotonic() + 10
        while batcher.load()["running"] and time.monotonic() < deadline:
            time.sleep(0.02)
        assert batcher.load() == {"running": 0, "waiting": 0}
        assert batcher.steps < 50  # the first left long before its 100 tokens (10 ms a step)
        answer = client.completions.create(model="micro", prompt="Jacob", max_tokens=4, temperature=0)
        assert answer.choices[0].finish_reason in ("stop", "length")
        with urllib.request.urlopen(url.removesuffix("/v1") + "/health") as health:
            assert health.read() == b'{"status":"ok","running":0,"waiting":0}'


def test_greedy_rows_decoded_together_equal_generate():
    """The batcher and lab.generation agree token for token (the server's answer is the generate stage's)."""
    from lab.batching import Batcher, Job
    from lab.config_stages import Sampling
    from lab.inference import TextModel

    tm = TextModel(make(max_seq_len=128), Chars(), None, "micro")
    batcher = Batcher(tm, 3, 8, 128)
    greedy = Sampling(max_new_tokens=20, temperature=0)
    prompts = [[1] + Chars().encode(p) for p in PROMPTS[:5]]
    jobs = [Job(p, greedy) for p in prompts]
    batcher.submit(jobs)
    batcher.start()
    for job in jobs:
        assert job.done.wait(30)
    assert [job.completion().ids for job in jobs] == [c.ids for c in tm.complete(prompts, greedy).completions]
    first = Job(prompts[0], Sampling(max_new_tokens=1, temperature=0))  # done as it is admitted: never stepped
    stopped = Job(prompts[1], Sampling(max_new_tokens=5, temperature=0, stop=[Chars().decode(jobs[1].row.ids[:1])]))
    batcher.submit([first, stopped])
    assert first.done.wait(30) and stopped.done.wait(30)
    assert first.completion().ids == jobs[0].row.ids[:1] and first.completion().finish_reason == "length"
    assert stopped.completion().ids == jobs[1].row.ids[:1] and stopped.completion().text == ""
    assert batcher.load() == {"running": 0, "waiting": 0} and batcher.steps < 5 * 19  # 5 prompts in 3 rows


def test_a_server_that_queues_nothing_still_fills_its_rows():
    """serve.max_queue=0: requests beyond the free rows get 429 at once, and up to max_batch are taken."""
    from lab.batching import Batcher, Job, QueueFull
    from lab.config_stages import Sampling
    from lab.inference import TextModel

    batcher = Batcher(TextModel(make(max_seq_len=128), Chars(), None, "micro"), 2, 0, 128)
    batcher.submit([Job([1, 40], Sampling(max_new_tokens=2, temperature=0)) for _ in range(2)])
    with pytest.raises(QueueFull, match="serve.max_batch=2, serve.max_queue=0"):
        batcher.submit([Job([1, 41], Sampling(max_new_tokens=2, temperature=0))])
