"""goldfish_ds/parallel/distributed.py: what each launcher's environment means (pure functions over an env
dict; no processes), Slurm host lists, and the address and interface choices on this machine."""
import socket

import pytest

from goldfish_ds.parallel import distributed
from goldfish_ds.parallel.distributed import (
    LaunchEnvironment,
    expand_hostlist,
    gloo_interface,
    init_distributed,
    interface_towards,
    launch_environment,
)


def test_torchrun_and_deepspeed():
    torchrun = {"RANK": "5", "WORLD_SIZE": "16", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "8",
                "MASTER_ADDR": "10.0.0.1", "MASTER_PORT": "29400", "GROUP_RANK": "0"}
    assert launch_environment(torchrun) == LaunchEnvironment(5, 16, 1, "10.0.0.1", 29400, "torchrun/deepspeed", 8)
    deepspeed = {"RANK": "9", "WORLD_SIZE": "16", "LOCAL_RANK": "1", "LOCAL_SIZE": "8", "CROSS_RANK": "1",
                 "MASTER_ADDR": "10.0.0.1", "MASTER_PORT": "29500"}
    assert launch_environment(deepspeed).local_world_size == 8
    # A Kubernetes operator: one rank per pod, no LOCAL_RANK.
    pod = {"RANK": "3", "WORLD_SIZE": "4", "MASTER_ADDR": "job-master-0", "MASTER_PORT": "23456"}
    assert launch_environment(pod) == LaunchEnvironment(3, 4, 0, "job-master-0", 23456, "torchrun/deepspeed")


def test_open_mpi():
    env = {"OMPI_COMM_WORLD_RANK": "3", "OMPI_COMM_WORLD_SIZE": "4", "OMPI_COMM_WORLD_LOCAL_RANK": "1",
           "OMPI_COMM_WORLD_LOCAL_SIZE": "2", "PMIX_RANK": "3"}
    # No address: rank 0 chooses one in init_distributed and broadcasts it.
    assert launch_environment(env) == LaunchEnvironment(3, 4, 1, None, None, "mpirun", 2)
    assert launch_environment({**env, "MASTER_ADDR": "10.0.0.1", "MASTER_PORT": "6000"}).master_port == 6000


@pytest.mark.parametrize("name", ["MPICH", "Intel MPI"])
def test_mpich_and_intel_mpi(name):
    env = {"PMI_RANK": "6", "PMI_SIZE": "8", "MPI_LOCALRANKID": "2", "MPI_LOCALNRANKS": "4"}
    if name == "Intel MPI":
        env.update(I_MPI_ROOT="/opt/intel/mpi", I_MPI_HYDRA_TOPOLIB="hwloc")
    assert launch_environment(env) == LaunchEnvironment(6, 8, 2, None, None, "mpich", 4)


def test_mvapich():
    env = {"MV2_COMM_WORLD_RANK": "1", "MV2_COMM_WORLD_SIZE": "2", "MV2_COMM_WORLD_LOCAL_RANK": "0"}
    assert launch_environment(env) == LaunchEnvironment(1, 2, 0, None, None, "mvapich")


SRUN = {"SLURM_PROCID": "13", "SLURM_NTASKS": "16", "SLURM_LOCALID": "5", "SLURM_JOB_ID": "123456",
        "SLURM_STEP_NODELIST": "gpu-[07-08]", "SLURM_JOB_NODELIST": "gpu-[05-08]", "SLURM_NODELIST": "gpu-[05-08]",
        "SLURM_LAUNCH_NODE_IPADDR": "10.1.0.5"}


def test_slurm_srun():
    # Rank 0 runs on the first node of the step; the port is derived from the job id (every rank agrees).
    assert launch_environment(SRUN) == LaunchEnvironment(13, 16, 5, "gpu-07", 23456, "slurm")
    only_job_list = {k: v for k, v in SRUN.items() if k != "SLURM_STEP_NODELIST"}
    assert launch_environment(only_job_list).master_addr == "gpu-05"
    no_lists = {k: v for k, v in only_job_list.items() if "NODELIST" not in k}
    assert launch_environment(no_lists).master_addr == "10.1.0.5"
    chosen = {**SRUN, "MASTER_ADDR": "10.1.0.7", "MASTER_PORT": "6000"}
    assert launch_environment(chosen).master_addr == "10.1.0.7" and launch_environment(chosen).master_port == 6000
    # srun --mpi=pmi2 adds PMI_RANK / PMI_SIZE but not MPICH's MPI_LOCALRANKID: still Slurm's ranks.
    assert launch_environment({**SRUN, "PMI_RANK": "13", "PMI_SIZE": "16"}).launcher == "slurm"


def test_launchers_inside_a_slurm_allocation():
    """Ranks started inside an allocation inherit its SLURM_* variables: the launcher that started them wins."""
    batch = {"SLURM_PROCID": "0", "SLURM_NTASKS": "16", "SLURM_LOCALID": "0", "SLURM_JOB_ID": "7",
             "SLURM_JOB_NODELIST": "n[1-2]"}
    mpirun = {"OMPI_COMM_WORLD_RANK": "9", "OMPI_COMM_WORLD_SIZE": "16", "OMPI_COMM_WORLD_LOCAL_RANK": "1"}
    assert launch_environment({**batch, **mpirun}) == LaunchEnvironment(9, 16, 1, None, None, "mpirun")
    torchrun = {"RANK": "9", "WORLD_SIZE": "16", "LOCAL_RANK": "1", "MASTER_ADDR": "n1", "MASTER_PORT": "29500"}
    assert launch_environment({**batch, **torchrun}).launcher == "torchrun/deepspeed"
    hydra = {"PMI_RANK": "9", "PMI_SIZE": "16", "MPI_LOCALRANKID": "1"}
    assert launch_environment({**batch, **hydra}).launcher == "mpich"


def test_a_process_started_alone_is_a_world_of_one():
    assert launch_environment({"HOME": "/root", "LOCAL_RANK": "0"}) == LaunchEnvironment(0, 1, 0, "127.0.0.1", None,
                                                                                        "single", 1)


@pytest.mark.parametrize("hostlist, hosts", [
    ("node01", ["node01"]),
    ("node[01-03,07]", ["node01", "node02", "node03", "node07"]),
    ("gpu-a[8-10],login,cpu[1,3]", ["gpu-a8", "gpu-a9", "gpu-a10", "login", "cpu1", "cpu3"]),
    ("r[1-2]n[09-10]", ["r1n09", "r1n10", "r2n09", "r2n10"]),
    ("a[001-002].cluster", ["a001.cluster", "a002.cluster"]),
])
def test_slurm_host_lists_expand(hostlist, hosts):
    assert expand_hostlist(hostlist) == hosts


def test_interfaces_on_this_host():
    """Loopback reaches loopback; a job on one host keeps gloo there."""
    assert interface_towards("127.0.0.1") == "lo"
    assert gloo_interface("127.0.0.1", single_host=True) == "lo"


CLUSTER_NODE = {"lo": ["127.0.0.1", "::1"], "eth0": ["10.0.0.5", "fe80::1"], "ib0": ["10.1.0.5"]}


@pytest.mark.parametrize("name_resolves_to, chosen", [
    (["127.0.1.1"], "10.0.0.5"),  # Debian's /etc/hosts: the host name is loopback
    (None, "10.0.0.5"),  # the host name does not resolve at all
    (["10.1.0.5"], "10.1.0.5"),  # it resolves to an address of this host: the cluster's choice
    (["203.0.113.9"], "10.0.0.5"),  # it resolves, but not to an address of this host
])
def test_rank_0_offers_an_address_other_hosts_reach(monkeypatch, name_resolves_to, chosen):
    def resolve(host):
        if name_resolves_to is None:
            raise socket.gaierror(-3, "Temporary failure in name resolution")
        return name_resolves_to

    monkeypatch.setattr(distributed, "_up_interfaces", lambda: CLUSTER_NODE)
    monkeypatch.setattr(distributed, "_resolve", resolve)
    assert distributed.reachable_address() == chosen
    assert distributed.interface_address("ib0") == "10.1.0.5"
    with pytest.raises(ValueError, match=r"network interface 'ib1' is not up .* \(up: eth0, ib0, lo\)"):
        distributed.interface_address("ib1")
    monkeypatch.setattr(distributed, "_up_interfaces", lambda: {"lo": ["127.0.0.1"]})
    with pytest.raises(ValueError, match="no network interface other than loopback .* --master_addr"):
        distributed.reachable_address()


def test_gloo_leaves_loopback_when_the_job_may_span_hosts(monkeypatch):
    """On rank 0's host its own name may resolve to 127.0.1.1: gloo must still listen where others reach it."""
    monkeypatch.setattr(distributed, "_up_interfaces", lambda: CLUSTER_NODE)
    monkeypatch.setattr(distributed, "_resolve", lambda host: ["127.0.1.1"])
    monkeypatch.setattr(distributed, "interface_towards", {"node01": "lo", "10.0.0.5": "eth0"}.get)
    assert gloo_interface("node01", single_host=False) == "eth0"
    assert gloo_interface("node01", single_host=True) == "lo"


def test_an_address_of_rank_0_that_does_not_resolve_is_an_error_not_a_retry_loop(monkeypatch):
    def unresolvable(host):
        raise socket.gaierror(-3, "Temporary failure in name resolution")

    monkeypatch.setattr(distributed, "_resolve", unresolvable)
    for name, value in {"RANK": "2", "WORLD_SIZE": "4", "LOCAL_RANK": "0", "MASTER_ADDR": "host1",
                        "MASTER_PORT": "29500"}.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(ValueError, match=r"rank 0's address 'host1' does not resolve on .* \(torchrun/deepspeed "
                                         r"job\): .*--master_addr \(torchrun: --local_addr on each host"):
        init_distributed()


def test_the_multi_node_options_state_their_defaults():
    from goldfish_ds.training import build_parser, parse_args

    text = " ".join(build_parser().format_help().split())
    assert "--dist_timeout DIST_TIMEOUT seconds a collective may wait" in text and "(default: 600.0)" in text
    assert "--master_addr MASTER_ADDR" in text and "--network_interface NETWORK_INTERFACE" in text
    with pytest.raises(ValueError, match="--dist_timeout must be > 0 seconds, got 0.0"):
        parse_args(["--dist_timeout", "0"])
