"""Memorization evaluation (goldfish_ds/eval) on real tiny HF Llama models.

A model trained to memorize four short documents must give them back exactly and be told from held-out
documents with AUC 1; the metrics and the ROC statistics are checked against hand-computed values.
"""
import json
import random
import shutil
import subprocess
import sys
import zlib
from pathlib import Path

import pytest
import torch

from goldfish_ds import GoldfishConfig
from goldfish_ds.data import load_tokenizer, train_sentencepiece
from goldfish_ds.eval import (
    Document,
    DocumentScores,
    ExtractionResult,
    divergence,
    evaluate_models,
    extract,
    first_divergence,
    generate_suffixes,
    load_model,
    longest_match_run,
    make_documents,
    membership_inference,
    min_k_mean,
    roc_auc,
    rouge_l,
    suffix_dropped,
    token_log_probs,
    token_match_fraction,
    tpr_at_fpr,
)
from goldfish_ds.reference import reference_goldfish_mask

transformers = pytest.importorskip("transformers")
REPO = Path(__file__).resolve().parents[1]
WORDS = ["the", "a", "fish", "swims", "in", "bowl", "water", "quick", "brown", "fox", "jumps", "over", "lazy", "dog",
         "river", "stone", "light", "tree", "house", "cold", "warm", "blue", "green", "red", "small", "large", "old",
         "new", "day", "night", "sun", "moon", "star", "sky"]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models run fastest on one thread (and do not stall when other jobs share the cores)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny_llama(vocab_size: int, seed: int = 0, initializer_range: float = 0.02):
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(vocab_size=vocab_size, hidden_size=64, intermediate_size=128,
                                      num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2,
                                      max_position_embeddings=128, initializer_range=initializer_range,
                                      bos_token_id=1, eos_token_id=2, pad_token_id=3)
    return transformers.LlamaForCausalLM(config)


def memorize(model, sequences, max_steps: int = 400):
    """Train on `sequences` (plain AdamW) until every target after the first word is the argmax."""
    width = max(map(len, sequences))
    ids = torch.full((len(sequences), width), 3)
    labels = torch.full((len(sequences), width), -100)
    for row, seq in enumerate(sequences):
        ids[row, :len(seq)] = labels[row, :len(seq)] = torch.tensor(seq)
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-2)
    model.train()
    for _ in range(max_steps):
        out = model(input_ids=ids, labels=labels)
        targets = labels[:, 3:]  # the first word picks the document: its tokens cannot be known in advance
        if out.loss.item() < 0.1 and ((out.logits[:, 2:-1].argmax(-1) == targets) | (targets == -100)).all():
            return model.eval()
        optimizer.zero_grad()
        out.loss.backward()
        optimizer.step()
    raise AssertionError("the tiny model did not memorize its documents")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """A sentencepiece tokenizer, 4 member texts (one given as exact ids with EOS) and 4 held-out texts."""
    rng = random.Random(0)
    texts = [" ".join(rng.choice(WORDS) for _ in range(12)) for _ in range(40)]
    work = tmp_path_factory.mktemp("corpus")
    tok_path = train_sentencepiece(texts, str(work / "tok"), vocab_size=320)
    tok = load_tokenizer(tok_path)
    members = [{"text": t} for t in texts[:4]]
    members[3]["ids"] = [tok.bos_id] + tok.encode(texts[3]) + [tok.eos_id]  # exact ids as trained
    nonmembers = [{"text": t} for t in texts[4:8]]
    for name, records in (("members", members), ("nonmembers", nonmembers)):
        (work / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return {"dir": work, "tokenizer": tok, "tokenizer_path": tok_path, "members": members,
            "nonmembers": nonmembers}


@pytest.fixture(scope="module")
def model_dirs(corpus):
    """HF directories (with tokenizer.model inside): "standard" memorized the members, "control" is untrained."""
    tok = corpus["tokenizer"]
    sequences = [d.ids for d in make_documents(corpus["members"], tok)]
    dirs = {}
    for name, model in (("standard", memorize(tiny_llama(tok.vocab_size), sequences)),
                        ("control", tiny_llama(tok.vocab_size, seed=1))):
        dirs[name] = corpus["dir"] / name
        model.save_pretrained(dirs[name])
        shutil.copy(corpus["tokenizer_path"], dirs[name] / "tokenizer.model")
    return dirs


def test_token_metrics_on_constructed_pairs():
    truth = [5, 6, 7, 8, 9, 10]
    assert (token_match_fraction(truth, truth), longest_match_run(truth, truth), first_divergence(truth, truth)) == \
        (1.0, 6, None)
    generated = [5, 6, 0, 8, 9, 10]
    assert token_match_fraction(generated, truth) == 5 / 6
    assert longest_match_run(generated, truth) == 3
    assert first_divergence(generated, truth) == 2
    generated = [0, 6, 7, 0, 0, 10]
    assert (token_match_fraction(generated, truth), longest_match_run(generated, truth),
            first_divergence(generated, truth)) == (0.5, 2, 0)
    with pytest.raises(ValueError, match="equal lengths"):
        token_match_fraction([1, 2], [1, 2, 3])


def test_rouge_l_is_the_lcs_f_measure():
    # tokens: lowercased alphanumeric words; LCS("the cat sat on the mat", "the cat on a mat") = the cat on mat
    precision, recall = 4 / 5, 4 / 6
    assert rouge_l("The cat, on a mat!", "the cat sat on the mat") == 2 * precision * recall / (precision + recall)
    assert rouge_l("the cat sat", "the cat sat") == 1.0
    assert rouge_l("dog", "the cat sat") == 0.0


def test_roc_auc_hand_computed():
    # member beats non-member in 4 + 4 + 3 of the 12 pairs
    assert roc_auc([0.9, 0.8, 0.4], [0.7, 0.3, 0.2, 0.1]) == 11 / 12
    # ties count 1/2: pairs (1 vs 1) = 1/2, (1 vs 0) = 1, twice
    assert roc_auc([1.0, 1.0], [1.0, 0.0]) == 0.75
    assert roc_auc([3.0, 4.0], [1.0, 2.0]) == 1.0
    assert roc_auc([1.0, 2.0], [3.0, 4.0]) == 0.0


def test_tpr_at_fpr_hand_computed():
    members = [0.95, 0.9, 0.6, 0.3]
    nonmembers = [0.8, 0.7] + [0.1] * 98
    # threshold 0.8: one false positive (FPR 1%), members 0.95 and 0.9 found; a lower threshold adds 0.7
    assert tpr_at_fpr(members, nonmembers, 0.01) == 0.5
    # FPR 2% admits threshold 0.3: every member, false positives 0.8 and 0.7
    assert tpr_at_fpr(members, nonmembers, 0.02) == 1.0
    # no false positive at all: only what scores above every non-member
    assert tpr_at_fpr(members, nonmembers, 0.0) == 0.5
    assert tpr_at_fpr([0.1], [0.2], 0.01) == 0.0


def test_membership_scores_are_higher_for_members():
    stats = DocumentScores(index=0, loss=2.0, zlib_ratio=0.05, min_k_log_prob=-3.0)
    assert [stats.membership_score(a) for a in ("loss", "zlib", "min_k")] == [-2.0, -0.05, -3.0]
    # members have lower loss: negated, they score higher and the AUC is above 1/2
    member_losses, nonmember_losses = [0.5, 0.7], [2.0, 0.6]
    assert roc_auc([-x for x in member_losses], [-x for x in nonmember_losses]) == 0.75


def test_min_k_mean_takes_the_lowest_log_probs():
    log_probs = torch.tensor([-1.0, -5.0, -2.0, -8.0, -3.0, -0.5, -4.0, -6.0, -7.0, -9.0])
    assert min_k_mean(log_probs, 20) == -8.5   # the 2 lowest of 10
    assert min_k_mean(log_probs, 5) == -9.0    # at least one token
    assert min_k_mean(log_probs, 100) == log_probs.double().mean().item()


def test_token_log_probs_equal_a_forward_pass_per_document():
    model = tiny_llama(50).eval()
    g = torch.Generator().manual_seed(0)
    sequences = [torch.randint(0, 50, (length,), generator=g).tolist() for length in (9, 17, 4, 12, 2)]
    batched = token_log_probs(model, sequences, batch_size=3)
    for seq, got in zip(sequences, batched):
        ids = torch.tensor(seq)
        with torch.no_grad():
            logits = model(input_ids=ids[None, :-1]).logits[0]
        expected = logits.log_softmax(-1).gather(-1, ids[1:, None])[:, 0]
        assert got.shape == (len(seq) - 1,)
        torch.testing.assert_close(got, expected)


@pytest.mark.parametrize("num_beams", [1, 4])
def test_batched_generation_equals_one_at_a_time(num_beams):
    model = tiny_llama(60, initializer_range=0.2).eval()  # wide logits: context-dependent, no near ties
    g = torch.Generator().manual_seed(2)
    documents = [Document(i, torch.randint(4, 60, (length,), generator=g).tolist(), "")
                 for i, length in enumerate((21, 14, 33, 9, 26, 17, 40))]
    batched = extract(model, documents, n=8, batch_size=3, num_beams=num_beams)
    alone = [extract(model, [doc], n=8, batch_size=1, num_beams=num_beams)[0] for doc in documents]
    assert [r.index for r in batched] == list(range(7))
    assert [r.generated for r in batched] == [r.generated for r in alone]
    assert batched == alone
    assert len({tuple(r.generated) for r in batched}) > 1  # the prompts matter


def test_generation_does_not_stop_at_eos():
    model = tiny_llama(60).eval()
    eos = torch.nn.functional.one_hot(torch.tensor(2), 60) * 100.0
    hook = model.lm_head.register_forward_hook(lambda module, args, out: out + eos)  # always predict EOS
    try:
        assert generate_suffixes(model, [[5, 6, 7], [8, 9]], n=5) == [[2] * 5, [2] * 5]
    finally:
        hook.remove()


def test_short_documents_are_skipped():
    model = tiny_llama(60).eval()
    documents = [Document(0, [1, 5, 6, 7], ""), Document(1, [1, 5, 6], ""), Document(2, [9] * 12, "")]
    results = extract(model, documents, n=3)
    assert [(r.index, r.prompt_length, r.truth) for r in results] == [(0, 1, [5, 6, 7]), (2, 9, [9, 9, 9])]
    results = extract(model, documents, n=3, prefix_len=2)  # needs prefix_len + n tokens
    assert [(r.index, r.prompt_length, r.truth) for r in results] == [(2, 2, [9, 9, 9])]


def test_memorized_documents_are_extracted_exactly(corpus, model_dirs):
    tok = corpus["tokenizer"]
    model = load_model(model_dirs["standard"])
    members = make_documents(corpus["members"], tok)
    for prefix_len in (None, 6):
        results = extract(model, members, n=8, prefix_len=prefix_len, batch_size=3, tokenizer=tok)
        assert [r.index for r in results] == [0, 1, 2, 3]
        assert all(r.exact_match and r.first_divergence is None for r in results)
        assert [(r.token_match, r.longest_run, r.rougeL) for r in results] == [(1.0, 8, 1.0)] * 4
        assert all(r.generated_text == r.truth_text for r in results)
    assert results[3].truth[-1] != tok.eos_id  # prefix 6: the suffix stops short of the EOS
    assert extract(model, members, n=8, tokenizer=tok)[3].truth[-1] == tok.eos_id  # the given ids, verbatim
    held_out = extract(model, make_documents(corpus["nonmembers"], tok), n=8, tokenizer=tok)
    assert not any(r.exact_match for r in held_out)


def test_membership_inference_separates_memorized_documents(corpus, model_dirs):
    tok = corpus["tokenizer"]
    members = make_documents(corpus["members"], tok)
    nonmembers = make_documents(corpus["nonmembers"], tok)
    result = membership_inference(load_model(model_dirs["standard"]), members, nonmembers, batch_size=3)
    assert max(s.loss for s in result.members) < min(s.loss for s in result.nonmembers)
    assert result.auc == {"loss": 1.0, "zlib": 1.0, "min_k": 1.0}
    assert result.tpr_at_1pct_fpr == {"loss": 1.0, "zlib": 1.0, "min_k": 1.0}
    scores = result.members[0]
    assert scores.zlib_ratio == scores.loss / len(zlib.compress(members[0].text.encode()))


def test_divergence_on_static_mask_by_hand():
    cfg = GoldfishConfig(k=3, h=4, strategy="static")  # label index t is dropped iff t % 3 == 0
    ids = list(range(10, 30))                          # 20 tokens: labels ids[1:], 19 of them
    n, prompt_length = 6, 14                           # suffix position j = label index 13 + j: j = 2, 5
    assert suffix_dropped(ids, prompt_length, n, cfg) == [False, False, True, False, False, True]
    truth = ids[prompt_length:]

    def result(index, generated):
        return ExtractionResult(index, prompt_length, generated, truth, generated == truth, 0.0, 0,
                                first_divergence(generated, truth), 0.0, "", "")

    results = [result(0, truth[:2] + [0, 0, 0, 0]), result(1, truth[:3] + [0, 0, 0]), result(2, list(truth))]
    documents = [Document(i, ids, "") for i in range(3)]
    got = divergence(results, documents, cfg)
    assert [(d.first_divergence, d.on_dropped) for d in got.documents] == [(2, True), (3, False), (None, None)]
    assert (got.num_divergences, got.on_dropped_rate, got.suffix_drop_rate) == (2, 0.5, 6 / 18)


def test_suffix_mask_is_the_training_row_mask():
    """A document at a row start, masked as training masks the whole packed row (reference implementation)."""
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(0, 1000, (40,), generator=g).tolist()
    row = ids + torch.randint(0, 1000, (25,), generator=g).tolist()  # the next document follows in the row
    for cfg in (GoldfishConfig(k=4, h=13), GoldfishConfig(k=3, h=5, strategy="hash-rolling", window="preceding")):
        training = reference_goldfish_mask(torch.tensor(row[1:])[None], cfg)[0]
        for n in (10, 39):
            assert suffix_dropped(ids, len(ids) - n, n, cfg) == training[len(ids) - 1 - n:len(ids) - 1].tolist()
        assert suffix_dropped(ids, 7, 20, cfg) == training[6:26].tolist()


def test_evaluate_models_api(corpus, model_dirs):
    results = evaluate_models({"standard": model_dirs["standard"]}, corpus["dir"] / "members.jsonl", num_docs=3,
                              n=8, batch_size=2, device="cpu", progress=False)
    run = results["runs"]["standard"]
    assert (run["num_documents"], run["num_skipped"], run["exact_match_rate"], run["rougeL_mean"]) == (3, 0, 1.0, 1.0)
    assert [d["index"] for d in run["documents"]] == [0, 1, 2]
    assert "mia" not in run and "beam" not in run and "divergence" not in run


def test_cli_end_to_end(corpus, model_dirs, tmp_path):
    out = tmp_path / "report"
    command = [sys.executable, str(REPO / "scripts" / "evaluate_memorization.py"),
               "--model", f"standard={model_dirs['standard']}", "--model", str(model_dirs["control"]),
               "--documents", str(corpus["dir"] / "members.jsonl"),
               "--nonmembers", str(corpus["dir"] / "nonmembers.jsonl"), "--suffix_len", "8", "--batch_size", "3",
               "--beam_search", "--num_beams", "3", "--goldfish_k", "4", "--goldfish_h", "3", "--device", "cpu",
               "--threads", "1", "--out", str(out)]
    proc = subprocess.run(command, capture_output=True, text=True, timeout=300, cwd=REPO, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads((out / "results.json").read_text())
    assert set(results["runs"]) == {"standard", "control"}  # the unnamed model takes its directory's name
    assert results["config"]["num_beams"] == 3
    assert (results["config"]["goldfish"]["k"], results["config"]["goldfish"]["exempt_ids"]) == (4, [1, 2, 3])
    standard, control = results["runs"]["standard"], results["runs"]["control"]
    for run in (standard, control):
        assert {"exact_match_rate", "rougeL_mean", "token_match_mean", "longest_run_mean", "num_documents",
                "num_skipped", "extraction_seconds", "documents", "beam", "mia", "divergence"} <= set(run)
        assert set(run["mia"]) >= {"loss", "zlib", "min_k", "members", "nonmembers"}
        assert len(run["documents"]) == len(run["beam"]["documents"]) == 4
        assert len(run["divergence"]["documents"]) == 4
    assert (standard["exact_match_rate"], standard["beam"]["exact_match_rate"]) == (1.0, 1.0)
    assert standard["mia"]["loss"] == {"auc": 1.0, "tpr_at_1pct_fpr": 1.0}
    assert standard["divergence"]["num_divergences"] == 0 and standard["divergence"]["on_dropped_rate"] is None
    assert control["exact_match_rate"] == 0.0 and control["divergence"]["num_divergences"] == 4
    summary = (out / "summary.md").read_text()
    assert "| standard |" in summary and "| control |" in summary and "AUC loss" in summary
    for png in ("rougeL_hist.png", "exact_match.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
