"""The pretraining pipeline end to end: real DeepSpeed ZeRO-3 ranks on CPU (gloo), started by the deepspeed
launcher, mpirun, torchrun or plain python; layouts, crash-and-resume, export, and bad input."""
from __future__ import annotations

import itertools
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from distributed import free_port
from test_launchers import launcher

from goldfish_ds import GoldfishConfig, goldfish_mask
from goldfish_ds.data import (
    PackedTokenDataset,
    ShardedSampler,
    builtin_documents,
    load_tokenizer,
    train_sentencepiece,
    write_packed_shards,
)
from goldfish_ds.models import Llama, LlamaConfig, read_hf_state_dict
from goldfish_ds.training.deepspeed_config import load_deepspeed_config
from goldfish_ds.training.optim import warmup_cosine_lr

REPO = Path(__file__).resolve().parents[1]
PRETRAIN = str(REPO / "scripts" / "pretrain.py")
STEPS = 20
TINY = LlamaConfig.from_json(str(REPO / "configs" / "models" / "tiny.json"))


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """The built-in corpus tokenized with a 2k sentencepiece model: (train dir, val dir, tokenizer)."""
    root = tmp_path_factory.mktemp("corpus")
    docs = builtin_documents()
    tok_path = train_sentencepiece(docs[8:], str(root / "tok"), vocab_size=2048)
    tok = load_tokenizer(tok_path)
    for name, texts in (("train", docs[8:]), ("val", docs[:8])):
        write_packed_shards(([tok.bos_id] + tok.encode(t) + [tok.eos_id] for t in texts), str(root / name),
                            tok.vocab_size)
    model = json.loads((REPO / "configs" / "models" / "tiny.json").read_text())
    (root / "model.json").write_text(json.dumps({**model, "vocab_size": 2048}))
    return root


def ds_config(path: Path, micro: int, accumulation: int, **extra) -> str:
    config = json.loads((REPO / "configs" / "deepspeed" / "zero3_cpu.json").read_text())
    config.update(train_micro_batch_size_per_gpu=micro, gradient_accumulation_steps=accumulation, **extra)
    path.write_text(json.dumps(config))
    return str(path)


def train_args(corpus: Path, out_dir: Path, config: str, *extra: str) -> list:
    return ["--deepspeed_config", config, "--out_dir", str(out_dir), "--data", str(corpus / "train"),
            "--val_data", str(corpus / "val"), "--tokenizer", str(corpus / "tok.model"),
            "--model_config", str(corpus / "model.json"), "--seq_len", "64", "--max_steps", str(STEPS),
            "--warmup_steps", "5", "--lr", "3e-3", "--min_lr", "3e-4", "--save_interval", "5", "--eval_interval", "10",
            "--eval_rows", "7", "--no-progress", "--no-export_hf", *extra]


def launch_env(nproc: int, env: dict | None = None) -> dict:
    """The environment of a launched job: Open MPI allowed as root, one thread per rank when ranks share the cores."""
    return dict(os.environ, OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1",
                OMP_NUM_THREADS="1" if nproc > 1 else "2", **(env or {}))


def launch_command(kind: str, nproc: int) -> list:
    """The command line that starts scripts/pretrain.py on nproc ranks under a launcher (before its options)."""
    if kind == "python":
        return [sys.executable, PRETRAIN]
    if kind == "deepspeed":
        return [launcher("deepspeed"), "--num_gpus", str(nproc), "--master_port", str(free_port()), PRETRAIN]
    if kind == "mpirun":
        return [launcher("mpirun"), "-np", str(nproc), "--map-by", "slot:OVERSUBSCRIBE", sys.executable, PRETRAIN]
    if kind == "torchrun":
        return [launcher("torchrun"), "--nproc_per_node", str(nproc), "--master_port", str(free_port()), PRETRAIN]
    raise ValueError(f"launcher kind must be python, deepspeed, mpirun or torchrun, got {kind!r}")


def launch(kind: str, nproc: int, args: list, expect_ok: bool = True, env: dict | None = None):
    """Run scripts/pretrain.py under a launcher; returns the CompletedProcess."""
    result = subprocess.run(launch_command(kind, nproc) + args, env=launch_env(nproc, env), capture_output=True,
                            text=True, timeout=900)
    if expect_ok:
        assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    return result


def records(out_dir: Path, kind: str = "train") -> list:
    lines = (out_dir / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["kind"] == kind]


def losses(out_dir: Path) -> np.ndarray:
    return np.array([r["loss"] for r in records(out_dir)])


# ---- units --------------------------------------------------------------------------------------------

def test_warmup_cosine_schedule():
    kw = dict(lr=4e-4, min_lr=4e-5, warmup_steps=10, max_steps=110)
    assert warmup_cosine_lr(0, **kw) == pytest.approx(4e-5)
    assert warmup_cosine_lr(9, **kw) == pytest.approx(4e-4)
    assert warmup_cosine_lr(10, **kw) == pytest.approx(4e-4)
    assert warmup_cosine_lr(60, **kw) == pytest.approx((4e-4 + 4e-5) / 2)
    assert warmup_cosine_lr(110, **kw) == pytest.approx(4e-5) and warmup_cosine_lr(500, **kw) == 4e-5


def test_deepspeed_config_fills_the_train_batch_size(tmp_path):
    config = load_deepspeed_config(ds_config(tmp_path / "a.json", 4, 2), data_parallel_size=3, model=TINY)
    assert config["train_batch_size"] == 24  # its refusals: tests/test_bad_input.py


@pytest.mark.parametrize("name", ["zero3_cpu", "zero3_gpu_bf16"])
def test_shipped_deepspeed_configs_size_buffers_to_the_model(name):
    """Their "auto" sizes: h^2, 0.9 h^2, 10 h and one decoder layer (counted on the real module, or from
    Llama-2-7B's published 6,738,415,616 parameters)."""
    big = LlamaConfig.from_json(str(REPO / "configs" / "models" / "llama-2-7b.json"))
    tiny_layer = sum(p.numel() for p in Llama(TINY).layers[0].parameters())
    big_layer = (6738415616 - 2 * 32000 * 4096 - 4096) // 32  # less the embeddings and the final norm
    for model, layer in ((TINY, tiny_layer), (big, big_layer)):
        zero = load_deepspeed_config(str(REPO / "configs" / "deepspeed" / f"{name}.json"), 2, model)
        zero, h = zero["zero_optimization"], model.hidden_size
        assert (zero["reduce_bucket_size"], zero["stage3_prefetch_bucket_size"],
                zero["stage3_param_persistence_threshold"]) == (h * h, int(0.9 * h * h), 10 * h)
        assert (zero["stage3_max_live_parameters"], zero["stage3_max_reuse_distance"], zero["sub_group_size"]) \
            == (layer, layer, layer)


# ---- end to end ---------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def reference_run(corpus, tmp_path_factory):
    """One rank, micro-batch 2 x 2 accumulation steps: the curve the other layouts must reproduce."""
    out = tmp_path_factory.mktemp("single")
    launch("python", 1, train_args(corpus, out, ds_config(out / "ds.json", 2, 2)))
    return out


@pytest.fixture(scope="module")
def dp2_run(corpus, tmp_path_factory):
    """ZeRO-3 over 2 data-parallel ranks from the deepspeed launcher (micro-batch 2, no accumulation)."""
    out = tmp_path_factory.mktemp("dp2")
    launch("deepspeed", 2, train_args(corpus, out, ds_config(out / "ds.json", 2, 1)))
    return out


def test_single_rank_trains_logs_and_checkpoints(corpus, reference_run):
    train = records(reference_run)
    assert [r["step"] for r in train] == list(range(1, STEPS + 1))
    assert losses(reference_run)[-3:].mean() < losses(reference_run)[:3].mean() - 0.5  # it learns
    # The first step's goldfish statistics, recomputed from its rows with the public API.
    data = PackedTokenDataset(str(corpus / "train"), 64)
    rows = list(itertools.islice(iter(ShardedSampler(len(data), micro_batch_size=2, accumulation_steps=2)), 4))
    labels = torch.stack([data[r] for r in rows])[:, 1:]
    dropped = goldfish_mask(labels, GoldfishConfig(k=4, h=13, exempt_ids=(1, 2, 3)))  # BOS, EOS, PAD exempt
    assert train[0]["drop_rate"] == dropped.sum().item() / labels.numel()
    assert train[0]["supervised_tokens"] == labels.numel() - dropped.sum().item()
    last = train[-1]
    assert last["loss_dropped_tokens"] > 0 and last["loss_all_tokens"] > 0
    assert last["input_tokens"] == STEPS * 4 * 64 and 0 < last["supervised_tokens"] < last["input_tokens"]
    val = records(reference_run, "val")
    assert [r["step"] for r in val] == [10, 20] and val[1]["val_loss"] < val[0]["val_loss"]
    checkpoints = reference_run / "checkpoints"
    assert (checkpoints / "latest").read_text() == f"step_{STEPS:08d}"
    assert sorted(p.name for p in checkpoints.glob("step_*")) == ["step_00000015", "step_00000020"]  # keep 2


def test_layouts_reproduce_the_single_rank_curve(corpus, reference_run, dp2_run, tmp_path):
    """ZeRO-3 with TP=2 x DP=1 (mpirun, activation checkpointing), TP=1 x DP=2 (deepspeed launcher), TP=2 x DP=2
    (mpirun -np 4). The validation loss (7 rows: at DP=2 split 4 + 3, the second rank padded) is the same too."""
    tp2 = tmp_path / "tp2"
    launch("mpirun", 2, train_args(corpus, tp2, ds_config(tmp_path / "tp2.json", 2, 2), "--tensor_parallel", "2",
                                   "--activation_checkpointing"))  # recomputation must not change the curve
    tp2dp2 = tmp_path / "tp2dp2"
    launch("mpirun", 4, train_args(corpus, tp2dp2, ds_config(tmp_path / "tp2dp2.json", 2, 1), "--tensor_parallel", "2"))
    reference = losses(reference_run)
    for run in (tp2, dp2_run, tp2dp2):
        np.testing.assert_allclose(losses(run), reference, rtol=0, atol=1e-4, err_msg=str(run))
        assert [r["drop_rate"] for r in records(run)] == [r["drop_rate"] for r in records(reference_run)]
        np.testing.assert_allclose([r["val_loss"] for r in records(run, "val")],
                                   [r["val_loss"] for r in records(reference_run, "val")], rtol=1e-5, err_msg=str(run))


@pytest.mark.parametrize("point, step", [("step", 7), ("checkpoint", 10)])
def test_kill_and_resume_is_exact(corpus, dp2_run, tmp_path, point, step):
    """SIGKILL rank 1 after step 7, or while it writes the step-10 checkpoint; resume (under torchrun);
    the loss curve equals the uninterrupted run's bit for bit and no complete checkpoint is lost."""
    out = tmp_path / "run"
    args = train_args(corpus, out, ds_config(tmp_path / "ds.json", 2, 1))
    crashed = launch("deepspeed", 2, args, expect_ok=False, env={"GOLDFISH_DS_CRASH": f"{point}:{step}:1"})
    assert crashed.returncode != 0
    checkpoints = out / "checkpoints"
    assert (checkpoints / "latest").read_text() == "step_00000005"
    if point == "checkpoint":
        assert (checkpoints / "step_00000010.partial").is_dir() and not (checkpoints / "step_00000010").exists()
    launch("torchrun", 2, args + ["--resume"])
    assert not list(checkpoints.glob("*.partial"))
    assert [r["step"] for r in records(out)] == list(range(1, STEPS + 1))
    assert losses(out).tolist() == losses(dp2_run).tolist()
    assert records(out, "val") == records(dp2_run, "val")


def test_resume_refuses_other_goldfish_settings(corpus, reference_run, tmp_path):
    out = tmp_path / "copy"
    shutil.copytree(reference_run, out)
    result = launch("python", 1, train_args(corpus, out, str(reference_run / "ds.json"), "--resume",
                                            "--goldfish_k", "3", "--max_steps", "25"), expect_ok=False)
    assert result.returncode != 0 and "goldfish settings" in result.stderr


def test_export_loads_in_transformers(corpus, reference_run, tmp_path):
    """--export_hf after a resume at the last step: HF transformers reads the model and tokenizer."""
    transformers = pytest.importorskip("transformers")
    out = tmp_path / "copy"
    shutil.copytree(reference_run, out)
    launch("python", 1, train_args(corpus, out, str(reference_run / "ds.json"), "--resume", "--export_hf"))
    model = transformers.AutoModelForCausalLM.from_pretrained(out / "hf", local_files_only=True)
    tok = load_tokenizer(str(out / "hf" / "tokenizer.model"))
    ids = torch.tensor([[tok.bos_id] + tok.encode("The with statement is used to wrap the execution")])
    with torch.no_grad():
        loss = model(ids, labels=ids).loss.item()
    assert loss < records(reference_run)[0]["loss"] - 0.5  # the trained weights, not the initialisation
    assert json.loads((out / "hf" / "generation_config.json").read_text()) == {"bos_token_id": tok.bos_id,
                                                                               "eos_token_id": tok.eos_id}
    # The export command reads a checkpoint back: step 20 gives the same tensors (here in 200 kB shards); step 15
    # others.
    for tag, shard_size in (("step_00000020", ["--max_shard_size", "200KB"]), ("step_00000015", [])):
        subprocess.run([sys.executable, str(REPO / "scripts" / "export_hf.py"), "--out_dir", str(out), "--tag", tag,
                        *shard_size], check=True, capture_output=True, timeout=600)
    assert (out / "hf" / "model.safetensors").is_file()  # the tiny model fits in one 5 GB file
    assert len(json.loads((out / "hf-step_00000020" / "model.safetensors.index.json").read_text())["weight_map"]) == \
        len(load_file(out / "hf" / "model.safetensors"))
    final, same, older = (read_hf_state_dict(str(out / d)) for d in ("hf", "hf-step_00000020", "hf-step_00000015"))
    assert final.keys() == same.keys() == older.keys()
    assert all(torch.equal(final[k], same[k]) for k in final)
    assert not torch.equal(final["model.norm.weight"], older["model.norm.weight"])
    transformers.AutoModelForCausalLM.from_pretrained(out / "hf-step_00000020", local_files_only=True)  # sharded
    # Continued pretraining from the export starts where the run ended, not from a fresh initialisation.
    cont = tmp_path / "continued"
    launch("python", 1, train_args(corpus, cont, str(reference_run / "ds.json"), "--init_from_hf", str(out / "hf"),
                                   "--max_steps", "1", "--eval_interval", "0"))
    assert losses(cont)[0] < records(reference_run)[0]["loss"] - 0.5


def test_host_memory_of_import_and_export_is_bounded(corpus, tmp_path):
    """A 137M-parameter model (548 MB in fp32) on 2 ZeRO-3 ranks: --init_from_hf from a sharded checkpoint, one step,
    export in 100 MB shards. No rank ever holds the whole model: importing, a rank's peak grows by at most its
    partition + the largest tensor; exporting, the writer's by one shard + one tensor, the other rank's by
    little. (Whole-model loading or gathering on every rank exceeds both.) Slack: allocator and interpreter noise."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=8192, hidden_size=2048, intermediate_size=5632, num_hidden_layers=2,
                                      num_attention_heads=16, num_key_value_heads=16, max_position_embeddings=64,
                                      tie_word_embeddings=False)
    hf = transformers.LlamaForCausalLM(config)
    numels = [p.numel() for p in hf.parameters()]
    hf.save_pretrained(tmp_path / "hf", max_shard_size="200MB")
    del hf
    out = tmp_path / "run"
    launch("torchrun", 2, train_args(corpus, out, ds_config(tmp_path / "ds.json", 1, 1), "--init_from_hf",
                                     str(tmp_path / "hf"), "--max_steps", "1", "--eval_interval", "0",
                                     "--seq_len", "16", "--export_hf", "--hf_max_shard_size", "100MB"))
    mib = 2**20
    model, largest, shard = 4 * sum(numels), 4 * max(numels), 100 * 10**6
    slack = 160 * mib
    peak = {(r["phase"], r["rank"]): (r["peak_rss_gib"] - r["start_rss_gib"]) * 2**30
            for r in map(json.loads, (out / "memory.jsonl").read_text().splitlines())}
    assert {phase for phase, _ in peak} == {"import", "engine", "train", "checkpoint", "export"}
    for rank in (0, 1):
        assert peak["import", rank] <= model / 2 + largest + slack < model, (rank, peak["import", rank] / mib)
    assert peak["export", 0] <= shard + largest + slack < model, peak["export", 0] / mib
    assert peak["export", 1] <= slack, peak["export", 1] / mib
    index = json.loads((out / "hf" / "model.safetensors.index.json").read_text())
    assert index["metadata"]["total_size"] == model and len(set(index["weight_map"].values())) >= 6


# ---- the default job: built-in corpus (478 training rows and 10 validation rows of 257 tokens) ---------------

def check_default_job(out: Path, rows_per_step: int) -> None:
    """Two steps of rows_per_step rows (micro x accumulation x ranks) trained, then validated at the last step."""
    train, val = records(out), records(out, "val")
    assert [r["step"] for r in train] == [1, 2] and train[-1]["input_tokens"] == 2 * rows_per_step * 256
    assert [r["step"] for r in val] == [2] and 0 < val[0]["val_loss"] < 20


def test_readme_quick_start_command_trains_validates_and_exports(tmp_path):
    """README's main-job command, as written, at 2 CPU ranks (--num_gpus 2): 10 validation rows, 16 per step."""
    readme = (REPO / "README.md").read_text()
    command = next(line for line in readme.splitlines() if line.startswith("deepspeed scripts/pretrain.py")).split()
    out = tmp_path / "run"
    port = free_port()
    command = [launcher("deepspeed"), "--num_gpus", "2", "--master_port", str(port), *command[1:],
               "--max_steps", "2", "--out_dir", str(out), "--no-progress"]
    result = subprocess.run(command, cwd=REPO, env=launch_env(2), capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    assert not list(Path("/dev/shm").glob(f"deepspeed_allreduce_buffer_*_{port}_*"))  # DeepSpeed's, unlinked
    check_default_job(out, rows_per_step=8 * 2)
    assert (out / "checkpoints" / "latest").read_text() == "step_00000002"
    assert {"config.json", "model.safetensors", "tokenizer.model"} <= {f.name for f in (out / "hf").iterdir()}


@pytest.mark.parametrize("kind, nproc, config, rows_per_step", [
    ("python", 1, None, 8),                        # the embedded default (zero3_cpu.json without a GPU)
    ("mpirun", 3, "zero3_cpu.json", 8 * 3),        # validation rows 4 + 3 + 3
    ("torchrun", 4, "zero3_gpu_bf16.json", 4 * 8 * 4),  # bf16 on CPU; a global batch of 128 rows
])
def test_default_job_runs_at_any_world_size(tmp_path, kind, nproc, config, rows_per_step):
    """With the deepspeed launcher at 2 ranks above: every launcher and 1-4 ranks, each shipped DeepSpeed config."""
    args = ["--out_dir", str(tmp_path / "run"), "--max_steps", "2", "--no-progress", "--no-export_hf"]
    launch(kind, nproc, args + (["--deepspeed_config", str(REPO / "configs" / "deepspeed" / config)] if config else []))
    check_default_job(tmp_path / "run", rows_per_step)


@pytest.mark.parametrize("name, world", [("tiny_cpu", 1), ("tinyllama-1.1b_8gpu", 8), ("llama-2-7b_2x8gpu", 16)])
def test_shipped_run_configs_are_consistent(name, world, monkeypatch):
    """configs/train/*.json parse, name existing model and DeepSpeed configs, and fit their world sizes."""
    from goldfish_ds.training import parse_args

    monkeypatch.chdir(REPO)
    args = parse_args(["--config", f"configs/train/{name}.json"])
    cfg = LlamaConfig.from_json(args.model_config)
    assert cfg.num_key_value_heads % args.tensor_parallel == 0 and world % args.tensor_parallel == 0
    ds = load_deepspeed_config(args.deepspeed_config, world // args.tensor_parallel, cfg)
    assert ds["train_batch_size"] % (world // args.tensor_parallel) == 0


def test_bf16_on_cpu_follows_the_fp32_curve(corpus, reference_run, tmp_path):
    """ZeRO-3 with bf16 enabled in the DeepSpeed config: bf16 weights and logits, fp32 loss; the curve stays within
    bf16 rounding of the fp32 run's over the first 6 steps (5 warmup steps + the peak: the same learning rates)."""
    out = tmp_path / "bf16"
    config = ds_config(tmp_path / "bf16.json", 2, 2, bf16={"enabled": True})
    launch("python", 1, train_args(corpus, out, config, "--max_steps", "6", "--eval_interval", "0"))
    np.testing.assert_allclose(losses(out), losses(reference_run)[:6], rtol=0.01)
    assert not np.allclose(losses(out), losses(reference_run)[:6], rtol=1e-6, atol=0)  # really ran in bf16
