"""The build: the compiled extension is what runs, the command reports it, and a CPU that cannot run it is told
to rebuild before it loads."""
import shutil
import subprocess
import sys

import pytest
import torch

import goldfish_ds
from conftest import HAS_CUDA, REPO


def test_compiled_kernels_present():
    assert "cpu" in goldfish_ds.compiled_backends()
    assert goldfish_ds.cpu_capability() in {"AVX512_BF16", "AVX512", "AVX2", "DEFAULT"}
    if HAS_CUDA:  # a GPU machine must run the CUDA kernels, never skip them
        assert "cuda" in goldfish_ds.compiled_backends()


def test_operators_registered():
    for name in ["goldfish_mask", "cross_entropy_loss", "cross_entropy_loss_grad", "cross_entropy_loss_grad_",
                 "scale_rows_"]:
        assert hasattr(torch.ops.goldfish_ds, name)


def test_info_command_reports_kernels():
    out = subprocess.run([sys.executable, "-m", "goldfish_ds", "info"], check=True, capture_output=True, text=True)
    assert "compiled kernels: cpu" in out.stdout


# ---- the SIMD level of the build against the CPU, checked before the extension loads ------------------------

# /proc/cpuinfo `flags` lines of real CPUs, as their owners posted them: an Intel Core i7-4510U (Haswell: AVX2,
# FMA, F16C, no AVX-512), and an Intel Core i5-6267U seen through VirtualBox (AVX, but no AVX2 and no FMA).
HASWELL_FLAGS = (
    "fpu vme de pse tsc msr pae mce cx8 apic sep mtrr pge mca cmov pat pse36 clflush dts acpi mmx fxsr sse sse2 ss ht "
    "tm pbe syscall nx pdpe1gb rdtscp lm constant_tsc arch_perfmon pebs bts rep_good nopl xtopology nonstop_tsc "
    "aperfmperf pni pclmulqdq dtes64 monitor ds_cpl vmx est tm2 ssse3 sdbg fma cx16 xtpr pdcm pcid sse4_1 sse4_2 "
    "movbe popcnt tsc_deadline_timer aes xsave avx f16c rdrand lahf_lm abm epb invpcid_single ssbd ibrs ibpb stibp "
    "pti tpr_shadow vnmi flexpriority ept vpid fsgsbase tsc_adjust bmi1 avx2 smep bmi2 erms invpcid xsaveopt dtherm "
    "ida arat pln pts md_clear flush_l1d")
VIRTUALBOX_SKYLAKE_FLAGS = (
    "fpu vme de pse tsc msr pae mce cx8 apic sep mtrr pge mca cmov pat pse36 clflush mmx fxsr sse sse2 ht syscall nx "
    "rdtscp lm constant_tsc rep_good nopl xtopology nonstop_tsc pni pclmulqdq ssse3 cx16 sse4_1 sse4_2 x2apic movbe "
    "popcnt aes xsave avx rdrand hypervisor lahf_lm abm 3dnowprefetch rdseed clflushopt")


def test_the_recorded_level_is_the_built_one_and_this_cpu_runs_it():
    from goldfish_ds import kernels

    built = kernels.built_cpu_capability(kernels._C.__file__)
    assert built == goldfish_ds.cpu_capability()
    kernels.check_cpu_supports(built, kernels.cpu_flags())  # this machine built it, so it runs it


def test_the_required_cpu_flags_are_the_instruction_sets_setup_py_compiles_for():
    """CPU_CAPABILITY_FLAGS must follow setup.py's CPU_FLAGS (-mavx2 needs the CPU flag avx2, and so on)."""
    import ast

    from goldfish_ds.kernels import CPU_CAPABILITY_FLAGS

    tree = ast.parse((REPO / "setup.py").read_text())
    constants = {node.targets[0].id: node.value for node in tree.body
                 if isinstance(node, ast.Assign) and isinstance(node.targets[0], ast.Name)}

    def flag_list(node: ast.expr) -> list:  # a list literal, a constant naming one, or a sum of those
        if isinstance(node, ast.Name):
            return flag_list(constants[node.id])
        if isinstance(node, ast.BinOp):
            return flag_list(node.left) + flag_list(node.right)
        return ast.literal_eval(node)

    table = constants["CPU_FLAGS"]
    compiled = {key.value: flag_list(value) for key, value in zip(table.keys, table.values)}
    assert set(compiled) == set(CPU_CAPABILITY_FLAGS)
    cpuinfo_name = {"avx512bf16": "avx512_bf16"}
    for level, flags in compiled.items():
        needed = {cpuinfo_name.get(f[2:], f[2:]) for f in flags if f.startswith("-m")}
        assert needed == set(CPU_CAPABILITY_FLAGS[level]), level


# The refusals themselves are rows of tests/test_bad_input.py.
RECORDED_CPUS = {"Core i7-4510U": (HASWELL_FLAGS, "AVX2"), "Core i5-6267U under VirtualBox": (VIRTUALBOX_SKYLAKE_FLAGS,
                                                                                             "DEFAULT")}


@pytest.mark.parametrize("cpu", RECORDED_CPUS)
def test_the_level_recommended_to_a_cpu_is_the_best_it_runs(cpu):
    from goldfish_ds.kernels import CPU_CAPABILITY_FLAGS, check_cpu_supports

    flags, best = RECORDED_CPUS[cpu]
    flags = frozenset(flags.split())
    check_cpu_supports(best, flags)
    levels = list(CPU_CAPABILITY_FLAGS)
    for better in levels[:levels.index(best)]:
        with pytest.raises(ImportError, match=f"GOLDFISH_CPU_CAPABILITY={best} pip install"):
            check_cpu_supports(better, flags)


def test_importing_on_a_cpu_without_the_built_level_raises_before_loading_the_extension(tmp_path):
    """A real import, in a process that sees a recorded /proc/cpuinfo (bind-mounted over the real one in its own
    mount namespace): ImportError with the rebuild command, and goldfish_ds._C never loaded. (No SIGILL can be
    provoked here: this CPU runs every level, so the check is what is tested, not a crash.)"""
    built = goldfish_ds.cpu_capability()
    if built == "DEFAULT":
        pytest.skip("a DEFAULT build runs on every x86-64 CPU: no mismatch to make")
    lacking = HASWELL_FLAGS if built.startswith("AVX512") else VIRTUALBOX_SKYLAKE_FLAGS
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text(f"processor\t: 0\nflags\t\t: {lacking}\n")
    probe = ("import sys\ntry:\n    import goldfish_ds\nexcept ImportError as e:\n"
             "    print('goldfish_ds._C' in sys.modules, e)\nelse:\n    print('imported')\n")
    unshare = shutil.which("unshare")
    command = [unshare, "--mount", "--propagation", "private", "sh", "-c",
               f'mount --bind "$0" /proc/cpuinfo && exec "$1" -c "$2"', str(cpuinfo), sys.executable, probe]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300) if unshare else None
    if result is None or "mount" in result.stderr and result.returncode != 0:
        pytest.skip(f"cannot bind-mount over /proc/cpuinfo here (needs root and mount namespaces): "
                    f"{result.stderr.strip() if result else 'no unshare'}")
    assert result.returncode == 0, result.stderr  # no SIGILL, no crash: a Python exception
    assert result.stdout.startswith("False goldfish_ds: the compiled extension goldfish_ds._C was built for the SIMD "
                                    f"level {built}, which this CPU lacks"), result.stdout
    assert "GOLDFISH_CPU_CAPABILITY=" in result.stdout and "pip install --no-build-isolation -e ." in result.stdout
