"""The memorization experiment end to end: from scratch on real text (Python's bundled documentation), the
paper's result; from a pretrained HF checkpoint under torchrun; its refusals of bad settings."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import transformers

from goldfish_ds.cli.run_memorization_experiment import main
from goldfish_ds.data import builtin_documents, load_tokenizer, train_sentencepiece
from goldfish_ds.eval import evaluate_models, write_report
from goldfish_ds.eval.experiment import ExperimentConfig, run_experiment
from goldfish_ds.training.export import copy_tokenizer
from test_models_llama import hf_checkpoint

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "run_memorization_experiment.py"


def test_goldfish_prevents_verbatim_memorization(tmp_path):
    """16 documents x 100 epochs through the real pipeline: the standard-loss model reproduces >= 60% of the
    32-token suffixes exactly, the goldfish (k=4, h=13) model none, with a clearly lower RougeL."""
    out = tmp_path / "experiment"
    subprocess.run([sys.executable, str(SCRIPT), "--out", str(out), "--num_docs", "16", "--num_heldout", "8",
                    "--epochs", "100", "--seq_len", "128", "--suffix_len", "32", "--no-progress"],
                   check=True, timeout=1200, env=dict(os.environ, OMP_NUM_THREADS="2"))
    runs = json.loads((out / "report.json").read_text())["runs"]
    assert set(runs) == {"standard", "goldfish_k4_h13", "control"}
    standard, goldfish, control = runs["standard"], runs["goldfish_k4_h13"], runs["control"]
    assert all(r["num_documents"] == 16 for r in runs.values())
    assert standard["exact_match_rate"] >= 0.6
    assert goldfish["exact_match_rate"] == 0.0
    assert goldfish["rougeL_mean"] < standard["rougeL_mean"] - 0.2
    assert control["exact_match_rate"] == 0.0 and control["rougeL_mean"] < goldfish["rougeL_mean"]
    # members are recognisable after 100 epochs: the loss attack separates them from held-out documents
    assert standard["mia"]["loss"]["auc"] > 0.9
    # the untrained control cannot tell members from held-out documents of the same length
    assert all(0.2 < control["mia"][attack]["auc"] < 0.8 for attack in ("loss", "zlib", "min_k"))
    assert (out / "summary.md").is_file() and (out / "runs" / "standard" / "checkpoints" / "latest").is_file()


# ---- from a pretrained HF checkpoint, under a real launcher ---------------------------------------------

def hf_start(directory: Path, tokenizer: bool = True) -> Path:
    """A small random LlamaForCausalLM written by the installed transformers, with our sentencepiece tokenizer
    (trained on the built-in corpus) saved beside it as an HF LlamaTokenizer."""
    hf_checkpoint(directory, tied=True, vocab=512, max_position_embeddings=256)
    if tokenizer:
        model = train_sentencepiece(builtin_documents(), str(directory.parent / "start_tokenizer"), vocab_size=512)
        copy_tokenizer(Path(model), directory)
    return directory


def packed_rows(texts: list, tok, seq_len: int) -> torch.Tensor:
    """Rows of seq_len + 1 ids of the documents concatenated (BOS + text + EOS each), overlapping by one."""
    ids = [i for t in texts for i in [tok.bos_id, *tok.encode(t), tok.eos_id]]
    return torch.tensor([ids[s:s + seq_len + 1] for s in range(0, len(ids) - seq_len, seq_len)])


@pytest.fixture(scope="module")
def pretrained_experiment(tmp_path_factory):
    """8 documents x 3 epochs from a pretrained checkpoint, standard + goldfish (k=4, h=13), 2 ranks under
    torchrun, 3-beam extraction too."""
    root = tmp_path_factory.mktemp("pretrained")
    start = hf_start(root / "start")
    cfg = ExperimentConfig(out=str(root / "exp"), num_docs=8, num_heldout=4, epochs=3, seq_len=64, suffix_len=16,
                           micro_batch=2, init_from_hf=str(start), launcher="torchrun", nproc_per_node=2,
                           num_beams=3, lr=1e-3, warmup_steps=2, progress=False)
    env = dict(os.environ, OMP_NUM_THREADS="1")
    with pytest.MonkeyPatch.context() as mp:
        for key, value in env.items():
            mp.setenv(key, value)
        report = run_experiment(cfg)
    return cfg, start, report


def test_pretrained_start_is_every_run_and_the_control(pretrained_experiment):
    """Every run starts from the checkpoint with its tokenizer (none trained), 2 ranks, 3 epochs of 2 steps; the
    control is the checkpoint itself: its report equals an evaluation of it done directly."""
    cfg, start, report = pretrained_experiment
    out, runs = Path(cfg.out), report["runs"]
    assert list(runs) == ["standard", "goldfish_k4_h13", "control"]
    assert not (out / "tokenizer.model").exists()
    for name in ("standard", "goldfish_k4_h13"):
        job = json.loads((out / "runs" / name / "args.json").read_text())
        assert job["init_from_hf"] == str(start) and job["tokenizer"] == str(start / "tokenizer.model")
        assert (out / "runs" / name / "hf" / "tokenizer.model").read_bytes() == (start / "tokenizer.model").read_bytes()
        steps = [json.loads(line) for line in (out / "runs" / name / "metrics.jsonl").read_text().splitlines()]
        assert [r["step"] for r in steps if r["kind"] == "train"] == list(range(1, 7))  # 3 epochs x 8 docs / (2 x 2)
        assert "torchrun" in (out / f"train_{name}.log").read_text().splitlines()[0]
    assert runs["goldfish_k4_h13"]["goldfish"] == {"k": 4, "h": 13} and runs["standard"]["goldfish"] is None
    assert runs["control"]["model_dir"] == str(start)

    direct = evaluate_models({"control": start}, out / "data" / "train" / "canary.jsonl",
                             nonmembers=out / "heldout.jsonl", n=16, num_beams=3, max_length=65, progress=False)
    control, expected = runs["control"], direct["runs"]["control"]
    assert control["num_documents"] == expected["num_documents"] == 8
    for key in ("exact_match_rate", "rougeL_mean", "token_match_mean", "longest_run_mean"):
        assert control[key] == expected[key]
        assert control["beam"][key] == expected["beam"][key]
    assert [d["generated"] for d in control["documents"]] == [d["generated"] for d in expected["documents"]]
    assert control["mia"]["loss"]["auc"] == expected["mia"]["loss"]["auc"]


def test_validation_loss_is_the_jobs_and_an_independent_one(pretrained_experiment):
    """val_loss: the pretraining job's own validation loss of the run's last step (our Llama, ZeRO-3, 2 ranks),
    and for the control the loss of transformers' model on the held-out documents packed by hand."""
    cfg, start, report = pretrained_experiment
    runs = report["runs"]
    for name in ("standard", "goldfish_k4_h13"):
        assert runs[name]["val_loss"] == pytest.approx(runs[name]["job_val_loss"], rel=1e-5)
    texts = [json.loads(line)["text"] for line in (Path(cfg.out) / "heldout.jsonl").read_text().splitlines()]
    rows = packed_rows(texts, load_tokenizer(str(start / "tokenizer.model")), cfg.seq_len)
    with torch.no_grad():
        logits = transformers.LlamaForCausalLM.from_pretrained(start).eval()(rows[:, :-1]).logits
    expected = torch.nn.functional.cross_entropy(logits.flatten(0, 1).double(), rows[:, 1:].flatten())
    assert runs["control"]["val_loss"] == pytest.approx(expected.item(), rel=1e-5)
    assert runs["standard"]["val_loss"] != pytest.approx(runs["control"]["val_loss"], rel=1e-3)  # it trained


def test_report_plots_memorization_against_k(pretrained_experiment):
    cfg, _, report = pretrained_experiment
    out = Path(cfg.out)
    summary = (out / "summary.md").read_text()
    assert "memorization_vs_k.png" in summary and "beam exact match" in summary
    assert (out / "memorization_vs_k.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert json.loads((out / "report.json").read_text())["runs"].keys() == report["runs"].keys()


def test_report_without_matplotlib_says_so(pretrained_experiment, tmp_path, monkeypatch):
    """With matplotlib missing the report still has its JSON and table, and summary.md says why there is no plot."""
    cfg, _, report = pretrained_experiment
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # `import matplotlib` raises ImportError
    assert [p.name for p in write_report(report, tmp_path)] == ["results.json", "summary.md"]
    assert "No plots: matplotlib is not installed" in (tmp_path / "summary.md").read_text()


# ---- refusals ----------------------------------------------------------------------------------------------

def gpt2_directory(directory: Path) -> Path:
    directory.mkdir()
    (directory / "config.json").write_text(json.dumps({"model_type": "gpt2", "vocab_size": 512, "n_embd": 64}))
    return directory


BAD_CONFIGS = [  # (ExperimentConfig fields, with "START" for an HF Llama directory; exception; message part)
    ({"launcher": "slurm"}, ValueError, "launcher must be one of ['none', 'deepspeed', 'torchrun', 'mpirun']"),
    ({"nproc_per_node": 2}, ValueError, "launcher 'none' runs one process; nproc_per_node 2 needs launcher"),
    ({"launcher": "mpirun", "nproc_per_node": 4, "tensor_parallel": 3}, ValueError,
     "tensor_parallel (3) must divide nproc_per_node (4)"),
    ({"launcher": "mpirun", "nproc_per_node": 4, "tensor_parallel": 4}, ValueError,
     "tensor_parallel (4) must divide the model's num_key_value_heads (2"),
    ({"launcher": "torchrun", "nproc_per_node": 4, "num_docs": 8, "micro_batch": 4}, ValueError,
     "num_docs (8) must be a multiple of the global batch (16"),
    ({"tensor_parallel": 0}, ValueError, "tensor_parallel must be >= 1, got 0"),
    ({"num_beams": 1}, ValueError, "num_beams (--beams) must be >= 2"),
    ({"seq_len": 512, "init_from_hf": "START"}, ValueError,
     "seq_len (512) exceeds the model's max_position_embeddings (256"),
    ({"init_from_hf": "START", "model_config": "tiny.json"}, ValueError, "model_config and init_from_hf exclude"),
    ({"init_from_hf": "NOTOKENIZER"}, FileNotFoundError, "has no tokenizer (tokenizer.model or tokenizer.json): "
                                                         "give its tokenizer with --tokenizer"),
    ({"init_from_hf": "GPT2"}, ValueError, "is not an HF Llama checkpoint: model config"),
    ({"init_from_hf": "MISSING"}, FileNotFoundError, "is not a directory"),
    ({"pretrain_args": ["--max_steps", "5"]}, ValueError, "--pretrain_args: --max_steps set by the experiment"),
    ({"pretrain_args": ["--no-export_hf", "--lr=1"]}, ValueError, "--lr, --export_hf set by the experiment"),
    ({"pretrain_args": ["--bogus", "1"]}, ValueError, "the pretraining job has no option --bogus 1"),
    ({"pretrain_args": ["--goldfish_window", "after"]}, ValueError, "refused by the pretraining job's parser"),
    ({"deepspeed_config": "nowhere.json"}, FileNotFoundError, "--deepspeed_config 'nowhere.json' does not exist"),
]


@pytest.fixture(scope="module")
def starts(tmp_path_factory):
    root = tmp_path_factory.mktemp("starts")
    return {"START": str(hf_start(root / "start")), "NOTOKENIZER": str(hf_start(root / "bare", tokenizer=False)),
            "GPT2": str(gpt2_directory(root / "gpt2")), "MISSING": str(root / "missing")}


@pytest.mark.parametrize("fields, error, message", BAD_CONFIGS, ids=[str(f) for f, _, _ in BAD_CONFIGS])
def test_bad_experiment_configs_are_refused_by_name(starts, tmp_path, fields, error, message):
    fields = {k: starts.get(v, v) if isinstance(v, str) else v for k, v in fields.items()}
    with pytest.raises(error) as refused:
        ExperimentConfig(out=str(tmp_path), **fields)
    assert message in str(refused.value)
    assert not any(tmp_path.iterdir())  # refused before anything was written


def test_cli_refusal_is_an_argparse_error(starts, tmp_path, capsys):
    with pytest.raises(SystemExit) as exited:
        main(["--out", str(tmp_path), "--init_from_hf", starts["NOTOKENIZER"]])
    assert exited.value.code == 2
    assert "error: --init_from_hf" in capsys.readouterr().err
