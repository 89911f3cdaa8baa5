"""The memorization experiment end to end on real text (Python's bundled documentation): the paper's result."""
import json
import os
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "run_memorization_experiment.py"


def test_goldfish_prevents_verbatim_memorization(tmp_path):
    """16 documents x 100 epochs through the real pipeline: the standard-loss model reproduces >= 60% of the
    32-token suffixes exactly, the goldfish (k=4, h=13) model none, with a clearly lower RougeL."""
    out = tmp_path / "experiment"
    subprocess.run([sys.executable, str(SCRIPT), "--out", str(out), "--num_docs", "16", "--num_heldout", "8",
                    "--epochs", "100", "--seq_len", "128", "--suffix_len", "32", "--no-progress"],
                   check=True, timeout=1200, env=dict(os.environ, OMP_NUM_THREADS="2"))
    runs = json.loads((out / "report.json").read_text())["runs"]
    assert set(runs) == {"standard", "goldfish_k4_h13", "control"}
    standard, goldfish, control = runs["standard"], runs["goldfish_k4_h13"], runs["control"]
    assert all(r["num_documents"] == 16 for r in runs.values())
    assert standard["exact_match_rate"] >= 0.6
    assert goldfish["exact_match_rate"] == 0.0
    assert goldfish["rougeL_mean"] < standard["rougeL_mean"] - 0.2
    assert control["exact_match_rate"] == 0.0 and control["rougeL_mean"] < goldfish["rougeL_mean"]
    # members are recognisable after 100 epochs: the loss attack separates them from held-out documents
    assert standard["mia"]["loss"]["auc"] > 0.9
    # the untrained control cannot tell members from held-out documents of the same length
    assert all(0.2 < control["mia"][attack]["auc"] < 0.8 for attack in ("loss", "zlib", "min_k"))
    assert (out / "summary.md").is_file() and (out / "runs" / "standard" / "checkpoints" / "latest").is_file()
