"""Training configs: the official presets (tests/reference/original-hnd-facts.md §3), overrides, checked errors."""

from __future__ import annotations

import pytest
import yaml

from hnd.registry import resolve
from hnd.config import (METHODS, TrainConfig, config_from_dict, dump_config, experiment_config, preset,
                        read_config_file, resolve_config)
from hnd.errors import HndError

from conftest import PAPER_TEACHERS, error

STUDENT = {t: f"{t}_head_mimic-ver{'1b' if t == 'inception_v3' else '2b'}-3ch" for t in PAPER_TEACHERS}
SGD = {"optimizer": "sgd", "lr": 1e-3, "momentum": 0.9, "weight_decay": 1e-4}
ADAM = {"optimizer": "adam", "lr": 1e-3, "weight_decay": 0.0}
COMMON = {"milestones": [5, 10, 15], "gamma": 0.1, "epochs": 20, "batch_size": 32, "eval_batch_size": 50,
          "kd_temperature": 1.0, "kd_alpha": 0.5}
OFFICIAL = {"naive": SGD, "kd": SGD, "hnd": ADAM, "ae": ADAM}


def model_for(teacher: str, method: str) -> str:
    return teacher if method in ("ae", "teacher") else STUDENT[teacher]


@pytest.mark.parametrize("teacher", PAPER_TEACHERS)
@pytest.mark.parametrize("method", list(OFFICIAL))
def test_official_presets(teacher, method):
    config = preset(resolve(model_for(teacher, method)), method)
    assert (config.model, config.method) == (model_for(teacher, method), method)
    for key, value in {**COMMON, **OFFICIAL[method]}.items():
        assert getattr(config, key) == value, key
    assert type(config.lr) is float and type(config.weight_decay) is float


@pytest.mark.parametrize("teacher", PAPER_TEACHERS)
def test_teacher_preset_is_the_original_org_config(teacher):
    config = preset(resolve(teacher), "teacher")
    assert (config.optimizer, config.lr, config.momentum, config.weight_decay) == ("sgd", 1e-2, 0.9, 5e-4)
    assert (config.epochs, config.batch_size, config.milestones) == (50, 20, [])


def test_presets_do_not_share_mutable_defaults():
    a, b = preset(resolve(STUDENT["resnet152"]), "hnd"), preset(resolve(STUDENT["resnet152"]), "hnd")
    a.milestones.append(18)
    assert b.milestones == [5, 10, 15]


def test_file_then_command_line(tmp_path):
    """The YAML file overrides the preset, key=value pairs override the file."""
    path = tmp_path / "run.yaml"
    path.write_text("lr: 1e-3\nepochs: 7\nbatch_size: 8\nmilestones: [3, 6]\n"
                    "teacher_checkpoint: runs/t/best.pt\nmodel: resnet152_head_mimic-ver2b-3ch\n")
    config = resolve_config(resolve(STUDENT["resnet152"]), "kd", path,
                            ["epochs=9", "lr=1", "gamma=0.5", "milestones=[2,4]", "teacher_checkpoint=null",
                             "pretrained=false", "device=cpu"])
    assert config.epochs == 9 and config.batch_size == 8  # command line wins; file value kept
    assert config.lr == 1.0 and type(config.lr) is float  # an int is accepted for a float
    assert config.gamma == 0.5 and config.milestones == [2, 4]
    assert config.teacher_checkpoint is None and config.pretrained is False and config.device == "cpu"
    assert config.optimizer == "sgd" and config.weight_decay == 1e-4  # untouched preset values


def test_yaml_file_values_are_coerced(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("lr: 1e-4\nweight_decay: 0\nmilestones: 8\n")  # YAML 1.1: 1e-4 is a string
    config = resolve_config(resolve(STUDENT["densenet169"]), "hnd", path)
    assert config.lr == 1e-4 and type(config.lr) is float
    assert config.weight_decay == 0.0 and type(config.weight_decay) is float
    assert config.milestones == [8]


def test_empty_file_and_no_overrides_give_the_preset(tmp_path):
    path = tmp_path / "empty.yaml"
    path.write_text("")
    spec = resolve(STUDENT["densenet201"])
    assert resolve_config(spec, "naive", path) == preset(spec, "naive")
    assert resolve_config(spec, "naive") == preset(spec, "naive")


def test_unknown_key_lists_valid_keys():
    message = error(resolve_config, resolve(STUDENT["resnet152"]), "hnd", None, ["learning_rate=0.1"])
    assert "learning_rate" in message
    for key in ("lr", "epochs", "milestones", "teacher_checkpoint", "amp"):
        assert key in message


@pytest.mark.parametrize("pair, key", [("epochs=1.5", "epochs"), ("epochs=abc", "epochs"),
                                       ("epochs=true", "epochs"), ("lr=fast", "lr"),
                                       ("pretrained=3", "pretrained"), ("milestones=[a]", "milestones"),
                                       ("milestones=x", "milestones")])
def test_wrong_type(pair, key):
    message = error(resolve_config, resolve(STUDENT["resnet152"]), "hnd", None, [pair])
    assert message.startswith(key) and "must be" in message


@pytest.mark.parametrize("key, bad, valid", [("optimizer", "rmsprop", ["sgd", "adam"]),
                                             ("transforms", "autoaugment", ["original", "torchvision"]),
                                             ("decoder", "turbojpeg", ["pil", "torchvision"]),
                                             ("selection", "test", ["holdout", "val"]),
                                             ("amp", "fp8", ["none", "bf16", "fp16"])])
def test_bad_choice_names_the_valid_ones(key, bad, valid):
    message = error(resolve_config, resolve(STUDENT["densenet169"]), "kd", None, [f"{key}={bad}"])
    assert key in message and bad in message
    assert all(v in message for v in valid)


@pytest.mark.parametrize("milestones", ["[10,5]", "[5,10,8]", "[0,5]", "[-1]"])
def test_milestones_must_increase(milestones):
    message = error(resolve_config, resolve(STUDENT["densenet169"]), "kd", None, [f"milestones={milestones}"])
    assert "milestones" in message


def test_repeated_milestone_is_rejected():
    """[5, 5] is not increasing: MultiStepLR would multiply the rate by gamma twice at epoch 5."""
    assert "milestones" in error(resolve_config, resolve(STUDENT["densenet169"]), "kd", None, ["milestones=[5,5,10]"])


@pytest.mark.parametrize("pair", ["epochs=0", "batch_size=-1", "lr=0", "kd_alpha=1.5", "kd_temperature=0",
                                  "input_size=16", "ae_channels=0"])
def test_out_of_range_values(pair):
    message = error(resolve_config, resolve("resnet152"), "ae", None, [pair])
    assert pair.split("=")[0] in message


def test_hnd_with_a_teacher_name_suggests_a_student():
    message = error(resolve_config, resolve("inception_v3"), "hnd")
    assert "inception_v3_head_mimic-ver1b-3ch" in message
    message = error(preset, resolve("densenet169"), "kd")
    assert "densenet169_head_mimic-ver2b-3ch" in message


@pytest.mark.parametrize("method", ["teacher", "ae"])
def test_teacher_methods_with_a_student_name_suggest_the_teacher(method):
    message = error(resolve_config, resolve(STUDENT["resnet152"]), method)
    assert "resnet152" in message and STUDENT["resnet152"] in message


def test_unknown_method_lists_methods():
    message = error(resolve_config, resolve(STUDENT["resnet152"]), "distill")
    assert "distill" in message and all(m in message for m in METHODS)


def test_unknown_model():
    message = error(resolve, "vgg17")
    assert "vgg17" in message and "vgg16" in message  # names similar torchvision classifiers


def test_any_torchvision_teacher_and_generic_student():
    config = resolve_config(resolve("vgg11"), "teacher")
    assert config.model == "vgg11" and config.spec.teacher.name == "vgg11"
    config = resolve_config(resolve("resnet18-3ch"), "hnd", assignments=["input_size=96"])
    assert config.model == "resnet18@layer2-3ch"  # canonical name
    assert config.spec.input_size == 96 and config.spec.head_output_shape == (128, 12, 12)


def test_config_file_cannot_change_model_or_method(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("model: densenet201_head_mimic-ver2b-3ch\n")
    assert "model" in error(resolve_config, resolve(STUDENT["densenet169"]), "hnd", path)
    path.write_text("method: kd\n")
    assert "method" in error(resolve_config, resolve(STUDENT["densenet169"]), "hnd", path)
    assert "method" in error(resolve_config, resolve(STUDENT["densenet169"]), "hnd", None, ["method=naive"])
    path.write_text("model: densenet169_head_mimic-ver2b-3ch\nmethod: hnd\n")  # the same is fine
    spec = resolve(STUDENT["densenet169"])
    assert resolve_config(spec, "hnd", path) == preset(spec, "hnd")


def test_missing_config_file(tmp_path):
    path = tmp_path / "absent.yaml"
    assert str(path) in error(resolve_config, resolve(STUDENT["densenet169"]), "hnd", path)
    assert str(tmp_path) in error(read_config_file, tmp_path)  # a folder is not a config file


def test_invalid_yaml(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("lr: [0.1, 0.2\nepochs: 3\n")
    message = error(resolve_config, resolve(STUDENT["densenet169"]), "hnd", path)
    assert str(path) in message and "YAML" in message


@pytest.mark.parametrize("text, kind", [("- lr: 0.1\n- epochs: 3\n", "list"), ("just words\n", "str")])
def test_yaml_that_is_not_a_mapping(tmp_path, text, kind):
    path = tmp_path / "list.yaml"
    path.write_text(text)
    message = error(resolve_config, resolve(STUDENT["densenet169"]), "hnd", path)
    assert str(path) in message and "mapping" in message and kind in message


def test_assignment_without_equals():
    assert "lr0.1" in error(resolve_config, resolve(STUDENT["densenet169"]), "hnd", None, ["lr0.1"])


@pytest.mark.parametrize("method", ["naive", "kd", "hnd", "ae", "teacher"])
def test_round_trip_through_dict_and_yaml(method):
    model = model_for("inception_v3", method)
    config = resolve_config(resolve(model), method, None, ["lr=0.02", "milestones=[1,2]", "input_size=96", "amp=bf16",
                                                  "teacher_checkpoint=t/best.pt", "seed=7"])
    assert config_from_dict(config.to_dict()) == config
    doc = yaml.safe_load(dump_config(config))
    assert doc == config.to_dict()
    assert config_from_dict(doc) == config
    assert list(doc)[:2] == ["model", "method"]


def test_teacher_checkpoint_is_recorded_absolute(tmp_path, monkeypatch):
    """A run records where its teacher is independently of the folder it was started from, so
    ``hnd evaluate`` finds the teacher from anywhere."""
    monkeypatch.chdir(tmp_path)
    config = resolve_config(resolve(STUDENT["densenet169"]), "hnd", None, ["teacher_checkpoint=runs/../t/best.pt"])
    assert config.teacher_checkpoint == str(tmp_path / "t" / "best.pt")
    monkeypatch.chdir(tmp_path.parent)
    assert config_from_dict(config.to_dict()) == config
    shown = yaml.safe_load(dump_config(config, relative_to=tmp_path / "notebooks"))
    assert shown["teacher_checkpoint"] == "../t/best.pt" and shown["lr"] == config.lr


def test_config_from_dict_rejects_bad_documents():
    assert "model" in error(config_from_dict, {"method": "hnd"})
    doc = TrainConfig(model=STUDENT["resnet152"], method="hnd").to_dict()
    assert "colour" in error(config_from_dict, {**doc, "colour": "red"})
    assert "optimizer" in error(config_from_dict, {**doc, "optimizer": "lbfgs"})


def test_experiment_config_picks_the_model_of_the_method():
    assert experiment_config(resolve("resnet50"), "hnd", 6).model == "resnet50_head_mimic-ver2b-6ch"
    assert experiment_config(resolve("inception_v3"), "kd", 3).model == "inception_v3_head_mimic-ver1b-3ch"
    ae = experiment_config(resolve("densenet169"), "ae", 9, {"epochs": 2})
    assert (ae.model, ae.ae_channels, ae.epochs, ae.optimizer) == ("densenet169", 9, 2, "adam")
    assert experiment_config(resolve("resnet152"), "teacher", 3).model == "resnet152"
    with pytest.raises(HndError, match="overrides cannot set ae_channels"):
        experiment_config(resolve("resnet50"), "ae", 3, {"ae_channels": 6})
    with pytest.raises(HndError, match="teacher must be a backbone name"):
        experiment_config(resolve("resnet50_head_mimic-ver2b-3ch"), "hnd", 3)
    with pytest.raises(HndError, match="unknown config key 'lrr'"):
        experiment_config(resolve("resnet50"), "hnd", 3, {"lrr": 1})


@pytest.mark.parametrize("teacher", PAPER_TEACHERS)
def test_entropic_preset_is_the_sc2_recipe(teacher):
    config = preset(resolve(STUDENT[teacher]), "entropic")
    assert config.model == STUDENT[teacher] + "-entropic" and config.spec.entropy
    assert (config.optimizer, config.lr, config.milestones, config.epochs, config.stage1_epochs) == \
        ("adam", 1e-3, [5, 8], 20, 10)
    assert (config.stage2_lr, config.stage2_milestones, config.kd_temperature, config.kd_alpha) == \
        (1e-3, [5], 1.0, 0.5)
    c, h, w = config.spec.head_output_shape
    assert config.beta == pytest.approx(c * h * w / 1e5, rel=1e-3) and config.beta > 0
    assert experiment_config(resolve(teacher), "entropic", 3).model == config.model
    again = config_from_dict(config.to_dict())
    assert again.model == config.model and again.beta == config.beta


@pytest.mark.parametrize("value,message", [(0, "beta"), (-1.5, "beta"), ("abc", "beta must be float"),
                                           (float("inf"), "beta")])
def test_bad_beta_is_a_one_line_error(value, message):
    text = error(resolve_config, resolve("resnet18-3ch"), "entropic", None, [f"beta={value}"])
    assert message in text and "\n" not in text


def test_entropic_names_and_methods_must_agree():
    assert "only --method entropic" in error(preset, resolve("resnet18-3ch-entropic"), "hnd")
    assert "stage1_epochs" in error(resolve_config, resolve("resnet18-3ch"), "entropic", None, ["stage1_epochs=30"])
    assert preset(resolve("resnet18-3ch-entropic"), "entropic").model == "resnet18@layer2-3ch-entropic"
