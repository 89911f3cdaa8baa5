"""Export a checkpoint as an HF Llama directory: goldfish_ds.cli.export_hf, the goldfish-export-hf command."""
from goldfish_ds.cli.export_hf import main

if __name__ == "__main__":
    main()
