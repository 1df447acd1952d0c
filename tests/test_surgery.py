"""Embedding surgery: which rows are copied, averaged or random, exactly; and the stage end to end."""
from __future__ import annotations

import pytest
import torch

from lab.config import TokenizerConfig
from lab.surgery import plan_rows, transplant
from lab.tokenizers import ByteTokenizer, train_sentencepiece
from labtest import FAST, all_runs, run_lab


@pytest.fixture(scope="module")
def bpe():
    from lab.data.kjv import read_kjv

    return train_sentencepiece(TokenizerConfig(kind="bpe", vocab_size=400, special_tokens=["<|im_start|>"]), read_kjv()[:5])


def test_byte_rows_move_onto_bpe_copied_averaged_or_random_exactly(bpe):
    old = ByteTokenizer(["<|im_start|>", "<|im_end|>"])
    plan = plan_rows(old, bpe)
    the = bpe.encode(" the")[0]
    assert bpe.piece(the) == "\u2581the" and plan.sources[the] == [32, 116, 104, 101] and plan.kinds[the] == "averaged"
    e = bpe.encode("e")[0]
    assert plan.sources[e] == [101] and plan.kinds[e] == "copied"
    assert [plan.sources[i] for i in (bpe.bos_id, bpe.eos_id, bpe.pad_id)] == [[256], [257], [258]]
    assert plan.sources[bpe.token_id("<|im_start|>")] == [259]  # a special token both have, by its spelling
    assert bpe.piece(0) == "<unk>" and plan.kinds[0] == "random"  # no text and no namesake
    torch.manual_seed(0)
    old_rows = torch.randn(old.vocab_size, 8)
    weights = transplant({"tok_emb.weight": old_rows, "lm_head.weight": old_rows * 2}, False, plan, 0.02, seed=1)
    assert torch.equal(weights["tok_emb.weight"][e], old_rows[101])
    assert torch.allclose(weights["tok_emb.weight"][the], old_rows[[32, 116, 104, 101]].mean(0))
    assert torch.allclose(weights["lm_head.weight"][the], 2 * old_rows[[32, 116, 104, 101]].mean(0))
    assert weights["tok_emb.weight"].shape == (bpe.vocab_size, 8)
    # 256 byte pieces, single letters, bos/eos/pad and <|im_start|> are copied; merges averaged; <unk> random
    assert plan.shares() == {"copied": 313 / 400, "averaged": 86 / 400, "random": 1 / 400}


def test_a_tokenizer_onto_itself_copies_every_row_in_place(bpe):
    plan = plan_rows(bpe, bpe)
    assert plan.sources == [[i] for i in range(bpe.vocab_size)] and set(plan.kinds) == {"copied"}


def test_surgery_keeps_shared_rows_beats_random_rows_and_is_a_checkpoint(tmp_path):
    from safetensors.torch import load_file

    from lab.lineage import resolve

    # trained enough to have opinions (val loss about 3.2): an untrained model's rows carry nothing to average
    run_lab(*FAST, "train.max_steps=400", "hardware.micro_batch=16", "train.warmup_steps=10", "train.eval_every=0",
            "tracking.experiment=s", cwd=tmp_path)
    (pre,) = all_runs(tmp_path)
    proc = run_lab(*FAST, "stage=surgery", f"init_from={pre.info.run_id}", "tokenizer.vocab_size=640",
                   "train.eval_batches=16", "tracking.experiment=s", cwd=tmp_path)
    cut = next(r for r in all_runs(tmp_path) if r.data.tags["lab.stage"] == "surgery")
    m = cut.data.metrics
    assert m["surgery/val_loss"] < m["surgery/val_loss_random_rows"]
    assert m["surgery/copied_share"] > 0.7 and m["surgery/copied_share"] + m["surgery/averaged_share"] + m["surgery/random_share"] == pytest.approx(1)
    assert "rows copied" in proc.stdout
    ckpts = tmp_path / "outputs/checkpoints"
    before, after = (load_file(ckpts / r / "export/model.safetensors")["tok_emb.weight"] for r in (pre.info.run_id, cut.info.run_id))
    old_tok = resolve(pre.info.run_id, None, ckpts, tmp_path).tokenizer()
    new_tok = resolve(cut.info.run_id, None, ckpts, tmp_path).tokenizer()
    shared = [(new_tok.piece(j), j) for j in range(new_tok.vocab_size)]
    old_ids = {old_tok.piece(i): i for i in range(old_tok.vocab_size)}
    pairs = [(old_ids[p], j) for p, j in shared if p in old_ids]
    assert len(pairs) > 0.7 * new_tok.vocab_size
    assert all(torch.equal(after[j], before[i]) for i, j in pairs)
    model = resolve(cut.info.run_id, None, ckpts, tmp_path).build()  # what init_from=<surgery run> loads
    with torch.no_grad():
        assert model(torch.tensor([new_tok.encode("In the beginning")])).shape[-1] == new_tok.vocab_size
    assert all(r.info.status == "FINISHED" for r in all_runs(tmp_path))
