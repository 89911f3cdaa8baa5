"""goldfish_ds.integrations.transformers with the real libraries: transformers' Trainer, TRL's SFTTrainer, PEFT
LoRA and the Trainer's DeepSpeed ZeRO-3, on a tiny random LlamaForCausalLM for a few steps on CPU.

References are computed apart from the trainers: torch's cross_entropy on the logits of a fresh copy of the
initial weights, shifted the plain way (logits[:, :-1] against labels[:, 1:]), over the targets that
goldfish_ds.reference keeps with its windows over the shifted input_ids (padding -100).
"""
from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from transformers import (
    AutoTokenizer,
    DataCollatorForSeq2Seq,
    DataCollatorWithFlattening,
    LlamaForCausalLM,
    Trainer,
    TrainingArguments,
    default_data_collator,
)

from distributed import free_port
from goldfish_ds import GoldfishConfig, goldfish_mask
from goldfish_ds.integrations.transformers import (
    GoldfishDataCollator,
    GoldfishTrainer,
    goldfish_causal_lm_loss,
    goldfish_labels,
)
from goldfish_ds.reference import reference_goldfish_mask

REPO = Path(__file__).resolve().parents[1]
EXAMPLES = REPO / "examples"
CFG = GoldfishConfig(k=3, h=4, exempt_ids=(1, 2, 3))  # short rows: a small h leaves most targets to the mask
SEQ = 24


def load_example(name: str):
    spec = importlib.util.spec_from_file_location(f"examples_{name}", EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.path.insert(0, str(EXAMPLES))  # the HF examples import their shared `hf_common`
    try:
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(EXAMPLES))
    return module


examples = load_example("hf_common")


class RecordingCollator:
    """Calls a collator and keeps a copy of every batch it made, in order."""

    def __init__(self, collator) -> None:
        self.collator, self.batches = collator, []

    def __call__(self, features):
        batch = self.collator(features)
        self.batches.append({key: value.clone() for key, value in batch.items()})
        return batch


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> Path:
    return examples.write_tiny_model(tmp_path_factory.mktemp("hf") / "tiny", hidden_size=32, layers=2, seed=0)


def fresh_model(tiny_dir: Path) -> LlamaForCausalLM:
    return LlamaForCausalLM.from_pretrained(tiny_dir, dtype=torch.float32)


@pytest.fixture(scope="module")
def rows(tiny_dir) -> list[dict]:
    """Real text rows, right-padded by 0 to 15 tokens (labels -100), so micro-batches keep different counts."""
    tokenizer = AutoTokenizer.from_pretrained(tiny_dir)
    out = []
    for i, row in enumerate(examples.packed_text_rows(tokenizer, SEQ)[:64]):
        ids, labels = torch.tensor(row["input_ids"]), torch.tensor(row["labels"])
        real = SEQ - (i % 4) * 5
        mask = (torch.arange(SEQ) < real).long()
        out.append({"input_ids": ids.masked_fill(mask == 0, tokenizer.pad_token_id), "attention_mask": mask,
                    "labels": labels.masked_fill(mask == 0, -100)})
    return out


def training_args(output_dir: Path, **overrides) -> TrainingArguments:
    options = dict(output_dir=str(output_dir), max_steps=3, per_device_train_batch_size=2,
                   gradient_accumulation_steps=2, learning_rate=5e-3, logging_steps=1, save_strategy="no",
                   report_to="none", use_cpu=True, disable_tqdm=True, seed=0)
    return TrainingArguments(**{**options, **overrides})


def logged(trainer, key: str) -> list[float]:
    return [entry[key] for entry in trainer.state.log_history if key in entry and "train_runtime" not in entry]


def shifted_tokens(batch: dict) -> torch.Tensor:
    """A batch's next-token ids [B, T - 1], -100 at padding: what the goldfish windows hash."""
    return batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)[:, 1:]


def reference_dropped(batches: list[dict], cfg: GoldfishConfig, hash_labels: bool = False) -> torch.Tensor:
    """goldfish_ds.reference's mask [N, T - 1] of the batches' shifted labels, windows over their tokens (or labels)."""
    labels = torch.cat([b["labels"][:, 1:] for b in batches])
    window_ids = None if hash_labels else torch.cat([shifted_tokens(b) for b in batches])
    return reference_goldfish_mask(labels, cfg, window_ids=window_ids)


def reference_loss(model: LlamaForCausalLM, batches: list[dict], cfg: GoldfishConfig, hash_labels: bool = False
                   ) -> float:
    """torch's mean cross-entropy over the reference-kept targets of all the batches together (one optimizer step)."""
    with torch.no_grad():
        logits = torch.cat([model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits[:, :-1]
                            for b in batches])
    labels = torch.cat([b["labels"][:, 1:] for b in batches])
    kept = labels.masked_fill(reference_dropped(batches, cfg, hash_labels), -100)
    return F.cross_entropy(logits.flatten(0, 1), kept.flatten()).item()


@pytest.fixture(scope="module")
def trainer_runs(tiny_dir, rows, tmp_path_factory):
    """Three steps of 2 x 2 rows: GoldfishTrainer (fused loss), and the stock Trainer on GoldfishDataCollator labels.

    Plain SGD, so the weights after the steps compare the gradients tightly (Adam's normalised update turns the
    rounding noise of near-zero gradient entries into differences of the learning rate's size).
    """
    out = tmp_path_factory.mktemp("trainer")
    sgd = dict(optim="sgd", learning_rate=0.5)
    fused_batches = RecordingCollator(default_data_collator)
    fused = GoldfishTrainer(model=fresh_model(tiny_dir), args=training_args(out / "fused", **sgd), train_dataset=rows,
                            eval_dataset=rows[:8], data_collator=fused_batches, goldfish=CFG)
    fused.train()
    stock_batches = RecordingCollator(default_data_collator)
    stock = Trainer(model=fresh_model(tiny_dir), args=training_args(out / "stock", **sgd), train_dataset=rows,
                    data_collator=GoldfishDataCollator(stock_batches, CFG))
    stock.train()
    return fused, fused_batches.batches, stock, stock_batches.batches


def test_logged_loss_is_goldfish_cross_entropy_over_the_accumulated_batch(tiny_dir, trainer_runs):
    fused, batches, _, _ = trainer_runs
    first_step = batches[:2]
    expected = reference_loss(fresh_model(tiny_dir), first_step, CFG)
    assert logged(fused, "loss")[0] == pytest.approx(expected, rel=1e-6)
    # The normalisation matters on these rows: per-micro-batch means, or the Trainer's count of every supervised
    # target (what a plain compute_loss_func gets), give other values.
    per_batch = sum(reference_loss(fresh_model(tiny_dir), [b], CFG) for b in first_step) / 2
    supervised = sum(int(b["labels"][:, 1:].ne(-100).sum()) for b in first_step)
    kept = supervised - sum(int(goldfish_mask(b["labels"][:, 1:], CFG).sum()) for b in first_step)
    assert abs(per_batch - expected) > 1e-3 and abs(expected * kept / supervised - expected) > 1e-1


def test_logged_drop_rate_is_the_mask_of_each_step(trainer_runs):
    fused, batches, _, _ = trainer_runs
    for step, rate in enumerate(logged(fused, "goldfish_drop_rate")):
        targets = torch.cat([b["labels"][:, 1:] for b in batches[2 * step:2 * step + 2]])
        assert rate == pytest.approx(goldfish_mask(targets, CFG).sum().item() / targets.ne(-100).sum().item())
        assert 0.1 < rate < 0.5


def test_fused_loss_trains_like_the_model_loss_on_collator_labels(trainer_runs):
    fused, fused_batches, stock, stock_batches = trainer_runs
    assert len(fused_batches) >= 6 and len(stock_batches) >= 6  # 3 steps x 2 (the dataloader may read one ahead)
    for a, b in zip(fused_batches[:6], stock_batches[:6]):
        assert torch.equal(a["input_ids"], b["input_ids"])  # the same rows in the same order
    assert logged(fused, "loss") == pytest.approx(logged(stock, "loss"), rel=1e-6)
    assert logged(fused, "grad_norm") == pytest.approx(logged(stock, "grad_norm"), rel=1e-5)
    for (name, p), q in zip(fused.model.named_parameters(), stock.model.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=1e-6, msg=name)


def test_evaluation_reports_the_standard_loss(trainer_runs, rows):
    fused = trainer_runs[0]
    batches = [default_data_collator(rows[i:i + 2]) for i in range(0, 8, 2)]
    with torch.no_grad():
        logits = torch.cat([fused.model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits[:, :-1]
                            for b in batches])
    labels = torch.cat([b["labels"][:, 1:] for b in batches])
    eval_loss = fused.evaluate()["eval_loss"]
    assert eval_loss == pytest.approx(F.cross_entropy(logits.flatten(0, 1), labels.flatten()).item(), rel=1e-6)


def test_dropped_targets_get_a_zero_logit_gradient(tiny_dir, rows):
    model = fresh_model(tiny_dir)
    batch = default_data_collator(rows[:4])
    captured = []

    def keep_logits_gradient(module, args, logits):
        logits.register_hook(captured.append)

    hook = model.lm_head.register_forward_hook(keep_logits_gradient)
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    loss = goldfish_causal_lm_loss(model(**inputs).logits, batch["labels"], CFG)
    hook.remove()
    loss.backward()
    grad = captured[0]
    targets = batch["labels"][:, 1:]
    dropped = goldfish_mask(targets, CFG)
    kept = targets.ne(-100) & ~dropped
    assert dropped.sum() > 10 and targets.eq(-100).sum() > 10
    assert grad[:, :-1][~kept].abs().max() == 0 and grad[:, -1].abs().max() == 0  # dropped, padding, last column
    with torch.no_grad():
        logits = model(**inputs).logits[:, :-1]
    logits.requires_grad_(True)
    expected = F.cross_entropy(logits[kept], targets[kept])
    expected.backward()
    assert loss.item() == pytest.approx(expected.item(), rel=1e-6)
    torch.testing.assert_close(grad[:, :-1][kept], logits.grad[kept], rtol=1e-5, atol=1e-8)
    assert model.model.embed_tokens.weight.grad.abs().sum() > 0  # the gradient went on into the model


def test_lora_run_changes_only_the_adapters(tiny_dir, rows, tmp_path):
    from peft import LoraConfig, get_peft_model

    lora = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")
    model = get_peft_model(fresh_model(tiny_dir), lora)
    before = {name: value.clone() for name, value in model.state_dict().items()}
    batches = RecordingCollator(default_data_collator)
    trainer = GoldfishTrainer(model=model, args=training_args(tmp_path), train_dataset=rows, data_collator=batches,
                              goldfish=CFG)
    trainer.train()
    after = model.state_dict()
    adapters = {name for name in before if "lora_" in name}
    assert len(adapters) == 2 * 2 * 2  # A and B of q_proj and v_proj in 2 layers
    assert {name for name in before if not torch.equal(before[name], after[name])} == adapters
    # LoRA's B starts at zero, so the first step's model is the base model.
    assert logged(trainer, "loss")[0] == pytest.approx(reference_loss(fresh_model(tiny_dir), batches.batches[:2], CFG),
                                                       rel=1e-6)


@pytest.fixture(scope="module")
def sft_runs(tiny_dir, tmp_path_factory):
    """Two steps of TRL SFT on prompt/completion pairs: GoldfishSFTTrainer, and SFTTrainer on collator labels."""
    from trl import SFTConfig, SFTTrainer
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    from goldfish_ds.integrations.transformers import GoldfishSFTTrainer

    out = tmp_path_factory.mktemp("sft")
    tokenizer = AutoTokenizer.from_pretrained(tiny_dir)
    pairs = load_example("trl_sft").prompt_completion_pairs().select(range(16))

    def config(name):
        return SFTConfig(output_dir=str(out / name), max_steps=2, per_device_train_batch_size=2,
                         gradient_accumulation_steps=2, learning_rate=5e-3, logging_steps=1, max_length=40,
                         completion_only_loss=True, save_strategy="no", report_to="none", use_cpu=True,
                         disable_tqdm=True, seed=0, bf16=False)  # SFTConfig's default bf16 autocasts, even on CPU

    fused_batches = RecordingCollator(DataCollatorForLanguageModeling(pad_token_id=tokenizer.pad_token_id))
    fused = GoldfishSFTTrainer(model=fresh_model(tiny_dir), args=config("fused"), train_dataset=pairs,
                               processing_class=tokenizer, data_collator=fused_batches, goldfish=CFG)
    fused.train()
    stock = SFTTrainer(model=fresh_model(tiny_dir), args=config("stock"), train_dataset=pairs,
                       processing_class=tokenizer,
                       data_collator=GoldfishDataCollator(DataCollatorForLanguageModeling(
                           pad_token_id=tokenizer.pad_token_id), CFG))
    stock.train()
    return fused, fused_batches.batches, stock


def test_sft_loss_is_goldfish_on_the_completions_only(tiny_dir, sft_runs):
    fused, batches, stock = sft_runs
    first_step = batches[:2]
    for batch in first_step:
        for labels, ids in zip(batch["labels"], batch["input_ids"]):
            prompt = int(labels.ne(-100).int().argmax())  # TRL set the prompt's labels to -100
            assert prompt >= 3 and torch.equal(labels[prompt:prompt + 8], ids[prompt:prompt + 8])
    expected = reference_loss(fresh_model(tiny_dir), first_step, CFG)
    assert logged(fused, "loss")[0] == pytest.approx(expected, rel=1e-6)
    # TRL's own loss (its fused LM head) on GoldfishDataCollator labels: the same first step.
    assert logged(stock, "loss")[0] == pytest.approx(expected, rel=1e-6)
    with_prompts = [{**b, "labels": b["input_ids"].masked_fill(b["attention_mask"] == 0, -100)} for b in first_step]
    assert abs(reference_loss(fresh_model(tiny_dir), with_prompts, CFG) - expected) > 1e-3
    # Hashing the labels (their -100 prompts) instead of the tokens would drop other completion targets.
    assert abs(reference_loss(fresh_model(tiny_dir), first_step, CFG, hash_labels=True) - expected) > 1e-4
    rates = logged(fused, "goldfish_drop_rate")
    assert len(rates) == 2 and all(0.1 < r < 0.5 for r in rates)
    for step, rate in enumerate(rates):  # the count behind num_items_in_batch hashes the tokens too
        step_batches = batches[2 * step:2 * step + 2]
        supervised = sum(int(b["labels"][:, 1:].ne(-100).sum()) for b in step_batches)
        assert rate == pytest.approx(reference_dropped(step_batches, CFG).sum().item() / supervised)


def prompt_response_features(tokenizer, supervise_prompt: bool) -> list[dict]:
    """Four rows: one response after four different prompts of 6 tokens each, then a longer row of its own.

    The prompts' labels are -100 unless supervise_prompt; the longer row makes the others padded.
    """
    docs = [tokenizer.encode(text, add_special_tokens=False) for text in examples.builtin_documents()[:6]]
    response = docs[4][:20]
    rows = [doc[:6] + response for doc in docs[:4]]
    features = [{"input_ids": ids, "labels": ids if supervise_prompt else [-100] * 6 + response} for ids in rows]
    return features + [{"input_ids": docs[5][:40], "labels": docs[5][:40]}]


@pytest.mark.parametrize("padding_side", ["left", "right"])
def test_collator_drops_depend_on_the_tokens_not_on_the_prompt_mask(tiny_dir, padding_side):
    tokenizer = AutoTokenizer.from_pretrained(tiny_dir, padding_side=padding_side)
    seq2seq = DataCollatorForSeq2Seq(tokenizer)  # pads labels with -100 on the tokenizer's side
    goldfish = GoldfishDataCollator(seq2seq, CFG)
    dropped, label_hash_dropped = {}, {}
    for supervised in (False, True):
        features = prompt_response_features(tokenizer, supervised)
        batch = seq2seq(features)
        out = goldfish(features)
        assert torch.equal(out["input_ids"], batch["input_ids"]) and out["labels"].shape == (5, 40)
        assert batch["attention_mask"][:4].eq(0).sum() == 4 * 14  # the prompt rows are padded
        dropped[supervised] = batch["labels"].ne(-100) & out["labels"].eq(-100)
        assert torch.equal(dropped[supervised][:, 1:], reference_dropped([batch], CFG))
        label_hash_dropped[supervised] = reference_dropped([batch], CFG, hash_labels=True)
    start = 14 + 6 if padding_side == "left" else 6  # the response's first label column
    response = slice(start, start + 20)
    past_first_windows = slice(start + CFG.h - 1, start + 20)
    masked = dropped[False]
    assert 3 <= masked[:4, response].sum(1).min() and masked[:4, response].sum(1).max() <= 12
    assert (masked[:4, past_first_windows] == masked[0, past_first_windows]).all()  # the same after every prompt
    assert torch.equal(dropped[True][:4, response], masked[:4, response])  # supervising the prompt changes nothing
    assert not masked[:4, :start].any()  # prompts and padding are never dropped
    # Hashing the labels would make the response's first drops depend on whether the prompt is supervised.
    assert not torch.equal(label_hash_dropped[True][:4, start - 1:start + 19],
                           label_hash_dropped[False][:4, start - 1:start + 19])


def test_bad_settings_are_clear_errors(tiny_dir, rows, tmp_path):
    model = fresh_model(tiny_dir)
    with pytest.raises(ValueError, match="ignore_index must be -100"):
        GoldfishTrainer(model=model, args=training_args(tmp_path), goldfish=GoldfishConfig(k=4, h=13, ignore_index=-1))
    with pytest.raises(ValueError, match="compute_loss_func must be None"):
        GoldfishTrainer(model=model, args=training_args(tmp_path), goldfish=CFG, compute_loss_func=lambda *a, **k: 0)
    with pytest.raises(TypeError, match="goldfish must be a goldfish_ds.GoldfishConfig"):
        GoldfishTrainer(model=model, args=training_args(tmp_path), goldfish={"k": 4})
    unlabelled = [{"input_ids": r["input_ids"]} for r in rows[:4]]
    with pytest.raises(ValueError, match="training batches need causal-LM 'labels'"):
        GoldfishTrainer(model=model, args=training_args(tmp_path), train_dataset=unlabelled, goldfish=CFG).train()
    with pytest.raises(ValueError, match="strategy 'random'"):
        GoldfishDataCollator(default_data_collator, GoldfishConfig(k=4, h=1, strategy="random"))
    no_labels = GoldfishDataCollator(default_data_collator, CFG)
    with pytest.raises(ValueError, match="has no 'labels'"):
        no_labels(unlabelled)
    with pytest.raises(ValueError, match="shift_labels"):
        no_labels([{**r, "shift_labels": r["labels"]} for r in rows[:2]])
    flattening = GoldfishDataCollator(DataCollatorWithFlattening(), CFG)  # transformers' padding-free collator
    with pytest.raises(ValueError, match="padding-free batches"):
        flattening([{"input_ids": r["input_ids"]} for r in rows[:2]])
    with pytest.raises(ValueError, match="labels must be an int64 \\[batch, seq\\] tensor"):
        goldfish_labels(rows[0]["labels"], CFG)
    with pytest.raises(ValueError, match="labels must be an int64 \\[batch, seq\\] tensor"):
        goldfish_labels(torch.zeros(2, 5), CFG)
    batch = default_data_collator(rows[:2])
    with pytest.raises(ValueError, match="labels must be -100 or equal input_ids at every position"):
        goldfish_labels(batch["labels"] + 1, CFG, input_ids=batch["input_ids"])
    with pytest.raises(ValueError, match="labels must be -100 or equal input_ids"):  # a supervised padding position
        goldfish_labels(batch["input_ids"], CFG, input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    with pytest.raises(ValueError, match="input_ids must be an int64 tensor of labels' shape"):
        goldfish_labels(batch["labels"], CFG, input_ids=batch["input_ids"][:, 1:])
    with pytest.raises(ValueError, match="attention_mask must be a \\[batch, seq\\] padding mask"):
        goldfish_labels(batch["labels"], CFG, input_ids=batch["input_ids"], attention_mask=batch["attention_mask"][0])


EXAMPLE_FLAGS = ["--max_steps", "3", "--seq_len", "32", "--grad_accum", "2", "--tiny_hidden_size", "32"]


def example_report(output_dir: Path) -> dict:
    """The report.json an example wrote, with the logged losses."""
    report = json.loads((output_dir / "report.json").read_text())
    report["losses"] = [e["loss"] for e in report["log_history"] if "loss" in e]
    return report


def run_example(command: list, output_dir: Path, **env_vars: str) -> dict:
    """Run an example in a subprocess (a command line ending in its options) and return its report."""
    env = dict(os.environ, DS_ACCELERATOR="cpu", **env_vars,
               PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    result = subprocess.run([*command, *EXAMPLE_FLAGS, "--output_dir", str(output_dir)], env=env, cwd=REPO,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return example_report(output_dir)


def test_hf_trainer_example_under_zero3_on_two_ranks_trains_like_one_process(tiny_dir, tmp_path, monkeypatch):
    monkeypatch.setattr(sys, "argv", ["hf_trainer.py", "--model", str(tiny_dir), "--batch_size", "2", *EXAMPLE_FLAGS,
                                      "--output_dir", str(tmp_path / "one")])
    load_example("hf_trainer").main()  # in this process, without DeepSpeed
    one = example_report(tmp_path / "one")
    torchrun = str(Path(sys.executable).parent / "torchrun")
    zero3 = run_example([torchrun, "--nproc_per_node", "2", "--master_port", str(free_port()),
                         str(EXAMPLES / "hf_trainer.py"), "--model", str(tiny_dir), "--batch_size", "1",
                         "--deepspeed", str(EXAMPLES / "ds_zero3.json")], tmp_path / "zero3", OMP_NUM_THREADS="1")
    assert zero3["zero3_partitioned"] and not one["zero3_partitioned"]
    # 2 ranks x 1 row x 2 micro-batches: the same 4 rows a step as 1 x 2 x 2, the loss over all their kept targets.
    assert len(one["losses"]) == 3 and zero3["losses"] == pytest.approx(one["losses"], rel=1e-6)
    assert len(set(one["losses"])) == 3  # the weights moved


@pytest.mark.parametrize("script", ["trl_sft.py", "peft_lora.py"])
def test_example_runs(script, tmp_path):
    report = run_example([sys.executable, str(EXAMPLES / script), "--batch_size", "2"], tmp_path)
    assert len(report["losses"]) == 3 and all(math.isfinite(x) and 5 < x < 7 for x in report["losses"])
    assert all(0 < e["goldfish_drop_rate"] < 0.5 for e in report["log_history"] if "loss" in e)
