"""HF checkpoints in and out: one tensor (or one slice) at a time, single-file and sharded, against transformers."""
import json

import pytest
import torch
from safetensors.torch import load_file

from distributed import run_distributed
from goldfish_ds.models import HFCheckpoint, llama_from_hf, read_hf_state_dict, save_hf_llama
from goldfish_ds.models.hf import parse_size, plan_shards
from goldfish_ds.parallel import destroy_model_parallel, initialize_model_parallel
from test_models_llama import hf_checkpoint

transformers = pytest.importorskip("transformers")


def assert_same_tensors(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert a[key].dtype == b[key].dtype and torch.equal(a[key], b[key]), key


def test_checkpoint_reads_slices_of_single_sharded_and_bin_files(tmp_path):
    single = hf_checkpoint(tmp_path / "single", tied=False)
    model = transformers.LlamaForCausalLM.from_pretrained(single)
    model.save_pretrained(tmp_path / "sharded", max_shard_size="20KB")
    assert (tmp_path / "sharded" / "model.safetensors.index.json").is_file()
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    torch.save(load_file(single / "model.safetensors"), bin_dir / "pytorch_model.bin")
    reference = load_file(single / "model.safetensors")
    for directory in (single, tmp_path / "sharded", bin_dir):
        checkpoint = HFCheckpoint(str(directory))
        assert set(checkpoint.names()) == set(reference)
        q = reference["model.layers.1.self_attn.q_proj.weight"]
        assert checkpoint.shape("model.layers.1.self_attn.q_proj.weight") == tuple(q.shape)
        assert torch.equal(checkpoint.read("model.layers.1.self_attn.q_proj.weight", slice(5, 9), slice(3, 40)),
                           q[5:9, 3:40])
        assert torch.equal(checkpoint.read("model.norm.weight", slice(10, 20)), reference["model.norm.weight"][10:20])
        assert_same_tensors(read_hf_state_dict(str(directory)), reference)


@pytest.mark.parametrize("tied", [False, True])
@pytest.mark.parametrize("max_shard_size", ["5GB", "30KB"])
def test_sharded_export_loads_in_transformers_and_round_trips(tmp_path, tied, max_shard_size):
    path = hf_checkpoint(tmp_path / "hf", tied)
    transformers.LlamaForCausalLM.from_pretrained(path).save_pretrained(tmp_path / "hf_sharded", max_shard_size="20KB")
    original = read_hf_state_dict(str(path))
    for source in (path, tmp_path / "hf_sharded"):
        out = tmp_path / f"ours_{source.name}"
        save_hf_llama(llama_from_hf(str(source)), str(out), max_shard_size=max_shard_size)
        assert_same_tensors(read_hf_state_dict(str(out)), original)
    files = sorted(p.name for p in out.glob("*.safetensors"))
    if max_shard_size == "5GB":
        assert files == ["model.safetensors"] and not (out / "model.safetensors.index.json").exists()
    else:
        index = json.loads((out / "model.safetensors.index.json").read_text())
        assert files == [f"model-{i:05d}-of-{len(files):05d}.safetensors" for i in range(1, len(files) + 1)]
        assert len(files) > 2 and set(index["weight_map"].values()) == set(files)
        assert index["metadata"]["total_size"] == sum(t.numel() * 4 for t in original.values())
        for file in files:  # every shard within the limit, unless it holds a single larger tensor
            shard = load_file(out / file)
            assert len(shard) == 1 or sum(t.numel() * 4 for t in shard.values()) <= 30_000
            assert all(index["weight_map"][k] == file for k in shard)
    hf = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    assert hf.config.tie_word_embeddings == tied
    ids = torch.randint(0, 301, (2, 17), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(llama_from_hf(str(out)).eval()(ids), hf(ids).logits, rtol=1e-5, atol=1e-5)


def body_tensor_parallel_round_trip(rank, world, path, out, max_shard_size):
    initialize_model_parallel(world)
    try:
        save_hf_llama(llama_from_hf(path), out, max_shard_size=max_shard_size)
    finally:
        destroy_model_parallel()


@pytest.mark.parametrize("tied, vocab, max_shard_size", [(False, 301, "30KB"), (True, 301, "5GB"), (True, 300, "30KB")])
def test_tensor_parallel_round_trip_is_bit_exact(tmp_path, tied, vocab, max_shard_size):
    path = hf_checkpoint(tmp_path / "hf", tied, vocab)
    run_distributed(body_tensor_parallel_round_trip, 2, str(path), str(tmp_path / "ours"), max_shard_size)
    assert_same_tensors(read_hf_state_dict(str(tmp_path / "ours")), read_hf_state_dict(str(path)))


def test_shard_plan_and_sizes():
    assert parse_size(5_000_000) == parse_size("5MB") == parse_size(" 5 mb") == 5 * 10**6
    assert parse_size("5GB") == 5 * 10**9 and parse_size("2GiB") == 2 * 2**30 and parse_size("1.5KB") == 1500
    for bad in ("5XB", "-1", "0", "", "GB", True):
        with pytest.raises(ValueError, match="max_shard_size must be a positive number of bytes"):
            parse_size(bad)
    sizes = {"a": 4, "b": 4, "c": 10, "d": 1, "e": 3}
    assert plan_shards(sizes, 8) == [["a", "b"], ["c"], ["d", "e"]]  # the 10-byte tensor gets its own shard
    assert plan_shards(sizes, 100) == [list(sizes)]
