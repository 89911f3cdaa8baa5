"""ZeRO-3 partitions filled from an HF checkpoint and exported, on real gloo ranks under deepspeed.zero.Init."""
import os

os.environ.setdefault("DS_ACCELERATOR", "cpu")  # before deepspeed is imported, here and in the spawned ranks

import pytest  # noqa: E402
import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

from distributed import run_distributed  # noqa: E402
from goldfish_ds.models import (Llama, LlamaConfig, export_hf_state_dict, llama_from_hf,  # noqa: E402
                                read_hf_state_dict)
from goldfish_ds.models.hf import hf_parameters  # noqa: E402
from goldfish_ds.parallel import (data_parallel_group, destroy_model_parallel, initialize_model_parallel,  # noqa: E402
                                  mpu)
from goldfish_ds.parallel.layers import uninitialised_weights  # noqa: E402
from goldfish_ds.training.export import export_hf  # noqa: E402
from goldfish_ds.training.partitions import load_hf_into_partitions, partition_range  # noqa: E402
from test_models_llama import hf_checkpoint  # noqa: E402

ZERO3 = {"train_micro_batch_size_per_gpu": 1, "zero_optimization": {"stage": 3}}


def zero3_llama(cfg: LlamaConfig, **kwargs) -> Llama:
    import deepspeed

    with deepspeed.zero.Init(data_parallel_group=data_parallel_group(), mpu=mpu, config_dict_or_path=ZERO3):
        return Llama(cfg, **kwargs)


def gathered(model: Llama) -> dict:
    """This rank's tensor-parallel slice of every parameter, gathered from the ZeRO-3 partitions."""
    import deepspeed

    out = {}
    for entry in hf_parameters(model):
        with deepspeed.zero.GatheredParameters([entry.param]):
            out[entry.key] = entry.param.detach().clone()
    return out


def body_partitions(rank, world, tp, path, out):
    import deepspeed

    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank))  # what DeepSpeed reads
    deepspeed.init_distributed(dist_backend="gloo")
    initialize_model_parallel(tp)
    try:
        cfg = LlamaConfig.from_json(f"{path}/config.json")
        reference = {e.key: e.param.detach() for e in hf_parameters(llama_from_hf(path))}  # this rank's TP slices
        with uninitialised_weights():
            model = zero3_llama(cfg)
        assert all(p.numel() == 0 for p in model.parameters())  # partitioned from the start
        load_hf_into_partitions(model, path)
        for entry in hf_parameters(model):
            start, stop = partition_range(entry.param)
            assert not entry.param.ds_tensor[stop - start:].any()  # the padding past the end is zero
        weights = gathered(model)
        assert weights.keys() == reference.keys()
        assert all(torch.equal(weights[k], reference[k]) for k in reference)
        export_hf(model, f"{out}/loaded", None, max_shard_size="30KB")
        # After an optimizer step the partitions are still what export writes (small parameters stay gathered).
        engine, *_ = deepspeed.initialize(model=model, optimizer=torch.optim.AdamW(model.parameters(), lr=1e-2),
                                          config=ZERO3, mpu=mpu, dist_init_required=False)
        ids = torch.randint(0, cfg.vocab_size, (1, 9), generator=torch.Generator().manual_seed(dist.get_rank() // tp))
        engine.backward(engine(ids).square().mean())
        engine.step()
        export_hf(engine.module, f"{out}/trained", None, max_shard_size="30KB")
        with deepspeed.zero.GatheredParameters(list(engine.module.parameters())):
            expected = export_hf_state_dict(engine.module)
        if rank == 0:
            trained = read_hf_state_dict(f"{out}/trained")
            assert trained.keys() == expected.keys() and all(torch.equal(trained[k], expected[k]) for k in trained)
            assert not torch.equal(trained["model.norm.weight"], reference["model.norm.weight"])
        # Initialised under zero.Init, on the CPU: the same parameters as without ZeRO and TP.
        drawn = gathered(zero3_llama(cfg, seed=7))
        expected = {e.key: e.param.detach() for e in hf_parameters(Llama(cfg, seed=7))}
        assert all(torch.equal(drawn[k], expected[k]) for k in drawn)
    finally:
        destroy_model_parallel()
    dist.barrier()


@pytest.mark.parametrize("world, tp, tied", [(2, 1, False), (4, 2, True)])
def test_partitions_filled_from_hf_and_exported_bit_exact(tmp_path, world, tp, tied):
    """DP=2 and TP=2 x DP=2 over a vocabulary of 301 (padded at TP=2; partitions padded too): loaded, exported,
    trained one step and exported again."""
    path = hf_checkpoint(tmp_path / "hf", tied, vocab=301)
    out = tmp_path / "export"
    run_distributed(body_partitions, world, tp, str(path), str(out))
    exported, original = read_hf_state_dict(str(out / "loaded")), read_hf_state_dict(str(path))
    assert exported.keys() == original.keys() and all(torch.equal(exported[k], original[k]) for k in original)
    assert (out / "loaded" / "model.safetensors.index.json").is_file()
    assert (out / "loaded" / "generation_config.json").is_file() and not (out / "loaded.partial").exists()
