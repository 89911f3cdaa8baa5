"""Models: Llama built from the tensor-parallel layers, and HF checkpoint interop."""
from goldfish_ds.models.hf import (HFCheckpoint, export_hf_state_dict, llama_from_hf, load_hf_llama, read_hf_state_dict,
                                   save_hf_llama)
from goldfish_ds.models.llama import Llama, LlamaConfig

__all__ = ["HFCheckpoint", "Llama", "LlamaConfig", "export_hf_state_dict", "llama_from_hf", "load_hf_llama",
           "read_hf_state_dict", "save_hf_llama"]
