"""Hugging Face folders end to end: stages start from one (`init_from=hf:<dir>`), with or without an
adapter, and `stage=export` writes one that transformers and peft load."""
from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from labtest import FAST, all_runs, mlflow_client, run_lab, save_hf_tokenizer

transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    """A tiny Gemma 2 (sliding window, soft-capping, sandwich norms) with its own BPE tokenizer."""
    directory = tmp_path_factory.mktemp("gemma2")
    vocab = save_hf_tokenizer(directory, vocab_size=1000)
    config = transformers.Gemma2Config(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                       num_attention_heads=4, num_key_value_heads=2, head_dim=16, sliding_window=16,
                                       max_position_embeddings=128, query_pre_attn_scalar=16)
    torch.manual_seed(0)
    transformers.AutoModelForCausalLM.from_config(config).save_pretrained(directory)
    return directory


def test_sft_with_lora_from_a_hugging_face_folder_then_dpo_from_that_run(hf_dir, tmp_path):
    run_lab(*FAST, "stage=sft", f"init_from=hf:{hf_dir}", "adapter=lora", "data.template=alpaca", "data.seq_len=128",
            "train.max_steps=4", "tracking.experiment=imp", cwd=tmp_path)
    (sft,) = all_runs(tmp_path)
    assert sft.info.status == "FINISHED"
    assert sft.data.tags["lab.init_from"] == f"hf:{hf_dir}" and sft.data.params["model.name"] == hf_dir.name
    assert sft.data.params["model.sliding_window"] == "16" and sft.data.params["model.attn_softcap"] == "50.0"
    assert int(sft.data.params["adapter.n_trainable"]) < int(sft.data.params["model.n_params"]) / 4
    # a frozen copy as the reference: the cached one would first score every pair
    run_lab(*FAST, "stage=dpo", f"init_from={sft.info.run_id}", "data.template=alpaca", "data.seq_len=128",
            "train.max_steps=3", "dpo.reference=copy", "tracking.experiment=imp", cwd=tmp_path)
    dpo = next(r for r in all_runs(tmp_path) if r.data.tags["lab.stage"] == "dpo")
    assert dpo.info.status == "FINISHED" and dpo.data.tags["lab.lineage.parent_run"] == sft.info.run_id


def test_continued_pretraining_from_a_hugging_face_folder_uses_its_tokenizer(hf_dir, tmp_path):
    from lab.formats.hf_tokenizer import load_hf_tokenizer

    run_lab(*FAST, f"init_from=hf:{hf_dir}", "train.max_steps=3", cwd=tmp_path)
    (run,) = all_runs(tmp_path)
    assert run.info.status == "FINISHED"
    assert run.data.params["tokenizer.sha256"] == load_hf_tokenizer(hf_dir).sha256


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A FAST pretraining run, then LoRA SFT runs from it on its weights and on its weights in nf4:
    (cwd, pretrain run id, {base_quant: sft run id})."""
    cwd = tmp_path_factory.mktemp("export")
    run_lab(*FAST, "tracking.experiment=pre", cwd=cwd)
    (pre,) = all_runs(cwd)
    sft = {}
    for quant in ("none", "nf4"):
        run_lab(*FAST, "stage=sft", f"init_from={pre.info.run_id}", "adapter=lora", "adapter.targets=[q,v,down]",
                "train.lr=2e-2", "train.max_steps=4", f"adapter.base_quant={quant}", f"tracking.experiment=sft_{quant}",
                cwd=cwd)
        (sft[quant],) = [r.info.run_id for r in all_runs(cwd) if r.data.params.get("adapter.base_quant") == quant
                         and r.data.tags.get("lab.stage") == "sft"]
    return cwd, pre.info.run_id, sft


def export_run(cwd, *args, check=True):
    return run_lab("stage=export", "tracking.experiment=exports", *args, cwd=cwd, check=check)


def test_export_hf_loads_in_transformers_with_labs_logits_and_is_recorded(trained):
    from lab.formats.hf import load_hf

    cwd, pre_id, _ = trained
    target = cwd / "exported"
    export_run(cwd, f"init_from={pre_id}", f"export.dir={target}", "export.max_shard_mb=0.2")
    run = next(r for r in all_runs(cwd) if r.data.tags.get("lab.stage") == "export")
    assert run.info.status == "FINISHED" and run.data.tags["lab.lineage.parent_run"] == pre_id
    assert run.data.tags["lab.export.dir"] == str(target) and run.info.run_name == f"export-micro from {pre_id[:8]}"
    logged = {a.path for a in mlflow_client(cwd).list_artifacts(run.info.run_id, "export")}
    assert {"export/config.json", "export/tokenizer.json", "export/model.safetensors.index.json"} <= logged
    hf = transformers.AutoModelForCausalLM.from_pretrained(target).eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(target)
    lab_model = lineage_model(cwd, pre_id)
    ids = tokenizer("In the beginning God created the heaven", add_special_tokens=False, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        assert (hf(ids).logits - lab_model(ids)).abs().max() < 1e-4
    again, _ = load_hf(target)  # and lab reads its own export back
    with torch.no_grad():
        assert torch.equal(again(ids), lab_model(ids))


def lineage_model(cwd, run_id):
    from pathlib import Path

    from lab.lineage import resolve

    return resolve(run_id, None, Path(cwd) / "outputs/checkpoints", Path(cwd) / "outputs/cache").build().eval()


@pytest.mark.parametrize("quant", ["none", "nf4"])
def test_export_peft_loads_onto_the_exported_base_with_labs_logits(trained, quant):
    """On a quantized base too: the adapter goes out for the original, full-precision base (the run's
    init_from), which is what `transformers` loads and PEFT applies it to."""
    peft = pytest.importorskip("peft")
    from lab import checkpoint as ckpt
    from lab.errors import ConfigError
    from lab.lineage import resolve
    from lab.stages.export import peft_parts
    from lab.adapters import load_adapter

    cwd, pre_id, sft = trained
    sft_id, target = sft[quant], cwd / f"peft_export_{quant}"
    export_run(cwd, f"init_from={sft_id}", "export.format=peft", f"export.dir={target}")
    with pytest.raises(ConfigError, match="export.format=peft needs a run trained with an adapter"):
        peft_parts(resolve(pre_id, None, cwd / "outputs/checkpoints", cwd), None)  # the pretraining run has none
    tuned = peft.PeftModel.from_pretrained(transformers.AutoModelForCausalLM.from_pretrained(target / "base"),
                                           target / "adapter").eval()
    run_dir = cwd / "outputs/checkpoints" / sft_id
    last = ckpt.latest_checkpoint(run_dir)
    if quant == "none":
        model = lineage_model(cwd, sft_id)  # the merged export, for its config; then the base it trained on
        model.load_state_dict(ckpt.base_weights(last), strict=False)
    else:  # the step holds the adapter alone, no base
        assert {k.split(".")[-2] for k in load_file(last / "model.safetensors")} == {"lora_A", "lora_B"}
        model = lineage_model(cwd, pre_id)
    load_adapter(model, run_dir / "export" / "adapter")
    ids = torch.randint(0, model.vocab_size, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert (tuned(ids).logits - model.eval()(ids)).abs().max() < 1e-4


def test_export_gguf_writes_one_file_with_the_model_and_its_vocabulary(trained):
    gguf = pytest.importorskip("gguf")
    cwd, pre_id, _ = trained
    target = cwd / "gguf_export"
    export_run(cwd, f"init_from={pre_id}", "export.format=gguf", f"export.dir={target}")
    (path,) = target.iterdir()
    assert path.name == "micro.gguf"
    reader = gguf.GGUFReader(str(path))
    fields = {name: f.contents() for name, f in reader.fields.items()}
    model = lineage_model(cwd, pre_id)
    assert fields["general.architecture"] == "llama" and len(fields["tokenizer.ggml.tokens"]) == model.vocab_size
    emb = next(t for t in reader.tensors if t.name == "token_embd.weight")
    assert torch.equal(torch.from_numpy(emb.data.copy()), model.tok_emb.weight.detach())


def test_export_refuses_a_folder_that_is_not_empty(trained):
    cwd, pre_id, _ = trained
    (cwd / "full").mkdir()
    (cwd / "full" / "notes.txt").write_text("mine")
    proc = export_run(cwd, f"init_from={pre_id}", f"export.dir={cwd / 'full'}", check=False)
    assert proc.returncode == 2 and proc.stderr.strip().splitlines()[-1] == (
        f"error: export.dir={cwd / 'full'} is not empty; name a new or empty folder, or move its contents away")
    assert (cwd / "full" / "notes.txt").read_text() == "mine"
    assert all(r.info.status != "RUNNING" for r in all_runs(cwd))
