"""Every bad user input gets one sentence and a non-zero exit (issue 17, item 5): flags out of
range, workdirs and output folders that cannot be written, images too small for the backbone,
NaN or infinite data, and datasets too small to train on or to evaluate.

The commands run in this process where they fail before any tracing (`main` is what the CLI
runs after parsing, so the exit status and the message are the command's), and a few through
the real CLI, so that the whole file stays fast.
"""

from __future__ import annotations

import errno
import os
import pickle
import subprocess
import sys

from absl import flags
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dymu_jax import tasks as tasks_lib
from dymu_jax.data import DataConfig, DatasetError, load
from dymu_jax.models import backbones, branched, build_multitask
from dymu_jax.models.layers import SlimConv
from dymu_jax.runs import guard
from experiments import cli_help
from experiments import common
from experiments import evaluate
from experiments import export
from experiments import results
from experiments import train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["--dataset=synthetic", "--image_size=16", "--num_train=32", "--num_test=16",
        "--steps=1", "--batch_size=8", "--noprogress"]
ARRAYS = ["--dataset=arrays", "--task_spec=digit:classification:3", "--steps=1",
          "--batch_size=8", "--noprogress"]
IS_ROOT = hasattr(os, "geteuid") and os.geteuid() == 0


def one_error(code, stderr: str) -> str:
  """The single `error:` line of a command that stopped with status 2 and no traceback."""
  errors = [l for l in stderr.splitlines() if l.startswith("error:")]
  assert code == 2 and len(errors) == 1, (code, stderr[-3000:])
  assert "Traceback" not in stderr
  return errors[0]


def run_main(capsys, module, *args) -> str:
  """`module.main` as its command line runs it (flags parsed as the CLI parses them), in this
  process; returns the one error line."""
  fv = flags.FLAGS
  fv.unparse_flags()
  try:
    with pytest.raises(SystemExit) as stop:
      cli_help.parse_flags([module.__name__, *args])
      module.main([module.__name__])
  finally:
    fv.unparse_flags()
  return one_error(stop.value.code, capsys.readouterr().err)


def run_cli(module: str, *args, timeout=300):
  return subprocess.run([sys.executable, "-m", f"experiments.{module}", *args], cwd=ROOT,
                        capture_output=True, text=True, timeout=timeout)


def cli_error(module: str, *args) -> str:
  result = run_cli(module, *args)
  return one_error(result.returncode, result.stderr)


@pytest.fixture()
def a_file(tmp_path):
  path = tmp_path / "a_file"
  path.write_text("not a folder\n")
  return path


def write_npz(path, images, labels=None):
  rng = np.random.default_rng(0)
  labels = rng.integers(0, 3, len(images)) if labels is None else labels
  np.savez(path, images=images, digit=labels)
  return path


def uint8_images(n, side=16):
  return np.random.default_rng(0).integers(0, 256, (n, side, side, 1)).astype(np.uint8)


# ----------------------------------------------------------------------------------------------
# 1. Flags: range and sign, named with the allowed range, before any data is read.


@pytest.mark.parametrize("args, message", [
    (["--image_size=-3"], "--image_size=-3: -3 is not a non-negative integer"),
    (["--num_train=-5"], "--num_train=-5: -5 is not a non-negative integer"),
    (["--num_test=-1"], "--num_test=-1: -1 is not a non-negative integer"),
    (["--eval_batch_size=-4"], "--eval_batch_size=-4: -4 is not a non-negative integer"),
    (["--seed=-1"], "--seed=-1: -1 is not a non-negative integer"),
    (["--data_seed=-1"], "--data_seed=-1: -1 is not a non-negative integer"),
    (["--head_width=-8"], "--head_width=-8: -8 is not a non-negative integer"),
    (["--steps=0"], "--steps=0: 0 is not a positive integer"),
    (["--steps=ten"], "--steps=ten: invalid literal for int()"),
    (["--batch_size=0"], "--batch_size=0: 0 is not a positive integer"),
    (["--learning_rate=0"], "--learning_rate=0.0: must be a finite number > 0"),
    (["--learning_rate=-0.1"], "--learning_rate=-0.1: must be a finite number > 0"),
    (["--learning_rate=nan"], "--learning_rate=nan: must be a finite number > 0"),
    (["--learning_rate=inf"], "--learning_rate=inf: must be a finite number > 0"),
    (["--weight_decay=-1"], "--weight_decay=-1.0: must be a finite number >= 0"),
    (["--grad_clip=nan"], "--grad_clip=nan: must be a finite number >= 0"),
    (["--momentum=1.5"], "--momentum=1.5: must be a finite number in [0, 1]"),
    (["--decay_factor=0"], "--decay_factor=0.0: must be a finite number > 0"),
    (["--decay_steps=-1"], "--decay_steps=-1: -1 is not a non-negative integer"),
    (["--warmup_steps=-1"], "--warmup_steps=-1: -1 is not a non-negative integer"),
    (["--eval_every=-1"], "--eval_every=-1: -1 is not a non-negative integer"),
    (["--checkpoint_every=-5"], "--checkpoint_every=-5: -5 is not a non-negative integer"),
    (["--keep_checkpoints=0"], "--keep_checkpoints=0: 0 is not a positive integer"),
    (["--log_every=0"], "--log_every=0: 0 is not a positive integer"),
    (["--prefetch=-1"], "--prefetch=-1: -1 is not a non-negative integer"),
    (["--test_fraction=0"], "--test_fraction=0.0: must be a finite number in (0, 1)"),
    (["--test_fraction=1"], "--test_fraction=1.0: must be a finite number in (0, 1)"),
    (["--lambda_kd=-1"], "--ecmt_lambda_kd=-1.0: must be a finite number >= 0"),
    (["--mutual_temperature=0"], "--ecmt_mutual_temperature=0.0: must be a finite number > 0"),
    (["--dymu_tau_factor=2"], "--dymu_tau_factor=2.0: must be a finite number in [0, 1]"),
    (["--dymu_temperature_decay=1.5"], "--dymu_temperature_decay=1.5: must be a finite number "
                                       "in (0, 1]"),
    (["--dymu_anchor_learning_rate=-1"], "--dymu_anchor_learning_rate=-1.0: must be a finite "
                                         "number >= 0"),
    (["--dymu_affinity_images=1"], "--dymu_affinity_images=1: must be a whole number >= 2"),
    (["--dymu_head_hidden_layers=-2"], "--dymu_head_hidden_layers=-2: must be a whole number "
                                       ">= -1 (-1 = the backbone's default)"),
    (["--dymu_validation_examples=-1"], "--dymu_validation_examples=-1: must be a whole "
                                        "number >= 0"),
    (["--dymu_edge_hidden=16,x"], "--dymu_edge_hidden=['16', 'x']: must be "
                                  "comma-separated whole numbers >= 1"),
    (["--phn_chunk_size=-1"], "--phn_chunk_size=-1: must be a whole number >= 0"),
    (["--phn_dirichlet_alpha=0"], "--phn_dirichlet_alpha=0.0: must be a finite number > 0"),
    (["--method=ecmt", "--num_subnets=1"], "--ecmt_num_subnets=1: must be a whole number >= 2"),
    (["--method=ecmt", "--width_choices=0.5,nan"],
     "must be comma-separated numbers in (0, 1]"),
    (["--method=gradsplit", "--gradsplit_stages=0"],
     "--gradsplit_split_stages=0: must be a whole number >= 1"),
])
def test_bad_training_flag_is_one_sentence(capsys, tmp_path, args, message):
  error = run_main(capsys, train, *TINY, f"--workdir={tmp_path / 'w'}", *args)
  assert message in error, error
  assert not (tmp_path / "w").exists()  # refused before anything was made


@pytest.mark.parametrize("module, args, message", [
    (export, ["--budget=inf"], "--budget=inf: must be a fraction of the SuperNet's MACs in "
                               "(0, 1] or a whole number of MACs per example above 1"),
    (export, ["--budget=0"], "--budget=0.0: must be a fraction"),
    (export, ["--budget=2.5"], "--budget=2.5: must be a fraction"),
    (export, ["--budget=nan"], "--budget=nan: must be a fraction"),
    (evaluate, ["--num_preferences=0"], "--num_preferences=0: 0 is not a positive integer"),
    (evaluate, ["--calibration_examples=0"], "--calibration_examples=0: 0 is not a positive "
                                             "integer"),
    (evaluate, ["--score_examples=-1"], "--score_examples=-1: -1 is not a positive integer"),
    (evaluate, ["--decoder_reserve=1.5"], "--decoder_reserve=1.5: must be a finite number in "
                                          "[0, 1]"),
    (evaluate, ["--max_test_examples=-1"], "--max_test_examples=-1: -1 is not a non-negative "
                                           "integer"),
    (evaluate, ["--budget_check_points=0"], "--budget_check_points=0: 0 is not a positive "
                                            "integer"),
    (evaluate, ["--cost_preferences=0"], "--cost_preferences=0: 0 is not a positive integer"),
    (evaluate, ["--preference_seed=-3"], "--preference_seed=-3: -3 is not a non-negative "
                                         "integer"),
    (evaluate, ["--eval_batch_size=-4"], "--eval_batch_size=-4: -4 is not a non-negative "
                                         "integer"),
    (evaluate, ["--budgets=0.5,2"], "--budgets are fractions of the SuperNet's MACs in (0, 1], "
                                    "got 2.0"),
    (evaluate, ["--resources=1.5"], "--resources are resource preferences c in [0, 1], got 1.5"),
    (evaluate, ["--hv_reference=1,nan"], "--hv_reference must be finite numbers (no nan or "
                                         "inf), got 1,nan"),
])
def test_bad_evaluation_and_export_flag_is_one_sentence(capsys, tmp_path, module, args,
                                                        message):
  error = run_main(capsys, module, f"--workdir={tmp_path / 'run'}", *args)
  assert message in error, error


def test_documented_sentinels_still_parse():
  fv = flags.FLAGS
  fv.unparse_flags()
  try:
    fv(["prog", "--image_size=0", "--num_train=0", "--num_test=0", "--eval_batch_size=0",
        "--head_width=0", "--warmup_steps=0", "--eval_every=0", "--checkpoint_every=0",
        "--grad_clip=0", "--weight_decay=0", "--prefetch=0", "--dymu_head_hidden_layers=-1",
        "--dymu_validation_examples=0", "--phn_chunk_size=0", "--max_test_examples=0",
        "--budget=1", "--budget=250000", "--lambda_kd=0", "--momentum=0"])
  finally:
    fv.unparse_flags()


@pytest.mark.parametrize("args, message", [
    (["--task_weights=-1,1"], "--task_weights=-1,1 must be numbers >= 0, not all 0"),
    (["--task_weights=0,0,0,0"], "--task_weights=0,0,0,0 must be numbers >= 0, not all 0"),
    (["--task_weights=1,inf"], "--task_weights must be finite numbers (no nan or inf), got "
                               "1,inf"),
    (["--tasks=depth,edges", "--task_weights=1"],
     "--task_weights=1 gives 1 weight(s) for the 2 tasks of --tasks=depth,edges"),
    (["--task_weights=1,1"], "Got 2 task weights for 4 tasks (segmentation, depth, normals, "
                             "edges)"),
])
def test_bad_task_weights_are_one_sentence(capsys, tmp_path, args, message):
  error = run_main(capsys, train, *TINY, f"--workdir={tmp_path / 'w'}", *args)
  assert message in error, error


def test_library_refuses_bad_task_weights():
  with pytest.raises(ValueError, match="Task weights must be finite numbers >= 0, not all 0, "
                                       "got -1, 1"):
    train.methods_lib.build("static", (tasks_lib.regression("a"), tasks_lib.regression("b")),
                            model_options={"backbone": "lenet"}, task_weights=(-1, 1))


def test_bad_flag_through_the_cli_exits_2_with_one_sentence(tmp_path):
  error = cli_error("train", *TINY, "--seed=-1", f"--workdir={tmp_path / 'w'}")
  assert error == "error: flag --seed=-1: -1 is not a non-negative integer."
  error = cli_error("export", f"--workdir={tmp_path / 'w'}", "--budget=inf")
  assert "--budget=inf: must be a fraction of the SuperNet's MACs in (0, 1]" in error


# ----------------------------------------------------------------------------------------------
# 2. Workdirs and output folders: OS errors as one sentence.


def test_workdir_that_is_a_file(capsys, a_file):
  error = run_main(capsys, train, *TINY, f"--workdir={a_file}")
  assert error == (f"error: --workdir needs the folder {a_file}, but it is a file; choose "
                   f"another --workdir.")


def test_workdir_inside_a_file(capsys, a_file):
  error = run_main(capsys, train, *TINY, f"--workdir={a_file / 'run'}")
  assert f"--workdir needs the folder {a_file / 'run'}, but {a_file} is a file" in error


@pytest.mark.skipif(IS_ROOT, reason="root ignores folder permissions")
def test_read_only_workdir(capsys, tmp_path):
  folder = tmp_path / "read_only"
  folder.mkdir()
  folder.chmod(0o500)
  try:
    error = run_main(capsys, train, *TINY, f"--workdir={folder}")
    assert f"cannot write {folder}: Permission denied (errno 13)" in error, error
    error = run_main(capsys, train, *TINY, f"--workdir={folder / 'run'}")
    assert "Permission denied (errno 13); choose a writable folder with --workdir" in error
  finally:
    folder.chmod(0o700)


def test_unwritable_workdir_even_as_root(capsys, tmp_path, monkeypatch):
  """What a read-only folder gives a user who is not root (os.access says no)."""
  folder = tmp_path / "read_only"
  folder.mkdir()
  real_access = os.access
  monkeypatch.setattr(common.os, "access", lambda path, mode: (
      False if os.fspath(path) == str(folder) else real_access(path, mode)))
  error = run_main(capsys, train, *TINY, f"--workdir={folder}")
  assert error == (f"error: cannot write {folder}: Permission denied (errno 13); choose a "
                   f"writable folder with --workdir.")


def test_full_disk_is_one_sentence(capsys, tmp_path, monkeypatch):
  def full(self):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), self.path)
  monkeypatch.setattr(guard.WorkdirLock, "__enter__", full)
  error = run_main(capsys, train, *TINY, f"--workdir={tmp_path / 'w'}")
  lock = tmp_path / "w" / guard.LOCK_FILE
  assert error == (f"error: cannot write {lock}: No space left on device (errno 28); free some "
                   f"space or choose a folder on another disk with --workdir.")


@pytest.mark.parametrize("error, folders, message", [
    (OSError(errno.ENOSPC, "No space left on device"), "--workdir",
     "cannot write: No space left on device (errno 28); free some space or choose a folder on "
     "another disk with --workdir."),
    (PermissionError(errno.EACCES, "Permission denied", "/x/y"), "--output_dir",
     "cannot write /x/y: Permission denied (errno 13); choose a writable folder with "
     "--output_dir."),
    (NotADirectoryError(errno.ENOTDIR, "Not a directory", "/f/x"), "--output",
     "cannot use /f/x: Not a directory (errno 20); a file stands where a folder is needed (or "
     "the reverse), so choose another path with --output."),
    (IsADirectoryError(errno.EISDIR, "Is a directory", "/d"), "--output",
     "cannot use /d: Is a directory (errno 21); a file stands where a folder is needed (or the "
     "reverse), so choose another path with --output."),
    (ValueError('RESOURCE_EXHAUSTED: Error writing local file "/w/checkpoints/1/_sharding": '
                "Failed to write 152419 bytes to file 7: No space left on device "
                "[os_error_code='28']"), "--workdir",  # tensorstore under orbax
     "cannot write /w/checkpoints/1/_sharding: No space left on device (errno 28); free some "
     "space or choose a folder on another disk with --workdir."),
    (FileNotFoundError("No finished run in w/*; train one first."), "--output",
     "No finished run in w/*; train one first."),  # our own wording is kept
    (FileNotFoundError(errno.ENOENT, "No such file or directory", "/a/b.json"), "--workdir",
     "cannot open /a/b.json: No such file or directory (errno 2)."),
])
def test_os_errors_are_described_in_one_sentence(error, folders, message):
  assert common.describe_error(error, folders) == message


def test_evaluate_output_dir_inside_a_file(capsys, tmp_path, a_file):
  error = run_main(capsys, evaluate, f"--workdir={tmp_path / 'run'}",
                   f"--output_dir={a_file / 'eval'}")
  assert f"--output_dir needs the folder {a_file / 'eval'}, but {a_file} is a file" in error


def test_export_output_dir_that_is_a_file(capsys, tmp_path, a_file):
  error = run_main(capsys, export, f"--workdir={tmp_path / 'run'}", f"--output_dir={a_file}")
  assert f"--output_dir needs the folder {a_file}, but it is a file" in error


@pytest.mark.parametrize("where, message", [
    ("inside_file", "--output needs the folder {file}, but it is a file; choose another "
                    "--output."),
    ("folder", "--output={folder} is a folder; give the Markdown file to write"),
])
def test_results_output_that_cannot_be_written(capsys, tmp_path, a_file, where, message):
  output = a_file / "results.md" if where == "inside_file" else tmp_path
  error = run_main(capsys, results, f"--workdirs={tmp_path / 'none'}", f"--output={output}")
  assert message.format(file=a_file, folder=tmp_path) in error, error


@pytest.mark.skipif(IS_ROOT, reason="root ignores folder permissions")
def test_results_output_in_a_read_only_folder(capsys, tmp_path):
  folder = tmp_path / "read_only"
  folder.mkdir()
  folder.chmod(0o500)
  try:
    error = run_main(capsys, results, f"--workdirs={tmp_path / 'none'}",
                     f"--output={folder / 'results.md'}")
    assert "Permission denied (errno 13); choose a writable folder with --output" in error
  finally:
    folder.chmod(0o700)


def test_workdir_in_a_file_through_the_cli(a_file):
  error = cli_error("train", *TINY, f"--workdir={a_file / 'run'}")
  assert f"--workdir needs the folder {a_file / 'run'}, but {a_file} is a file" in error


# ----------------------------------------------------------------------------------------------
# 3. Images smaller than the backbone's minimum.


def test_each_backbone_states_its_minimum():
  assert backbones.min_image_size("lenet") == 20  # (((20 - 8) // 2) - 4) // 2 = 1
  assert backbones.min_image_size("lenet", {"kernel_sizes": [5, 5]}) == 16
  for name in ("resnet_small", "resnet18", "resnet34", "mobilenet_v2"):
    assert backbones.min_image_size(name) == backbones.PADDED_MIN_IMAGE_SIZE == 1


def _init_shapes(model, side):
  return jax.eval_shape(lambda x: model.init(jax.random.PRNGKey(0), x),
                        jnp.zeros((2, side, side, 1)))


@pytest.mark.parametrize("backbone", ["lenet", "resnet_small", "resnet18", "mobilenet_v2"])
def test_the_minimum_is_the_true_one(backbone):
  model = build_multitask((tasks_lib.classification("digit", 10),), backbone, head_width=8)
  minimum = backbones.min_image_size(backbone)
  _init_shapes(model, minimum)  # runs at the minimum
  if minimum > 1:
    with pytest.raises(ValueError, match=rf"LeNet needs images of at least {minimum}x{minimum} "
                                         rf"px, got {minimum - 1}x{minimum - 1}"):
      _init_shapes(model, minimum - 1)


def test_branched_lenet_checks_its_minimum():
  net = branched.build_branched((tasks_lib.classification("a", 3),
                                 tasks_lib.classification("b", 3)), "lenet")
  assert net.min_image_size == 20
  with pytest.raises(ValueError, match=r"BranchedNet \(lenet blocks\) needs images of at least "
                                       r"20x20 px, got 16x16"):
    net.init(jax.random.PRNGKey(0), jnp.zeros((2, 16, 16, 1)), "shared")


def test_a_kernel_larger_than_its_input_is_one_sentence():
  conv = SlimConv(4, 5, padding="VALID", name="conv")
  with pytest.raises(ValueError, match=r"SlimConv 'conv': its 5x5 kernel does not fit its 4x4 "
                                       r"input"):
    jax.eval_shape(lambda x: conv.init(jax.random.PRNGKey(0), x), jnp.zeros((1, 4, 4, 1)))


def test_lenet_on_small_synthetic_images(capsys, tmp_path):
  error = run_main(capsys, train, *TINY, "--backbone=lenet", f"--workdir={tmp_path / 'w'}")
  assert error == ("error: --backbone=lenet needs images of at least 20x20 px, but the "
                   "synthetic images are 16x16; set --image_size=20 or more, or choose another "
                   "--backbone.")


def test_dymu_lenet_streams_on_small_images(capsys, tmp_path):
  path = write_npz(tmp_path / "digits.npz", uint8_images(40))
  error = run_main(capsys, train, *ARRAYS, f"--data_dir={path}", "--method=dymu",
                   "--backbone=lenet", f"--workdir={tmp_path / 'w'}")
  assert "--backbone=lenet needs images of at least 20x20 px, but the arrays images are 16x16" \
      in error
  assert not (tmp_path / "w" / "pretrain" / "checkpoints").exists()


def test_lenet_on_valid_16px_arrays_through_the_cli(tmp_path):
  path = write_npz(tmp_path / "digits.npz", uint8_images(40))
  error = cli_error("train", *ARRAYS, f"--data_dir={path}", "--backbone=lenet",
                    f"--workdir={tmp_path / 'w'}")
  assert "--backbone=lenet needs images of at least 20x20 px, but the arrays images are 16x16" \
      in error


# ----------------------------------------------------------------------------------------------
# 4. NaN or infinite inputs are bad data, named with their file.


def test_nan_pixels_in_an_npz(capsys, tmp_path):
  images = np.random.default_rng(0).random((40, 16, 16)).astype(np.float32)
  images[0, 0, 0], images[3, 2, 2] = np.nan, np.inf
  path = write_npz(tmp_path / "nan.npz", images)
  error = run_main(capsys, train, *ARRAYS, f"--data_dir={path}", f"--workdir={tmp_path / 'w'}")
  assert error == (f"error: arrays: images 'images' in '{path}' has 2 NaN or infinite value(s) "
                   f"out of 10,240; fix or remove those examples.")


def test_nan_float_labels_in_an_npz(tmp_path):
  ages = np.linspace(1, 80, 40)
  ages[5] = np.inf  # NaN marks a missing regression label; infinity is refused
  path = write_npz(tmp_path / "ages.npz", uint8_images(40), labels=ages)
  with pytest.raises(DatasetError, match=r"labels 'digit' in '.*ages.npz' has 1 infinite "
                                         r"value\(s\) out of 40 \(NaN marks a missing label"):
    load(DataConfig(name="arrays", data_dir=str(path), task_spec="digit:regression"), "train")


def test_nan_pixels_in_a_multi_mnist_pickle(tmp_path):
  rng = np.random.default_rng(0)
  x = rng.random((30, 36, 36)).astype(np.float32)
  x[4, 10, 10] = np.nan
  y = rng.integers(0, 10, (30, 2))
  path = tmp_path / "multi_mnist.pickle"
  with open(path, "wb") as f:
    pickle.dump((x, y), f)
  with pytest.raises(DatasetError, match=r"multi_mnist: images in '.*multi_mnist.pickle' has 1 "
                                         r"NaN or infinite value\(s\) out of 38,880"):
    load(DataConfig(name="multi_mnist", data_dir=str(path)), "train")


def test_nan_ages_in_utkface(tmp_path):
  n = 12
  rng = np.random.default_rng(0)
  age = rng.uniform(1, 80, n)
  age[[2, 7]] = np.nan
  path = tmp_path / "utkface_32x32.npz"
  np.savez(path, images=rng.integers(0, 256, (n, 32, 32, 3)).astype(np.uint8), age=age,
           gender=rng.integers(0, 2, n), race=rng.integers(0, 5, n))
  with pytest.raises(DatasetError, match=r"utkface: ages in '.*utkface_32x32.npz' has 2 NaN or "
                                         r"infinite value\(s\) out of 12"):
    load(DataConfig(name="utkface", data_dir=str(tmp_path)), "train")


# ----------------------------------------------------------------------------------------------
# 5. Too few examples: refused, never NaN metrics in summary.json.


def test_one_image_dataset_has_no_test_split(capsys, tmp_path):
  path = write_npz(tmp_path / "one.npz", uint8_images(1), labels=np.array([1]))
  error = run_main(capsys, train, *ARRAYS, "--batch_size=1", f"--data_dir={path}",
                   f"--workdir={tmp_path / 'w'}")
  assert error == ("error: The test split of arrays is empty (1 training and 0 test examples), "
                   "so there is nothing to evaluate; give the dataset more examples or change "
                   "--test_fraction=0.2.")
  assert not (tmp_path / "w" / "summary.json").exists()


def test_training_split_smaller_than_a_batch(capsys, tmp_path):
  error = run_main(capsys, train, *TINY, "--num_train=4", f"--workdir={tmp_path / 'w'}")
  assert error == ("error: The training split of synthetic has 4 example(s), fewer than one "
                   "batch of --batch_size=8; lower --batch_size or give the dataset more "
                   "examples.")
