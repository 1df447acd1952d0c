"""lab's own checkpoint layout: a format version, read back whole, and what older or newer files do."""
from __future__ import annotations

import json
import re

import pytest
import torch

from lab import checkpoint as ckpt
from lab.config import ModelConfig
from lab.errors import CheckpointError
from lab.lineage import _read
from lab.models import build_model
from lab.tokenizers import ByteTokenizer


@pytest.fixture
def export(tmp_path):
    torch.manual_seed(0)
    model = build_model(ModelConfig(n_kv_heads=2), 259)
    tok = ByteTokenizer()
    ckpt.write_export(tmp_path / "export", model.state_dict(), model, tok, {"step": 3, "tokenizer_sha256": tok.sha256})
    return tmp_path / "export", model


def edit(path, **changes):
    path.write_text(json.dumps(json.loads(path.read_text()) | changes))


def test_a_checkpoint_records_its_format_and_loads_back_equal(export):
    folder, model = export
    assert json.loads((folder / "meta.json").read_text())["format_version"] == ckpt.FORMAT_VERSION == 2
    loaded = _read(folder).build()
    assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), model.state_dict().values()))
    assert loaded.lm_head.weight is loaded.tok_emb.weight  # the tie survives the one-allocation build


def test_a_version_one_checkpoint_still_loads(export):
    """Version 1 had no format_version and a model_config.json without the Gemma options."""
    folder, model = export
    meta = json.loads((folder / "meta.json").read_text())
    del meta["format_version"]
    (folder / "meta.json").write_text(json.dumps(meta))
    config = json.loads((folder / "model_config.json").read_text())
    old_keys = ("name dim n_layers n_heads n_kv_heads ffn_dim multiple_of max_seq_len rope_theta norm_eps "
                "tie_embeddings dropout deepnorm init_std vocab_size").split()
    (folder / "model_config.json").write_text(json.dumps({k: config[k] for k in old_keys}))
    idx = torch.randint(0, 259, (1, 9))
    with torch.no_grad():
        assert torch.equal(_read(folder).build()(idx), model(idx))


@pytest.mark.parametrize("meta, config, message", [
    ({"format_version": 99}, {}, "format_version=99 is newer than this lab reads (2); upgrade lab"),
    ({}, {"sliding_window_size": 4}, "unexpected keyword argument 'sliding_window_size'; the checkpoint was written "
                                     "by another lab version"),
])
def test_a_checkpoint_from_another_version_says_what_to_do(export, meta, config, message):
    folder, _ = export
    edit(folder / "meta.json", **meta)
    edit(folder / "model_config.json", **config)
    with pytest.raises(CheckpointError, match=re.escape(message)) as err:
        _read(folder)
    assert "\n" not in str(err.value)


def test_a_checkpoint_that_does_not_fit_the_model_names_the_tensor(export):
    folder, _ = export
    wrong = build_model(ModelConfig(n_kv_heads=2, dim=32), 259)
    with pytest.raises(CheckpointError, match=r"does not fit model=micro: layers.0.attn.k_proj.weight is \(32, 64\), the model's \(16, 32\)"):
        ckpt.load_weights(wrong, folder)


def test_pruning_keeps_the_newest_and_every_event_checkpoint(tmp_path):
    import json

    from lab.checkpoint import _prune, step_dir

    for step, event in ((100, None), (200, "grokking"), (300, None), (400, None)):
        folder = step_dir(tmp_path, step)
        folder.mkdir()
        (folder / "meta.json").write_text(json.dumps({"step": step} | ({"event": event} if event else {})))
    (tmp_path / ".step_0000500.tmp").mkdir()  # a half-written one
    _prune(tmp_path, keep=1)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step_0000200", "step_0000400"]
