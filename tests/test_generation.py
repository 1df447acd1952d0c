"""lab.generation and the KV cache: the cache changes no token, sampling filters do what they say,
stop ids and strings end completions, streaming hands over exactly the final text."""
from __future__ import annotations

import pytest
import torch

from lab.config_stages import Sampling
from lab.generation import generate, sample
from lab.models.kv_cache import KVCache
from labtest import V, make

GREEDY = Sampling(max_new_tokens=24, temperature=0.0)
WINDOWED = dict(sliding_window=4, sliding_window_pattern=2)  # layer 0 local (window 4), layer 1 global


def prompt(n: int, seed: int = 1) -> list[int]:
    return torch.randint(0, V, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def letters(ids: list[int]) -> str:
    return "".join(chr(ord("a") + i % 26) for i in ids)


@pytest.mark.parametrize("options", [{}, WINDOWED, dict(sliding_window=4, sliding_window_pattern=0, attn_softcap=50.0)])
def test_cached_logits_equal_the_full_forward(options):
    model = make(**options)
    ids = torch.tensor([prompt(20)])
    full = model(ids)  # (1, 20, V)
    cache = KVCache(model, 1, 20)
    out = [model(ids[:, :7], cache=cache)]  # a prefill longer than the window, then one token at a time
    out += [model(ids[:, t:t + 1], cache=cache) for t in range(7, 20)]
    cached = torch.cat(out, dim=1)  # the last position of each call: 6, 7, ..., 19
    torch.testing.assert_close(cached, full[:, 6:], rtol=0, atol=2e-5)


def test_sliding_window_layers_keep_only_their_window():
    model = make(**WINDOWED)
    cache = KVCache(model, 2, 30)
    assert [k.shape[2] for k in cache.keys] == [4, 30]
    assert cache.nbytes() == 2 * 2 * 2 * (4 + 30) * 16 * 4  # k and v, batch 2, 2 kv heads, 16-wide fp32


@pytest.mark.parametrize("options", [{}, WINDOWED])
def test_greedy_with_the_cache_gives_the_tokens_of_generation_without_it(options):
    model = make(**options)
    prompts = [prompt(3, 1), prompt(9, 2), prompt(17, 3)]  # a batch of different lengths, left-padded
    cached = generate(model, prompts, GREEDY).completions
    plain = generate(model, prompts, GREEDY, use_cache=False).completions
    alone = [generate(model, [p], GREEDY, use_cache=False).completions[0] for p in prompts]
    assert [c.ids for c in cached] == [c.ids for c in plain] == [c.ids for c in alone]
    assert all(len(c.ids) == 24 and c.finish_reason == "length" for c in cached)
    assert len(set(tuple(c.ids) for c in cached)) == 3


def test_one_forward_pass_per_token_and_the_context_bounds_the_output():
    model = make(max_seq_len=32)
    result = generate(model, [prompt(20)], Sampling(max_new_tokens=50, temperature=0.0))
    assert len(result.completions[0].ids) == 12 and result.completions[0].finish_reason == "length"
    assert result.forward_passes == 12
    with pytest.raises(ValueError, match="prompt 0 has 32 tokens; the model's context"):
        generate(model, [prompt(32)], GREEDY)
    with pytest.raises(ValueError, match="prompt 1 is empty"):
        generate(model, [prompt(3), []], GREEDY)


def test_sampling_is_reproducible_and_leaves_the_global_rng_and_mode_alone():
    model = make(dropout=0.1).train()
    state = torch.get_rng_state()
    options = Sampling(max_new_tokens=10, temperature=1.0, top_k=20, seed=7)
    a = generate(model, [prompt(5)], options).completions[0].ids
    b = generate(model, [prompt(5)], options).completions[0].ids
    generate(model, [prompt(5)], Sampling(max_new_tokens=3, seed=None))  # a fresh seed: still not the global RNG
    assert torch.equal(torch.get_rng_state(), state)
    assert model.training
    assert a == b and len(a) == 10


def test_top_k_1_is_greedy_and_a_stop_id_ends_a_row_unprinted():
    model = make()
    greedy = generate(model, [prompt(4)], GREEDY).completions[0].ids
    top1 = generate(model, [prompt(4)], Sampling(max_new_tokens=24, temperature=1.0, top_k=1, seed=0))
    assert top1.completions[0].ids == greedy
    stopped = generate(model, [prompt(4), prompt(6, 2)], GREEDY, stop_ids=[greedy[5]]).completions[0]
    assert stopped.ids == greedy[:greedy.index(greedy[5])] and stopped.finish_reason == "stop"


def test_top_p_keeps_the_smallest_set_that_reaches_p():
    logits = torch.tensor([[0.5, 0.3, 0.15, 0.05]]).log().repeat(400, 1)
    g = torch.Generator().manual_seed(0)
    assert set(sample(logits, Sampling(temperature=1.0, top_k=0, top_p=0.5), g).tolist()) == {0}
    assert set(sample(logits, Sampling(temperature=1.0, top_k=0, top_p=0.8), g).tolist()) == {0, 1}
    assert set(sample(logits, Sampling(temperature=1.0, top_k=0, top_p=0.81), g).tolist()) == {0, 1, 2}


def test_repetition_penalty_divides_positive_and_multiplies_negative_logits():
    logits = torch.tensor([[2.0, -1.0, 1.5, -0.5]])
    seen = torch.tensor([[True, True, False, False]])
    options = Sampling(temperature=0.0, repetition_penalty=2.0)
    assert sample(logits, options, torch.Generator(), seen).item() == 2  # 2.0 -> 1.0 falls below 1.5
    assert sample(logits, Sampling(temperature=0.0), torch.Generator()).item() == 0


def test_a_stop_string_cuts_the_text_and_streaming_gives_exactly_the_final_text():
    model = make()
    full = generate(model, [prompt(4)], GREEDY, decode=letters).completions[0]
    stop = full.text[10:13]
    first = full.text.index(stop)
    pieces: list[str] = []
    cut = generate(model, [prompt(4)], Sampling(max_new_tokens=24, temperature=0.0, stop=[stop]), decode=letters,
                   on_text=lambda row, text: pieces.append(text)).completions[0]
    assert cut.text == full.text[:first] and cut.finish_reason == "stop"
    assert "".join(pieces) == cut.text
    assert len(cut.ids) == first + len(stop)  # generation stopped on the token that completed the string
    streamed: list[str] = []
    generate(model, [prompt(4)], GREEDY, decode=letters, on_text=lambda row, text: streamed.append(text))
    assert "".join(streamed) == full.text and len(streamed) == 24  # one piece per token when nothing is held back


def test_extreme_sampling_settings_give_tokens_never_nan():
    """A temperature below float32's range is greedy's limit; a tiny repetition penalty overflows a logit
    to inf, which must not become NaN probabilities."""
    from lab.generation import sample

    logits = torch.randn(3, 50, generator=torch.Generator().manual_seed(0))
    gen = torch.Generator().manual_seed(1)
    for t in (1e-300, 1e-45, 1e-30):
        assert torch.equal(sample(logits, Sampling(temperature=t, top_k=0), gen), logits.argmax(-1))
    seen = torch.zeros(3, 50, dtype=torch.bool)
    seen[:, :25] = True
    picked = sample(logits, Sampling(temperature=1.0, repetition_penalty=1e-300, top_k=0), gen, seen)
    favoured = torch.where(seen & (logits > 0), 1.0, 0.0)  # positive seen logits became the largest there is
    assert all(favoured[b, picked[b]] == 1 for b in range(3))


@pytest.mark.parametrize("options", [WINDOWED, pytest.param({}, marks=pytest.mark.slow)])
def test_the_compiled_decode_step_gives_the_tokens_of_the_eager_and_uncached_paths(options):
    """Greedy and seeded sampling, prompts longer than the window (the ring wraps while decoding). The
    windowed model has a global layer too; compiling the plain one as well costs CI 15 s more."""
    model = make(**options)
    prompts = [prompt(3, 1), prompt(9, 2), prompt(17, 3)]
    for sampling in (GREEDY, Sampling(max_new_tokens=24, temperature=1.0, top_k=20, seed=3)):
        plain = generate(model, prompts, sampling, use_cache=False).completions
        eager = generate(model, prompts, sampling).completions
        compiled = generate(model, prompts, sampling, compile=True).completions
        assert [c.ids for c in compiled] == [c.ids for c in eager] == [c.ids for c in plain]


def test_rows_decode_alone_or_together_and_a_moved_row_carries_on():
    """The server's batch: rows joining at different lengths, compacted when one leaves (lab.decoding)."""
    from lab.decoding import Decoding

    model = make(**WINDOWED)
    prompts = [prompt(5, 1), prompt(12, 2), prompt(2, 3)]
    alone = [generate(model, [p], GREEDY).completions[0].ids for p in prompts]
    for compiled in (False, True):
        decoding = Decoding(model, 4, 64, compiled=compiled, dynamic=True)
        tokens = [int(decoding.admit(b, p).argmax()) for b, p in enumerate(prompts[:2])]
        out = [[t] for t in tokens]
        for i in range(23):
            if i == 5:  # a third row joins late, and later the first leaves: the last row moves into its place
                tokens.append(int(decoding.admit(2, prompts[2]).argmax()))
                out.append([tokens[-1]])
            if i == 12:
                decoding.cache.move(2, 0)
                tokens, out, done = [tokens[2], tokens[1]], [out[2], out[1]], out[0]
            logits = decoding.step(torch.tensor(tokens), span=None if i % 2 else 32)
            tokens = logits.argmax(-1).tolist()
            for row, t in zip(out, tokens):
                row.append(t)
        assert done == alone[0][:13] and out[1] == alone[1] and out[0] == alone[2][:len(out[0])]


def test_weights_laid_out_for_decoding_change_no_token():
    """lab.inference stores a CPU model's Linear weights transposed (faster matrix-vector products),
    projections of one input side by side (one product); a tied head shares the embedding's layout;
    the state dict holds the same values."""
    from lab.decoding import lay_out_for_decoding

    model = make(tie_embeddings=True)
    prompts = [prompt(3, 1), prompt(9, 2)]
    ids = torch.tensor([prompt(20)])
    before, tokens = model(ids), [c.ids for c in generate(model, prompts, GREEDY).completions]
    state = {k: v.clone() for k, v in model.state_dict().items()}
    lay_out_for_decoding(model)
    mlp, attn = model.layers[0].mlp, model.layers[0].attn
    up = mlp.up_proj.weight  # (out, in) as ever, its memory a slice of (in, gate's out + up's out)
    assert up.stride() == (1, 2 * up.size(0)) and up.data_ptr() == mlp.gate_up.weight.data_ptr() + 4 * up.size(0)
    widths = [attn.q_proj.out_features, attn.k_proj.out_features, attn.v_proj.out_features]
    assert attn.qkv.weight.shape == (attn.q_proj.in_features, sum(widths))
    assert attn.v_proj.weight.data_ptr() == attn.qkv.weight.data_ptr() + 4 * (widths[0] + widths[1])
    assert mlp.down_proj.weight.stride() == (1, mlp.down_proj.weight.size(0))  # alone: transposed
    assert model.tok_emb.weight.stride() == (1, V)
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    torch.testing.assert_close(model(ids), before, rtol=0, atol=1e-5)
    assert [c.ids for c in generate(model, prompts, GREEDY).completions] == tokens


def test_a_half_precision_kv_cache_holds_half_the_bytes_and_nearly_the_same_logits():
    """generate.kv_cache_dtype=fp16: the rows hold fp16, each step's logits are the fp32 cache's up to the
    rounding of what it stores, and the server's start line counts 2 bytes a value."""
    from types import SimpleNamespace

    from lab.decoding import Decoding
    from lab.inference import TextModel
    from lab.stages.serve import row_capacity

    model = make(**WINDOWED)
    half, full = (Decoding(model, 1, 32, dtype=dtype) for dtype in (torch.float16, None))
    assert half.cache.keys[0].dtype == torch.float16 and 2 * half.cache.nbytes() == full.cache.nbytes()
    ids = prompt(9)
    logits = [(half.admit(0, ids), full.admit(0, ids))]
    for t in prompt(6, 2):
        logits.append((half.step(torch.tensor([t]))[0], full.step(torch.tensor([t]))[0]))
    gaps = [(a - b).abs().max().item() for a, b in logits]
    assert 0 < max(gaps) < 1e-2

    said: list[str] = []
    tm = TextModel(model, tokenizer=None, template=None, name="micro", kv_cache_dtype=torch.float16)
    row_capacity(tm, SimpleNamespace(max_batch=4, kv_cache_gb=None), said.append)
    per_token = 2 * 2 * 2 * 16 * 2  # k and v, 2 layers, 2 kv heads, 16 wide, 2 bytes
    assert said == [f"KV cache: 4 rows of {model.config.max_seq_len} tokens, 0 MiB ({per_token} bytes a token) "
                    "<serve.max_batch=4, serve.kv_cache_gb=None>"]
