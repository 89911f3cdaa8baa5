"""Goldfish SFT on a pretrained checkpoint: does an instruction-tuned model reproduce its training answers?

Builds an instruction set from the first --num_examples articles of a wiki JSONL (question = the title, answer =
the leading sentences of the first paragraph, up to --answer_chars characters), writes it as chat SFT data
(goldfish-prepare-data --format chat, one example per row), fine-tunes --base (an HF Llama directory) on it twice
with goldfish-pretrain --init_from_hf (standard loss, then goldfish k=4 h=13), and greedily generates every
answer from its rendered question (the chat generation prompt) with the base and both fine-tuned models.
Prints a markdown table: exact-match rate of the answers (answer + EOS), mean token match, mean longest
verbatim run (tokens) and RougeL; OUT/results.json holds the same numbers.

    python examples/sft_memorization.py --base BASE_HF_DIR --tokenizer tok.model --out runs/sft
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

from goldfish_ds.data import chat_generation_prompt, load_tokenizer
from goldfish_ds.eval.documents import Document, load_model
from goldfish_ds.eval.extraction import extract, summarize_extraction

REPO = Path(__file__).resolve().parents[1]


def leading_sentences(paragraph: str, max_chars: int) -> str:
    """The paragraph's first sentences, as many as fit in max_chars (at least one)."""
    sentences = paragraph.replace(". ", ".\0").split("\0")
    answer = sentences[0]
    for sentence in sentences[1:]:
        if len(answer) + 1 + len(sentence) > max_chars:
            break
        answer += " " + sentence
    return answer


def build_set(wiki: str, num_examples: int, max_chars: int) -> list[dict]:
    with open(wiki, encoding="utf-8") as f:
        articles = [json.loads(line) for line in f][:num_examples]
    return [{"messages": [{"role": "user", "content": a["title"]},
                          {"role": "assistant", "content": leading_sentences(a["text"].split("\n")[0], max_chars)}]}
            for a in articles]


def evaluate(model_dir: str, tokenizer_path: str, examples: list[dict]) -> dict:
    """Greedy answers from each question's generation prompt; exact match = answer ids and EOS reproduced."""
    tok = load_tokenizer(tokenizer_path)
    model = load_model(model_dir)
    results = []
    for index, example in enumerate(examples):
        question, answer = example["messages"]
        truth = tok.encode(answer["content"]) + [tok.eos_id]  # as the plain template supervises it
        doc = Document(index, chat_generation_prompt(tok, [question]) + truth, "")
        results += extract(model, [doc], n=len(truth), tokenizer=tok)
    return summarize_extraction(results)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base", required=True, help="HF Llama directory to fine-tune")
    parser.add_argument("--tokenizer", required=True, help="its tokenizer (sentencepiece .model or HF directory)")
    parser.add_argument("--wiki", default=str(REPO.parent / "shared" / "data" / "wiki_dev.jsonl"))
    parser.add_argument("--out", required=True)
    parser.add_argument("--num_examples", type=int, default=32)
    parser.add_argument("--answer_chars", type=int, default=300)
    parser.add_argument("--seq_len", type=int, default=128)
    parser.add_argument("--steps", type=int, default=240, help="optimizer steps (of 8 examples) per fine-tuning run")
    parser.add_argument("--lr", type=float, default=1e-3)
    args = parser.parse_args()

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    examples = build_set(args.wiki, args.num_examples, args.answer_chars)
    (out / "sft.jsonl").write_text("".join(json.dumps(e) + "\n" for e in examples))
    run = [sys.executable, "-m"]
    subprocess.run(run + ["goldfish_ds.cli.prepare_data", "--format", "chat", "--input", str(out / "sft.jsonl"),
                          "--tokenizer", args.tokenizer, "--out", str(out / "data"), "--seq_len", str(args.seq_len)],
                   check=True)
    rows = {"base": args.base}
    for name, loss in (("standard", ["--no-goldfish"]), ("goldfish k=4 h=13", ["--goldfish_k", "4",
                                                                            "--goldfish_h", "13"])):
        run_dir = out / name.split()[0]
        subprocess.run(run + ["goldfish_ds.cli.pretrain", "--init_from_hf", args.base, "--data", str(out / "data"),
                              "--tokenizer", args.tokenizer, "--seq_len", str(args.seq_len), "--max_steps",
                              str(args.steps), "--warmup_steps", "10", "--lr", str(args.lr), "--min_lr",
                              str(args.lr / 10), "--weight_decay", "0", "--eval_interval", "0", "--save_interval",
                              str(args.steps), "--keep_checkpoints", "1", "--out_dir", str(run_dir), "--no-progress",
                              "--deepspeed_config", str(REPO / "configs" / "deepspeed" / "zero3_cpu.json"), *loss],
                       check=True)
        rows[name] = str(run_dir / "hf")
    table = {name: evaluate(model_dir, args.tokenizer, examples) for name, model_dir in rows.items()}
    (out / "results.json").write_text(json.dumps(table, indent=1))
    print(f"| model | exact match ({len(examples)} answers) | token match | longest run | RougeL |\n"
          "| --- | --- | --- | --- | --- |")
    for name, s in table.items():
        print(f"| {name} | {s['exact_match_rate']:.3f} | {s['token_match_mean']:.3f} | {s['longest_run_mean']:.1f} | "
              f"{s['rougeL_mean']:.3f} |")


if __name__ == "__main__":
    main()
