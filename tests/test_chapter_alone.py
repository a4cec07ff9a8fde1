"""mnist_net.py handed out alone: copied into an empty folder beside an mnist_data/ folder, it
trains and writes its log by itself; with fast_layers.py beside it, it runs the fast path; a
learner's edit to a chapter layer runs the chapter, and says so.  And run as a script in the
project, there is one copy of the module: the tools use the one whose main() runs."""
import os
import re
import shutil
import subprocess
import sys

import pytest

import mnist_net as m
import two_processes

from conftest import ROOT, write_mnist

N_TEST = 60
RELU_FORWARD = "        return np.maximum(x, 0)\n"
RELU_BACKWARD = "        return dout * self.positive\n"


def clean_env(columns=None):
    """The environment of a user's shell: nothing of this project on the import path."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "COLUMNS")}
    if columns:
        env["COLUMNS"] = columns
    return env


def folder_with(tmp_path, files, data=True, chapter=None):
    """An empty folder holding only `files` copied from the project (mnist_net.py's text
    replaced by `chapter` if given) and, if data, a small synthetic MNIST in mnist_data/."""
    folder = tmp_path / "handout"
    folder.mkdir()
    for name in files:
        shutil.copy(os.path.join(ROOT, name), folder / name)
    if chapter is not None:
        (folder / "mnist_net.py").write_text(chapter)
    if data:
        write_mnist(str(folder / "mnist_data"), n_train=200, n_test=N_TEST)
    return folder


def run(folder, *args, columns=None):
    return subprocess.run([sys.executable, "mnist_net.py", *args], cwd=folder, env=clean_env(columns),
                          capture_output=True, text=True, timeout=300)


def layers_line(stdout):
    lines = [line for line in stdout.splitlines() if line.startswith("layers: ")]
    assert len(lines) == 1, stdout
    return lines[0]


def epoch_loss(stdout):
    return float(re.search(r"^epoch 1/1  loss (\d+\.\d+)", stdout, re.M).group(1))


def log_rows(path):
    return [line for line in path.read_text().splitlines() if not line.startswith("#")]


@pytest.fixture(scope="module")
def fast_run(tmp_path_factory):
    """The unedited chapter with fast_layers.py and two_processes.py beside it: the default run,
    on the fast path."""
    folder = folder_with(tmp_path_factory.mktemp("fast"), ["mnist_net.py", "fast_layers.py", "two_processes.py"])
    result = run(folder, "--epochs", "1")
    assert result.returncode == 0, result.stderr
    return folder, result


def test_the_chapter_alone_trains_and_writes_its_log(tmp_path, fast_run):
    folder = folder_with(tmp_path, ["mnist_net.py"])
    result = run(folder, "--epochs", "1")
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    out = result.stdout
    assert layers_line(out) == "layers: this file's own (fast_layers.py is not here)"
    assert 'network --net "conv8 relu pool fc128 relu fc10"' in out and "epoch 1/1  loss" in out
    assert "Full MNIST test accuracy:" in out and f"Wrote {N_TEST} predictions to mnist_test_log.txt" in out
    rows = log_rows(folder / "mnist_test_log.txt")
    assert len(rows) == N_TEST and all(re.fullmatch(r"\d \d", row) for row in rows)
    assert sorted(os.listdir(folder)) == ["mnist_data", "mnist_net.py", "mnist_test_log.txt"]
    # the chapter's layers compute what the fast path's do: the same loss, to float32 rounding
    assert abs(epoch_loss(out) - epoch_loss(fast_run[1].stdout)) <= 2e-4


def test_alone_every_line_it_prints_fits_100_columns(tmp_path):
    """Numbers as wide as the full data set's (60,000 training images: 469 steps of 128)."""
    folder = folder_with(tmp_path, ["mnist_net.py"], data=False)
    write_mnist(str(folder / "mnist_data"), n_train=60_000, n_test=10_000)
    result = run(folder, "--epochs", "1", "--net", "conv2 pool fc10", "--optimizer", "momentum")
    assert result.returncode == 0, result.stderr
    assert "Training on 60000 images" in result.stdout
    lines = result.stdout.splitlines()
    assert max(len(line) for line in lines) <= 100, max(lines, key=len)


def test_alone_its_help_shows_only_the_flags_it_serves(tmp_path):
    folder = folder_with(tmp_path, ["mnist_net.py"], data=False)
    result = run(folder, "--help")
    assert result.returncode == 0, result.stderr
    text = result.stdout
    for flag in ("--epochs", "--batch-size", "--net", "--optimizer", "--lr", "--seed", "--dataset",
                 "--data-dir", "--log-file", "--plain", "--quiet"):
        assert flag in text
    for flag in ("--save-model", "--load-model", "--predict", "--plot", "--trace", "--gradcheck",
                 "--no-download", "--limit"):
        assert flag not in text
    assert "(default: False)" not in text


@pytest.mark.parametrize("columns", [None, "250"])
def test_alone_its_help_fits_100_columns_on_any_terminal(tmp_path, columns):
    folder = folder_with(tmp_path, ["mnist_net.py"], data=False)
    result = run(folder, "--help", columns=columns)           # argparse fills the terminal's width
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert max(len(line) for line in lines) <= 100, max(lines, key=len)


def test_alone_a_missing_data_file_is_one_line_and_the_old_log_stays(tmp_path):
    folder = folder_with(tmp_path, ["mnist_net.py"])
    missing = folder / "mnist_data" / "t10k-labels-idx1-ubyte"
    os.remove(missing)
    (folder / "mnist_test_log.txt").write_text("# my earlier run\n7 7\n")
    result = run(folder, "--epochs", "1")
    assert result.returncode == 1
    assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr
    assert result.stderr.startswith(f"error: {missing}: missing")
    assert (folder / "mnist_test_log.txt").read_text() == "# my earlier run\n7 7\n"


def test_alone_a_bad_flag_is_refused(tmp_path):
    folder = folder_with(tmp_path, ["mnist_net.py"], data=False)
    result = run(folder, "--save-model", "m.npz")               # a flag of the full command line only
    assert result.returncode == 2 and "unrecognized arguments: --save-model" in result.stderr
    result = run(folder, "--net", "conv8 relu pooll fc10")
    assert result.returncode == 2 and result.stderr.count("\n") == 1 and "'pooll'" in result.stderr
    assert os.listdir(folder) == ["mnist_net.py"]


def test_with_fast_layers_beside_it_the_fast_path_runs(fast_run, tmp_path):
    """The fast path in two processes where two_processes.py finds that safe (else one, saying
    why); with fast_layers.py copied alone, in one process, saying so: the same log, byte for byte."""
    folder, result = fast_run
    why = two_processes.why_one_process(m.BATCH_SIZE, facts=dict(two_processes.platform_facts(), threads=1))
    assert layers_line(result.stdout) == "layers: the fast path (fast_layers.py), " + \
        ("two processes" if why is None else f"one process ({why})")
    assert len(log_rows(folder / "mnist_test_log.txt")) == N_TEST
    alone = folder_with(tmp_path, ["mnist_net.py", "fast_layers.py"])
    one = run(alone, "--epochs", "1")
    assert one.returncode == 0, one.stderr
    assert layers_line(one.stdout) == "layers: the fast path (fast_layers.py), one process (two_processes.py is not here)"
    assert (alone / "mnist_test_log.txt").read_bytes() == (folder / "mnist_test_log.txt").read_bytes()
    plain = run(folder, "--epochs", "1", "--plain", "--log-file", "plain.txt")
    assert plain.returncode == 0, plain.stderr
    assert layers_line(plain.stdout) == "layers: this file's own (--plain)"


@pytest.fixture(scope="module")
def edited_run(tmp_path_factory):
    """A learner's edit: the chapter's ReLU made leaky (forward and backward), fast_layers.py
    beside it, the default run."""
    chapter = open(os.path.join(ROOT, "mnist_net.py")).read()
    assert chapter.count(RELU_FORWARD) == 1 and chapter.count(RELU_BACKWARD) == 1
    edited = chapter.replace(RELU_FORWARD, "        return np.maximum(x, 0.1 * x)\n").replace(
        RELU_BACKWARD, "        return dout * np.where(self.positive, 1, 0.1).astype(dout.dtype)\n")
    folder = folder_with(tmp_path_factory.mktemp("edited"), ["fast_layers.py"], chapter=edited)
    result = run(folder, "--epochs", "1")
    assert result.returncode == 0, result.stderr
    return folder, result


def test_a_learners_edit_runs_the_chapter_and_says_so(edited_run, fast_run):
    """The start-up check finds the fast path's ReLU differs from the edited chapter's, and
    the run uses the chapter's (edited) layers."""
    _, result = edited_run
    line = layers_line(result.stdout)
    assert line.startswith("layers: the chapter's layers differ from the fast path's")
    assert "running the chapter" in line
    # the edit ran: the loss is not the unedited network's
    assert abs(epoch_loss(result.stdout) - epoch_loss(fast_run[1].stdout)) > 1e-3


def test_the_edited_run_prints_lines_that_fit_100_columns(edited_run):
    lines = edited_run[1].stdout.splitlines()
    assert max(len(line) for line in lines) <= 100, max(lines, key=len)


def test_run_as_a_script_there_is_one_copy_of_the_module(tmp_path):
    """python3 mnist_net.py in the project: every function of mnist_net.py that runs once main()
    has started runs in the module named mnist_net (the one the tools import), none in __main__."""
    write_mnist(str(tmp_path / "data"), n_train=64, n_test=20)
    script = os.path.join(ROOT, "mnist_net.py")
    probe = f"""
import os, runpy, sys
script = {script!r}
ran, main_started, ours = set(), [], {{}}

def profile(frame, event, arg):
    if event != "call":
        return
    name = frame.f_code.co_filename
    if name not in ours:
        ours[name] = os.path.exists(name) and os.path.samefile(name, script)
    if ours[name]:
        if frame.f_code.co_name == "main":
            main_started.append(frame.f_globals["__name__"])
        if main_started:
            ran.add((frame.f_globals["__name__"], frame.f_code.co_name))

sys.argv = [script, "--data-dir", "data", "--epochs", "1", "--quiet", "--log-file", "log.txt"]
sys.path.insert(0, os.path.dirname(script))      # as python3 mnist_net.py would
sys.setprofile(profile)
try:
    runpy.run_path(script, run_name="__main__")
except SystemExit as e:
    code = e.code
sys.setprofile(None)
assert code == 0, code
chapter = sys.modules["mnist_net"]
assert os.path.samefile(chapter.__file__, script)
import fast_layers
from tools import command_line, model_files, reports
assert command_line.mnist_net is chapter and model_files.mnist_net is chapter and fast_layers.chapter is chapter
assert command_line.DATASETS is chapter.DATASETS
modules = {{name for name, _ in ran}}
functions = {{function for _, function in ran}}
assert modules == {{"mnist_net"}}, sorted(ran)
assert {{"main", "train", "train_epoch", "evaluate", "choose_layers"}} <= functions, sorted(functions)
print("one copy:", len(ran), "functions of", chapter.__name__)
"""
    result = subprocess.run([sys.executable, "-c", probe], cwd=tmp_path, env=clean_env(),
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "one copy:" in result.stdout and "functions of mnist_net" in result.stdout
    assert len((tmp_path / "log.txt").read_text().splitlines()) > 20
