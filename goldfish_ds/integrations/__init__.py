"""Adapters for the training frameworks people already use; each submodule imports its framework only when used."""
