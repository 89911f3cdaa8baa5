"""The package as users install it: real pip, fresh virtual environments outside the repository, pip's default
build isolation.

One environment serves the `packaging` tests (setting it up installs torch and compiles the extension):
a copy of the checkout's files, a fresh venv with the pinned torch, a wheel built from the copy by that venv's
pip and installed with the [train] extra. Every build runs with `--no-index` and a folder holding only the build
requirements of pyproject.toml, so a build that asked for torch (a second one, downloaded into the isolated build
environment) would fail. The editable install runs last and replaces the wheel in that environment.
"""
from __future__ import annotations

import ast
import json
import os
import re
import shutil
import subprocess
import sys
import tomllib
import zipfile
from dataclasses import dataclass
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

REPO = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())
COMMANDS = {  # console command -> the script that is its thin entry point
    "goldfish-pretrain": "pretrain.py",
    "goldfish-prepare-data": "prepare_data.py",
    "goldfish-train-tokenizer": "train_tokenizer.py",
    "goldfish-export-hf": "export_hf.py",
    "goldfish-evaluate-memorization": "evaluate_memorization.py",
    "goldfish-memorization-experiment": "run_memorization_experiment.py",
}
PIP_TIMEOUT = 1800  # a compile on 2 busy cores


def requirement_lines(path: Path) -> list[Requirement]:
    lines = (line.split("#")[0].strip() for line in path.read_text().splitlines())
    return [Requirement(line) for line in lines if line]


def run(command: list, env: dict, cwd: Path, timeout: float = PIP_TIMEOUT) -> subprocess.CompletedProcess:
    result = subprocess.run([str(c) for c in command], env=env, cwd=cwd, capture_output=True, text=True,
                            timeout=timeout)
    assert result.returncode == 0, f"{command} failed:\n{result.stdout[-6000:]}\n{result.stderr[-6000:]}"
    return result


# ---- what the repository declares ---------------------------------------------------------------------------

def test_requirements_pin_the_packages_the_package_declares():
    """requirements.txt (the CI set) = dependencies + every extra + the build requirements, and each pin there
    satisfies the package's own range (torch's CPU pin is a torch the package accepts)."""
    project = PYPROJECT["project"]
    declared = [Requirement(r) for r in project["dependencies"] + PYPROJECT["build-system"]["requires"]]
    declared += [Requirement(r) for extra in project["optional-dependencies"].values() for r in extra]
    declared = [r for r in declared if canonicalize_name(r.name) != canonicalize_name(project["name"])]
    pinned = {canonicalize_name(r.name): r for r in requirement_lines(REPO / "requirements.txt")}
    assert set(pinned) == {canonicalize_name(r.name) for r in declared}
    for requirement in declared:
        pins = [s.version for s in pinned[canonicalize_name(requirement.name)].specifier if s.operator == "=="]
        assert all(requirement.specifier.contains(v) for v in pins), (requirement, pins)
    assert "torch" not in {canonicalize_name(Requirement(r).name) for r in PYPROJECT["build-system"]["requires"]}


def test_every_module_parses_with_the_oldest_python_the_package_allows():
    """requires-python is true to the code: each module parses with that version's grammar, and before 3.10 an
    `X | Y` annotation is only allowed where `from __future__ import annotations` keeps it from being evaluated."""
    oldest = tuple(int(x) for x in re.fullmatch(r">=(\d+)\.(\d+)", PYPROJECT["project"]["requires-python"]).groups())
    for path in [REPO / "setup.py", *sorted((REPO / "goldfish_ds").rglob("*.py")), *(REPO / "scripts").glob("*.py")]:
        tree = ast.parse(path.read_text(), filename=str(path), feature_version=oldest)
        annotations = [n.annotation for n in ast.walk(tree) if isinstance(n, (ast.arg, ast.AnnAssign)) and n.annotation]
        annotations += [n.returns for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))
                        and n.returns]
        unions = [a for a in annotations if any(isinstance(n, ast.BinOp) and isinstance(n.op, ast.BitOr)
                                                for n in ast.walk(a))]
        deferred = any(isinstance(n, ast.ImportFrom) and n.module == "__future__" and
                       any(alias.name == "annotations" for alias in n.names) for n in tree.body)
        assert oldest >= (3, 10) or not unions or deferred, f"{path}: `X | Y` annotations need Python 3.10"


def test_scripts_are_the_console_commands():
    """Each script calls the main() its console command runs, and holds nothing else."""
    scripts = PYPROJECT["project"]["scripts"]
    for command, script in COMMANDS.items():
        module = scripts[command].removesuffix(":main")
        body = ast.parse((REPO / "scripts" / script).read_text()).body
        assert ast.unparse(body[1]) == f"from {module} import main"
        assert len(body) == 3 and ast.unparse(body[2]) == "if __name__ == '__main__':\n    main()"
    assert (REPO / "configs").resolve() == (REPO / "goldfish_ds" / "configs").resolve()  # one copy of the configs


# ---- built and installed with pip ---------------------------------------------------------------------------

@dataclass
class Environment:
    root: Path
    src: Path          # a copy of the checkout's files
    venv: Path
    wheel: Path
    build_tools: Path  # wheels of the build requirements only (no torch)
    work: Path         # a directory outside the checkout to run commands in

    @property
    def python(self) -> Path:
        return self.venv / "bin" / "python"

    @property
    def site_packages(self) -> Path:
        return self.venv / "lib" / f"python{sys.version_info.major}.{sys.version_info.minor}" / "site-packages"

    def env(self, offline_builds: bool = False) -> dict:
        """The venv as if activated; nothing of the checkout or of the test's own environment on the path."""
        env = {k: v for k, v in os.environ.items()
               if k not in ("PYTHONPATH", "VIRTUAL_ENV", "PIP_NO_BUILD_ISOLATION", "PIP_NO_INDEX", "PIP_FIND_LINKS")}
        env.update(VIRTUAL_ENV=str(self.venv), PATH=f"{self.venv / 'bin'}{os.pathsep}{os.environ['PATH']}")
        if offline_builds:
            env.update(PIP_NO_INDEX="1", PIP_FIND_LINKS=str(self.build_tools))
        return env

    def pip(self, *args, offline_builds: bool = False, cwd: Path | None = None) -> subprocess.CompletedProcess:
        return run([self.python, "-m", "pip", *args], self.env(offline_builds), cwd or self.work)

    def python_json(self, code: str) -> dict:
        """Run code in the venv from the work directory; it prints one JSON object."""
        return json.loads(run([self.python, "-c", code], self.env(), self.work, timeout=300).stdout.splitlines()[-1])


def copy_checkout(dst: Path) -> None:
    """The files git tracks or would track (no build outputs, venvs or runs), symlinks kept."""
    listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=REPO,
                            capture_output=True, check=True).stdout.decode().split("\0")
    for name in filter(None, listed):
        source, target = REPO / name, dst / name
        if source.is_symlink() or source.is_file():
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, target, follow_symlinks=False)


@pytest.fixture(scope="module")
def environment(tmp_path_factory) -> Environment:
    root = tmp_path_factory.mktemp("packaging")
    e = Environment(root, root / "src", root / "venv", Path(), root / "build-tools", root / "work")
    e.work.mkdir()
    copy_checkout(e.src)
    run([sys.executable, "-m", "pip", "download", "--only-binary", ":all:", "-d", e.build_tools,
         *PYPROJECT["build-system"]["requires"]], dict(os.environ), root)
    assert not list(e.build_tools.glob("torch-*"))
    run([sys.executable, "-m", "venv", e.venv], dict(os.environ), root)
    e.pip("install", "--upgrade", "pip")
    torch_pin = next(r for r in requirement_lines(REPO / "requirements.txt") if r.name == "torch")
    e.pip("install", str(torch_pin))
    e.pip("wheel", "--no-deps", "-w", root / "dist", e.src, offline_builds=True)
    e.wheel = next((root / "dist").glob("goldfish_ds-*.whl"))
    e.pip("install", f"{e.wheel}[train]")
    return e


@pytest.mark.packaging
def test_wheel_holds_the_configs_the_extension_and_its_torch(environment):
    names = set(zipfile.ZipFile(environment.wheel).namelist())
    shipped = (environment.src / "goldfish_ds" / "configs").rglob("*")
    configs = {p.relative_to(environment.src).as_posix() for p in shipped if p.is_file()}
    assert configs and configs <= names
    assert any(re.fullmatch(r"goldfish_ds/_C\..*\.so", n) for n in names) and "goldfish_ds/_build_info.py" in names
    entry_points = next(n for n in names if n.endswith(".dist-info/entry_points.txt"))
    text = zipfile.ZipFile(environment.wheel).read(entry_points).decode()
    assert all(f"{command} = " in text for command in [*COMMANDS, "goldfish_ds"])
    built = environment.python_json(
        "import json, torch, goldfish_ds, goldfish_ds._build_info as b; print(json.dumps({'package': "
        "goldfish_ds.__file__, 'built_against': b.TORCH_PATH, 'torch': torch.__path__[0], 'backends': "
        "goldfish_ds.compiled_backends()}))")
    assert Path(built["package"]).parent == environment.site_packages / "goldfish_ds"
    assert built["built_against"] == built["torch"] == str(environment.site_packages / "torch")
    assert "cpu" in built["backends"]


@pytest.mark.packaging
def test_installed_command_runs_the_default_job_outside_the_repository(environment):
    """goldfish-pretrain with no data arguments: the embedded default, its configs read from site-packages."""
    out = environment.work / "run"
    env = dict(environment.env(), OMP_NUM_THREADS="2")
    run([environment.venv / "bin" / "goldfish-pretrain", "--max_steps", "2", "--no-progress", "--out_dir", out],
        env, environment.work, timeout=900)
    train = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in train if "loss" in r] == [1, 2]
    assert [r["step"] for r in train if "val_loss" in r] == [2]
    assert {"config.json", "model.safetensors", "tokenizer.model"} <= {f.name for f in (out / "hf").iterdir()}
    assert (out / "tensorboard").is_dir()  # tensorboard came with the [train] extra
    args = json.loads((out / "args.json").read_text())
    assert Path(args["model_config"]) == environment.site_packages / "goldfish_ds" / "configs" / "models" / "tiny.json"


@pytest.mark.packaging
def test_console_commands_start_and_match_the_scripts(environment):
    """Every command answers --help; the pretraining one with the same text as its script, run from the copy
    of the checkout on the installed package (argparse wraps the usage by the program's name: compared word by
    word)."""
    helps = {c: run([environment.venv / "bin" / c, "--help"], environment.env(), environment.work).stdout
             for c in COMMANDS}
    assert all(text.startswith(f"usage: {command} ") for command, text in helps.items())
    from_script = run([environment.python, environment.src / "scripts" / "pretrain.py", "--help"], environment.env(),
                      environment.work).stdout
    assert helps["goldfish-pretrain"].replace("goldfish-pretrain", "pretrain.py").split() == from_script.split()


@pytest.mark.packaging
def test_import_refuses_an_extension_built_against_another_torch(environment):
    info = Path(environment.python_json(
        "import json, goldfish_ds._build_info as b; print(json.dumps({'path': b.__file__}))")["path"])
    recorded = info.read_text()
    info.write_text(re.sub(r"TORCH_VERSION = .*", "TORCH_VERSION = '2.4.0'", recorded))
    try:
        result = subprocess.run([environment.python, "-c", "import goldfish_ds"], env=environment.env(),
                                cwd=environment.work, capture_output=True, text=True, timeout=300)
    finally:
        info.write_text(recorded)
    assert result.returncode == 1
    assert "ImportError: goldfish_ds: the compiled extension goldfish_ds._C was built against torch 2.4.0 (" \
        in result.stderr
    assert "`pip install -e .`" in result.stderr


@pytest.mark.packaging
def test_build_without_torch_in_the_environment_stops_with_the_fix(environment):
    bare = environment.root / "bare"
    run([sys.executable, "-m", "venv", bare], dict(os.environ), environment.root)
    env = dict(environment.env(offline_builds=True), VIRTUAL_ENV=str(bare))
    result = subprocess.run([bare / "bin" / "python", "-m", "pip", "install", environment.src], env=env,
                            cwd=environment.work, capture_output=True, text=True, timeout=PIP_TIMEOUT)
    assert result.returncode != 0
    output = result.stdout + result.stderr
    assert f"{bare / 'lib'}" in output and "holds none" in output and "Install torch there first" in output


@pytest.mark.packaging
def test_editable_install_builds_the_extension_against_the_environments_torch(environment):
    """`pip install -e .` as users run it (build isolation on), with nothing but the build tools to download."""
    environment.pip("install", "-e", ".", offline_builds=True, cwd=environment.src)
    built = environment.python_json(
        "import json, torch, goldfish_ds, goldfish_ds._build_info as b\n"
        "from goldfish_ds import GoldfishConfig, apply_goldfish, goldfish_cross_entropy\n"
        "g = torch.Generator().manual_seed(0)\n"
        "logits, labels = torch.randn(64, 50, generator=g), torch.randint(0, 50, (64,), generator=g)\n"
        "cfg = GoldfishConfig(k=2, h=1, strategy='hash-rolling')\n"
        "ours = goldfish_cross_entropy(logits, labels, cfg, in_place=False)\n"
        "torch_ce = torch.nn.functional.cross_entropy(logits, apply_goldfish(labels, cfg))\n"
        "print(json.dumps({'package': goldfish_ds.__file__, 'built_against': b.TORCH_PATH, 'version': "
        "b.TORCH_VERSION, 'torch': torch.__path__[0], 'torch_version': torch.__version__, 'ours': ours.item(), "
        "'torch_ce': torch_ce.item(), 'kept': int((apply_goldfish(labels, cfg) >= 0).sum())}))")
    assert Path(built["package"]) == environment.src / "goldfish_ds" / "__init__.py"
    assert built["built_against"] == built["torch"] == str(environment.site_packages / "torch")
    assert built["version"] == built["torch_version"]
    assert 0 < built["kept"] < 64 and built["ours"] == pytest.approx(built["torch_ce"], rel=1e-6)
    assert list((environment.src / "goldfish_ds").glob("_C.*.so"))
