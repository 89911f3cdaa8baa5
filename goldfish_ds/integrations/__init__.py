"""Adapters for training stacks outside goldfish_ds; each submodule imports its own library when it is imported."""
