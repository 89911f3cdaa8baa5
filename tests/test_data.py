"""Packed token shards, the dataset that reads them, the sampler, and the tokenizers."""
import itertools

import numpy as np
import pytest

from conftest import wiki_texts
from goldfish_ds.data import PackedTokenDataset, ShardedSampler, load_tokenizer, train_sentencepiece, write_packed_shards


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


def test_missing_and_corrupt_shards_are_clear_errors(tmp_path):
    manifest = write_packed_shards(documents(20, 1000), str(tmp_path), 1000, shard_tokens=1000)
    shard = tmp_path / manifest["shards"][1]["tokens"]
    data = shard.read_bytes()
    shard.write_bytes(data[:-2])
    with pytest.raises(ValueError, match="is corrupt"):
        PackedTokenDataset(str(tmp_path), 32)
    shard.write_bytes(bytes([data[0] ^ 1]) + data[1:])
    PackedTokenDataset(str(tmp_path), 32)  # same size: only the checksum can tell
    with pytest.raises(ValueError, match="sha256 differs"):
        PackedTokenDataset(str(tmp_path), 32, verify=True)
    shard.unlink()
    with pytest.raises(FileNotFoundError, match="is missing"):
        PackedTokenDataset(str(tmp_path), 32)
    with pytest.raises(FileNotFoundError, match="no manifest.json"):
        PackedTokenDataset(str(tmp_path / "nothing"), 32)
    with pytest.raises(ValueError, match=r"token ids must be in \[0, 10\)"):
        write_packed_shards([[1, 2, 10]], str(tmp_path / "bad"), 10)


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
    with pytest.raises(ValueError, match="seed"):
        resumed.load_state_dict({"epoch": 0, "position": 0, "seed": 6})
    with pytest.raises(ValueError, match="dp_rank must be in"):
        ShardedSampler(10, 4, 4)


def test_trained_sentencepiece_tokenizer_round_trips_real_text(tmp_path):
    texts = wiki_texts()[:40]
    model = train_sentencepiece(texts, str(tmp_path / "sp"), vocab_size=2000)
    tok = load_tokenizer(model)
    assert tok.vocab_size == 2000 and (tok.bos_id, tok.eos_id, tok.pad_id) == (1, 2, 3)
    text = " ".join(texts[0][:500].split())  # sentencepiece's normaliser folds runs of whitespace
    ids = tok.encode(text)
    assert max(ids) < 2000
    assert tok.decode(ids) == text


def test_bad_tokenizer_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="expected a sentencepiece .model file"):
        load_tokenizer(str(tmp_path))


def test_scripts_train_a_tokenizer_and_pack_a_corpus(tmp_path):
    import json
    import subprocess
    import sys
    from pathlib import Path

    scripts = Path(__file__).resolve().parents[1] / "scripts"
    corpus = tmp_path / "corpus.jsonl"
    texts = wiki_texts()[:30]
    corpus.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    subprocess.run([sys.executable, str(scripts / "train_tokenizer.py"), "--input", str(corpus), "--out",
                    str(tmp_path / "sp"), "--vocab_size", "1000"], check=True, capture_output=True)
    out = subprocess.run([sys.executable, str(scripts / "prepare_data.py"), "--input", str(corpus), "--tokenizer",
                          str(tmp_path / "sp.model"), "--out", str(tmp_path / "data")], check=True,
                         capture_output=True, text=True)
    assert "wrote 30 documents" in out.stdout
    tok = load_tokenizer(str(tmp_path / "sp.model"))
    data = PackedTokenDataset(str(tmp_path / "data"), seq_len=128, verify=True)
    assert data[0][:1].tolist() == [tok.bos_id]
    assert data[0][1:21].tolist() == tok.encode(texts[0])[:20]
    bad = subprocess.run([sys.executable, str(scripts / "prepare_data.py"), "--input", str(tmp_path / "x.csv"),
                          "--tokenizer", str(tmp_path / "sp.model"), "--out", str(tmp_path / "d2")],
                         capture_output=True, text=True)
    assert bad.returncode != 0 and "does not exist" in bad.stderr
