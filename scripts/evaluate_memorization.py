"""Memorization evaluation: goldfish_ds.cli.evaluate_memorization, goldfish-evaluate-memorization."""
from goldfish_ds.cli.evaluate_memorization import main

if __name__ == "__main__":
    main()
