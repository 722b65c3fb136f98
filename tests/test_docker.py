"""No Docker engine runs here: check that what the Dockerfile and docker/README use exists in the project."""
import os
import re
import shlex
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def read(path):
    with open(os.path.join(ROOT, path)) as f:
        return f.read()


def test_dockerfile_copies_existing_paths():
    text = read("docker/Dockerfile")
    copies = re.findall(r"^COPY\s+(.+?)\s+\S+\s*$", text, re.M)
    assert copies, "the Dockerfile copies nothing"
    for line in copies:
        for src in line.split():
            assert os.path.exists(os.path.join(ROOT, src)), f"Dockerfile copies {src}, which does not exist"
    assert "nvidia-dali-cuda120" in text and "cuda12" in text


def _commands():
    """Each `docker run ... IMAGE <command>` of docker/README.md, joined over line continuations."""
    text = read("docker/README.md") + "\n" + read("docker/Dockerfile")
    text = re.sub(r"\\\n\s*(#\s*)?", " ", text)
    cmds = []
    for line in text.splitlines():
        m = re.search(r"docker run .*?cdiscount-trainer (.+)$", line)
        if m:
            cmds.append(shlex.split(m.group(1)))
    return cmds


def test_readme_commands_exist_with_their_flags():
    cmds = _commands()
    kinds = {c[0] if c[0] != "python" else c[2] for c in cmds}
    assert {"train/run.sh", "tools.repack", "tools.bench", "tools.predict"} <= kinds
    for cmd in cmds:
        if cmd[0] == "train/run.sh":
            assert os.access(os.path.join(ROOT, "train/run.sh"), os.X_OK)
            assert os.path.isfile(os.path.join(ROOT, "train/configs", cmd[1] + ".yaml")), cmd
            overrides = [a for a in cmd[2:] if "=" in a and not a.startswith("-")]
            for o in overrides:  # the keys must be real config keys
                from train.config import Config, apply_override

                apply_override(Config(), o.split("=")[0] + "=/x")
            continue
        assert cmd[:2] == ["python", "-m"], cmd
        module, args = cmd[2], cmd[3:]
        assert os.path.isfile(os.path.join(ROOT, *module.split(".")) + ".py"), module
        help_args = [args[0], "--help"] if module == "tools.bench" else ["--help"]
        out = subprocess.run([sys.executable, "-m", module, *help_args], cwd=ROOT, capture_output=True,
                             text=True)
        assert out.returncode == 0, out.stderr
        for flag in (a for a in args if a.startswith("--")):
            assert flag in out.stdout, f"{module} {' '.join(help_args)} does not know {flag}"


def test_dali_cuda_major_is_the_bases():
    text = read("docker/Dockerfile")
    base = re.search(r"^ARG BASE=\S+-cuda(\d+)\.\d+", text, re.M)
    dali = re.search(r"^ARG DALI=nvidia-dali-cuda(\d+)0$", text, re.M)
    assert base and dali, "the Dockerfile names its BASE's CUDA version and its DALI package in ARG lines"
    assert base.group(1) == dali.group(1), f"a CUDA {base.group(1)} base with DALI for CUDA {dali.group(1)}"


def test_volumes_and_gpu_flags_in_the_documented_commands():
    assert re.search(r'^VOLUME \["/data", "/runs"\]$', read("docker/Dockerfile"), re.M)
    text = re.sub(r"\\\n\s*(#\s*)?", " ", read("docker/README.md") + "\n" + read("docker/Dockerfile"))
    runs = [line for line in text.splitlines() if re.search(r"docker run .*cdiscount-trainer", line)]
    assert runs
    for line in runs:
        assert re.search(r"-v \S+:/data\b", line), line
        if "train/run.sh" in line or "--gpus" in line:
            assert "--gpus all" in line and "--ipc=host" in line, line
        if "train/run.sh" in line:
            assert re.search(r"-v \S+:/runs\b", line), line


def test_docker_test_says_when_it_cannot_run(tmp_path):
    """Without dockerd/debootstrap and no apt-get to install them: a message and exit 77, never a pass."""
    import shutil

    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for tool in ("dirname", "date", "id"):  # what the script needs before it looks for the Docker tools
        os.symlink(shutil.which(tool), bin_dir / tool)
    p = subprocess.run([shutil.which("bash"), os.path.join(ROOT, "docker", "test.sh")], env={"PATH": str(bin_dir)},
                       capture_output=True, text=True, timeout=60)
    assert p.returncode == 77, p.stdout + p.stderr
    assert "NOT RUN" in p.stderr and "nothing was tested" in p.stderr
