"""One way to start torch.distributed, whoever launched the ranks, on one host or several.

`launch_environment(env)` reads where a process sits in the job from its launcher's variables; the first
launcher whose rank, world-size and local-rank variables are all set wins, in this order:

  torchrun, deepspeed (its own launcher and --no_ssh)   RANK, WORLD_SIZE, LOCAL_RANK (default 0: Kubernetes
                                                        operators start one rank per pod without it)
  Open MPI mpirun (also deepspeed --launcher openmpi)   OMPI_COMM_WORLD_RANK, _SIZE, _LOCAL_RANK
  MPICH / Intel MPI (mpiexec, hydra)                    PMI_RANK, PMI_SIZE, MPI_LOCALRANKID
  MVAPICH2                                              MV2_COMM_WORLD_RANK, _SIZE, _LOCAL_RANK
  Slurm srun                                            SLURM_PROCID, SLURM_NTASKS, SLURM_LOCALID

MPI comes before Slurm: ranks that mpirun starts inside a Slurm allocation inherit the allocation's
SLURM_PROCID. `srun --mpi=pmi2` sets PMI_RANK / PMI_SIZE but not MPI_LOCALRANKID, so its ranks are Slurm's.
An environment whose rank or size variables say several ranks but match no launcher is an error naming them,
never a silent world of one.

Rank 0's address and port: MASTER_ADDR / MASTER_PORT when set (torchrun and deepspeed set them); under Slurm
the first host of the step's node list and a port derived from the job id; under MPI rank 0 chooses an
address the other hosts can reach (never one that resolves to loopback when the job spans hosts) and a free
port, and broadcasts them with mpi4py. `init_distributed` then exports RANK / WORLD_SIZE / LOCAL_RANK /
MASTER_ADDR / MASTER_PORT, so DeepSpeed, started afterwards in the same process, sees the same world, and
points gloo at the network interface that reaches rank 0 (GLOO_SOCKET_IFNAME) unless it is set.
"""
from __future__ import annotations

import datetime
import ipaddress
import os
import re
import socket
from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import NamedTuple

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class LaunchEnvironment:
    """Where this process sits in the job. master_addr / master_port are None where the launcher does not
    say them: rank 0 then chooses them in init_distributed."""
    rank: int
    world_size: int
    local_rank: int
    master_addr: str | None
    master_port: int | None
    launcher: str  # "torchrun/deepspeed", "mpirun" (Open MPI), "mpich" (or Intel MPI), "mvapich", "slurm", "single"
    local_world_size: int | None = None  # ranks on this host, where the launcher says


class _Launcher(NamedTuple):
    name: str
    rank: str
    size: str
    local_rank: str
    local_size: tuple  # variables that may hold the number of ranks on this host
    local_rank_default: int | None = None  # None: the local-rank variable is required


LAUNCHERS = (
    _Launcher("torchrun/deepspeed", "RANK", "WORLD_SIZE", "LOCAL_RANK", ("LOCAL_WORLD_SIZE", "LOCAL_SIZE"), 0),
    _Launcher("mpirun", "OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE", "OMPI_COMM_WORLD_LOCAL_RANK",
              ("OMPI_COMM_WORLD_LOCAL_SIZE",)),
    _Launcher("mpich", "PMI_RANK", "PMI_SIZE", "MPI_LOCALRANKID", ("MPI_LOCALNRANKS",)),
    _Launcher("mvapich", "MV2_COMM_WORLD_RANK", "MV2_COMM_WORLD_SIZE", "MV2_COMM_WORLD_LOCAL_RANK",
              ("MV2_COMM_WORLD_LOCAL_SIZE",)),
    _Launcher("slurm", "SLURM_PROCID", "SLURM_NTASKS", "SLURM_LOCALID", ()),
)
MPI_LAUNCHERS = ("mpirun", "mpich", "mvapich")
# Variables of launchers we do not start from (PMIx, HPE/Cray PALS and ALPS, IBM jsrun) that say "one of several".
OTHER_RANK_VARIABLES = ("PMIX_RANK", "PALS_RANKID", "PALS_LOCAL_RANKID", "ALPS_APP_PE", "JSM_NAMESPACE_RANK")
OTHER_SIZE_VARIABLES = ("SLURM_NPROCS", "JSM_NAMESPACE_SIZE")
SLURM_NODELISTS = ("SLURM_STEP_NODELIST", "SLURM_JOB_NODELIST", "SLURM_NODELIST")
DEFAULT_MASTER_PORT = 29500


def _integer(env: Mapping[str, str], name: str) -> int:
    try:
        return int(env[name])
    except ValueError:
        raise ValueError(f"launcher variable {name} must be an integer, got {env[name]!r}") from None


def launch_environment(env: Mapping[str, str] | None = None) -> LaunchEnvironment:
    """Where this process sits in the job, from its launcher's variables (env: default os.environ)."""
    env = os.environ if env is None else env
    for launcher in LAUNCHERS:
        if launcher.rank in env and launcher.size in env and (launcher.local_rank in env
                                                              or launcher.local_rank_default is not None):
            break
    else:
        _refuse_unknown_world(env)
        return LaunchEnvironment(0, 1, 0, "127.0.0.1", None, "single", 1)
    rank, world_size = _integer(env, launcher.rank), _integer(env, launcher.size)
    local_rank = _integer(env, launcher.local_rank) if launcher.local_rank in env else launcher.local_rank_default
    if not 0 <= rank < world_size or local_rank < 0:
        raise ValueError(f"{launcher.name}: {launcher.rank}={rank}, {launcher.size}={world_size}, "
                         f"{launcher.local_rank}={local_rank} is not a rank of the world")
    local_world_size = next((_integer(env, v) for v in launcher.local_size if v in env), None)
    master_addr = env.get("MASTER_ADDR")
    master_port = _integer(env, "MASTER_PORT") if "MASTER_PORT" in env else None
    if launcher.name == "slurm":
        nodelist = next((env[v] for v in SLURM_NODELISTS if v in env), None)
        if master_addr is None:
            master_addr = expand_hostlist(nodelist)[0] if nodelist else env.get("SLURM_LAUNCH_NODE_IPADDR")
        if master_port is None:  # every rank must agree without talking: derive it from the job id
            job_id = _integer(env, "SLURM_JOB_ID") if "SLURM_JOB_ID" in env else None
            master_port = DEFAULT_MASTER_PORT if job_id is None else 20000 + job_id % 10000
    return LaunchEnvironment(rank, world_size, local_rank, master_addr, master_port, launcher.name,
                             local_world_size)


def _refuse_unknown_world(env: Mapping[str, str]) -> None:
    """Raise if rank or size variables say this process is one of several ranks (no launcher matched)."""
    ranks = [v for launcher in LAUNCHERS for v in (launcher.rank, launcher.local_rank)] + list(OTHER_RANK_VARIABLES)
    sizes = [v for launcher in LAUNCHERS for v in (launcher.size, *launcher.local_size)] + list(OTHER_SIZE_VARIABLES)
    found = {v: env[v] for v in ranks + sizes if v in env}

    def says_several(name: str, value: str) -> bool:
        return not value.strip().isdigit() or int(value) > (0 if name in ranks else 1)

    if any(says_several(name, value) for name, value in found.items()):
        described = ", ".join(f"{name}={value}" for name, value in found.items())
        needs = "; ".join(f"{launcher.name}: {launcher.rank}, {launcher.size}, {launcher.local_rank}"
                          for launcher in LAUNCHERS)
        raise ValueError(f"this process looks like one rank of several ({described}) but no launcher's "
                         f"variables are complete ({needs}): start it with one of these launchers, or set "
                         f"RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT yourself")


def expand_hostlist(hostlist: str) -> list[str]:
    """Slurm's compressed host list, expanded: "node[01-03,07],login" -> node01 node02 node03 node07 login.

    Several bracket groups in one name multiply ("r[1-2]n[1-2]" -> r1n1 r1n2 r2n1 r2n2); zero padding is kept.
    """
    names, depth, start = [], 0, 0
    for i, char in enumerate(hostlist + ","):
        depth += {"[": 1, "]": -1}.get(char, 0)
        if char == "," and depth == 0:
            if hostlist[start:i].strip():
                names.append(hostlist[start:i].strip())
            start = i + 1
    if depth != 0 or not names:
        raise ValueError(f"Slurm host list {hostlist!r} is malformed (expected names like node[01-03,07])")
    return [host for name in names for host in _expand_name(name, hostlist)]


def _expand_name(name: str, hostlist: str) -> list[str]:
    match = re.fullmatch(r"([^\[\]]*)\[([^\[\]]*)\](.*)", name)
    if match is None:
        if "[" in name or "]" in name:
            raise ValueError(f"Slurm host list {hostlist!r} is malformed at {name!r}")
        return [name]
    prefix, ranges, rest = match.groups()
    hosts = []
    for part in ranges.split(","):
        low, _, high = part.strip().partition("-")
        if not low.isdigit() or not (high or low).isdigit():
            raise ValueError(f"Slurm host list {hostlist!r}: {part!r} is not a number or a range like 01-03")
        for number in range(int(low), int(high or low) + 1):
            hosts += [f"{prefix}{number:0{len(low)}d}{tail}" for tail in _expand_name(rest, hostlist)]
    return hosts


# ---- addresses and interfaces -------------------------------------------------------------------------

def _up_interfaces() -> dict[str, list[str]]:
    """Interface name -> its IPv4 and IPv6 addresses, for the interfaces that are up."""
    import psutil  # a DeepSpeed dependency

    stats = psutil.net_if_stats()
    return {name: [a.address.split("%")[0] for a in addrs if a.family in (socket.AF_INET, socket.AF_INET6)]
            for name, addrs in psutil.net_if_addrs().items() if name in stats and stats[name].isup}


def _is_loopback(address: str) -> bool:
    return ipaddress.ip_address(address).is_loopback


def _resolve(host: str) -> list[str]:
    return sorted({info[4][0] for info in socket.getaddrinfo(host, None, type=socket.SOCK_STREAM)})


def interface_address(network_interface: str) -> str:
    """The address of `network_interface` on this host (IPv4 first)."""
    interfaces = _up_interfaces()
    if network_interface not in interfaces or not interfaces[network_interface]:
        raise ValueError(f"network interface {network_interface!r} is not up on {socket.gethostname()} (up: "
                         f"{', '.join(sorted(interfaces))}): choose one with --network_interface")
    return sorted(interfaces[network_interface], key=lambda a: ":" in a)[0]


def reachable_address() -> str:
    """An address of this host that other hosts can reach: the host name's, when it resolves to a non-loopback
    address of this host (the usual cluster set-up), else the first non-loopback IPv4 address of an interface
    that is up. Names that resolve to 127.0.1.1 (Debian) or not at all are common, so the name is never used."""
    interfaces = _up_interfaces()
    here = {a for addresses in interfaces.values() for a in addresses}
    try:
        named = [a for a in _resolve(socket.gethostname()) if a in here and not _is_loopback(a)]
    except socket.gaierror:
        named = []
    if named:
        return named[0]
    for addresses in interfaces.values():
        for address in addresses:
            if ":" not in address and not _is_loopback(address):
                return address
    raise ValueError(f"{socket.gethostname()} has no network interface other than loopback that is up: give rank "
                     f"0's address with --master_addr (or MASTER_ADDR)")


def interface_towards(address: str) -> str | None:
    """The network interface this host uses to reach `address` (None when no route or no interface matches)."""
    try:
        family, _, _, _, sockaddr = socket.getaddrinfo(address, 9, type=socket.SOCK_DGRAM)[0]
        with socket.socket(family, socket.SOCK_DGRAM) as s:
            s.connect(sockaddr)  # a UDP connect sends nothing: it only picks the route and the source address
            local = s.getsockname()[0]
    except OSError:
        return None
    return next((name for name, addresses in _up_interfaces().items() if local in addresses), None)


def gloo_interface(master_addr: str, single_host: bool) -> str | None:
    """The interface gloo should use: the one that reaches rank 0, unless that is loopback (rank 0's host
    resolving its own name to 127.0.1.1) in a job that may span hosts: then the one other hosts reach us by."""
    name = interface_towards(master_addr)
    if name is not None and not single_host and all(_is_loopback(a) for a in _up_interfaces()[name]):
        try:
            name = interface_towards(reachable_address())
        except ValueError:  # loopback is all this host has: every rank must be here
            pass
    return name


def free_port() -> int:
    """A TCP port that was free a moment ago (for a rendezvous)."""
    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]


def _rank0_announces(launch: LaunchEnvironment, network_interface: str | None) -> LaunchEnvironment:
    """Fill in master_addr / master_port: rank 0 chooses them and broadcasts them with mpi4py (MPI launchers);
    a world of one takes loopback and a free port."""
    if launch.launcher == "single":
        return replace(launch, master_addr=launch.master_addr or "127.0.0.1",
                       master_port=launch.master_port or free_port())
    if launch.launcher not in MPI_LAUNCHERS:
        raise ValueError(f"{launch.launcher} gives no address of rank 0: set MASTER_ADDR and MASTER_PORT (or "
                         f"--master_addr / --master_port)")
    from mpi4py import MPI

    comm = MPI.COMM_WORLD
    if (comm.Get_rank(), comm.Get_size()) != (launch.rank, launch.world_size):
        raise ValueError(f"{launch.launcher} says rank {launch.rank} of {launch.world_size}, mpi4py's MPI says "
                         f"{comm.Get_rank()} of {comm.Get_size()}: mpi4py is built for another MPI. Install mpi4py "
                         f"against the MPI that launched the job, or set MASTER_ADDR and MASTER_PORT for every rank")
    chosen = None
    if launch.rank == 0:
        try:
            if launch.master_addr:
                address = launch.master_addr
            elif network_interface:
                address = interface_address(network_interface)
            elif launch.local_world_size == launch.world_size:
                address = "127.0.0.1"  # every rank is on this host
            else:
                address = reachable_address()
            chosen = (address, launch.master_port or free_port())
        except ValueError as e:
            chosen = e  # every rank raises it, instead of waiting in the broadcast for an address
    chosen = comm.bcast(chosen, root=0)
    if isinstance(chosen, ValueError):
        raise ValueError(f"rank 0: {chosen}")
    return replace(launch, master_addr=chosen[0], master_port=chosen[1])


def init_distributed(backend: str = "", timeout_s: float = 600.0, master_addr: str | None = None,
                     master_port: int | None = None, network_interface: str | None = None) -> LaunchEnvironment:
    """Initialise the default process group (NCCL with CUDA, else gloo) for any launcher, on one host or several.

    timeout_s bounds every collective of the default group: if a rank or a host is lost, the others fail with
    an error instead of hanging. master_addr / master_port override the launcher's (and MASTER_ADDR /
    MASTER_PORT). network_interface (e.g. "eth0", "ib0") is exported as GLOO_SOCKET_IFNAME and
    NCCL_SOCKET_IFNAME and gives rank 0's address under MPI; without it gloo uses the interface that reaches
    rank 0, unless GLOO_SOCKET_IFNAME is set, and NCCL chooses its own.
    """
    launch = launch_environment()
    if network_interface:
        interface_address(network_interface)  # it exists here
        os.environ.update(GLOO_SOCKET_IFNAME=network_interface, NCCL_SOCKET_IFNAME=network_interface)
    launch = replace(launch, master_addr=master_addr or launch.master_addr,
                     master_port=master_port or launch.master_port)
    if launch.master_addr is None or launch.master_port is None:
        launch = _rank0_announces(launch, network_interface)
    try:
        _resolve(launch.master_addr)
    except socket.gaierror:
        raise ValueError(f"rank 0's address {launch.master_addr!r} does not resolve on {socket.gethostname()} "
                         f"({launch.launcher} job): give an address every host resolves with --master_addr "
                         f"(torchrun: --local_addr on each host; deepspeed: --master_addr)") from None
    if launch.world_size > 1 and "GLOO_SOCKET_IFNAME" not in os.environ:
        interface = gloo_interface(launch.master_addr, single_host=launch.local_world_size == launch.world_size)
        if interface is not None:
            os.environ["GLOO_SOCKET_IFNAME"] = interface
    os.environ.update(RANK=str(launch.rank), WORLD_SIZE=str(launch.world_size), LOCAL_RANK=str(launch.local_rank),
                      MASTER_ADDR=launch.master_addr, MASTER_PORT=str(launch.master_port))
    if not backend:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(launch.local_rank)
    if not dist.is_initialized():
        dist.init_process_group(backend, rank=launch.rank, world_size=launch.world_size,
                                timeout=datetime.timedelta(seconds=timeout_s))
    return launch
