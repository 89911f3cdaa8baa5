"""The pretraining job: goldfish_ds.cli.pretrain, the goldfish-pretrain command (--help lists every option)."""
from goldfish_ds.cli.pretrain import main

if __name__ == "__main__":
    main()
