"""The CLI surface: help, printing the config, other tokenizers, DeepNorm, and mixtures end to end."""
from __future__ import annotations

import pytest

from labtest import FAST, all_runs, loss_history


def test_help_lists_groups_and_options(lab_cli):
    out = lab_cli("--help").stdout
    assert "hardware: cpu, cuda, mps, rtx4070, rtx4090, rtx5070ti, t2000" in out
    assert "stage: analysis, bench, chat, compare, dpo, eval, export, generate, multitask, pipeline, plan, pretrain, serve, sft, surgery" in out
    assert "optimizer: adafactor, adam, adamw, muon, sgd" in out
    assert "analysis: adapter_rank, alignment, attention, capacity, concepts, layers, tokenizer" in out
    assert "tokenizer: bpe, byte, unigram" in out
    assert "deep_narrow_48" in out and "theos_small" in out
    assert "  model        the decoder's size and architecture options" in out and "[nano]" in out  # what and its default
    assert out.index("Any key can be set") < out.index("== Groups") and len(out.splitlines()) < 60  # no raw config dump


def test_cfg_job_prints_the_composed_config(lab_cli):
    out = lab_cli("--cfg", "job", "model=tiny", "train.lr=1e-4").stdout
    assert "name: tiny" in out and "lr: 0.0001" in out and "hydra:" not in out


def test_byte_tokenizer_deepnorm_accumulation_and_checkpointing_train(lab_cli, tmp_path):
    lab_cli(*FAST, "tokenizer=byte", "model.deepnorm=true", "model.n_layers=6",
            "hardware.grad_accum=2", "hardware.grad_checkpointing=true")
    (run,) = all_runs(tmp_path)
    losses = loss_history(tmp_path, run.info.run_id)
    assert run.data.params["model.deepnorm"] == "True" and run.data.tags["lab.choice.tokenizer"] == "byte"
    assert run.data.metrics["train/tokens_seen"] == 12 * 2 * 4 * 64  # two micro-batches a step
    assert losses[12] < losses[1] - 0.5


def test_weighted_mixture_trains_on_kjv_and_local_text(lab_cli, tmp_path, small_corpus):
    lab_cli(*FAST, "data=kjv_text_mix", f"data.sources.1.path={small_corpus}")
    (run,) = all_runs(tmp_path)
    assert run.info.status == "FINISHED"
    assert run.data.params["data.sources.0.weight"] == "3.0" and run.data.params["data.sources.1.kind"] == "text"


def test_sigterm_ends_a_run_like_ctrl_c():
    import signal

    from lab import signals

    previous = signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)
    signals.install()
    try:
        with pytest.raises(KeyboardInterrupt) as caught:  # so lab.runner marks the run KILLED
            signal.raise_signal(signal.SIGTERM)
        assert isinstance(caught.value, signals.Terminated)
    finally:
        signal.signal(signal.SIGTERM, previous[0])
        signal.signal(signal.SIGINT, previous[1])


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")  # the swallowing is the point
def test_a_ctrl_c_swallowed_by_a_finalizer_still_stops_training_at_the_next_step():
    """Ctrl-C landing in a `__del__` is printed as "Exception ignored" and dropped by Python; a
    run in CI trained on for 300 s after one. The training loop asks at every step."""
    import gc
    import signal

    from lab import signals

    class Finalized:
        def __del__(self):
            signal.raise_signal(signal.SIGINT)

    previous = signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)
    # As in a terminal: a suite started in the background of a shell inherits SIGINT ignored, which
    # install() rightly keeps, and the raised SIGINT would then never arrive.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signals.install()
    try:
        Finalized()  # collected at once: the KeyboardInterrupt is raised in __del__ and swallowed
        gc.collect()
        with pytest.raises(KeyboardInterrupt) as caught:
            signals.raise_if_interrupted()
        assert not isinstance(caught.value, signals.Terminated)
        signals.raise_if_interrupted()  # asked once: nothing pending any more
    finally:
        signal.signal(signal.SIGTERM, previous[0])
        signal.signal(signal.SIGINT, previous[1])


def test_the_defaults_that_failed_now_run_and_say_once_what_they_changed(lab_cli, tmp_path):
    """`lab model=micro` (context 128 < data.seq_len 256) and a run shorter than the 40-step warm-up."""
    proc = lab_cli("model=micro", "train.max_steps=3", "tokenizer.vocab_size=512", "hardware.micro_batch=2",
                   "train.eval_batches=1", "train.sample_tokens=4", "train.progress=false")
    (run,) = all_runs(tmp_path)
    assert run.info.status == "FINISHED"
    assert (run.data.params["model.max_seq_len"], run.data.params["data.seq_len"]) == ("256", "256")
    assert run.data.params["train.warmup_steps"] == "0"
    log = proc.stdout + proc.stderr
    assert log.count("model.max_seq_len raised from 128 to data.seq_len=256") == 1
    assert log.count("train.warmup_steps=40 is not shorter than train.max_steps=3; warming up over 0 steps") == 1
