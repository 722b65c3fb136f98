"""`train/run.sh` mistakes: each one is a single line on stderr and exit status 2, before torchrun starts
(no traceback, no failure report), and a failed start leaves no RUN/config.yaml behind."""
import os
import subprocess

import yaml

from train.config import dump_yaml, list_recipes, load_config
from train.config import main as check_main

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RUN_SH = os.path.join(ROOT, "train", "run.sh")


def run_sh(*args):
    env = dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS="1")
    env.pop("TRAIN_STATUS_FILE", None)
    return subprocess.run([RUN_SH, *map(str, args)], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=300)


def assert_one_line_error(p, *phrases):
    out = p.stdout + p.stderr
    assert p.returncode == 2, out
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), out
    assert "Traceback" not in out and "ChildFailedError" not in out and p.stdout == "", out
    for phrase in phrases:
        assert phrase in lines[0], (phrase, lines[0])


def test_each_mistake_is_one_line_and_exit_2_before_torchrun(data_dir, tmp_path):
    misspelled = tmp_path / "typo.yaml"
    misspelled.write_text("model: {name: tiny}\ntrain: {epohcs: 3}\n")
    unlabelled = tmp_path / "U"
    unlabelled.mkdir()
    (unlabelled / "manifest.json").write_text('{"labelled": false, "splits": {"test": {}}}')
    cases = [
        (["resnet5O", "--data", data_dir], ["recipe 'resnet5O'", "resnet50"]),
        ([misspelled, "--data", data_dir], ["train.epohcs", "did you mean 'epochs'"]),
        (["demo", "--data", data_dir, "train.epohcs=3"], ["train.epohcs", "did you mean 'epochs'"]),
        (["demo", "--data", data_dir, "data.batch_size=many"], ["data.batch_size: expected int"]),
        (["demo", "--data", data_dir, "train.amp=fp8"], ["train.amp must be one of"]),
        (["demo", "--data", data_dir, "model.name=resnet5O"], ["model.name=resnet5O: unknown model",
                                                               "did you mean 'resnet50'", "inception_v4"]),
        (["demo", "--data", tmp_path / "nowhere"], ["nowhere: no such directory", "tools.repack"]),
        (["demo", "--data", tmp_path], ["has no manifest.json"]),
        (["demo", "--data", unlabelled], ["unlabelled repack"]),
        (["demo"], ["a data directory is required", "--data DATA", "data.path"]),
        (["demo", "--data", data_dir, "train.init_from=" + str(tmp_path / "none.pt")], ["train.init_from=", "no such file"]),
    ]
    for i, (args, phrases) in enumerate(cases):
        run = tmp_path / f"run{i}"
        assert_one_line_error(run_sh(*args, "--out", run), *phrases)
        assert not os.path.exists(run / "config.yaml"), args


def test_a_start_that_fails_inside_the_trainer_leaves_no_config_yaml(data_dir, tmp_path):
    """Past the checks (a RUN/last.pt that is not a checkpoint): the trainer refuses it and writes nothing."""
    run = tmp_path / "RUN"
    run.mkdir()
    (run / "last.pt").write_bytes(b"not a checkpoint" * 64)
    p = run_sh("demo", "--data", data_dir, "--out", run, "data.num_threads=1", "train.tensorboard=false")
    assert p.returncode == 2, p.stdout + p.stderr
    assert "last.pt is not a checkpoint of this trainer" in p.stderr
    assert "weights_only" not in p.stdout + p.stderr
    assert not (run / "config.yaml").exists()


def test_the_model_names_run_sh_checks_are_the_registry_s():
    """run.sh reads the names from models/zoo.py's source (no torch import): the same list as the registry."""
    from models import list_models
    from train.config import registered_model_names

    assert registered_model_names() == list_models() and "resnet50" in list_models()


def test_check_prints_the_resolved_config(data_dir, capsys):
    assert check_main(["demo", "--data", str(data_dir), "train.epochs=3"]) == 0
    cfg = yaml.safe_load(capsys.readouterr().out)
    assert cfg["data"]["path"] == str(data_dir) and cfg["train"]["epochs"] == 3.0
    assert check_main(["demo", "--data", str(data_dir), "--quiet"]) == 0 and capsys.readouterr().out == ""


def test_config_yaml_has_no_float_artifacts():
    """Every float a recipe resolves to prints as typed (57.12, not 57.120000000000005)."""
    def floats(v):
        if isinstance(v, dict):
            for x in v.values():
                yield from floats(x)
        elif isinstance(v, list):
            for x in v:
                yield from floats(x)
        elif isinstance(v, float):
            yield v

    for name in list_recipes():
        text = dump_yaml(load_config(name))
        for x in floats(yaml.safe_load(text)):
            assert float(f"{x:.10g}") == x, (name, x)


def test_torchrun_leaves_out_its_report_where_the_workers_said_why(tmp_path):
    """train.torchrun (what train.launch execs): a worker that ends the run with its own error line and status
    2 (a refusal) or 4 (lost contact) in the status file gets no torchrun traceback and failure report after
    that line; any other status keeps torch's report (a bug's traceback must stay)."""
    import sys

    worker = tmp_path / "worker.py"
    worker.write_text("import os, sys\n"
                      "open(os.environ['TRAIN_STATUS_FILE'], 'w').write(sys.argv[1])\n"
                      "print('error: the worker says why', file=sys.stderr)\n"
                      "sys.exit(int(sys.argv[1]))\n")
    for status, quiet in ((2, True), (4, True), (1, False)):
        env = dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS="1", TRAIN_STATUS_FILE=str(tmp_path / "status"))
        p = subprocess.run([sys.executable, "-m", "train.torchrun", "--standalone", "--nproc_per_node=1",
                            str(worker), str(status)], cwd=ROOT, env=env, capture_output=True, text=True,
                           timeout=120)
        assert p.returncode == 1, p.stderr
        assert "error: the worker says why" in p.stderr
        report = "ChildFailedError" in p.stderr and "Traceback" in p.stderr
        assert report is not quiet, (status, p.stderr)
