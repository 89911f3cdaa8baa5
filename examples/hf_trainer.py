"""Causal-LM training with transformers' Trainer and the goldfish loss, on Python's bundled documentation.

    python examples/hf_trainer.py --max_steps 50                      # tiny random Llama, offline
    python examples/hf_trainer.py --model runs/default/hf --labels collator
    deepspeed examples/hf_trainer.py --deepspeed examples/ds_zero3.json
"""
from transformers import Trainer, TrainingArguments, default_data_collator

import common
from goldfish_ds.integrations.transformers import GoldfishDataCollator, GoldfishTrainer


def main() -> None:
    args = common.parser(__doc__.splitlines()[0]).parse_args()
    training_args = TrainingArguments(**common.trainer_options(args))
    path = common.model_path(args, training_args)
    tokenizer = common.load_tokenizer(path)
    goldfish = common.goldfish_config(args, tokenizer)
    rows = common.packed_text_rows(tokenizer, args.seq_len)
    model = common.load_model(path)
    if args.labels == "fused":
        trainer = GoldfishTrainer(model=model, args=training_args, train_dataset=rows,
                                  data_collator=default_data_collator, goldfish=goldfish)
    else:
        trainer = Trainer(model=model, args=training_args, train_dataset=rows,
                          data_collator=GoldfishDataCollator(default_data_collator, goldfish))
    trainer.train()
    common.write_report(trainer, args.output_dir)


if __name__ == "__main__":
    main()
