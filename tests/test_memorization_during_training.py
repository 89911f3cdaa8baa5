"""--memorization_eval_interval: the extraction attack run inside a ZeRO-3 + tensor-parallel job, checked against
goldfish_ds.eval (HF transformers' generate) on the job's own HF export, and invisible to the training."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
from test_training import ds_config, launch, records, train_args

from goldfish_ds.data import CanarySet, builtin_documents, load_tokenizer, train_sentencepiece, write_packed_shards
from goldfish_ds.eval import extract, load_model, make_documents, read_records, summarize_extraction
from goldfish_ds.training.arguments import parse_args
from goldfish_ds.training.memorization import memorization_canaries

REPO = Path(__file__).resolve().parents[1]
SEQ_LEN, SUFFIX, STEPS, INTERVAL = 32, 12, 30, 15
TRAIN_ONLY = ("tokens_per_s", "step_time_s", "tflops_per_s", "mfu")  # wall-clock numbers of a train record


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    """5 canaries (Python's help topics, 3 of them cut short: 13 to 33 tokens, one per 33-token row) repeated 20
    times beside 1 short background topic."""
    root = tmp_path_factory.mktemp("memorization_corpus")
    docs = builtin_documents()
    tok = load_tokenizer(train_sentencepiece(docs, str(root / "tok"), vocab_size=2048))
    canaries = [docs[0], docs[1][:90], docs[3], docs[4][:120], docs[6][:70]]
    write_packed_shards((tok.encode_document(t) for t in docs[8:9]), str(root / "train"), tok.vocab_size,
                        canary=CanarySet(canaries, [tok.encode_document(t) for t in canaries], SEQ_LEN, repeats=20))
    write_packed_shards((tok.encode_document(t) for t in docs[20:23]), str(root / "val"), tok.vocab_size)
    model = json.loads((REPO / "configs" / "models" / "tiny.json").read_text())
    (root / "model.json").write_text(json.dumps({**model, "vocab_size": 2048}))
    return root


def job_args(corpus: Path, out: Path, *extra: str) -> list:
    """TP=2 x DP=2 (4 ranks), micro-batch 2 x 2 accumulation steps, lr 3e-3; the HF export at the end unless
    `extra` says --no-export_hf."""
    args = train_args(corpus, out, ds_config(out.parent / f"{out.name}_ds.json", 2, 2), "--tensor_parallel", "2",
                      "--seq_len", str(SEQ_LEN), "--max_steps", str(STEPS), "--save_interval", "100", "--lr", "3e-3",
                      "--min_lr", "3e-4")
    return [a for a in args if a != "--no-export_hf"] + list(extra)


@pytest.fixture(scope="module")
def runs(corpus, tmp_path_factory) -> tuple[Path, Path]:
    """The same job with the evaluation every 15 steps and without it (torchrun, 4 ranks each)."""
    root = tmp_path_factory.mktemp("memorization_runs")
    evaluated, plain = root / "evaluated", root / "plain"
    launch("torchrun", 4, job_args(corpus, evaluated, "--memorization_eval_interval", str(INTERVAL),
                                   "--memorization_suffix_len", str(SUFFIX)))
    launch("torchrun", 4, job_args(corpus, plain, "--no-export_hf"))
    return evaluated, plain


def test_records_equal_the_evaluation_of_the_hf_export(corpus, runs):
    """The step-30 record, document by document, equals goldfish_ds.eval's greedy extraction (HF generate, KV
    cache, left padding) on the job's HF export of step 30. The 5 canaries (prompts of 21, 21, 11, 9 and 1 tokens)
    go to the 2 data-parallel ranks as 3 + 2, decoded right-padded in batches of 2 that mix prompt lengths, the
    second rank decoding a filler row in its second batch, and across the vocabulary slices of 2 TP ranks. The
    model starts memorizing: more suffix tokens reproduced at step 30 than at step 15, and a whole suffix."""
    evaluated, _ = runs
    memorization = records(evaluated, "memorization")
    assert [r["step"] for r in memorization] == [15, 30]
    assert all(r["num_docs"] == 5 and r["suffix_len"] == SUFFIX for r in memorization)
    trained = read_records(str(corpus / "train" / "canary.jsonl"))
    assert sorted(len(r["ids"]) - SUFFIX for r in trained) == [1, 9, 11, 21, 21]
    per_doc = [json.loads(line) for line in (evaluated / memorization[-1]["results"]).read_text().splitlines()]
    tokenizer = load_tokenizer(str(evaluated / "hf" / "tokenizer.model"))
    documents = make_documents(trained, tokenizer)
    reference = extract(load_model(evaluated / "hf"), documents, n=SUFFIX, batch_size=3, tokenizer=tokenizer)
    assert per_doc == [r.to_dict() for r in reference]
    summary = summarize_extraction(reference)
    assert {key: memorization[-1][key] for key in summary} == summary
    assert memorization[-1]["token_match_mean"] > memorization[0]["token_match_mean"] > 0
    assert memorization[-1]["exact_match_rate"] > 0


def test_tensorboard_has_the_memorization_scalars(runs):
    event_accumulator = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")
    evaluated, _ = runs
    events = event_accumulator.EventAccumulator(str(evaluated / "tensorboard"))
    events.Reload()
    for key in ("exact_match_rate", "token_match_mean", "rougeL_mean", "longest_run_mean", "num_docs"):
        scalars = events.Scalars(f"memorization/{key}")
        expected = records(evaluated, "memorization")
        assert [s.step for s in scalars] == [r["step"] for r in expected]
        assert [s.value for s in scalars] == pytest.approx([r[key] for r in expected], rel=1e-6)


def test_the_evaluation_leaves_training_unchanged(runs):
    """Losses, gradient norms and token counts bit-identical with and without the evaluations."""
    evaluated, plain = runs
    strip = lambda run: [{k: v for k, v in r.items() if k not in TRAIN_ONLY} for r in records(run)]  # noqa: E731
    assert strip(evaluated) == strip(plain) and len(strip(plain)) == STEPS
    assert records(evaluated, "val") == records(plain, "val")


def test_canaries_default_to_the_training_data(corpus):
    tokenizer = load_tokenizer(str(corpus / "tok.model"))
    canaries = memorization_canaries(None, str(corpus / "train"), SUFFIX, tokenizer)
    trained = read_records(str(corpus / "train" / "canary.jsonl"))
    assert [c.prompt + c.truth for c in canaries] == [r["ids"] for r in trained]
    assert all(len(c.truth) == SUFFIX for c in canaries)


def test_text_documents_are_tokenized_and_short_ones_left_out(corpus, tmp_path):
    tokenizer = load_tokenizer(str(corpus / "tok.model"))
    texts = tmp_path / "texts.jsonl"
    texts.write_text(json.dumps({"text": "tiny"}) + "\n" + json.dumps({"text": builtin_documents()[30]}) + "\n")
    canaries = memorization_canaries(str(texts), str(corpus / "val"), SUFFIX, tokenizer)
    assert [c.index for c in canaries] == [1]
    assert canaries[0].prompt + canaries[0].truth == [tokenizer.bos_id] + tokenizer.encode(builtin_documents()[30])


@pytest.mark.parametrize("argv, message", [
    (["--memorization_eval_interval", "-1"], "--memorization_eval_interval must be >= 0"),
    (["--memorization_eval_interval", "5", "--memorization_suffix_len", "0"], "--memorization_suffix_len must be >= 1"),
    (["--memorization_data", "x.jsonl"], "--memorization_data is read only by the evaluation of "
                                         "--memorization_eval_interval"),
])
def test_bad_options_are_refused_by_name(argv, message):
    with pytest.raises(ValueError, match=message):
        parse_args(argv)


def test_nothing_to_evaluate_is_refused_naming_both_options(corpus, tmp_path):
    tokenizer = load_tokenizer(str(corpus / "tok.model"))
    with pytest.raises(ValueError, match=r"--memorization_eval_interval needs documents.*--memorization_data"):
        memorization_canaries(None, str(corpus / "val"), SUFFIX, tokenizer)  # packed data without canaries
    with pytest.raises(ValueError, match=r"--memorization_data .* more than --memorization_suffix_len 5000 tokens"):
        memorization_canaries(None, str(corpus / "train"), 5000, tokenizer)
    texts = tmp_path / "texts.jsonl"
    texts.write_text(json.dumps({"text": "no ids"}) + "\n")
    with pytest.raises(ValueError, match=r"--memorization_data .*texts.jsonl: document 0 has no 'ids'"):
        memorization_canaries(str(texts), str(corpus / "train"), SUFFIX, None)
    with pytest.raises(FileNotFoundError, match=r"--memorization_data .*missing.jsonl: no such file"):
        memorization_canaries(str(tmp_path / "missing.jsonl"), str(corpus / "train"), SUFFIX, tokenizer)
