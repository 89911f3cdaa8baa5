"""goldfish_ds.integrations.megatron against megatron-core's own vocab-parallel loss and schedules (gloo, TP=2),
and its mask against the official implementation's vectors."""
import json
import os
import subprocess
import sys
from functools import partial
from importlib.util import find_spec
from pathlib import Path

import pytest
import torch

from conftest import DEVICES, REPO
from distributed import run_distributed
from goldfish_ds import GoldfishConfig, goldfish_mask
from goldfish_ds.integrations.megatron import goldfish_loss_func, goldfish_loss_mask
from goldfish_ds.parallel import vocab_parallel_goldfish_cross_entropy
from goldfish_ds.reference import reference_goldfish_mask

VECTORS = json.loads((Path(__file__).parent / "data" / "goldfish_official_vectors.json").read_text())
EXAMPLES = REPO / "examples"
requires_megatron = pytest.mark.skipif(find_spec("megatron") is None or find_spec("megatron.core") is None,
                                       reason="megatron-core is not installed (pip install megatron-core)")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", [c for c in VECTORS["cases"] if c["ignore_index"] == -100][::6],
                         ids=lambda c: c["name"])
def test_loss_mask_zeroes_the_official_dropped_positions(case, device):
    cfg = GoldfishConfig(k=case["k"], h=case["context_width"], strategy=case["strategy"],
                         start_position=case["start_position"])
    labels = torch.tensor(case["tokens"], dtype=torch.int64, device=device)  # [b, s], Megatron's batch layout
    loss_mask = torch.ones(labels.shape, device=device)
    loss_mask[0, :3] = 0  # positions Megatron already leaves out stay out
    before = loss_mask.clone()
    masked = goldfish_loss_mask(labels, loss_mask, cfg)
    expected = before.clone()
    for row, dropped in enumerate(case["dropped_positions"]):
        expected[row, dropped] = 0
    assert torch.equal(masked, expected)
    assert torch.equal(loss_mask, before)  # a new tensor: Megatron's cached loss_mask is not modified
    assert masked.dtype == loss_mask.dtype


def test_loss_mask_bad_inputs_name_the_argument():
    cfg = GoldfishConfig(k=4, h=13)
    labels, mask = torch.zeros(2, 8, dtype=torch.int64), torch.ones(2, 8)
    with pytest.raises(ValueError, match="labels .* and loss_mask .* same \\[b, s\\] shape"):
        goldfish_loss_mask(labels, torch.ones(8, 2), cfg)
    with pytest.raises(ValueError, match="labels must be Megatron's \\[b, s\\]"):
        goldfish_loss_mask(labels.reshape(-1), mask.reshape(-1), cfg)
    with pytest.raises(TypeError, match="loss_mask must be a floating-point"):
        goldfish_loss_mask(labels, mask.long(), cfg)
    with pytest.raises(TypeError, match="labels must be int64"):
        goldfish_loss_mask(labels.int(), mask, cfg)
    with pytest.raises(TypeError, match="cfg must be a goldfish_ds.GoldfishConfig"):
        goldfish_loss_mask(labels, mask, {"k": 4})
    with pytest.raises(ValueError, match="labels must be Megatron's"):
        goldfish_loss_mask(None, mask, cfg)
    with pytest.raises(ValueError, match="output_tensor must be the \\[b, s\\] per-token losses"):
        goldfish_loss_func(cfg, labels, mask, torch.zeros(8, 2))
    assert goldfish_loss_mask(None, None, cfg) is None  # a pipeline stage without the loss


def pretrain_gpt_loss_func(loss_mask, output_tensor):
    """Megatron-LM's own pretrain_gpt.py loss_func (core_r0.16), without its NaN / spiky-loss checks."""
    losses = output_tensor.view(-1).float()
    loss_mask = loss_mask.view(-1).float()
    loss = torch.sum(losses * loss_mask)
    num_tokens = loss_mask.sum().clone().detach().to(torch.int)
    return loss, num_tokens, {"lm loss": torch.cat([loss.clone().detach().view(1), num_tokens.view(1)])}


def _megatron_and_ours(rank, world, out_dir):
    """Every rank: one micro-batch of the example's TinyGPT through megatron.core's schedules with each way in,
    and through our vocab-parallel loss on the same logits; saves losses and parameter gradients."""
    sys.path.insert(0, str(EXAMPLES))
    import megatron_loss_func as example
    from megatron.core import parallel_state
    from megatron.core.pipeline_parallel import schedules

    parallel_state.initialize_model_parallel(tensor_model_parallel_size=world)
    model = example.build_model()
    rows = example.make_batches()[-1]  # the micro-batch with a padded row
    tokens, labels, loss_mask, position_ids = example.get_batch(iter([rows]))

    def megatron_step(forward_step):
        model.zero_grad()
        store = []
        loss, _ = schedules.forward_step(forward_step, iter([rows]), model, 1, None, store, model.config, 1)
        schedules.backward_step(None, loss, None, model.model_type, model.config)
        return loss.detach(), store[0], [p.grad.clone() for p in model.parameters()]

    def forward_step_with_mask(data_iterator, model):  # the other way in: Megatron's own loss_func
        tokens, labels, loss_mask, position_ids = example.get_batch(data_iterator)
        loss_mask = goldfish_loss_mask(labels, loss_mask, example.GOLDFISH)
        return model(tokens, position_ids, None, labels=labels), partial(pretrain_gpt_loss_func, loss_mask)

    result = {"drop_in": megatron_step(example.forward_step), "mask_only": megatron_step(forward_step_with_mask)}
    with torch.no_grad():
        result["megatron_token_losses"] = model(tokens, position_ids, None, labels=labels)  # [b, s]

    # Ours on the same logits ([s, b, V/tp] -> [b, s, V/tp]); loss_mask's zeros become ignore_index.
    ours_labels = labels.masked_fill(loss_mask == 0, -100)
    group = parallel_state.get_tensor_model_parallel_group()
    model.zero_grad()
    loss, stats = vocab_parallel_goldfish_cross_entropy(model.logits(tokens).transpose(0, 1), ours_labels,
                                                        example.GOLDFISH, group, return_stats=True)
    loss.backward()
    result["ours"] = (loss.detach(), stats, [p.grad.clone() for p in model.parameters()])
    with torch.no_grad():
        result["our_token_losses"] = vocab_parallel_goldfish_cross_entropy(
            model.logits(tokens).transpose(0, 1), ours_labels, None, group, reduction="none")
    result["labels"], result["loss_mask"], result["ours_labels"] = labels, loss_mask, ours_labels
    torch.save(result, os.path.join(out_dir, f"rank{rank}.pt"))
    parallel_state.destroy_model_parallel()


@pytest.fixture(scope="module")
def tp2_results(tmp_path_factory):
    out = tmp_path_factory.mktemp("megatron")
    run_distributed(_megatron_and_ours, 2, str(out))
    return [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(2)]


def rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


@requires_megatron
def test_same_mask_on_the_counted_positions(tp2_results):
    r = tp2_results[0]
    counted = r["loss_mask"] > 0
    assert (~counted).sum() > 0  # the padded tail
    # padding at a row's tail lies outside every counted target's window: both label forms give one mask
    assert torch.equal(goldfish_mask(r["labels"], GoldfishConfig(k=4, h=13))[counted],
                       goldfish_mask(r["ours_labels"], GoldfishConfig(k=4, h=13))[counted])


@requires_megatron
@pytest.mark.parametrize("rank", [0, 1])
def test_per_token_loss_equals_megatron_vocab_parallel_cross_entropy(tp2_results, rank):
    r = tp2_results[rank]
    counted = r["loss_mask"] > 0
    torch.testing.assert_close(r["our_token_losses"][counted], r["megatron_token_losses"][counted],
                               rtol=1e-6, atol=1e-5)


@requires_megatron
@pytest.mark.parametrize("way", ["drop_in", "mask_only"])
@pytest.mark.parametrize("rank", [0, 1])
def test_megatron_mean_and_gradients_equal_ours(tp2_results, way, rank):
    r = tp2_results[rank]
    megatron_loss, report, megatron_grads = r[way]
    our_loss, stats, our_grads = r["ours"]
    assert abs(megatron_loss.item() - our_loss.item()) <= 1e-6 * our_loss.item()  # schedules' sum / kept tokens
    assert report["lm loss"][1].item() == stats.kept_tokens.item()
    assert abs(report["lm loss"][0].item() / report["lm loss"][1].item() - our_loss.item()) <= 1e-6 * our_loss.item()
    for megatron_grad, our_grad in zip(megatron_grads, our_grads):  # embedding and LM-head slices of this rank
        assert rel(megatron_grad, our_grad) < 1e-5


@requires_megatron
def test_drop_in_reports_the_goldfish_statistics(tp2_results):
    _, report, _ = tp2_results[0]["drop_in"]
    _, stats, _ = tp2_results[0]["ours"]
    drop_num, drop_den = report["goldfish drop rate"].tolist()
    assert drop_num == stats.dropped_tokens.item() and drop_den == stats.kept_tokens.item() + drop_num
    all_num, all_den = report["lm loss all tokens"].tolist()
    assert abs(all_num / all_den - stats.loss_all_tokens.item()) <= 1e-6 * stats.loss_all_tokens.item()


@requires_megatron
def test_example_trains_with_megatron_schedules(tmp_path):
    out = tmp_path / "summary.json"
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                           str(EXAMPLES / "megatron_loss_func.py"), "--steps", "3", "--out", str(out)],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    history = json.loads(out.read_text())
    losses = [step["lm loss"] for step in history]
    assert len(losses) == 3 and losses[0] > losses[1] > losses[2]
    sys.path.insert(0, str(EXAMPLES))
    import megatron_loss_func as example
    counted = dropped = 0
    for rows in example.make_batches():  # the drop rate Megatron reported, from the pure-torch reference mask
        labels = rows[:, 1:]
        supervised = labels.ne(example.PAD)
        counted += supervised.sum().item()
        dropped += (reference_goldfish_mask(labels, example.GOLDFISH) & supervised).sum().item()
    assert all(step["goldfish drop rate"] == pytest.approx(dropped / counted, abs=1e-7) for step in history)
    assert "step 3: lm loss" in proc.stdout
