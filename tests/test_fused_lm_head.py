"""The fused LM head (Llama.forward(..., loss_targets=...), pretrain.py --fused_lm_head) against the logits path:
the model's loss, statistics and every parameter gradient (tied and untied, one rank and TP=2), and whole ZeRO-3
jobs' loss curves with and without --fused_lm_head."""
from __future__ import annotations

import json
from dataclasses import fields, replace
from pathlib import Path

import numpy as np
import pytest
import torch

from distributed import run_distributed
from test_training import corpus, ds_config, launch, losses, records, train_args  # noqa: F401 (corpus: a fixture)
from goldfish_ds import GoldfishConfig, goldfish_mask
from goldfish_ds.models import Llama, LlamaConfig, LossTargets, documents_from_eos
from goldfish_ds.parallel import (destroy_model_parallel, initialize_model_parallel,
                                  vocab_parallel_goldfish_cross_entropy)

EOS = 2
# vocab 301: at TP=2 each rank holds 151 rows and the last one is padding.
SMALL = dict(vocab_size=301, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=64)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm().clamp(min=1e-30)).item()


def batch() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(inputs, labels, window_ids) [3, 40]: packed rows with EOS ids inside, a few ignored targets, and an SFT-like
    row with two prompts (-100 in labels, still in window_ids)."""
    g = torch.Generator().manual_seed(7)
    ids = torch.randint(3, SMALL["vocab_size"], (3, 41), generator=g)
    ids[0, 15], ids[1, 8], ids[1, 30] = EOS, EOS, EOS
    labels = ids[:, 1:].clone()
    labels[0, -3:] = -100
    labels[2, :12] = -100
    labels[2, 20:26] = -100
    return ids[:, :-1], labels, ids[:, 1:]


# (name, goldfish config, LossTargets fields besides labels and cfg, whether the model gets the documents)
CASES = [
    ("mean", GoldfishConfig(k=4, h=3, exempt_ids=(1,)), {}, False),
    ("sum, random strategy at step 5", GoldfishConfig(k=3, h=2, strategy="random", seed=11),
     {"reduction": "sum", "step": 5}, False),
    ("none, SFT window_ids, boundaries, document attention", GoldfishConfig(k=4, h=8, boundary_id=EOS),
     {"reduction": "none", "window_ids": True}, True),
    ("standard loss (cfg None)", None, {}, False),
]


def test_the_cases_change_the_mask():
    """Each case's step, window_ids and boundaries change which targets are dropped, so passing them matters."""
    _, labels, window_ids = batch()
    random, sft = CASES[1][1], CASES[2][1]
    assert not torch.equal(goldfish_mask(labels, random, 5), goldfish_mask(labels, random, 0))
    assert not torch.equal(goldfish_mask(labels, sft, window_ids=window_ids), goldfish_mask(labels, sft))
    assert not torch.equal(goldfish_mask(labels, sft), goldfish_mask(labels, replace(sft, boundary_id=None)))


def loss_and_gradients(model: Llama, case: tuple, fused: bool) -> tuple[torch.Tensor, object, dict]:
    """The case's loss, statistics and every parameter's gradient, by the fused head or from the logits."""
    _, cfg, extra, documents = case
    inputs, labels, window_ids = batch()
    extra = {**extra, "window_ids": window_ids if extra.get("window_ids") else None}
    kwargs = {"documents": documents_from_eos(inputs, EOS)} if documents else {}
    model.zero_grad(set_to_none=True)
    if fused:
        loss, stats = model(inputs, **kwargs, loss_targets=LossTargets(labels, cfg, return_stats=True, **extra))
    else:
        loss, stats = vocab_parallel_goldfish_cross_entropy(model(inputs, **kwargs), labels, cfg, return_stats=True,
                                                            vocab_size=model.cfg.vocab_size, **extra)
    # A weighted sum, so that reduction "none" gets an upstream gradient that differs between the targets.
    weights = torch.linspace(0.5, 1.5, loss.numel()).reshape(loss.shape)
    (loss * weights).sum().backward()
    return loss.detach(), stats, {name: p.grad.clone() for name, p in model.named_parameters()}


def check_fused_equals_logits_path(tied: bool) -> None:
    """Fused vs logits path on the same model, every case: loss within 1e-6, every gradient within 1e-5 (relative
    norms), identical counts and statistics within 1e-6; and the loss without autograd."""
    model = Llama(LlamaConfig(**SMALL, tie_word_embeddings=tied), seed=3).train()
    for case in CASES:
        loss, stats, grads = loss_and_gradients(model, case, fused=True)
        ref_loss, ref_stats, ref_grads = loss_and_gradients(model, case, fused=False)
        assert loss.shape == ref_loss.shape and rel(loss, ref_loss) <= 1e-6, case[0]
        for field in fields(stats):
            got, want = getattr(stats, field.name), getattr(ref_stats, field.name)
            if field.name.endswith("_tokens") and not field.name.startswith("loss"):
                assert torch.equal(got, want), (case[0], field.name)
            else:
                assert abs(got.item() - want.item()) <= 1e-6 * max(1.0, abs(want.item())), (case[0], field.name)
        if case[1] is not None:
            assert ref_stats.dropped_tokens > 0 and ref_stats.kept_tokens > 0, case[0]  # the mask really drops
        assert grads.keys() == ref_grads.keys() and ("lm_head.weight" in grads) != tied
        for name, expected in ref_grads.items():
            assert expected.norm() > 0 and rel(grads[name], expected) <= 1e-5, (case[0], name)
    with torch.no_grad():
        inputs, labels, _ = batch()
        loss = model(inputs, loss_targets=LossTargets(labels, CASES[0][1]))
        expected = vocab_parallel_goldfish_cross_entropy(model(inputs), labels, CASES[0][1],
                                                            vocab_size=model.cfg.vocab_size)
        assert rel(loss, expected) <= 1e-6


@pytest.mark.parametrize("tied", [False, True])
def test_fused_head_equals_the_logits_path_on_one_rank(tied):
    check_fused_equals_logits_path(tied)


def body_tensor_parallel(rank: int, world: int) -> None:
    torch.set_num_threads(1)  # two ranks on the machine's cores
    initialize_model_parallel(world)
    try:
        for tied in (False, True):
            check_fused_equals_logits_path(tied)
    finally:
        destroy_model_parallel()


def test_fused_head_equals_the_logits_path_at_tp2():
    """Each rank's slice of every gradient (the LM head's with a padding row on rank 1), tied and untied."""
    run_distributed(body_tensor_parallel, 2)


# ---- whole jobs: ZeRO-3 under real launchers, --fused_lm_head against --no-fused_lm_head -----------------------

FUSED = ("--fused_lm_head", "--no-fused_lm_head")


def job_pair(corpus: Path, root: Path, kind: str, ranks: int, config: str, *extra: str, env: dict | None = None
             ) -> dict:
    """The same 20-step job with and without the fused head: {flag: out_dir}."""
    runs = {}
    for flag in FUSED:
        runs[flag] = root / flag.lstrip("-")
        launch(kind, ranks, train_args(corpus, runs[flag], config, flag, *extra), env=env)
    return runs


@pytest.fixture(scope="module")
def dp2_jobs(corpus, tmp_path_factory):
    """TP=1 x DP=2 (deepspeed launcher), micro-batch 2 x 2 accumulation steps, the tied tiny model,
    --loss_normalization global_tokens, --document_attention, --goldfish_boundaries reset, and a NaN loss on rank 1
    at step 4 (the step is skipped)."""
    root = tmp_path_factory.mktemp("fused_dp2")
    return job_pair(corpus, root, "deepspeed", 2, ds_config(root / "ds.json", 2, 2), "--loss_normalization",
                    "global_tokens", "--document_attention", "--goldfish_boundaries", "reset",
                    env={"GOLDFISH_DS_CRASH": "nan_loss:4:1"})


@pytest.fixture(scope="module")
def tp2_jobs(corpus, tmp_path_factory):
    """TP=2 x DP=1 (mpirun), activation checkpointing, an untied model whose vocabulary (2049) pads rank 1's
    LM-head slice with one row, and --log_interval 2 (the odd steps do not compute the dropped targets' loss);
    "every_step": the unfused job logging every step, for the records of the even steps."""
    root = tmp_path_factory.mktemp("fused_tp2")
    model = json.loads((corpus / "model.json").read_text())
    (root / "model.json").write_text(json.dumps({**model, "vocab_size": 2049, "tie_word_embeddings": False}))
    args = ("--model_config", str(root / "model.json"), "--tensor_parallel", "2", "--activation_checkpointing")
    config = ds_config(root / "ds.json", 2, 2)
    runs = job_pair(corpus, root, "mpirun", 2, config, *args, "--log_interval", "2")
    runs["every_step"] = root / "every_step"
    launch("mpirun", 2, train_args(corpus, runs["every_step"], config, "--no-fused_lm_head", *args))
    return runs


def test_unlogged_steps_change_no_logged_record(tp2_jobs):
    """--log_interval 2 against 1: the same records at the even steps (the kept counts of the unlogged steps go
    into supervised_tokens), in both pipelines."""
    every_step = {r["step"]: r for r in records(tp2_jobs["every_step"])}
    keys = ("loss", "loss_all_tokens", "loss_dropped_tokens", "drop_rate", "supervised_tokens", "input_tokens")
    for flag in FUSED:
        logged = records(tp2_jobs[flag])
        assert [r["step"] for r in logged] == list(range(2, 21, 2)), flag
        for r in logged:
            expected = every_step[r["step"]]
            assert all(np.isfinite(r[key]) for key in keys), (flag, r)
            assert (r["supervised_tokens"], r["input_tokens"]) == (expected["supervised_tokens"],
                                                                     expected["input_tokens"]), (flag, r["step"])
            np.testing.assert_allclose([r[key] for key in keys[:4]], [expected[key] for key in keys[:4]],
                                       rtol=1e-5, atol=1e-4, err_msg=f"{flag} step {r['step']}")


@pytest.mark.parametrize("jobs", ["dp2_jobs", "tp2_jobs"])
def test_fused_head_reproduces_the_loss_curve(jobs, request):
    """Every step's loss within the layout tests' 1e-4 (tests/test_training.py), the same drop rates and kept
    counts, the dropped tokens' loss and the validation loss (the logits path in both) within 1e-5, the same
    skipped steps."""
    runs = request.getfixturevalue(jobs)
    fused, plain = (runs[flag] for flag in FUSED)
    assert json.loads((fused / "args.json").read_text())["fused_lm_head"] is True
    assert json.loads((plain / "args.json").read_text())["fused_lm_head"] is False
    assert [r["step"] for r in records(fused)] == [r["step"] for r in records(plain)]
    np.testing.assert_allclose(losses(fused), losses(plain), rtol=0, atol=1e-4)
    for key in ("drop_rate", "supervised_tokens"):
        assert [r[key] for r in records(fused)] == [r[key] for r in records(plain)], key
    np.testing.assert_allclose([r["loss_dropped_tokens"] for r in records(fused)],
                               [r["loss_dropped_tokens"] for r in records(plain)], rtol=1e-5)
    np.testing.assert_allclose([r["val_loss"] for r in records(fused, "val")],
                               [r["val_loss"] for r in records(plain, "val")], rtol=1e-5)
    assert records(fused, "skipped") == records(plain, "skipped")
    if jobs == "dp2_jobs":
        assert len(records(fused)) + len(records(fused, "skipped")) == 20
        assert [r["step"] for r in records(fused, "skipped")] == [4]


def test_fused_head_in_bf16_follows_the_logits_path(corpus, tmp_path):
    """bf16 weights (DeepSpeed's bf16): the fused curve stays within the bf16 rounding that
    tests/test_training.py::test_bf16_on_cpu_follows_the_fp32_curve allows (rtol 0.01) over 6 steps, one rank."""
    runs = job_pair(corpus, tmp_path, "python", 1, ds_config(tmp_path / "bf16.json", 2, 2, bf16={"enabled": True}),
                    "--max_steps", "6", "--eval_interval", "0")
    np.testing.assert_allclose(losses(runs["--fused_lm_head"]), losses(runs["--no-fused_lm_head"]), rtol=0.01)
