"""Typed method options: each registered method's `Config` is the one declaration of its
options, the command line derives its flags from it, runs record it, and flag files share a
base per dataset (includes resolve next to the including file, from any folder)."""

from __future__ import annotations

import dataclasses
import glob
import os
import subprocess
import sys

import pytest
from absl import flags

from dymu_jax import methods
from dymu_jax.methods import options as options_lib
from dymu_jax import files as files_lib
from dymu_jax.runs import settings
from experiments import cli_help
from experiments import common
from experiments import train  # noqa: F401  (defines the training flags)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FLAGS_DIR = os.path.join(ROOT, "experiments", "flags")


@pytest.mark.parametrize("name", list(methods.METHODS))
def test_every_option_is_a_documented_flag_with_the_configs_default(name):
  config = methods.config_of(name)
  default = config().check()  # the defaults are allowed values
  for field in config.fields():
    assert field.metadata["help"].strip(), (name, field.name)
    flag = flags.FLAGS[config.flag_name(field.name)]
    value = getattr(default, field.name)
    if isinstance(value, tuple):
      assert [type(value[0])(v) for v in flag.default] == list(value) if value else (
          flag.default in ([], None)), (name, field.name)
    else:
      assert flag.default == value, (name, field.name)
    for former in field.metadata["former"]:  # old names keep working as aliases
      assert former in common.ALIASES and former in flags.FLAGS
  owners = common.config_owners()
  if config.fields():
    assert name in owners[config]


def test_one_naming_rule_and_shared_configs():
  assert methods.config_of("phn") is methods.config_of("phn_bn")
  assert methods.config_of("static") is options_lib.NoOptions
  for config in common.config_owners():
    for field in config.fields():
      assert config.flag_name(field.name) == f"{config.PREFIX}_{field.name}"
  assert methods.ecmt.Config.flag_name("num_subnets") == "ecmt_num_subnets"


def test_unknown_and_out_of_range_options_are_one_sentence():
  with pytest.raises(ValueError, match="Unknown ECMT option.s. lambda; allowed: num_subnets, "):
    methods.ecmt.Config.from_options({"lambda": 1.0})
  with pytest.raises(ValueError, match=r"^ECMT options: lambda_kd=-1.0 must be a finite number >= 0\.$"):
    methods.ecmt.Config(lambda_kd=-1.0).check()
  with pytest.raises(ValueError, match=r"^--ecmt_num_subnets=1 must be a whole number >= 2 "):
    methods.ecmt.Config(num_subnets=1).check(lambda f: f"--ecmt_{f}")
  with pytest.raises(ValueError, match=r"ECMT options: kd='best' is not allowed; choose one of ci_kd, "):
    methods.ecmt.Config(kd="best").check()
  with pytest.raises(ValueError, match=r"DYMU options: tau_factor=1.5 must be a finite number in \[0, 1\]"):
    methods.dymu.Config(tau_factor=1.5).check()
  # Through the registry: the same checks before anything is built.
  with pytest.raises(ValueError, match=r"PHN and PHN-BN options: dirichlet_alpha=0.0 must be a finite number > 0"):
    methods.build("phn", (), method_options={"dirichlet_alpha": 0.0})
  # Sequences become tuples, so configs stay hashable (static arguments).
  config = methods.gradsplit.Config.from_options({"group_sizes": [2, 1]})
  assert config.group_sizes == (2.0, 1.0) and hash(config) == hash(config)


def test_configs_reach_the_method_objects():
  config = methods.pcgrad.Config(order="random")
  assert config.options() == {"order": "random"}
  dymu = methods.dymu.Config(stage="edge", head_hidden_layers=1, tau_factor=0.3)
  options = dymu.options()
  assert options["stage"] == "edge" and options["tau_factor"] == 0.3
  # The stage runner's and the branched builder's fields are not the method object's.
  assert "anchor_dir" not in options and "head_hidden_layers" not in options
  assert "stage" not in methods.dymu.Config().options()  # "all" is the runner's
  assert methods.dymu.Config(stage_steps=(3, 2, 1)).steps_per_stage(9) == {
      "pretrain": 1000, "anchor": 3, "edge": 2, "weight": 1}
  assert methods.dymu.Config(anchor_init="shared").stages() == ("anchor", "edge", "weight")


def test_saved_runs_read_former_names_and_legacy_values():
  """A run saved before the options were renamed (or before one existed) reads the same."""
  saved = {"method": "ecmt", "num_subnets": 3, "kd": "none", "lambda_kd": 0.0,
           "width_choices": ["0.5", "1.0"]}
  config = settings.method_config(saved)
  assert (config.num_subnets, config.kd, config.lambda_kd, config.width_choices) == (
      3, "none", 0.0, (0.5, 1.0))
  assert methods.normalise_flag_values(saved)["ecmt_num_subnets"] == 3
  old_dymu = {"method": "dymu", "dymu_stage": "edge"}  # before anchor_init and depth_factor
  config = settings.method_config(old_dymu)
  assert (config.anchor_init, config.depth_factor, config.use_gradient) == (
      "independent", "shifted", "flow")
  with pytest.raises(ValueError, match="--dymu_edge_hidden must be comma-separated whole "):
    settings.method_config({"method": "dymu", "dymu_edge_hidden": ["a"]})


def _parsed(path: str, cwd: str) -> dict:
  """The flag values of `path` as the entry points parse it, from the folder `cwd`."""
  here = os.getcwd()
  os.chdir(cwd)
  flags.FLAGS.unparse_flags()
  try:
    argv, files = common.expand_flag_files(["prog", f"--flagfile={path}"])
    flags.FLAGS(argv)
    return {**common.flag_values(), "_files": files}
  finally:
    flags.FLAGS.unparse_flags()
    os.chdir(here)


def test_flag_files_share_a_base_and_resolve_from_any_folder(tmp_path):
  variant = os.path.join(FLAGS_DIR, "utkface_ecmt_no_kd.flags")
  from_root = _parsed(os.path.relpath(variant, ROOT), ROOT)
  elsewhere = _parsed(variant, str(tmp_path))
  assert {k: v for k, v in from_root.items() if k != "_files"} == {
      k: v for k, v in elsewhere.items() if k != "_files"}
  # base/utkface.flags -> utkface_ecmt.flags -> the variant: each level's settings arrive.
  assert from_root["dataset"] == "utkface" and from_root["backbone"] == "resnet_small"
  assert from_root["method"] == "ecmt" and from_root["ecmt_kd"] == "none"
  assert from_root["_files"] == (os.path.join("experiments", "flags", "utkface_ecmt_no_kd.flags"),)
  # absl alone reads the same includes from the repository root (e.g. in a notebook).
  flags.FLAGS.unparse_flags()
  here = os.getcwd()
  os.chdir(ROOT)
  try:
    flags.FLAGS(["prog", f"--flagfile={variant}"])
    assert flags.FLAGS.ecmt_kd == "none" and flags.FLAGS.dataset == "utkface"
  finally:
    flags.FLAGS.unparse_flags()
    os.chdir(here)


def test_flag_file_includes_next_to_the_file_loops_and_missing_files(tmp_path):
  (tmp_path / "sub").mkdir()
  (tmp_path / "sub" / "base.flags").write_text("# base\n--dataset=synthetic\n--steps=5\n")
  (tmp_path / "sub" / "run.flags").write_text("# run\n--flagfile=base.flags\n\n// c\n--steps=7\n")
  assert files_lib.flag_file_args(str(tmp_path / "sub" / "run.flags")) == [
      "--dataset=synthetic", "--steps=5", "--steps=7"]
  (tmp_path / "a.flags").write_text("--flagfile=b.flags\n")
  (tmp_path / "b.flags").write_text("--flagfile=a.flags\n")
  with pytest.raises(ValueError, match="includes itself"):
    files_lib.flag_file_args(str(tmp_path / "a.flags"))
  with pytest.raises(ValueError, match="does not exist"):
    common.expand_flag_files(["prog", "--flagfile", str(tmp_path / "none.flags")])


def _settings(path: str) -> dict[str, str]:
  out = {}
  for arg in files_lib.flag_file_args(path):
    name, _, text = arg[2:].partition("=")
    out[name] = text
  return out


@pytest.mark.parametrize("path", sorted(glob.glob(os.path.join(FLAGS_DIR, "*.flags"))),
                         ids=os.path.basename)
def test_flag_files_override_only_what_differs(path):
  """A flag file includes a base (or the run it varies) and sets only what differs from it."""
  lines = [l.strip() for l in open(path) if l.startswith("--")]
  includes = [l.partition("=")[2] for l in lines if l.startswith("--flagfile=")]
  assert len(includes) == 1 and lines[0].startswith("--flagfile="), path
  inherited = _settings(os.path.join(ROOT, includes[0]))
  for line in lines[1:]:
    name, _, text = line[2:].partition("=")
    assert inherited.get(name) != text, f"{os.path.basename(path)} repeats --{name}={text}"
    assert name not in common.ALIASES, f"{os.path.basename(path)} uses the former --{name}"


def test_a_run_records_its_typed_config_and_flag_files(tmp_path):
  workdir = tmp_path / "run"
  result = subprocess.run(
      [sys.executable, "-m", "experiments.train",
       f"--flagfile={os.path.join(FLAGS_DIR, 'synthetic_pcgrad.flags')}", "--image_size=16",
       "--num_train=32", "--num_test=16", "--head_width=8", "--steps=2", "--batch_size=16",
       "--eval_every=0", "--checkpoint_every=2", "--pcgrad_order=random", "--noprogress",
       f"--workdir={workdir}"], cwd=str(tmp_path), capture_output=True, text=True, timeout=600,
      env={**os.environ, "PYTHONPATH": ROOT})
  assert result.returncode == 0, result.stderr[-3000:]
  from dymu_jax import runs as runs_lib
  record = runs_lib.saved_metadata(str(workdir))["run"]["record"]
  assert record["method"] == "pcgrad" and record["method_config"] == {"order": "random"}
  assert record["data"]["name"] == "synthetic" and record["data"]["image_size"] == 16
  assert record["model"]["backbone"] == "resnet_small" and record["train"]["steps"] == 2
  assert record["flag_files"] == [os.path.relpath(
      os.path.join(FLAGS_DIR, "synthetic_pcgrad.flags"), str(tmp_path))]
  assert dataclasses.is_dataclass(methods.pcgrad.Config)
  assert cli_help.owner_of("pcgrad_order")[1] == ("pcgrad",)


def test_resuming_compares_options_saved_under_their_former_names(monkeypatch, tmp_path):
  """A run saved with --num_subnets=2 is not resumed with --ecmt_num_subnets=4 unnoticed."""
  from dymu_jax.runs import guard
  saved = {"method": "ecmt", "num_subnets": 2, "kd": "ci_kd"}
  monkeypatch.setattr(guard.stages_lib, "saved_metadata", lambda workdir: {"run": {"flags": saved}})
  current = {"method": "ecmt", "ecmt_num_subnets": 4, "ecmt_kd": "ci_kd"}
  with pytest.raises(ValueError, match="--ecmt_num_subnets 2 -> 4"):
    guard.check_resume_flags(str(tmp_path), current, allow=False)
  assert guard.check_resume_flags(
      str(tmp_path), {**current, "ecmt_num_subnets": 2}, allow=False) == {}
