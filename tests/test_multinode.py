"""Multi-node pretraining on two simulated hosts (tests/multihost.py: a network namespace per host, its own address
and hostname, the other host's name unresolvable) with 2 ranks each, TP=2 inside a host and DP=2 across: mpirun
--hostfile, deepspeed's multi-node launchers and torchrun --nnodes 2 reproduce the single-rank loss curve; a lost
host stops the job within --dist_timeout and --resume is exact; an out_dir one host does not share is an error.
The launch commands are the README's (Multi-node); the hostfile is configs/hostfile.example's."""
from __future__ import annotations

import sys
import time
from pathlib import Path

import numpy as np
import pytest
from distributed import free_port
from multihost import HostsUnavailable, SimulatedHosts
from test_training import corpus, ds_config, launch, losses, records, train_args  # noqa: F401 (corpus: a fixture)

REPO = Path(__file__).resolve().parents[1]
PRETRAIN = str(REPO / "scripts" / "pretrain.py")
BIN = Path(sys.executable).parent
STEPS = 10
# What each host's login environment needs added: this checkout (not an installed goldfish_ds), one thread per
# rank (4 ranks share 2 cores), and Open MPI's consent to run as root.
ENV = {"PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "OMPI_ALLOW_RUN_AS_ROOT": "1",
       "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM": "1"}
MPI_OVER_ETH0 = ["--mca", "btl_tcp_if_include", "eth0", "--mca", "oob_tcp_if_include", "eth0"]


@pytest.fixture(scope="module")
def hosts(tmp_path_factory):
    harness = SimulatedHosts(2, tmp_path_factory.mktemp("hosts"))
    try:
        harness.start()
    except HostsUnavailable as e:
        pytest.skip(f"cannot simulate hosts here: {e}")
    yield harness
    harness.close()


@pytest.fixture(scope="module")
def hostfile(hosts, tmp_path_factory) -> Path:
    """configs/hostfile.example with the simulated hosts' addresses and 2 slots per host."""
    text = (REPO / "configs" / "hostfile.example").read_text().replace("slots=8", "slots=2")
    for i, host in enumerate(hosts.hosts, 1):
        text = text.replace(f"HOST{i}_ADDRESS", host.address)
    path = tmp_path_factory.mktemp("hostfile") / "hosts"
    path.write_text(text)
    return path


def job_args(corpus: Path, out_dir: Path, *extra: str) -> list:
    """tests/test_training.py's tiny run for STEPS steps, TP=2 x DP=2 (micro-batch 2: the reference's batch)."""
    config = ds_config(out_dir.parent / f"{out_dir.name}-ds.json", 2, 1)
    return train_args(corpus, out_dir, config, "--max_steps", str(STEPS), "--tensor_parallel", "2", *extra)


def mpirun_command(hosts: SimulatedHosts, hostfile: Path, args: list) -> list:
    """The README's mpirun line; --prtemca plm_ssh_agent makes the harness's agent Open MPI's ssh."""
    return ["mpirun", "--hostfile", str(hostfile), "-np", "4", "--map-by", "slot", *MPI_OVER_ETH0,
            "--prtemca", "plm_ssh_agent", str(hosts.agent), "-x", "PYTHONPATH", "-x", "OMP_NUM_THREADS",
            sys.executable, PRETRAIN, *args]


def assert_nothing_left_running(hosts: SimulatedHosts) -> None:
    """The launchers took down every process they started, on every host (remote daemons get 10 s to exit)."""
    deadline = time.monotonic() + 10
    while any(hosts.pids(host) for host in hosts.hosts) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert {host.name: hosts.pids(host) for host in hosts.hosts} == {host.name: [] for host in hosts.hosts}


def run_on_first_host(hosts: SimulatedHosts, command: list, expect_ok: bool = True):
    result = hosts.run(hosts.hosts[0], command, env=ENV, timeout=600)
    if expect_ok:
        assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    assert_nothing_left_running(hosts)
    return result


def assert_same_curve(run: Path, reference: Path) -> None:
    """The tolerance of tests/test_training.py::test_layouts_reproduce_the_single_rank_curve."""
    assert [r["step"] for r in records(run)] == list(range(1, STEPS + 1))
    np.testing.assert_allclose(losses(run), losses(reference), rtol=0, atol=1e-4, err_msg=str(run))
    assert [r["drop_rate"] for r in records(run)] == [r["drop_rate"] for r in records(reference)]


def torchrun_command(hosts: SimulatedHosts, node: int, port: int, args: list) -> list:
    """The README's torchrun line for host `node` (0-based): c10d rendezvous on the first host's address."""
    first = hosts.hosts[0]
    return [str(BIN / "torchrun"), "--nnodes", "2", "--nproc_per_node", "2", "--rdzv_backend", "c10d",
            "--rdzv_endpoint", f"{first.address}:{port}", "--rdzv_id", "goldfish", "--local_addr",
            hosts.hosts[node].address, "--rdzv_conf", f"is_host={int(node == 0)}", PRETRAIN, *args]


def on_each_host(hosts: SimulatedHosts, commands: list, logs: Path) -> list:
    """Run commands[i] on host i at once; returns each one's (return code, output) when all have ended."""
    logs.mkdir(parents=True, exist_ok=True)
    procs = [hosts.popen(host, command, logs / f"{host.name}.log", env=ENV)
             for host, command in zip(hosts.hosts, commands)]
    for proc in procs:
        proc.wait(timeout=600)
    assert_nothing_left_running(hosts)
    return [(proc.returncode, (logs / f"{host.name}.log").read_text()) for proc, host in zip(procs, hosts.hosts)]


@pytest.fixture(scope="module")
def reference(corpus, tmp_path_factory):
    """One rank, micro-batch 2 x 2 accumulation steps, STEPS steps: the curve every layout must reproduce."""
    out = tmp_path_factory.mktemp("reference") / "run"
    launch("python", 1, train_args(corpus, out, ds_config(out.parent / "ds.json", 2, 2), "--max_steps", str(STEPS)))
    return out


@pytest.fixture(scope="module")
def mpirun_run(hosts, hostfile, corpus, tmp_path_factory):
    out = tmp_path_factory.mktemp("mpirun") / "run"
    run_on_first_host(hosts, mpirun_command(hosts, hostfile, job_args(corpus, out)))
    return out


def test_mpirun_across_hosts_reproduces_the_single_rank_curve(hosts, mpirun_run, reference):
    assert_same_curve(mpirun_run, reference)
    launched = hosts.agent_log.read_text().splitlines()
    assert any(line.startswith("host2: ") and "prted" in line for line in launched)  # Open MPI's daemon, via the agent


def test_deepspeed_openmpi_launcher_across_hosts(hosts, hostfile, corpus, reference, tmp_path):
    """deepspeed --launcher openmpi runs mpirun --hostfile itself, with --mca btl_tcp_if_include eth0
    (--no_ssh_check and --master_addr: the simulated hosts have no ssh; Open MPI reaches host 2 through the agent)."""
    out = tmp_path / "run"
    launcher_args = "--map-by slot --mca oob_tcp_if_include eth0 -x OMP_NUM_THREADS --prtemca plm_ssh_agent " \
        + str(hosts.agent)
    run_on_first_host(hosts, [str(BIN / "deepspeed"), "--hostfile", str(hostfile), "--launcher", "openmpi",
                              "--no_ssh_check", "--master_addr", hosts.hosts[0].address, "--launcher_args",
                              launcher_args, PRETRAIN, *job_args(corpus, out)])
    assert_same_curve(out, reference)


@pytest.mark.parametrize("launcher", ["deepspeed --no_ssh", "torchrun"])
def test_a_launcher_on_each_host(hosts, hostfile, corpus, reference, tmp_path, launcher):
    """One launcher per host: deepspeed --no_ssh --node_rank N (with the interface given: --network_interface),
    or torchrun --nnodes 2 (c10d rendezvous; gloo finds the interface that reaches rank 0 itself)."""
    out, port = tmp_path / "run", free_port()
    if launcher == "torchrun":
        commands = [torchrun_command(hosts, node, port, job_args(corpus, out)) for node in range(2)]
    else:
        commands = [[str(BIN / "deepspeed"), "--hostfile", str(hostfile), "--no_ssh", "--node_rank", str(node),
                     "--master_addr", hosts.hosts[0].address, "--master_port", str(port), PRETRAIN,
                     *job_args(corpus, out, "--network_interface", "eth0")] for node in range(2)]
    for code, output in on_each_host(hosts, commands, tmp_path / "logs"):
        assert code == 0, output[-4000:]
    assert_same_curve(out, reference)


LOST_HOST_TIMEOUT = 20  # --dist_timeout of the lost-host run, seconds


def test_a_lost_host_stops_the_job_within_dist_timeout_and_resume_is_exact(hosts, hostfile, corpus, mpirun_run,
                                                                           tmp_path):
    """torchrun on each host; after the step-5 checkpoint host 2 is lost: its cable is pulled (nothing it sends
    arrives any more, as when a machine dies) and every process on it is SIGKILLed. Host 1's ranks wait for it
    until --dist_timeout, then the job ends with an error naming the failure; nothing is left running. mpirun
    --resume on the hosts then continues from step 5 to the uninterrupted run's curve, bit for bit."""
    second = hosts.hosts[1]
    out, logs, port = tmp_path / "run", tmp_path / "logs", free_port()
    args = job_args(corpus, out, "--dist_timeout", str(LOST_HOST_TIMEOUT))
    logs.mkdir()
    procs = [hosts.popen(host, torchrun_command(hosts, node, port, args), logs / f"{host.name}.log", env=ENV)
             for node, host in enumerate(hosts.hosts)]
    latest = out / "checkpoints" / "latest"
    try:
        deadline = time.monotonic() + 300
        while not (latest.is_file() and latest.read_text() == "step_00000005"):
            assert time.monotonic() < deadline and all(p.poll() is None for p in procs), \
                (logs / "host1.log").read_text()[-4000:]
            time.sleep(0.02)
        hosts.disconnect(second)
        assert len(hosts.kill(second)) >= 3  # torchrun and its two ranks, at least
        lost = time.monotonic()
        procs[0].wait(timeout=LOST_HOST_TIMEOUT + 120)
        took = time.monotonic() - lost
        procs[1].wait(timeout=10)
        output = (logs / "host1.log").read_text()
        assert procs[0].returncode != 0 and took < LOST_HOST_TIMEOUT + 45, (took, output[-4000:])
        assert "Timed out waiting" in output and "on host1 stopped in step" in output, output[-4000:]
        assert f"unreachable for --dist_timeout ({LOST_HOST_TIMEOUT} s); continue with --resume (latest " \
               "complete checkpoint: step_00000005)" in output
        assert_nothing_left_running(hosts)
        assert latest.read_text() == "step_00000005" and [r["step"] for r in records(out)][-1] < STEPS
    finally:  # after a failure above: nothing may run on, or stay cut from, the hosts the next tests use
        for host in hosts.hosts:
            hosts.kill(host)
        hosts.reconnect(second)

    run_on_first_host(hosts, mpirun_command(hosts, hostfile, args + ["--resume"]))
    assert [r["step"] for r in records(out)] == list(range(1, STEPS + 1))
    assert losses(out).tolist() == losses(mpirun_run).tolist()
    assert records(out, "val") == records(mpirun_run, "val")


def test_an_out_dir_a_host_does_not_share_is_an_error(hosts, hostfile, corpus, tmp_path):
    """Host 2 has a disk of its own (an empty tmpfs) where host 1 has out_dir: the job stops before training, with
    an error naming out_dir and the ranks that do not see it, instead of checkpoints that lack their shards."""
    out = tmp_path / "run"
    out.mkdir()
    with hosts.masked(hosts.hosts[1], out):
        result = run_on_first_host(hosts, mpirun_command(hosts, hostfile, job_args(corpus, out)), expect_ok=False)
    assert result.returncode != 0
    assert f"--out_dir {out} is not shared by every rank: ranks 2 on host2, 3 on host2 do not see" in result.stderr, \
        result.stderr[-4000:]
    assert not (out / "metrics.jsonl").exists() and not list(out.glob(".shared_*"))


def test_the_hosts_leave_nothing_behind(hosts):
    """Last: the harness removes its namespaces, their /etc/netns files, and every process that ran on a host."""
    hosts.close()
    assert hosts.leftovers() == []
