"""Causal-LM training with transformers' Trainer and the goldfish loss, on Python's bundled documentation.

    python examples/hf_trainer.py --max_steps 50                      # tiny random Llama, offline
    python examples/hf_trainer.py --model runs/default/hf --labels collator
    torchrun --nproc_per_node 2 examples/hf_trainer.py --deepspeed examples/ds_zero3.json
"""
from transformers import TrainingArguments

import hf_common


def main() -> None:
    args = hf_common.parser(__doc__.splitlines()[0]).parse_args()
    training_args = TrainingArguments(**hf_common.trainer_options(args))
    path = hf_common.model_path(args, training_args)
    tokenizer = hf_common.load_tokenizer(path)
    trainer = hf_common.causal_lm_trainer(args, training_args, hf_common.load_model(path), tokenizer)
    trainer.train()
    hf_common.write_report(trainer, args.output_dir)


if __name__ == "__main__":
    main()
