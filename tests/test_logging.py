"""Per-step logging: the model FLOPs count against torch's FLOP counter, TFLOP/s and MFU in the records, and a real
job logging to Weights & Biases offline, read back from the run file wandb wrote."""
from __future__ import annotations

import json
import shutil
import struct
import subprocess
from importlib.util import find_spec
from pathlib import Path

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from test_training import PRETRAIN, corpus, ds_config, launch_env, records, train_args  # noqa: F401 (fixture)
from goldfish_ds import GoldfishConfig, goldfish_cross_entropy
from goldfish_ds.models import Llama, LlamaConfig
from goldfish_ds.training.arguments import build_parser, parse_args
from goldfish_ds.training.flops import (device_peak_tflops, known_peak_tflops, step_throughput,
                                        training_flops_per_token)

SMALL = LlamaConfig(vocab_size=96, hidden_size=32, intermediate_size=80, num_hidden_layers=2, num_attention_heads=4,
                    num_key_value_heads=2, head_dim=12)  # grouped-query attention, head_dim != hidden / heads


def counted_flops(model: Llama, input_ids: torch.Tensor, backward: bool) -> int:
    """FLOPs torch's FlopCounterMode counts (matmuls) in a forward, or forward + backward, pass. The math SDPA
    backend spells attention as matmuls the counter sees (the CPU's fused kernel is not in its registry)."""
    counter = FlopCounterMode(display=False)
    with sdpa_kernel(SDPBackend.MATH), counter:
        logits = model(input_ids[:, :-1])
        if backward:
            goldfish_cross_entropy(logits, input_ids[:, 1:], GoldfishConfig(k=4, h=3)).backward()
    return counter.get_total_flops()


@pytest.mark.parametrize("tied", [False, True])
def test_flop_count_equals_torch_flop_counter(tied):
    cfg = LlamaConfig(**{**SMALL.__dict__, "tie_word_embeddings": tied})
    model = Llama(cfg)
    B, T = 3, 20
    input_ids = torch.randint(0, cfg.vocab_size, (B, T + 1), generator=torch.Generator().manual_seed(0))
    expected = training_flops_per_token(cfg, T) * B * T
    assert counted_flops(model, input_ids, backward=False) * 3 == expected
    assert counted_flops(model, input_ids, backward=True) == expected


def test_activation_checkpointing_recompute_is_not_model_flops():
    B, T = 2, 16
    input_ids = torch.randint(0, SMALL.vocab_size, (B, T + 1), generator=torch.Generator().manual_seed(1))
    plain = counted_flops(Llama(SMALL), input_ids, backward=True)
    recomputed = counted_flops(Llama(SMALL, activation_checkpointing=True), input_ids, backward=True)
    decoder_forward = plain // 3 - 2 * SMALL.vocab_size * SMALL.hidden_size * B * T
    # the hardware runs (part of: torch stops recomputing once it has what backward needs) the layers' forward again
    assert plain < recomputed <= plain + decoder_forward
    assert training_flops_per_token(SMALL, T) * B * T == plain  # model FLOPs: the run without recompute


def test_peak_table_and_mfu_only_with_a_peak():
    assert known_peak_tflops("NVIDIA H100 80GB HBM3") == 989.0
    assert known_peak_tflops("NVIDIA H100 PCIe") == 756.0
    assert known_peak_tflops("NVIDIA H200") == 989.0
    assert known_peak_tflops("NVIDIA A100-SXM4-80GB") == known_peak_tflops("NVIDIA A100 80GB PCIe") == 312.0
    assert known_peak_tflops("NVIDIA H100 NVL") is None and known_peak_tflops("NVIDIA L4") is None
    assert device_peak_tflops(None, torch.device("cpu"), torch.bfloat16) is None  # CPU: unknown
    assert device_peak_tflops(2.5, torch.device("cpu"), torch.float32) == 2.5
    assert "mfu" not in step_throughput(512, 0.5, 1000, 2, None)
    record = step_throughput(512, 0.5, 1000, 2, 4.0)
    assert record == {"model_flops": 512_000, "tflops_per_s": 512_000 / 0.5 / 1e12,
                      "mfu": 512_000 / 0.5 / 1e12 / (2 * 4.0)}


def test_help_states_the_formula_and_options_are_checked(monkeypatch):
    text = " ".join(build_parser().format_help().split())
    assert "6 N + 12 L H Q T (PaLM, Chowdhery et al. 2022, appendix B)" in text
    assert "activation-checkpointing recompute not counted" in text
    with pytest.raises(ValueError, match="--peak_tflops must be > 0"):
        parse_args(["--peak_tflops", "0"])
    with pytest.raises(ValueError, match="--wandb_run_name names a W&B run: give --wandb_project too"):
        parse_args(["--wandb_run_name", "x"])
    monkeypatch.setenv("WANDB_MODE", "offlne")
    with pytest.raises(ValueError, match="WANDB_MODE must be one of .*'offline'.*got 'offlne'"):
        parse_args(["--wandb_project", "p"])


def wandb_records(run_file: Path) -> list:
    """The records of a wandb run file (`run-ID.wandb`): wandb's protobuf Records, framed as a LevelDB log
    (7-byte file header ":W&B" + magic + version; 32 KiB blocks of chunks: crc32c, length, type, payload)."""
    from wandb.proto import wandb_internal_pb2

    data = run_file.read_bytes()
    assert data[:4] == b":W&B" and struct.unpack("<HB", data[4:7]) == (0xBEE1, 0)
    block, pos, payload, out = 32768, 7, b"", []
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a chunk header is padding
            pos += block - pos % block
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if kind == 0:  # zero padding at the end of the file
            break
        payload += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # FULL or LAST chunk: a whole record
            record = wandb_internal_pb2.Record()
            record.ParseFromString(payload)
            out.append(record)
            payload = b""
    return out


@pytest.fixture(scope="module")
def wandb_job(corpus, tmp_path_factory):  # noqa: F811 (fixture)
    """A 3-step job on 1 rank with --wandb_project in offline mode, in a network namespace with only loopback."""
    if find_spec("wandb") is None:
        pytest.skip("wandb is not installed (pip install wandb)")
    if shutil.which("unshare") is None or subprocess.run(["unshare", "--net", "true"]).returncode != 0:
        pytest.skip("cannot make a network namespace here (needs root and unshare)")
    tmp = tmp_path_factory.mktemp("wandb_job")
    out = tmp / "wandb_run"
    args = train_args(corpus, out, ds_config(tmp / "ds.json", 2, 2), "--max_steps", "3", "--eval_interval", "3",
                      "--save_interval", "3", "--wandb_project", "goldfish-test", "--peak_tflops", "0.05")
    command = ["unshare", "--net", "bash", "-c", 'ip link set lo up && exec "$@"', "job", "python", PRETRAIN, *args]
    result = subprocess.run(command, env=launch_env(1, {"WANDB_MODE": "offline"}), capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return out


def test_records_hold_model_flops_tflops_and_mfu(wandb_job, corpus):  # noqa: F811 (fixture)
    train = records(wandb_job)
    assert [r["step"] for r in train] == [1, 2, 3]
    flops_per_token = training_flops_per_token(LlamaConfig.from_json(str(corpus / "model.json")), 64)
    for r in train:
        assert r["model_flops"] == flops_per_token * 2 * 2 * 64  # micro-batch 2 x accumulation 2 x seq_len 64
        assert r["tflops_per_s"] == r["model_flops"] / r["step_time_s"] / 1e12
        assert r["mfu"] == r["tflops_per_s"] / 0.05
        assert "peak_device_memory_gib" not in r  # CPU


def test_offline_wandb_run_holds_the_metrics(wandb_job):
    runs = list((wandb_job / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(runs) == 1
    recs = wandb_records(runs[0])
    run = next(r.run for r in recs if r.WhichOneof("record_type") == "run")
    assert run.project == "goldfish-test" and run.display_name == "wandb_run"
    config = {item.key: json.loads(item.value_json) for item in run.config.update}  # wandb.init(config=...)
    assert config["wandb_project"] == "goldfish-test" and config["seq_len"] == 64
    assert config["model_flops_per_token"] == training_flops_per_token(LlamaConfig.from_json(config["model_config"]),
                                                                       64)
    history = {}
    for r in recs:
        if r.WhichOneof("record_type") == "history":
            items = {item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in r.history.item}
            history.setdefault(items["_step"], {}).update(items)
    for r in records(wandb_job):
        logged = history[r["step"]]
        for key in ("loss", "loss_all_tokens", "drop_rate", "lr", "tflops_per_s", "mfu", "model_flops"):
            assert logged[f"train/{key}"] == r[key], key
    assert history[3]["val/val_loss"] == records(wandb_job, "val")[0]["val_loss"]
