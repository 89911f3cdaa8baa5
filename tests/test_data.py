"""Document sources, packed token shards with canary rows, the dataset that reads them, the sampler, the tokenizers."""
import itertools
import json
import runpy
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import wiki_texts

from goldfish_ds.data import (
    PADDING,
    CanarySet,
    PackedTokenDataset,
    ShardedSampler,
    builtin_documents,
    load_tokenizer,
    read_documents,
    sources,
    train_sentencepiece,
    write_packed_shards,
)

SCRIPTS = Path(__file__).resolve().parents[1] / "scripts"


def documents(n, vocab, seed=0):
    g = np.random.default_rng(seed)
    return [g.integers(0, vocab, size=int(g.integers(5, 400))).tolist() for _ in range(n)]


@pytest.mark.parametrize("vocab, dtype", [(32000, "uint16"), (128256, "uint32")])
def test_round_trip_rows_are_the_concatenated_documents(tmp_path, vocab, dtype):
    docs = documents(60, vocab)
    manifest = write_packed_shards(docs, str(tmp_path), vocab, shard_tokens=3000)
    assert manifest["dtype"] == dtype and len(manifest["shards"]) > 1
    assert manifest["num_tokens"] == sum(map(len, docs)) and manifest["num_docs"] == 60
    data = PackedTokenDataset(str(tmp_path), seq_len=64, verify=True)
    # rows follow each shard's concatenated documents, seq_len + 1 tokens at multiples of seq_len
    first_shard = np.fromfile(tmp_path / manifest["shards"][0]["tokens"], dtype=dtype).astype(np.int64)
    for row in range(3):
        assert data[row].tolist() == first_shard[row * 64: row * 64 + 65].tolist()
    assert all(len(data[i]) == 65 for i in range(len(data)))
    starts = np.load(tmp_path / manifest["shards"][0]["docs"])
    assert starts[0] == 0 and first_shard[starts[1]:starts[1] + 5].tolist() == docs[1][:5]


def test_sampler_splits_epochs_across_ranks_and_resumes_exactly():
    rows = {rank: list(itertools.islice(iter(ShardedSampler(103, rank, 4, seed=5)), 25)) for rank in range(4)}
    assert all(len(set(r)) == 25 for r in rows.values())
    assert not set(rows[0]) & set(rows[1]) and not set(rows[2]) & set(rows[3])
    assert set().union(*rows.values()) <= set(range(103))
    sampler = ShardedSampler(103, 1, 4, seed=5)
    it = iter(sampler)
    taken = [next(it) for _ in range(40)]  # crosses an epoch (25 rows per rank per epoch)
    resumed = ShardedSampler(103, 1, 4, seed=5)
    resumed.load_state_dict(ShardedSampler(103, 1, 4, seed=5, epoch=sampler.epoch, position=sampler.position).state_dict())
    fresh = list(itertools.islice(iter(ShardedSampler(103, 1, 4, seed=5)), 60))
    assert taken == fresh[:40]
    assert list(itertools.islice(iter(resumed), 20)) == fresh[40:60]


def test_trained_sentencepiece_tokenizer_round_trips_real_text(tmp_path):
    texts = wiki_texts()[:40]
    model = train_sentencepiece(texts, str(tmp_path / "sp"), vocab_size=2000)
    tok = load_tokenizer(model)
    assert tok.vocab_size == 2000 and (tok.bos_id, tok.eos_id, tok.pad_id) == (1, 2, 3)
    text = " ".join(texts[0][:500].split())  # sentencepiece's normaliser folds runs of whitespace
    ids = tok.encode(text)
    assert max(ids) < 2000
    assert tok.decode(ids) == text


def test_scripts_train_a_tokenizer_and_pack_a_corpus(tmp_path):
    corpus = tmp_path / "corpus.jsonl"
    texts = wiki_texts()[:30]
    corpus.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    trained = run_script("train_tokenizer.py", "--input", corpus, "--out", tmp_path / "sp", "--vocab_size", 1000)
    assert trained.returncode == 0, trained.stderr
    out = run_script("prepare_data.py", "--input", corpus, "--tokenizer", tmp_path / "sp.model", "--out",
                     tmp_path / "data")
    assert out.returncode == 0, out.stderr
    assert "wrote 30 documents" in out.stdout
    tok = load_tokenizer(str(tmp_path / "sp.model"))
    data = PackedTokenDataset(str(tmp_path / "data"), seq_len=128, verify=True)
    assert data[0][:1].tolist() == [tok.bos_id]
    assert data[0][1:21].tolist() == tok.encode(texts[0])[:20]
    bad = run_script("prepare_data.py", "--input", tmp_path / "x.csv", "--tokenizer", tmp_path / "sp.model", "--out",
                     tmp_path / "d2")
    assert bad.returncode != 0 and "does not exist" in bad.stderr


def run_script(name, *args):
    return subprocess.run([sys.executable, str(SCRIPTS / name), *map(str, args)], check=False, capture_output=True,
                          text=True)


def write_jsonl(path, texts, field="text"):
    path.write_text("".join(json.dumps({field: t, "id": i}) + "\n" for i, t in enumerate(texts)), encoding="utf-8")
    return str(path)


def write_parquet(path, texts, field="text"):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"id": list(range(len(texts))), field: texts}), path, row_group_size=7)
    return str(path)


def test_builtin_documents_are_the_python_help_topics_in_name_order():
    from pydoc_data.topics import topics

    docs = builtin_documents()
    assert len(docs) == 79 and all(isinstance(d, str) and d.strip() for d in docs)
    assert docs[0] == topics["assert"] and docs == [topics[name] for name in sorted(topics)]


def test_parquet_and_hf_datasets_give_the_same_documents_as_jsonl(tmp_path, monkeypatch):
    import datasets

    monkeypatch.setattr(sources, "_BATCH_ROWS", 4)  # several record batches per file
    texts = builtin_documents()[:24]
    texts.insert(5, "")  # empty documents are skipped by every reader
    expected = [t for t in texts if t]
    jsonl = write_jsonl(tmp_path / "a.jsonl", texts)
    parquet = write_parquet(tmp_path / "a.parquet", texts)
    datasets.Dataset.from_dict({"text": texts, "id": list(range(len(texts)))}).save_to_disk(str(tmp_path / "ds"))
    splits = {"train": datasets.Dataset.from_dict({"text": texts}),
              "test": datasets.Dataset.from_dict({"text": ["held out"]})}
    datasets.DatasetDict(splits).save_to_disk(str(tmp_path / "dd"))
    assert list(read_documents([jsonl])) == expected
    assert list(read_documents([parquet])) == expected
    assert list(read_documents([str(tmp_path / "ds")])) == expected
    assert list(read_documents([f"{tmp_path / 'dd'}:train"])) == expected
    assert list(read_documents([parquet, f"{tmp_path / 'dd'}:test", jsonl])) == expected + ["held out"] + expected
    body = write_parquet(tmp_path / "body.parquet", texts, field="body")
    assert list(read_documents([body], text_field="body")) == expected


def padded(ids, width):
    return ids[:width] + [PADDING] * (width - len(ids[:width]))


def test_canary_rows_follow_the_packed_rows_once_per_repeat(tmp_path):
    seq_len, repeats = 16, 3
    background = documents(30, 1000)
    canary_docs = [list(range(1, 6)), list(range(100, 117)), list(range(200, 240)), [7]]  # 5, 17 (= fits), 40, 1
    texts = ["five", "seventeen", "forty", "one"]
    manifest = write_packed_shards(background, str(tmp_path), 1000, shard_tokens=2000,
                                   canary=CanarySet(texts, canary_docs, seq_len, repeats))
    assert {k: manifest["canary"][k] for k in ("seq_len", "num_docs", "repeats", "num_truncated")} == \
        {"seq_len": 16, "num_docs": 4, "repeats": 3, "num_truncated": 1}
    assert (tmp_path / "canary_rows.bin").stat().st_size == 4 * 17 * 4  # stored once, int32
    assert [json.loads(line) for line in (tmp_path / "canary.jsonl").read_text().splitlines()] == \
        [{"text": t, "ids": d[:17]} for t, d in zip(texts, canary_docs)]

    data = PackedTokenDataset(str(tmp_path), seq_len, verify=True)
    packed_rows = sum((s["num_tokens"] - 1) // seq_len for s in manifest["shards"])
    assert data.num_packed_rows == packed_rows and len(data) == packed_rows + 4 * repeats
    first_shard = np.fromfile(tmp_path / manifest["shards"][0]["tokens"], dtype="uint16").astype(np.int64)
    assert data[0].tolist() == first_shard[:17].tolist()
    for repeat in range(repeats):
        for i, doc in enumerate(canary_docs):
            row = data[packed_rows + repeat * 4 + i]
            assert row.dtype == torch.int64
            assert row.tolist() == padded(doc, 17)
    assert data[packed_rows + 3].tolist() == [7] + [-1] * 16
    with pytest.raises(IndexError):
        data[len(data)]


def test_canary_only_directory(tmp_path):
    canary_docs = [[1, 5, 9, 2], list(range(3, 30))]
    manifest = write_packed_shards([], str(tmp_path), 32000, canary=CanarySet(["a", "b"], canary_docs, 8, repeats=5))
    assert manifest["shards"] == [] and manifest["num_docs"] == 0 and manifest["canary"]["num_truncated"] == 1
    data = PackedTokenDataset(str(tmp_path), 8, verify=True)
    assert data.num_packed_rows == 0 and len(data) == 10
    assert [data[i].tolist() for i in range(4)] == [padded(canary_docs[0], 9), canary_docs[1][:9]] * 2
    assert sorted(itertools.islice(iter(ShardedSampler(len(data))), 10)) == list(range(10))


def test_prepare_data_cli_mixes_repeated_canaries_into_a_parquet_corpus(tmp_path):
    docs = builtin_documents()
    background, canaries = docs[:60], docs[60:]
    parquet = write_parquet(tmp_path / "background.parquet", background, field="body")
    canary_file = write_jsonl(tmp_path / "canary.jsonl", canaries, field="body")
    trained = run_script("train_tokenizer.py", "--input", parquet, "--text_field", "body", "--out", tmp_path / "sp",
                         "--vocab_size", 1000)
    assert trained.returncode == 0, trained.stderr
    tok = load_tokenizer(str(tmp_path / "sp.model"))

    out = run_script("prepare_data.py", "--input", parquet, "--tokenizer", tmp_path / "sp.model", "--out",
                     tmp_path / "data", "--canary", canary_file, "--text_field", "body", "--num_canary", 3,
                     "--canary_repeats", 4, "--seq_len", 32, "--shard_tokens", 20000)
    assert out.returncode == 0, out.stderr
    assert "wrote 60 documents" in out.stdout and "wrote 3 canary documents" in out.stdout
    assert "repeated 4 times" in out.stdout
    encoded = [tok.encode_document(t) for t in canaries[:3]]
    assert all(len(ids) > 33 for ids in encoded)  # the help topics are long: all truncated
    assert [json.loads(line) for line in (tmp_path / "data" / "canary.jsonl").read_text().splitlines()] == \
        [{"text": t, "ids": ids[:33]} for t, ids in zip(canaries[:3], encoded)]
    data = PackedTokenDataset(str(tmp_path / "data"), 32, verify=True)
    manifest = data.manifest
    assert manifest["num_docs"] == 60 and len(manifest["shards"]) > 1
    assert manifest["num_tokens"] == sum(len(tok.encode_document(t)) for t in background)
    assert {k: manifest["canary"][k] for k in ("seq_len", "num_docs", "repeats", "num_truncated")} == \
        {"seq_len": 32, "num_docs": 3, "repeats": 4, "num_truncated": 3}
    assert len(data) == data.num_packed_rows + 12
    assert [data[data.num_packed_rows + i].tolist() for i in range(12)] == [ids[:33] for ids in encoded] * 4
    assert data[0][:20].tolist() == tok.encode_document(background[0])[:20]

    short = write_jsonl(tmp_path / "short.jsonl", ["a tiny canary", "another one"])
    out = run_script("prepare_data.py", "--tokenizer", tmp_path / "sp.model", "--out", tmp_path / "only",
                     "--canary", short, "--seq_len", 64, "--canary_repeats", 2)
    assert out.returncode == 0, out.stderr
    only = PackedTokenDataset(str(tmp_path / "only"), 64)
    assert len(only) == 4 and only.manifest["canary"]["num_truncated"] == 0
    assert only[3].tolist() == padded(tok.encode_document("another one"), 65)


def test_prepare_data_cli_argument_errors(tmp_path, monkeypatch, capsys):
    short = write_jsonl(tmp_path / "short.jsonl", ["a tiny canary", "another one"])
    for args, message in [((), "give --input, --canary, or both"),
                          (("--canary", short), "--canary needs --seq_len"),
                          (("--canary", short, "--seq_len", 8, "--num_canary", 3),
                           "--num_canary 3, but the canary inputs hold 2 documents"),
                          (("--input", short, "--seq_len", 8), "apply only with --canary")]:
        monkeypatch.setattr(sys, "argv", ["prepare_data.py", "--tokenizer", str(tmp_path / "none.model"), "--out",
                                          str(tmp_path / "bad"), *map(str, args)])
        with pytest.raises(SystemExit) as exit_:  # in-process: argparse errors exit with status 2
            runpy.run_path(str(SCRIPTS / "prepare_data.py"), run_name="__main__")
        assert exit_.value.code == 2 and message in capsys.readouterr().err
    assert not (tmp_path / "bad").exists()


def test_sampler_micro_batches_do_not_depend_on_the_dp_accumulation_split():
    """Slot a x dp + d of each global batch: 1 rank x 4 accumulation steps, 2 x 2 and 4 x 1 see the same
    micro-batches, so the layouts train identically."""
    def micro_batches(dp, accumulation, steps=6):
        out = []
        for rank in range(dp):
            rows = iter(ShardedSampler(50, rank, dp, seed=3, micro_batch_size=3, accumulation_steps=accumulation))
            out.append([[next(rows) for _ in range(3)] for _ in range(steps * accumulation)])
        # order them as (step, slot): slot = a * dp + rank
        return [out[rank][step * accumulation + a] for step in range(steps) for a in range(accumulation)
                for rank in range(dp)]

    single = micro_batches(1, 4)
    assert micro_batches(2, 2) == single and micro_batches(4, 1) == single
    assert len({r for batch in single[:16] for r in batch}) == 48  # 4 global batches of 12 distinct rows in epoch 0
