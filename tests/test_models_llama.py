"""The Llama model against HF transformers, HF checkpoint round trips, and tensor parallelism vs one rank."""
import json
from pathlib import Path

import pytest
import torch

from distributed import run_distributed
from goldfish_ds import GoldfishConfig, goldfish_cross_entropy
from goldfish_ds.models import (Llama, LlamaConfig, export_hf_state_dict, llama_from_hf, read_hf_state_dict,
                                save_hf_llama)
from goldfish_ds.parallel import destroy_model_parallel, initialize_model_parallel, vocab_parallel_goldfish_cross_entropy

transformers = pytest.importorskip("transformers")
REPO = Path(__file__).resolve().parents[1]
CFG = GoldfishConfig(k=4, h=3, exempt_ids=(1,))


def rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm().clamp(min=1e-30)).item()


def hf_checkpoint(directory: Path, tied: bool, vocab: int = 301, kv_heads: int = 2) -> Path:
    """A tiny random HF LlamaForCausalLM saved as safetensors (4 query heads; GQA with 2 key/value heads)."""
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=vocab, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=kv_heads, max_position_embeddings=128,
                                      rope_theta=10000.0, tie_word_embeddings=tied)
    transformers.LlamaForCausalLM(config).save_pretrained(directory)
    return directory


@pytest.mark.parametrize("tied", [False, True])
def test_logits_equal_hf_transformers(tmp_path, tied):
    path = hf_checkpoint(tmp_path, tied)
    hf = transformers.LlamaForCausalLM.from_pretrained(path).eval()
    ours = llama_from_hf(str(path)).eval()
    ids = torch.randint(0, 301, (2, 33), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected, got = hf(ids).logits, ours(ids)
    assert rel(got, expected) <= 1e-5
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("tied", [False, True])
def test_import_export_round_trip_is_bit_exact(tmp_path, tied):
    path = hf_checkpoint(tmp_path / "hf", tied)
    save_hf_llama(llama_from_hf(str(path)), str(tmp_path / "ours"))
    original, exported = read_hf_state_dict(str(path)), read_hf_state_dict(str(tmp_path / "ours"))
    assert set(original) == set(exported)
    assert all(torch.equal(original[k], exported[k]) for k in original)
    config = json.loads((tmp_path / "ours" / "config.json").read_text())
    assert transformers.LlamaForCausalLM.from_pretrained(tmp_path / "ours").config.tie_word_embeddings == tied
    assert config["num_key_value_heads"] == 2


@pytest.mark.parametrize("name", ["tiny", "tinyllama-1.1b", "llama-2-7b", "llama-2-13b", "llama-3-8b"])
def test_model_configs_load(name):
    cfg = LlamaConfig.from_json(str(REPO / "configs" / "models" / f"{name}.json"))
    assert cfg.head_dim * cfg.num_attention_heads == cfg.hidden_size


def test_config_refuses_unsupported_features():
    with pytest.raises(ValueError, match="rope_scaling"):
        LlamaConfig.from_dict(dict(vocab_size=10, hidden_size=8, intermediate_size=8, num_hidden_layers=1,
                                   num_attention_heads=2, rope_scaling={"rope_type": "llama3"}))
    with pytest.raises(ValueError, match="must be divisible by num_attention_heads"):
        LlamaConfig(vocab_size=10, hidden_size=9, intermediate_size=8, num_hidden_layers=1, num_attention_heads=2,
                    num_key_value_heads=2)


def test_activation_checkpointing_gives_the_same_gradients(tmp_path):
    path = hf_checkpoint(tmp_path, tied=False)
    ids = torch.randint(0, 301, (2, 16), generator=torch.Generator().manual_seed(2))
    grads = []
    for checkpointing in (False, True):
        model = llama_from_hf(str(path), activation_checkpointing=checkpointing).train()
        goldfish_cross_entropy(model(ids[:, :-1]), ids[:, 1:], CFG).backward()
        grads.append(export_hf_state_dict(model, grads=True))
    assert all(torch.equal(grads[0][k], grads[1][k]) for k in grads[0])


def body_tensor_parallel(rank, world, path, vocab):
    """Rank-sharded Llama vs the single-process one: loss within 1e-6, every gradient within 1e-5."""
    ids = torch.randint(0, vocab, (2, 24), generator=torch.Generator().manual_seed(3))
    labels = ids[:, 1:].clone()
    labels[0, -4:] = -100
    single = llama_from_hf(path).train()
    ref_loss = goldfish_cross_entropy(single(ids[:, :-1]), labels, CFG)
    ref_loss.backward()
    ref_grads = export_hf_state_dict(single, grads=True)

    initialize_model_parallel(world)
    try:
        model = llama_from_hf(path).train()
        loss = vocab_parallel_goldfish_cross_entropy(model(ids[:, :-1]), labels, CFG)
        loss.backward()
        grads = export_hf_state_dict(model, grads=True)
    finally:
        destroy_model_parallel()
    assert rel(loss, ref_loss) <= 1e-6
    for key, expected in ref_grads.items():
        assert rel(grads[key], expected) <= 1e-5, key


@pytest.mark.parametrize("world, vocab, tied, kv_heads", [(2, 301, False, 2), (2, 300, True, 2), (4, 301, True, 4)])
def test_tensor_parallel_llama_matches_one_rank(tmp_path, world, vocab, tied, kv_heads):
    path = hf_checkpoint(tmp_path, tied, vocab, kv_heads)
    run_distributed(body_tensor_parallel, world, str(path), vocab)


def body_bad_tp(rank, world):
    initialize_model_parallel(world)
    try:
        cfg = LlamaConfig(vocab_size=50, hidden_size=32, intermediate_size=32, num_hidden_layers=1,
                          num_attention_heads=4, num_key_value_heads=2)
        with pytest.raises(ValueError, match=r"tensor-parallel size \(4\) must divide num_key_value_heads \(2\)"):
            Llama(cfg)
    finally:
        destroy_model_parallel()


def test_tensor_parallel_size_must_divide_kv_heads():
    run_distributed(body_bad_tp, 4)
