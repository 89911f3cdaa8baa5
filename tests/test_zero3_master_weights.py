"""fp32 ZeRO-3 with the model's partitions as the optimizer's master weights (fp32_master_shares_partition), against
DeepSpeed's own behaviour, on real gloo ranks."""
import contextlib
import os

os.environ.setdefault("DS_ACCELERATOR", "cpu")  # before deepspeed is imported, here and in the spawned ranks

import pytest  # noqa: E402
import torch  # noqa: E402

from distributed import run_distributed  # noqa: E402
from goldfish_ds.models import Llama, LlamaConfig  # noqa: E402
from goldfish_ds.parallel import data_parallel_group, destroy_model_parallel, initialize_model_parallel, mpu  # noqa: E402
from goldfish_ds.training.optim import adamw  # noqa: E402
from goldfish_ds.training.zero3_master_weights import fp32_master_shares_partition  # noqa: E402

CFG = LlamaConfig(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=16)
STEPS = 3


def ds_config(bf16: bool) -> dict:
    return {"train_micro_batch_size_per_gpu": 2, "gradient_clipping": 1.0, "bf16": {"enabled": bf16},
            "zero_optimization": {"stage": 3, "reduce_bucket_size": 4096, "stage3_prefetch_bucket_size": 4096,
                                  "stage3_param_persistence_threshold": 0, "sub_group_size": 2000}}


def body_train(rank, world, share, bf16, out):
    import deepspeed

    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank))  # what DeepSpeed reads
    deepspeed.init_distributed(dist_backend="gloo")
    initialize_model_parallel(1)
    try:
        config = ds_config(bf16)
        with deepspeed.zero.Init(data_parallel_group=data_parallel_group(), mpu=mpu, config_dict_or_path=config):
            model = Llama(CFG, seed=3)
        optimizer = adamw(model, lr=1e-2, betas=(0.9, 0.95), weight_decay=0.1)
        with fp32_master_shares_partition() if share else contextlib.nullcontext():
            engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=config, mpu=mpu,
                                              dist_init_required=False)
        zero = engine.optimizer
        masters, partitions = zero.fp32_partitioned_groups_flat, zero.fp16_partitioned_groups_flat
        losses = []
        for _ in range(STEPS):
            ids = torch.randint(0, CFG.vocab_size, (2, 9), generator=torch.Generator().manual_seed(rank))  # the same rows each step
            logits = engine(ids[:, :-1]).float()
            loss = torch.nn.functional.cross_entropy(logits.reshape(-1, CFG.vocab_size), ids[:, 1:].reshape(-1))
            engine.backward(loss)
            engine.step()
            losses.append(loss.item())
        with deepspeed.zero.GatheredParameters(list(engine.module.parameters())):
            weights = {name: p.detach().float().clone() for name, p in engine.module.named_parameters()}
        torch.save({"losses": losses, "weights": weights,
                    "shared": [m.data_ptr() == p.data_ptr() for m, p in zip(masters, partitions)],
                    "master_dtypes": {str(m.dtype) for m in masters},
                    "master_bytes": sum(m.numel() * m.element_size() for m in masters),
                    "partition_bytes": sum(p.numel() * p.element_size() for p in partitions)},
                   f"{out}/rank{rank}.pt")
    finally:
        destroy_model_parallel()


def run(tmp_path, share: bool, bf16: bool) -> list[dict]:
    out = tmp_path / f"share{int(share)}_bf16{int(bf16)}"
    out.mkdir()
    run_distributed(body_train, 2, share, bf16, str(out))
    return [torch.load(out / f"rank{r}.pt") for r in range(2)]


@pytest.fixture(scope="module")
def fp32_runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("fp32")
    return run(tmp, share=False, bf16=False), run(tmp, share=True, bf16=False)


def test_fp32_master_is_the_partition_and_training_is_bit_identical(fp32_runs):
    """DeepSpeed alone clones the fp32 partition (4 bytes a parameter more); shared, it is the partition itself,
    and 3 optimizer steps (clipping, AdamW with decay) give the same losses and weights bit for bit."""
    cloned, shared = fp32_runs
    for plain, ours in zip(cloned, shared):
        assert not any(plain["shared"]) and all(ours["shared"]) and len(ours["shared"]) > 1  # several sub-groups
        assert plain["master_bytes"] == ours["partition_bytes"] > 0
        assert plain["losses"] == ours["losses"]
        assert plain["weights"].keys() == ours["weights"].keys()
        assert all(torch.equal(plain["weights"][k], ours["weights"][k]) for k in plain["weights"])
    first, last = shared[0]["losses"][0], shared[0]["losses"][-1]
    assert last < first  # it trained (the same rows every step)


def test_mixed_precision_keeps_its_fp32_master_copy(tmp_path):
    """bf16 weights need a separate fp32 master: the context changes nothing there."""
    for rank in run(tmp_path, share=True, bf16=True):
        assert not any(rank["shared"]) and rank["master_dtypes"] == {"torch.float32"}
        assert rank["master_bytes"] == 2 * rank["partition_bytes"]
