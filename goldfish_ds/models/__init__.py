"""Models: Llama built from the tensor-parallel layers, its rotary embeddings, and HF checkpoint interop."""
from goldfish_ds.models.hf import (HFCheckpoint, export_hf_state_dict, llama_from_hf, load_hf_llama, read_hf_state_dict,
                                   save_hf_llama)
from goldfish_ds.models.llama import Llama, LlamaConfig, documents_from_eos
from goldfish_ds.models.rope import RopeParameters
from goldfish_ds.parallel.layers import LossTargets  # the argument of Llama.forward(..., loss_targets=...)

__all__ = ["HFCheckpoint", "Llama", "LlamaConfig", "LossTargets", "RopeParameters", "documents_from_eos",
           "export_hf_state_dict", "llama_from_hf", "load_hf_llama", "read_hf_state_dict", "save_hf_llama"]
