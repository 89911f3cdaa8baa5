"""Goldfish SFT: masks hashed over window_ids (the unmasked targets), SFT data formats and their supervision."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from conftest import DEVICES
from test_training import ds_config, launch, records

from goldfish_ds import GoldfishConfig, apply_goldfish, goldfish_cross_entropy, goldfish_mask
from goldfish_ds.cli import prepare_data
from goldfish_ds.data import (PackedTokenDataset, builtin_documents, chat_generation_prompt, load_tokenizer,
                              train_sentencepiece)
from goldfish_ds.data.sft import encode_chat
from goldfish_ds.parallel import vocab_parallel_goldfish_cross_entropy
from goldfish_ds.reference import reference_goldfish_mask

HASHED = ["hash-table", "hash-avalanche", "hash-rolling"]


def sft_row(prompt: torch.Tensor, response: torch.Tensor, supervise_prompt: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(labels, window_ids) of one row: the prompt's targets -100 unless supervised, the response's its ids."""
    ids = torch.cat([prompt, response])
    labels = ids.clone()
    if not supervise_prompt:
        labels[:len(prompt)] = -100
    return labels, ids


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("strategy", HASHED)
@pytest.mark.parametrize("window", ["inclusive", "preceding"])
def test_response_mask_ignores_the_prompt_beyond_the_window(strategy, window, device):
    gen = torch.Generator().manual_seed(3)
    h = 5
    cfg = GoldfishConfig(k=3, h=h, strategy=strategy, window=window)
    response = torch.randint(4, 500, (200,), generator=gen)
    masks = []
    for seed in (1, 2):
        prompt = torch.randint(4, 500, (37,), generator=torch.Generator().manual_seed(seed))
        labels, ids = sft_row(prompt, response, supervise_prompt=False)
        masks.append(goldfish_mask(labels.to(device), cfg, window_ids=ids.to(device)).cpu()[37:])
    reach = h if window == "preceding" else h - 1  # response targets whose window still holds prompt tokens
    assert torch.equal(masks[0][reach:], masks[1][reach:])
    assert masks[0][reach:].any() and not masks[0][reach:].all()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("strategy", HASHED + ["static"])
def test_supervising_the_prompt_or_not_leaves_the_response_mask(strategy, device):
    gen = torch.Generator().manual_seed(5)
    cfg = GoldfishConfig(k=4, h=13, strategy=strategy, exempt_ids=(2,))
    prompt, response = torch.randint(3, 4000, (50,), generator=gen), torch.randint(3, 4000, (300,), generator=gen)
    response[::17] = 2
    hidden, ids = sft_row(prompt, response, supervise_prompt=False)
    shown, _ = sft_row(prompt, response, supervise_prompt=True)
    with_ids = goldfish_mask(hidden.to(device), cfg, window_ids=ids.to(device)).cpu()
    assert torch.equal(with_ids[50:], goldfish_mask(shown.to(device), cfg).cpu()[50:])
    assert not with_ids[:50].any()  # -100 targets are never dropped, whatever their window
    assert not with_ids[50:][response == 2].any()  # exempt ids looked up on the labels
    if strategy != "static":  # without window_ids the -100 prompt is hashed and the mask changes
        assert not torch.equal(goldfish_mask(hidden, cfg)[50:], goldfish_mask(shown, cfg)[50:])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("strategy", HASHED + ["static", "random"])
@pytest.mark.parametrize("window", ["inclusive", "preceding"])
def test_window_ids_masks_equal_the_reference(strategy, window, device):
    gen = torch.Generator().manual_seed(11)
    cfg = GoldfishConfig(k=3, h=7, strategy=strategy, window=window, exempt_ids=(0, 2), start_position=1, seed=9)
    for B, T, vocab in [(1, 1, 5), (3, 100, 7), (4, 777, 32000)]:
        ids = torch.randint(0, vocab, (B, T), generator=gen)
        ids[-1, ::11] = -100  # a window id equal to ignore_index is never dropped, as in labels
        labels = torch.where(torch.rand(B, T, generator=gen) < 0.3, -100, ids)
        labels[0, ::5] = torch.randint(0, vocab, (len(range(0, T, 5)),), generator=gen)  # labels other than ids
        expected = reference_goldfish_mask(labels, cfg, step=4, window_ids=ids)
        got = goldfish_mask(labels.to(device), cfg, step=4, window_ids=ids.to(device)).cpu()
        assert torch.equal(got, expected), (B, T)
        applied = apply_goldfish(labels.to(device), cfg, step=4, window_ids=ids.to(device)).cpu()
        assert torch.equal(applied, torch.where(expected, -100, labels))
        flat = goldfish_mask(labels[0].to(device), cfg, step=4, window_ids=ids[0].to(device)).cpu()
        assert torch.equal(flat, expected[0])


def torch_ce_over(logits: torch.Tensor, labels: torch.Tensor, dropped: torch.Tensor) -> torch.Tensor:
    kept = torch.where(dropped, -100, labels)
    return torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]).double(), kept.reshape(-1))


@pytest.mark.parametrize("device", DEVICES)
def test_losses_with_window_ids_equal_torch_over_that_mask(device):
    gen = torch.Generator().manual_seed(2)
    B, T, V = 3, 64, 101
    cfg = GoldfishConfig(k=3, h=4)
    ids = torch.randint(0, V, (B, T), generator=gen)
    labels = ids.clone()
    labels[:, :20] = -100  # the prompts
    dropped = reference_goldfish_mask(labels, cfg, window_ids=ids)
    assert not torch.equal(dropped, reference_goldfish_mask(labels, cfg))  # window_ids changes this mask
    logits = torch.randn(B, T, V, generator=gen)
    expected = torch_ce_over(logits, labels, dropped)
    x = logits.clone().to(device).requires_grad_()
    loss, stats = goldfish_cross_entropy(x, labels.to(device), cfg, window_ids=ids.to(device), in_place=False,
                                         return_stats=True)
    assert loss.item() == pytest.approx(expected.item(), rel=1e-6)
    assert stats.dropped_tokens.item() == dropped.sum().item()
    loss.backward()
    ref = logits.double().requires_grad_()
    torch_ce_over(ref, labels, dropped).backward()
    torch.testing.assert_close(x.grad.cpu().double(), ref.grad, rtol=1e-5, atol=1e-7)
    parallel = vocab_parallel_goldfish_cross_entropy(logits.to(device), labels.to(device), cfg,
                                                     window_ids=ids.to(device))
    assert parallel.item() == pytest.approx(expected.item(), rel=1e-6)


def test_bad_window_ids_are_refused():
    cfg = GoldfishConfig(k=3, h=4)
    labels = torch.zeros(2, 8, dtype=torch.int64)
    with pytest.raises(ValueError, match="window_ids must have labels' shape"):
        goldfish_mask(labels, cfg, window_ids=torch.zeros(2, 7, dtype=torch.int64))
    with pytest.raises(TypeError, match="window_ids must be an int64 tensor"):
        goldfish_mask(labels, cfg, window_ids=torch.zeros(2, 8, dtype=torch.int32))
    with pytest.raises(TypeError, match="window_ids must be an int64 tensor"):
        apply_goldfish(labels, cfg, window_ids=[[0] * 8] * 2)


# ---- SFT data: goldfish-prepare-data --format chat / prompt_response, through real training jobs ----------------

SEQ_LEN = 64
LLAMA3_TEMPLATE = (  # Llama 3's layout: a header per message, content trimmed, <|eot_id|> ending every turn
    "{{ bos_token }}{% for m in messages %}{{ '<|start_header_id|>' + m['role'] + '<|end_header_id|>\\n\\n' "
    "+ m['content'] | trim + '<|eot_id|>' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}")


def write_jsonl(path: Path, rows: list) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def expected_rows(examples: list[tuple[list[int], list[bool]]], seq_len: int, pad_id: int | None
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """Independent layout of the rows: (ids, supervised) [R, seq_len + 1], one example per row (pad_id given,
    cut to seq_len ids) or packed (pad_id None)."""
    if pad_id is not None:
        examples = [(ids[:seq_len] + [pad_id] * (seq_len - len(ids[:seq_len])),
                     sup[:seq_len] + [False] * (seq_len - len(sup[:seq_len]))) for ids, sup in examples]
        examples.append(([pad_id], [False]))
    ids = torch.tensor([i for e in examples for i in e[0]])
    sup = torch.tensor([s for e in examples for s in e[1]])
    count = (len(ids) - 1) // seq_len
    index = torch.arange(count)[:, None] * seq_len + torch.arange(seq_len + 1)
    return ids[index], sup[index]


def expected_kept(ids: torch.Tensor, sup: torch.Tensor, cfg: GoldfishConfig) -> int:
    labels = torch.where(sup[:, 1:], ids[:, 1:], -100)
    return int((labels.ne(-100) & ~reference_goldfish_mask(labels, cfg, window_ids=ids[:, 1:])).sum())


@pytest.fixture(scope="module")
def sp_tokenizer(tmp_path_factory) -> str:
    return train_sentencepiece(builtin_documents(), str(tmp_path_factory.mktemp("sp") / "tok"), vocab_size=1000)


@pytest.fixture(scope="module")
def hf_chat_tokenizer(tmp_path_factory) -> str:
    """An HF tokenizer directory written by transformers: a byte-level BPE trained here, a Llama-3-like template."""
    from tokenizers import Tokenizer as RawTokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<|begin_of_text|>", "<|eot_id|>", "<|start_header_id|>", "<|end_header_id|>", "<|pad|>"]
    raw = RawTokenizer(models.BPE())
    raw.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    raw.decoder = decoders.ByteLevel()
    raw.train_from_iterator(builtin_documents(), trainers.BpeTrainer(
        vocab_size=800, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok = PreTrainedTokenizerFast(tokenizer_object=raw, bos_token=specials[0], eos_token=specials[1],
                                  pad_token=specials[4])
    tok.chat_template = LLAMA3_TEMPLATE
    out = tmp_path_factory.mktemp("hf_tok")
    tok.save_pretrained(str(out))
    return str(out)


def prompt_response_records() -> list[dict]:
    docs = builtin_documents()
    rows = [{"prompt": f"Topic: {d[:30]}\nAnswer:", "response": " " + d[30:110]} for d in docs[:11]]
    rows[3]["response"] = " " + docs[3][30:2000]  # longer than a row: cut, counted
    return rows


def conversations() -> list[dict]:
    docs = builtin_documents()
    return [{"messages": [{"role": "system", "content": "Answer briefly."},
                          {"role": "user", "content": d[:40]}, {"role": "assistant", "content": d[40:120]},
                          {"role": "user", "content": "More?"}, {"role": "assistant", "content": d[120:160]}]}
            for d in docs[20:32]]


@pytest.fixture(scope="module")
def prompt_response_run(tmp_path_factory, sp_tokenizer):
    """prompt_response data (one example per row), 8 training rows in one micro-batch, on 2 tensor-parallel
    ranks (the vocab-parallel loss with window_ids): every step sees them all."""
    root = tmp_path_factory.mktemp("pr")
    data = write_jsonl(root / "train.jsonl", prompt_response_records()[:8])
    val = write_jsonl(root / "val.jsonl", prompt_response_records()[8:])
    for name, path in (("train", data), ("val", val)):
        prepare_data.main(["--format", "prompt_response", "--input", path, "--tokenizer", sp_tokenizer,
                           "--out", str(root / name), "--seq_len", str(SEQ_LEN)])
    out = root / "run"
    launch("deepspeed", 2, ["--deepspeed_config", ds_config(root / "ds.json", 8, 1), "--tensor_parallel", "2",
                            "--out_dir", str(out), "--data", str(root / "train"), "--val_data", str(root / "val"),
                            "--tokenizer", sp_tokenizer, "--seq_len", str(SEQ_LEN), "--max_steps", "3",
                            "--eval_interval", "3", "--save_interval", "3", "--goldfish_k", "3", "--goldfish_h", "4",
                            "--no-progress"])
    return root, out


def independent_prompt_response(tok, records_: list[dict]) -> list[tuple[list[int], list[bool]]]:
    out = []
    for r in records_:
        prompt, response = [tok.bos_id] + tok.encode(r["prompt"]), tok.encode(r["response"]) + [tok.eos_id]
        out.append((prompt + response, [False] * len(prompt) + [True] * len(response)))
    return out


def test_prompt_response_rows_and_training_counts(prompt_response_run, sp_tokenizer):
    root, out = prompt_response_run
    tok = load_tokenizer(sp_tokenizer)
    ids, sup = expected_rows(independent_prompt_response(tok, prompt_response_records()[:8]), SEQ_LEN, tok.pad_id)
    data = PackedTokenDataset(str(root / "train"), SEQ_LEN, verify=True)
    assert data.sft["num_truncated"] == 1 and data.sft["supervised_tokens"] == int(sup.sum())
    assert len(data) == 8
    assert torch.equal(torch.stack([data[r] for r in range(8)]), ids)
    assert torch.equal(torch.stack([data.supervised(r) for r in range(8)]), sup)
    cfg = GoldfishConfig(k=3, h=4, exempt_ids=tok.special_ids)
    kept = expected_kept(ids, sup, cfg)
    labels = torch.where(sup[:, 1:], ids[:, 1:], -100)
    assert kept != int((labels.ne(-100) & ~reference_goldfish_mask(labels, cfg)).sum())  # hashing labels differs
    train = records(out)
    assert [r["supervised_tokens"] for r in train] == [kept, 2 * kept, 3 * kept]  # every step holds every row
    targets = int(sup[:, 1:].sum())
    assert train[0]["drop_rate"] == pytest.approx((targets - kept) / targets, abs=1e-12)


def test_sft_validation_loss_counts_only_the_responses(prompt_response_run, sp_tokenizer):
    """The job's last validation loss equals the exported model's mean loss over the supervised val targets."""
    from transformers import LlamaForCausalLM

    root, out = prompt_response_run
    tok = load_tokenizer(sp_tokenizer)
    ids, sup = expected_rows(independent_prompt_response(tok, prompt_response_records()[8:]), SEQ_LEN, tok.pad_id)
    model = LlamaForCausalLM.from_pretrained(str(out / "hf")).eval()
    with torch.no_grad():
        logits = model(ids[:, :-1]).logits
    labels = torch.where(sup[:, 1:], ids[:, 1:], -100)
    expected = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]).double(), labels.reshape(-1))
    assert records(out, "val")[-1]["val_loss"] == pytest.approx(expected.item(), rel=1e-5)


def independent_chat(tok, conversation: dict) -> tuple[list[int], list[bool]]:
    """The Llama-3 layout written out by hand and cut around each assistant turn's content + <|eot_id|> (the
    supervised pieces); each piece tokenized alone, as sft.py documents."""
    pieces, text = [], "<|begin_of_text|>"
    for m in conversation["messages"]:
        text += f"<|start_header_id|>{m['role']}<|end_header_id|>\n\n"
        if m["role"] == "assistant":
            pieces += [(text, False), (m["content"].strip() + "<|eot_id|>", True)]
            text = ""
        else:
            text += m["content"].strip() + "<|eot_id|>"
    ids, sup = [], []
    for piece, counts in pieces + [(text, False)]:
        ids += tok.encode(piece)
        sup += [counts] * len(tok.encode(piece))
    return ids, sup


def test_chat_template_packed_end_to_end(tmp_path, hf_chat_tokenizer):
    tok = load_tokenizer(hf_chat_tokenizer)
    assert tok.chat_template == LLAMA3_TEMPLATE
    examples = [independent_chat(tok, c) for c in conversations()]
    ids, sup = expected_rows(examples, SEQ_LEN, None)
    prepare_data.main(["--format", "chat", "--pack", "--input", write_jsonl(tmp_path / "c.jsonl", conversations()),
                       "--tokenizer", hf_chat_tokenizer, "--out", str(tmp_path / "data")])
    data = PackedTokenDataset(str(tmp_path / "data"), SEQ_LEN, verify=True)
    assert torch.equal(torch.stack([data[r] for r in range(len(data))]), ids)
    assert torch.equal(torch.stack([data.supervised(r) for r in range(len(data))]), sup)
    rows = len(data)
    launch("python", 1, ["--deepspeed_config", ds_config(tmp_path / "ds.json", rows, 1), "--out_dir",
                         str(tmp_path / "run"), "--data", str(tmp_path / "data"), "--tokenizer", hf_chat_tokenizer,
                         "--seq_len", str(SEQ_LEN), "--max_steps", "2", "--eval_interval", "0", "--save_interval", "2",
                         "--goldfish_k", "4", "--goldfish_h", "13", "--goldfish_strategy", "hash-rolling",
                         "--no-progress", "--no-export_hf"])
    kept = expected_kept(ids, sup, GoldfishConfig(k=4, h=13, strategy="hash-rolling", exempt_ids=tok.special_ids))
    assert [r["supervised_tokens"] for r in records(tmp_path / "run")] == [kept, 2 * kept]


def test_chat_generation_prompt_is_the_prefix_of_a_training_example(hf_chat_tokenizer, sp_tokenizer):
    for path in (hf_chat_tokenizer, sp_tokenizer):
        tok = load_tokenizer(path)
        conversation = conversations()[0]
        example = encode_chat(tok, conversation)
        prompt = chat_generation_prompt(tok, conversation["messages"][:2])
        first_answer = example.supervised.index(True)
        assert example.ids[:first_answer] == prompt
    tok = load_tokenizer(sp_tokenizer)  # the plain template, spelled out
    assert example.ids[:len(prompt)] == ([tok.bos_id] + tok.encode("System: Answer briefly.\n")
                                         + tok.encode(f"User: {conversation['messages'][1]['content']}\n")
                                         + tok.encode("Assistant: "))


@pytest.mark.parametrize("record, message", [
    ({"prompt": "q"}, "needs a string field 'response'"),
    ({"prompt": 3, "response": "a"}, "needs a string field 'prompt'"),
    ({"prompt": "q", "response": "  "}, "field 'response' is empty"),
])
def test_bad_prompt_response_records_are_refused_by_row(tmp_path, sp_tokenizer, record, message):
    path = write_jsonl(tmp_path / "x.jsonl", [{"prompt": "q", "response": "a"}, record])
    with pytest.raises(ValueError, match=f"x.jsonl:2: .*{message}"):
        prepare_data.main(["--format", "prompt_response", "--input", path, "--tokenizer", sp_tokenizer,
                           "--out", str(tmp_path / "d"), "--seq_len", "16"])


@pytest.mark.parametrize("record, message", [
    ({"text": "x"}, "needs a non-empty list field 'messages'"),
    ({"messages": [{"role": "user"}]}, r"messages\[0\] must be an object with a string 'role' and a string 'content'"),
    ({"messages": [{"role": "tool", "content": "x"}]}, r"messages\[0\] has role 'tool'; roles are"),
    ({"messages": [{"role": "user", "content": "x"}]}, "has no assistant turn"),
    ({"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": ""}]},
     r"messages\[1\] is an assistant turn with an empty 'content'"),
])
def test_bad_chat_records_are_refused_by_row(tmp_path, sp_tokenizer, record, message):
    path = write_jsonl(tmp_path / "x.jsonl", [record])
    with pytest.raises(ValueError, match=f"x.jsonl:1: .*{message}"):
        prepare_data.main(["--format", "chat", "--pack", "--input", path, "--tokenizer", sp_tokenizer,
                           "--out", str(tmp_path / "d")])


def test_a_template_that_rewrites_earlier_turns_is_refused(tmp_path, hf_chat_tokenizer):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(hf_chat_tokenizer)
    tok.chat_template = ("{% for m in messages %}{% if loop.last and m['role'] == 'assistant' %}[final]{% endif %}"
                         "{{ m['role'] + ': ' + m['content'] + '\\n' }}{% endfor %}")  # marks the last turn only
    tok.save_pretrained(str(tmp_path / "tok"))
    path = write_jsonl(tmp_path / "x.jsonl", conversations()[:1])
    with pytest.raises(ValueError, match=r"x.jsonl:1: the chat template .* not a prefix"):
        prepare_data.main(["--format", "chat", "--pack", "--input", path, "--tokenizer", str(tmp_path / "tok"),
                           "--out", str(tmp_path / "d")])


def test_sft_options_are_checked(tmp_path, sp_tokenizer):
    path = write_jsonl(tmp_path / "x.jsonl", [{"prompt": "q", "response": "a"}])
    common = ["--input", path, "--tokenizer", sp_tokenizer, "--out", str(tmp_path / "d")]
    for extra in ([], ["--pack", "--seq_len", "8"]):
        with pytest.raises(SystemExit):
            prepare_data.main(["--format", "prompt_response", *common, *extra])
    with pytest.raises(SystemExit):
        prepare_data.main(["--pack", *common])  # --pack with --format text
    prepare_data.main(["--format", "prompt_response", "--seq_len", "8", *common])
    with pytest.raises(ValueError, match="one SFT example per row of seq_len 8, not the requested seq_len 16"):
        PackedTokenDataset(str(tmp_path / "d"), 16)
