"""Tokenize documents into packed shards: goldfish_ds.cli.prepare_data, the goldfish-prepare-data command."""
from goldfish_ds.cli.prepare_data import main

if __name__ == "__main__":
    main()
