"""Supervised fine-tuning with TRL's SFTTrainer and the goldfish loss on the completions only.

Each of Python's bundled help topics becomes a prompt (its title) and a completion (its text); with
completion_only_loss the prompt tokens are -100 in the labels and the goldfish mask drops about 1/k of the
completion tokens only.

    python examples/trl_sft.py --max_steps 50                         # tiny random Llama, offline
    python examples/trl_sft.py --model runs/default/hf --labels collator
"""
from datasets import Dataset
from trl import SFTConfig, SFTTrainer
from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

import hf_common
from goldfish_ds.data import builtin_documents
from goldfish_ds.integrations.transformers import GoldfishDataCollator, GoldfishSFTTrainer


def prompt_completion_pairs() -> Dataset:
    """{"prompt": "Python help: TITLE\\n", "completion": TEXT} for each bundled help topic."""
    rows = []
    for doc in builtin_documents():
        title, _, body = doc.partition("\n")
        rows.append({"prompt": f"Python help: {title}\n", "completion": body.lstrip("*\n")})
    return Dataset.from_list(rows)


def main() -> None:
    args = hf_common.parser(__doc__.splitlines()[0]).parse_args()
    sft_args = SFTConfig(**hf_common.trainer_options(args), max_length=args.seq_len, completion_only_loss=True)
    path = hf_common.model_path(args, sft_args)
    tokenizer = hf_common.load_tokenizer(path)
    goldfish = hf_common.goldfish_config(args, tokenizer)
    model = hf_common.load_model(path)
    if args.labels == "fused":
        trainer = GoldfishSFTTrainer(model=model, args=sft_args, train_dataset=prompt_completion_pairs(),
                                     processing_class=tokenizer, goldfish=goldfish)
    else:
        collator = GoldfishDataCollator(DataCollatorForLanguageModeling(pad_token_id=tokenizer.pad_token_id),
                                        goldfish)
        trainer = SFTTrainer(model=model, args=sft_args, train_dataset=prompt_completion_pairs(),
                             processing_class=tokenizer, data_collator=collator)
    trainer.train()
    hf_common.write_report(trainer, args.output_dir)


if __name__ == "__main__":
    main()
