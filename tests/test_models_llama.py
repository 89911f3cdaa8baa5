"""The Llama model against HF transformers (each RoPE variant, every HF config field, one rank and two), HF checkpoint
round trips in both transformers generations' config formats, and tensor parallelism vs one rank."""
import json
from dataclasses import asdict, fields, replace
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from distributed import run_distributed
from goldfish_ds import GoldfishConfig, goldfish_cross_entropy
from goldfish_ds.models import (Llama, LlamaConfig, export_hf_state_dict, llama_from_hf, load_hf_llama,
                                read_hf_state_dict, save_hf_llama)
from goldfish_ds.models.rope import RopeParameters, rope_inverse_frequencies
from goldfish_ds.parallel import (destroy_model_parallel, gather_from_tensor_parallel_region, initialize_model_parallel,
                                  vocab_parallel_goldfish_cross_entropy)

transformers = pytest.importorskip("transformers")
REPO = Path(__file__).resolve().parents[1]
CFG = GoldfishConfig(k=4, h=3, exempt_ids=(1,))


def rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm().clamp(min=1e-30)).item()


# RoPE variants, as transformers.LlamaConfig arguments, on 16-wide heads unless head_dim is given. llama3 with
# original_max_position_embeddings 64 has all three bands at theta 500000: frequency 0 (wavelength 6.3 < 64 / 4) is
# kept, 1 (32.6) interpolated, the others (> 64 / 1) divided by factor.
ROPE = {
    "default": {},
    "theta": dict(rope_parameters={"rope_type": "default", "rope_theta": 500.0}),
    "llama3": dict(rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0,
                                    "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                    "original_max_position_embeddings": 64}),
    "linear": dict(rope_parameters={"rope_type": "linear", "rope_theta": 10000.0, "factor": 4.0}),
    "head_dim": dict(head_dim=32, rope_parameters={"rope_type": "default", "rope_theta": 500000.0}),
}
# The same RoPE as transformers 4 writes it: top-level rope_theta, rope_scaling without it ("type": before 4.43).
ROPE_TRANSFORMERS_4 = {
    "theta": {"rope_theta": 500.0, "rope_scaling": None},
    "llama3": {"rope_theta": 500000.0, "rope_scaling": {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                                        "original_max_position_embeddings": 64, "rope_type": "llama3"}},
    "linear": {"rope_theta": 10000.0, "rope_scaling": {"type": "linear", "factor": 4.0}},
}
IDS = torch.randint(0, 300, (2, 33), generator=torch.Generator().manual_seed(1))


def hf_checkpoint(directory: Path, tied: bool, vocab: int = 301, kv_heads: int = 2, **config) -> Path:
    """A tiny random HF LlamaForCausalLM saved by the installed transformers (4 query heads; GQA with 2 key/value
    heads); config: further transformers.LlamaConfig arguments (rope_parameters, head_dim, ...)."""
    torch.manual_seed(0)
    small = dict(vocab_size=vocab, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=kv_heads, max_position_embeddings=128, tie_word_embeddings=tied)
    config = transformers.LlamaConfig(**{**small, **config})
    transformers.LlamaForCausalLM(config).save_pretrained(directory)
    return directory


def hf_logits(path: Path) -> torch.Tensor:
    with torch.no_grad():
        return transformers.LlamaForCausalLM.from_pretrained(path).eval()(IDS).logits


def our_logits(path: Path) -> torch.Tensor:
    with torch.no_grad():
        return llama_from_hf(str(path)).eval()(IDS)


@pytest.mark.parametrize("case, tied", [("default", False), ("default", True), ("theta", False), ("llama3", False),
                                        ("linear", True), ("head_dim", False)])
def test_logits_equal_hf_transformers(tmp_path, case, tied):
    path = hf_checkpoint(tmp_path, tied, **ROPE[case])
    written = json.loads((path / "config.json").read_text())
    assert "rope_parameters" in written and "rope_theta" not in written  # transformers 5's format
    expected, got = hf_logits(path), our_logits(path)
    assert rel(got, expected) <= 1e-5
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    if case != "default":  # the RoPE settings matter here: plain RoPE (theta 10000) gives other logits
        cfg = LlamaConfig.from_json(str(path / "config.json"))
        plain = Llama(replace(cfg, rope_parameters=RopeParameters())).eval()
        load_hf_llama(plain, str(path))
        with torch.no_grad():
            assert rel(plain(IDS), expected) > 1e-3


@pytest.mark.parametrize("case", ROPE)
def test_inverse_frequencies_equal_transformers(case):
    config = transformers.LlamaConfig(vocab_size=10, hidden_size=64, intermediate_size=8, num_hidden_layers=1,
                                      num_attention_heads=4, max_position_embeddings=128, **ROPE[case])
    cfg = LlamaConfig.from_dict(config.to_dict())
    expected = transformers.models.llama.modeling_llama.LlamaRotaryEmbedding(config).inv_freq
    assert torch.equal(rope_inverse_frequencies(cfg.rope_parameters, cfg.head_dim), expected)


def test_llama3_keeps_interpolates_and_divides_the_frequency_bands():
    llama3 = RopeParameters(**ROPE["llama3"]["rope_parameters"])
    ratio = rope_inverse_frequencies(RopeParameters(rope_theta=500000.0), 16) / rope_inverse_frequencies(llama3, 16)
    assert ratio[0] == 1 and 1 < ratio[1] < 8
    torch.testing.assert_close(ratio[2:], torch.full((6,), 8.0))


@pytest.mark.parametrize("case", ROPE_TRANSFORMERS_4)
def test_transformers_4_config_gives_the_same_logits(tmp_path, case):
    """A config.json in transformers 4's format, written by hand, reads as the transformers 5 one saved with it."""
    path = hf_checkpoint(tmp_path, tied=False, **ROPE[case])
    written = json.loads((path / "config.json").read_text())
    expected, rope = our_logits(path), written.pop("rope_parameters")
    (path / "config.json").write_text(json.dumps({**written, **ROPE_TRANSFORMERS_4[case]}))
    read = transformers.LlamaConfig.from_pretrained(path).rope_parameters
    assert {k: v for k, v in read.items() if k != "type"} == rope  # transformers too reads the same RoPE
    assert torch.equal(our_logits(path), expected)


@pytest.mark.parametrize("case", ROPE)
def test_exported_config_reads_back_the_same_in_both_transformers_generations(case):
    """to_hf_dict: transformers 5 reads our RoPE and head_dim; so does a reader of the transformers 4 keys alone."""
    config = transformers.LlamaConfig(vocab_size=10, hidden_size=64, intermediate_size=8, num_hidden_layers=1,
                                      num_attention_heads=4, max_position_embeddings=128, **ROPE[case])
    cfg = LlamaConfig.from_dict(config.to_dict())
    written = json.loads(json.dumps(cfg.to_hf_dict()))
    for read in (written, {k: v for k, v in written.items() if k != "rope_parameters"}):
        back = transformers.LlamaConfig.from_dict(read)
        assert (back.rope_parameters, back.head_dim) == (config.rope_parameters, config.head_dim)
        assert LlamaConfig.from_dict(read) == cfg
    assert LlamaConfig.from_dict(json.loads(json.dumps(asdict(cfg)))) == cfg == LlamaConfig.from_dict(asdict(cfg))
    assert hash(LlamaConfig.from_dict(asdict(cfg))) == hash(cfg)


@pytest.mark.parametrize("tied, case", [(False, "default"), (True, "llama3"), (False, "head_dim")])
def test_import_export_round_trip_is_bit_exact(tmp_path, tied, case):
    path = hf_checkpoint(tmp_path / "hf", tied, **ROPE[case])
    save_hf_llama(llama_from_hf(str(path)), str(tmp_path / "ours"))
    original, exported = read_hf_state_dict(str(path)), read_hf_state_dict(str(tmp_path / "ours"))
    assert set(original) == set(exported)
    assert all(torch.equal(original[k], exported[k]) for k in original)
    config = json.loads((tmp_path / "ours" / "config.json").read_text())
    read_back = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "ours").config
    read_original = transformers.LlamaConfig.from_pretrained(path)
    assert read_back.tie_word_embeddings == tied
    assert (read_back.rope_parameters, read_back.head_dim) == (read_original.rope_parameters, read_original.head_dim)
    assert config["num_key_value_heads"] == 2


@pytest.mark.parametrize("name", ["tiny", "tinyllama-1.1b", "llama-2-7b", "llama-2-13b", "llama-3-8b", "llama-3.1-8b",
                                  "llama-3.2-1b"])
def test_model_configs_load(name):
    cfg = LlamaConfig.from_json(str(REPO / "configs" / "models" / f"{name}.json"))
    assert cfg.head_dim * cfg.num_attention_heads == cfg.hidden_size
    assert LlamaConfig.from_dict(json.loads(json.dumps(asdict(cfg)))) == cfg
    # What we export for it gives transformers the same rotary frequencies.
    exported = transformers.LlamaConfig.from_dict(cfg.to_hf_dict())
    rotary = transformers.models.llama.modeling_llama.LlamaRotaryEmbedding(exported)
    assert torch.equal(rope_inverse_frequencies(cfg.rope_parameters, cfg.head_dim), rotary.inv_freq)
    assert (cfg.rope_parameters.rope_type == "llama3") == name.startswith(("llama-3.1", "llama-3.2"))


# Every HF config key that LlamaForCausalLM reads (transformers.LlamaConfig's fields, the transformers 4 RoPE keys,
# and PreTrainedConfig's keys that change the math), set on a tiny config:
#   implemented: our config takes it and our logits equal transformers';
#   ignored: our config does not change, and our logits still equal transformers' with it set;
#   refused: a ValueError naming the key.
TABLE_BASE = dict(vocab_size=301, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2)
FIELD_TABLE = [
    ("vocab_size", 300, "implemented"),
    ("hidden_size", 96, "implemented"),
    ("intermediate_size", 80, "implemented"),
    ("num_hidden_layers", 3, "implemented"),
    ("num_attention_heads", 8, "implemented"),
    ("num_key_value_heads", 4, "implemented"),
    ("head_dim", 32, "implemented"),
    ("max_position_embeddings", 64, "implemented"),  # kept; llama3's default original_max_position_embeddings
    ("rms_norm_eps", 1e-2, "implemented"),
    ("tie_word_embeddings", True, "implemented"),
    ("initializer_range", 0.05, "implemented"),  # initialisation only
    ("rope_parameters", ROPE["theta"]["rope_parameters"], "implemented"),
    ("rope_parameters", ROPE["llama3"]["rope_parameters"], "implemented"),
    ("rope_parameters", ROPE["linear"]["rope_parameters"], "implemented"),
    ("rope_theta", 500.0, "implemented"),
    ("rope_scaling", ROPE_TRANSFORMERS_4["linear"]["rope_scaling"], "implemented"),
    ("rope_scaling", ROPE_TRANSFORMERS_4["llama3"]["rope_scaling"], "implemented"),
    ("hidden_act", "gelu", "refused"),
    ("attention_bias", True, "refused"),
    ("mlp_bias", True, "refused"),
    ("attention_dropout", 0.1, "refused"),  # we have no dropout
    ("head_dim", 15, "refused"),  # rotate-half needs an even head
    ("rope_parameters", {"rope_type": "yarn", "factor": 2.0, "original_max_position_embeddings": 64}, "refused"),
    ("rope_parameters", {"rope_type": "dynamic", "factor": 2.0}, "refused"),
    ("rope_parameters", {"rope_type": "longrope", "short_factor": [1.0] * 8, "long_factor": [2.0] * 8,
                         "original_max_position_embeddings": 64}, "refused"),
    ("rope_parameters", {**ROPE["llama3"]["rope_parameters"], "attention_factor": 2.0}, "refused"),
    ("rope_parameters", {"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.5}, "refused"),
    ("rope_scaling", {"type": "dynamic", "factor": 2.0}, "refused"),
    ("partial_rotary_factor", 0.5, "refused"),
    ("is_causal", False, "refused"),
    ("model_type", "mistral", "refused"),
    ("quantization_config", {"quant_method": "bitsandbytes", "load_in_8bit": True}, "refused"),
    ("per_layer_config", {"1": {"intermediate_size": 48}}, "refused"),
    ("pretraining_tp", 2, "ignored"),  # transformers 5 has dropped it; in 4 it only sliced the matmuls
    ("pad_token_id", 0, "ignored"),  # HF's padding_idx: a zero initial row without gradient; the logits agree
    ("bos_token_id", 5, "ignored"),
    ("eos_token_id", [2, 3], "ignored"),
    ("use_cache", False, "ignored"),
    ("dtype", "bfloat16", "ignored"),  # the DeepSpeed config picks ours
    ("torch_dtype", "bfloat16", "ignored"),
    ("transformers_version", "4.44.0", "ignored"),
    ("architectures", ["LlamaForCausalLM"], "ignored"),
    ("chunk_size_feed_forward", 4, "ignored"),
    ("is_encoder_decoder", True, "ignored"),
    ("output_hidden_states", True, "ignored"),
    ("output_attentions", True, "ignored"),
    ("return_dict", False, "ignored"),
    ("id2label", {0: "a", 1: "b", 2: "c"}, "ignored"),
    ("label2id", {"a": 0, "b": 1, "c": 2}, "ignored"),
    ("problem_type", "regression", "ignored"),
    ("partial_rotary_factor", 1.0, "ignored"),
    ("is_causal", True, "ignored"),
    ("model_type", "llama", "ignored"),
]


def test_field_table_covers_every_transformers_llama_config_field():
    assert {f.name for f in fields(transformers.LlamaConfig)} <= {key for key, _, _ in FIELD_TABLE}


@pytest.mark.parametrize("key, value, kind", FIELD_TABLE, ids=[f"{kind}-{key}" for key, _, kind in FIELD_TABLE])
def test_hf_config_field_is_implemented_ignored_or_refused(tmp_path, key, value, kind):
    values = {**TABLE_BASE, key: value}
    if kind == "refused":
        with pytest.raises(ValueError, match=key):
            LlamaConfig.from_dict(values)
        return
    cfg = LlamaConfig.from_dict(values)
    assert (cfg != LlamaConfig.from_dict(TABLE_BASE)) == (kind == "implemented")
    torch.manual_seed(0)
    hf = transformers.LlamaForCausalLM(transformers.LlamaConfig.from_dict(values)).eval()
    hf.config.return_dict = True  # the output container only (transformers 5.24's forward fails without it)
    save_file({k: v.clone() for k, v in hf.state_dict().items()}, str(tmp_path / "model.safetensors"))  # weights only
    ours = Llama(cfg).eval()
    load_hf_llama(ours, str(tmp_path))
    with torch.no_grad():
        torch.testing.assert_close(ours(IDS), hf(IDS).logits, rtol=1e-5, atol=1e-5)


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


def body_logits_tensor_parallel(rank, world, cases):
    """The vocabulary slices of a world-rank sharded Llama, gathered, equal transformers' logits within 1e-5."""
    initialize_model_parallel(world)
    try:
        for path, expected in cases:
            model = llama_from_hf(path).eval()
            with torch.no_grad():
                logits = gather_from_tensor_parallel_region(model(IDS), model.embed_tokens.group)
            torch.testing.assert_close(logits[..., :expected.shape[-1]], expected, rtol=1e-5, atol=1e-5)
    finally:
        destroy_model_parallel()


def test_tensor_parallel_logits_equal_hf_transformers(tmp_path):
    paths = [hf_checkpoint(tmp_path / case, tied=case == "linear", **ROPE[case]) for case in ROPE]
    run_distributed(body_logits_tensor_parallel, 2, [(str(path), hf_logits(path)) for path in paths])


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
