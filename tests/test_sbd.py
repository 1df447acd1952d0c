"""Set Block Decoding: the training layout, the mixed objective, and decoding (exactly greedy at γ = 0;
fewer forward passes than tokens on a model fine-tuned for it)."""
from __future__ import annotations

import pytest
import torch

from lab.config_stages import Sampling
from lab.generation import generate
from lab.sbd import block_layout, decode_layout, sbd_objective
from labtest import FAST, V, make, mlflow_client, run_lab


def test_block_layout_is_causal_text_beside_bidirectional_blocks():
    positions, mask = block_layout(torch.zeros(1, 5, dtype=torch.long), block=2, offset=1)
    assert positions.tolist() == [[0, 1, 2, 3, 4, 0, 1, 2, 3, 4]]
    m = mask[0, 0].int().tolist()
    assert [row[:5] for row in m[:5]] == [[1, 0, 0, 0, 0], [1, 1, 0, 0, 0], [1, 1, 1, 0, 0], [1, 1, 1, 1, 0], [1, 1, 1, 1, 1]]
    assert all(row[5:] == [0] * 5 for row in m[:5])  # the clean text never sees the corrupted copy
    # blocks at offset 1: places {0}, {1, 2}, {3, 4}; each sees the text before it and all of itself
    assert [row[:5] for row in m[5:]] == [[0] * 5, [1, 0, 0, 0, 0], [1, 0, 0, 0, 0], [1, 1, 1, 0, 0], [1, 1, 1, 0, 0]]
    assert [row[5:] for row in m[5:]] == [[1, 0, 0, 0, 0], [0, 1, 1, 0, 0], [0, 1, 1, 0, 0], [0, 0, 0, 1, 1], [0, 0, 0, 1, 1]]


def test_blocks_stop_at_segment_starts():
    positions, mask = block_layout(torch.tensor([[0, 0, 0, 1, 1, 1]]), block=4, offset=0)
    assert positions[0, :6].tolist() == [0, 1, 2, 0, 1, 2]
    noisy = mask[0, 0, 6:].int().tolist()
    # blocks of 4 from place 0 ({0-3}, {4, 5}), cut again where the second segment starts: {0-2}, {3}, {4, 5}
    assert [row[6:] for row in noisy] == [[1, 1, 1, 0, 0, 0]] * 3 + [[0, 0, 0, 1, 0, 0]] + [[0, 0, 0, 0, 1, 1]] * 2
    assert [row[:6] for row in noisy] == [[0] * 6] * 4 + [[0, 0, 0, 1, 0, 0]] * 2  # only its own segment's text


def test_decode_layout_is_the_training_layout_with_the_block_after_the_text():
    positions, mask = decode_layout(3, 2, torch.device("cpu"))
    assert positions.tolist() == [[0, 1, 2, 3, 4]]
    assert mask[0, 0].int().tolist() == [[1, 0, 0, 0, 0], [1, 1, 0, 0, 0], [1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 1, 1, 1, 1]]


def test_the_objective_masks_only_learned_tokens_and_adds_both_losses():
    model = make(max_seq_len=12)  # rows as long as the context: the copy doubles the row, not the positions
    torch.manual_seed(3)
    inputs = torch.randint(0, V - 1, (4, 12))
    targets = torch.cat([inputs[:, 1:], inputs[:, :1]], dim=1)
    targets[:, :5] = -100  # a prompt: tokens 1-5 are no one's target
    seen: list[torch.Tensor] = []
    real = model.forward
    model.forward = lambda idx, **kw: seen.append(idx) or real(idx, **kw)
    loss, m = sbd_objective(block=3, mask_id=V - 1, weight=0.5)(model, (inputs, targets, torch.zeros_like(inputs)))
    noisy = seen[0][:, 12:]
    assert torch.equal(seen[0][:, :12], inputs)
    assert not (noisy[:, :6] == V - 1).any() and (noisy == V - 1).any()  # only learned tokens (places 6-11) are masked
    assert loss.item() == pytest.approx(m["ntp_loss"].item() + 0.5 * m["matp_loss"].item(), rel=1e-6)
    loss.backward()
    assert model.tok_emb.weight.grad[V - 1].abs().sum() > 0  # the mask token's embedding learns


@pytest.mark.parametrize("options", [{}, dict(sliding_window=4, sliding_window_pattern=2)])
def test_at_gamma_zero_sbd_is_greedy_decoding_one_token_per_pass(options):
    model = make(**options)
    prompts = [[1, 2, 3, 4, 5], [7, 8, 9]]
    greedy = generate(model, prompts, Sampling(max_new_tokens=20, temperature=0.0)).completions
    for cache in (True, False):
        sbd = generate(model, prompts, Sampling(max_new_tokens=20, temperature=0.0, sbd_gamma=0.0, sbd_block=4),
                       pad_id=V - 1, use_cache=cache)
        assert [c.ids for c in sbd.completions] == [c.ids for c in greedy] and sbd.forward_passes == 40
    wide = [generate(model, prompts, Sampling(max_new_tokens=20, temperature=0.0, sbd_gamma=100.0, sbd_block=4),
                     pad_id=V - 1, use_cache=cache) for cache in (True, False)]
    assert [c.ids for c in wide[0].completions] == [c.ids for c in wide[1].completions]  # the cache changes nothing
    assert wide[0].forward_passes == 10  # the bound never binds: a whole block of 4 a pass


@pytest.mark.parametrize("entropies, gamma, first, taken", [
    ([0.5, 0.1, 0.3, 2.0], 0.0, None, [1]),  # one token: the surest
    ([0.5, 0.1, 0.3, 2.0], 0.35, None, [1, 2]),  # 0.1 + 0.3 - 0.3 = 0.1; with 0.5: 0.9 - 0.5 = 0.4 > 0.35
    ([0.5, 0.1, 0.3, 2.0], 0.4, None, [1, 2, 0]),  # 0.4 <= 0.4; with 2.0: 2.9 - 2.0 = 0.9
    ([0.5, 0.1, 0.3, 2.0], 1.0, None, [1, 2, 0, 3]),
    ([0.2, 0.2, 0.2], 0.2, None, [0, 1]),  # ties by place; 0.6 - 0.2 = 0.4 > 0.2
    ([0.5, 0.1, 0.3, 2.0], 0.0, 0, [0]),  # the next place always, so gamma 0 is greedy
    ([0.5, 0.1, 0.3, 2.0], 0.35, 0, [0, 1]),  # 0.6 - 0.5 = 0.1; with 0.3: 0.9 - 0.5 = 0.4
    ([3.0, 0.1, 0.3, 2.0], 0.4, 0, [0, 1, 2]),  # a sure-less next place counts only as the largest
])
def test_the_entropy_bounded_rule_takes_the_largest_surest_set_within_gamma(entropies, gamma, first, taken):
    from lab.sbd import entropy_bounded

    assert entropy_bounded(entropies, gamma, first) == taken


def test_a_block_stays_until_every_place_in_it_is_decoded(monkeypatch):
    """Blocks of 4: a pass that takes the next place and the block's last leaves two places between,
    and the next pass decodes those within the same block (3 places), not a block slid along (4)."""
    from lab import sbd

    model, widths = make(), []
    real = model.forward
    model.forward = lambda idx, **kw: widths.append(idx.size(1)) or real(idx, **kw)
    monkeypatch.setattr(sbd, "entropy_bounded", lambda h, gamma, first=None: [0, len(h) - 1] if len(h) > 1 else [0])
    out = generate(model, [[1, 2, 3, 4, 5]], Sampling(max_new_tokens=8, temperature=0.0, sbd_gamma=1.0, sbd_block=4),
                   pad_id=V - 1, use_cache=False)
    blocks = [w - t for w, t in zip(widths, [5, 6, 9, 10])]  # a row is the text so far, then the block
    assert blocks == [4, 3, 4, 3] and out.forward_passes == 4 and len(out.completions[0].ids) == 8


def test_a_model_fine_tuned_for_sbd_decodes_in_fewer_passes_than_tokens(tmp_path, shared_cache):
    from lab import inference
    from lab.lineage import resolve

    verses = ["In the beginning God created the heaven and the earth.", "And God said, Let there be light: and there was light.",
              "The LORD is my shepherd; I shall not want.", "Jesus wept."]
    (tmp_path / "corpus").mkdir()
    for d in range(40):
        (tmp_path / "corpus" / f"d{d}.txt").write_text(" ".join(verses[(d + i) % 4] for i in range(10)))
    # fp32: the same model on every CPU (at lr 1e-2 in fp32, as a CPU without bf16 trains, it only said "the the the")
    run_lab(*FAST, "data=text", f"data.path={tmp_path / 'corpus'}", "tokenizer.vocab_size=400", "train.max_steps=120",
            "train.lr=3e-3", "hardware.micro_batch=8", "train.sbd_block=4", "train.eval_every=0", "hardware.precision=fp32",
            f"paths.cache={shared_cache}", cwd=tmp_path)
    (run,) = mlflow_client(tmp_path).search_runs(["0"]) or mlflow_client(tmp_path).search_runs(
        [mlflow_client(tmp_path).get_experiment_by_name("lab").experiment_id])
    pre = resolve(str(tmp_path / "outputs" / "checkpoints" / run.info.run_id), None, tmp_path, shared_cache)
    tm = inference.load(pre, None, torch.device("cpu"))
    assert tm.sbd_block == 4
    prompt = [tm.encode("In the beginning")]
    greedy = tm.complete(prompt, Sampling(max_new_tokens=40, temperature=0.0))
    sbd = tm.complete(prompt, Sampling(max_new_tokens=40, temperature=0.0, sbd_gamma=0.5))
    same = sum(a == b for a, b in zip(sbd.completions[0].ids, greedy.completions[0].ids))
    assert len(sbd.completions[0].ids) == 40 and same >= 36  # (nearly) the same text ...
    assert sbd.forward_passes < greedy.forward_passes == 40  # ... in fewer passes than tokens


def test_sbd_through_the_decode_step_gives_the_uncached_tokens_eager_and_compiled():
    """A pass feeds a fixed width (the tokens decoded since the last pass, then the block), so the
    compiled pass is captured once; greedy and seeded, with a sliding window, a one-token prompt
    included, every way gives the same tokens in the same passes."""
    model = make(sliding_window=4, sliding_window_pattern=2)
    prompts = [[1, 2, 3, 4, 5], [7, 8, 9], [3]]
    for sampling in (Sampling(max_new_tokens=20, temperature=0.0, sbd_gamma=6.0, sbd_block=4),
                     Sampling(max_new_tokens=20, temperature=1.0, seed=5, sbd_gamma=6.0, sbd_block=4)):
        runs = [generate(model, prompts, sampling, pad_id=V - 1, use_cache=False),
                generate(model, prompts, sampling, pad_id=V - 1),
                generate(model, prompts, sampling, pad_id=V - 1, compile=True)]
        ids = [[c.ids for c in r.completions] for r in runs]
        assert ids[0] == ids[1] == ids[2] and all(len(i) == 20 for i in ids[0])
        assert runs[0].forward_passes == runs[1].forward_passes == runs[2].forward_passes
        assert 3 * 20 / 4 < runs[0].forward_passes < 3 * 20  # passes that took one token, and passes that took more


def test_a_block_wider_than_the_sliding_window_is_one_line():
    from types import SimpleNamespace

    from lab.errors import ConfigError
    from lab.inference import TextModel

    tm = TextModel(make(sliding_window=4, sliding_window_pattern=2), SimpleNamespace(pad_id=3, eos_id=2, bos_id=1),
                   None, "micro")
    assert tm.resolved(Sampling(sbd_gamma=0.3, sbd_block=4)).sbd_block == 4
    with pytest.raises(ConfigError, match=r"generate.sbd_block=8 is wider than the model's sliding window "
                                          r"\(model.sliding_window=4\); set generate.sbd_block=4 or less"):
        tm.resolved(Sampling(sbd_gamma=0.3, sbd_block=8))
