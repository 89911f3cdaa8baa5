"""Train a sentencepiece tokenizer: goldfish_ds.cli.train_tokenizer, the goldfish-train-tokenizer command."""
from goldfish_ds.cli.train_tokenizer import main

if __name__ == "__main__":
    main()
