"""The memorization experiment: goldfish_ds.cli.run_memorization_experiment, goldfish-memorization-experiment."""
from goldfish_ds.cli.run_memorization_experiment import main

if __name__ == "__main__":
    main()
