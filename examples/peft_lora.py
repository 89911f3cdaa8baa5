"""LoRA fine-tuning (PEFT) with transformers' Trainer and the goldfish loss: only the adapters train.

    python examples/peft_lora.py --max_steps 50                       # tiny random Llama, offline
    python examples/peft_lora.py --model runs/default/hf --lora_r 16
"""
from peft import LoraConfig, get_peft_model
from transformers import TrainingArguments

import hf_common


def main() -> None:
    p = hf_common.parser(__doc__.splitlines()[0])
    p.add_argument("--lora_r", type=int, default=8, help="LoRA rank (alpha = 2 x rank)")
    args = p.parse_args()
    training_args = TrainingArguments(**hf_common.trainer_options(args))
    path = hf_common.model_path(args, training_args)
    tokenizer = hf_common.load_tokenizer(path)
    lora = LoraConfig(r=args.lora_r, lora_alpha=2 * args.lora_r, lora_dropout=0.0, task_type="CAUSAL_LM",
                      target_modules=["q_proj", "k_proj", "v_proj", "o_proj"])
    model = get_peft_model(hf_common.load_model(path), lora)
    model.print_trainable_parameters()
    trainer = hf_common.causal_lm_trainer(args, training_args, model, tokenizer)
    trainer.train()
    hf_common.write_report(trainer, args.output_dir)


if __name__ == "__main__":
    main()
