"""timm teachers: ``timm/NAME[.TAG]`` names, their pretrained configs, split points, weights and
students, over one small member of each family (weights: random files where timm looks)."""

from __future__ import annotations

import json
import math
import sys

import pytest
import torch

from conftest import error, put_in_hub_cache
from hnd.cli import main
from hnd.config import resolve_config
from hnd.data import image_tensor
from hnd.methods import build_task
from hnd.models import create_model
from hnd.registry import resolve
from hnd.teachers import teacher_spec
from hnd.timm_teachers import weights_path

timm = pytest.importorskip("timm")

SIZE = 96  # the students' input side in these tests: small and quick

# One small member per family; the hybrid (EfficientViT) traces only with timm's own FX
# registrations.
FAMILIES = {
    "resnet": "timm/resnet18.a1_in1k",
    "efficientnet": "timm/efficientnet_b0",
    "mobilenetv3": "timm/mobilenetv3_small_050",
    "mobilenetv4": "timm/mobilenetv4_conv_small",
    "convnext": "timm/convnext_atto",
    "regnet": "timm/regnetx_002",
    "hybrid": "timm/efficientvit_b0",
}


def _json(capsys):
    return json.loads(capsys.readouterr().out)


def test_names_resolve_once_into_a_spec_with_the_tags_pretrained_config():
    spec = resolve("timm/resnet18")
    assert str(spec) == "timm/resnet18.a1_in1k" and resolve(str(spec)) == spec  # the default tag, pinned
    cfg = timm.models.get_pretrained_cfg("resnet18.a1_in1k")
    t = spec.teacher
    assert (t.input_size, t.interpolation, t.mean, t.std, t.num_classes) == \
        (cfg.input_size[-1], cfg.interpolation, tuple(cfg.mean), tuple(cfg.std), cfg.num_classes)
    assert t.resize_size == math.floor(224 / cfg.crop_pct) == 235  # timm's rule: input side / crop_pct
    vit = resolve("timm/vit_tiny_patch16_224.augreg_in21k_ft_in1k")
    assert vit.preprocessing().mean == vit.preprocessing().std == (0.5, 0.5, 0.5)  # not ImageNet's
    student = resolve("timm/resnet18@layer2-3ch")
    assert str(student) == "timm/resnet18.a1_in1k@layer2-3ch" and student.teacher is t
    assert str(resolve("timm/resnet18-3ch-entropic")) == "timm/resnet18.a1_in1k@layer2-3ch-entropic"


def test_bad_timm_names_are_one_line_errors(monkeypatch):
    assert "unknown timm model 'resnt18'; similar: timm/resnet18" in error(resolve, "timm/resnt18")
    message = error(resolve, "timm/resnet18.nope-3ch")
    assert "resnet18 has no pretrained tag 'nope'" in message and "timm/resnet18.a1_in1k" in message
    squash = next(n for n in timm.list_models(pretrained=True)
                  if timm.models.get_pretrained_cfg(n).crop_mode == "squash")
    assert "crop_mode 'squash'" in error(teacher_spec, f"timm/{squash}")
    assert "nearest valid split points: layer1 or layer2.0.add" in error(resolve, "timm/resnet18@layer2.0.conv1-3ch")
    monkeypatch.setitem(sys.modules, "timm", None)  # as if not installed
    assert error(resolve, "timm/convnext_atto") == 'timm teachers need timm, an optional extra: pip install "hnd[timm]"'


@pytest.mark.parametrize("family", FAMILIES)
def test_every_family_has_split_points_a_student_an_hnd_step_and_predict(family, timm_pretrained, capsys, tmp_path,
                                                                        image_file):
    """Split points named after timm's modules; the default student's shapes; one HND step
    from the pretrained teacher (the cached file); ``hnd predict`` with its checkpoint."""
    name = FAMILIES[family]
    timm_pretrained(name)
    assert main(["inspect", name, "--split-points", "--json"]) == 0
    points = {p["name"]: p for p in _json(capsys)["split_points"]}
    spec = resolve(f"{name}-3ch")
    modules = {n for n, _ in spec.teacher.builder().named_modules()}
    assert spec.split_point in points and spec.split_point in modules  # named after timm's modules
    assert tuple(points[spec.split_point]["output_shape"]) == spec.head_output_shape

    config = resolve_config(spec, "hnd", assignments=[f"input_size={SIZE}"])
    torch.manual_seed(0)
    task = build_task(config, num_classes=1000)
    x = torch.randn(2, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(1))
    task.train_mode()
    with torch.no_grad():
        target = task.reference(x)
        z = task.model.head.encoder(x)
    assert task.trained(x).shape == target.shape == (2, *config.spec.head_output_shape)
    assert z.shape[:2] == (2, 3)  # the 3-channel bottleneck
    loss, _ = task.loss(task.trained, x, torch.tensor([0, 1]))
    loss.backward()
    before = {n: p.detach().clone() for n, p in task.trained.named_parameters()}
    torch.optim.Adam(task.trained.parameters(), 1e-3).step()
    assert any(not torch.equal(before[n], p) for n, p in task.trained.named_parameters())

    from hnd.checkpoints import save_checkpoint

    student = task.model.eval()
    save_checkpoint(tmp_path / "student.pt", config.spec, student)
    assert main(["predict", name + "-3ch", str(image_file), "--checkpoint", str(tmp_path / "student.pt"),
                 "--topk", "3", "--logits", "--json"]) == 0
    logits = torch.tensor(_json(capsys)["logits"])
    with torch.no_grad():
        expected = student(image_tensor(config.spec, image_file))[0]
    torch.testing.assert_close(logits, expected, rtol=1e-4, atol=1e-4)


def test_pretrained_weights_load_through_timm_from_where_they_are_cached(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))  # caches of this test's own
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    spec = resolve("timm/regnetx_002")
    missing = error(create_model, spec)  # nothing cached, HND_OFFLINE=1 (conftest)
    assert "HND_OFFLINE=1 forbids downloading" in missing and str(weights_path(spec.teacher)) in missing
    state = spec.teacher.builder().state_dict()
    put_in_hub_cache(spec.teacher.name, state)  # the Hugging Face cache, as a download leaves it
    teacher = create_model(spec)
    assert all(torch.equal(teacher.state_dict()[k], v) for k, v in state.items())

    # a file put by hand at weights_path (another cache: the hub's is empty there)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-hub"))
    path = weights_path(spec.teacher)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"not a safetensors file")
    assert error(create_model, spec).startswith(f"cannot build {spec.teacher.name} with its pretrained weights: ")
    from safetensors.torch import save_file
    shifted = {k: v + 1 if v.is_floating_point() else v for k, v in state.items()}
    save_file({k: v.contiguous() for k, v in shifted.items()}, str(path))
    by_hand = create_model(spec)
    assert torch.equal(by_hand.state_dict()["stem.conv.weight"], shifted["stem.conv.weight"])


def test_the_teachers_normalization_reaches_training_evaluation_and_the_exported_encoder(timm_pretrained,
                                                                                         tmp_path, capsys):
    """A tag trained with mean = std = 0.5: every step that normalizes uses it, and the encoder's
    sidecar tells the device."""
    name = "timm/efficientnet_b0.ra4_e3600_r224_in1k"
    spec = resolve(f"{name}-3ch").at_input_size(SIZE)
    assert spec.teacher.mean == spec.teacher.std == (0.5, 0.5, 0.5)
    from hnd.data import train_transform

    assert list(train_transform(spec).transforms[-1].mean) == [0.5, 0.5, 0.5]
    assert spec.preprocessing().mean == (0.5, 0.5, 0.5)
    from hnd.checkpoints import save_checkpoint

    timm_pretrained(name)
    save_checkpoint(tmp_path / "student.pt", spec, create_model(spec))
    out = tmp_path / "encoder.onnx"
    assert main(["export", str(spec), "--part", "encoder", "--checkpoint", str(tmp_path / "student.pt"),
                 "--out", str(out)]) == 0
    capsys.readouterr()
    side = json.loads(out.with_suffix(".json").read_text())
    assert side["preprocessing"]["mean"] == [0.5, 0.5, 0.5] and side["preprocessing"]["input_size"] == SIZE


def test_train_evaluate_and_predict_on_the_command_line_parse_once_and_read_once(timm_pretrained, tmp_path,
                                                                                 capsys, counts, image_file):
    from hnd.synth import write_synthetic_dataset

    data = write_synthetic_dataset(tmp_path / "data", classes=3, train_per_class=4, val_per_class=2,
                                   image_size=72)["root"]
    timm_pretrained("timm/regnetx_002")
    common = ["--data", data, "--no-progress", "epochs=1", f"input_size={SIZE}", "batch_size=4",
              "holdout_per_class=1", "num_workers=0"]
    assert main(["train", "timm/regnetx_002", "--method", "teacher", "--out", str(tmp_path / "teacher"),
                 *common]) == 0
    student = "timm/regnetx_002@s2-3ch"
    assert main(["train", student, "--method", "hnd", "--out", str(tmp_path / "hnd"), *common,
                 f"teacher_checkpoint={tmp_path / 'teacher' / 'best.pt'}"]) == 0
    assert "hnd timm/regnetx_002.pycls_in1k@s2-3ch: best epoch 1" in capsys.readouterr().out
    best = str(tmp_path / "hnd" / "best.pt")
    for argv in (["evaluate", student, "--method", "hnd", "--checkpoint", best, "--data", data, "--student-only",
                  "--workers", "0", "--no-progress", "--json"],
                 ["predict", student, str(image_file), "--checkpoint", best, "--json"]):
        counts.update(parse=0, create=0, loads={})
        assert main(argv) == 0, argv[0]
        result = _json(capsys)
        assert (counts["parse"], counts["create"]) == (1, 1), argv[0]
        assert list(counts["loads"].values()) == [1], argv[0]  # the checkpoint, read once
    assert sorted(t["index"] for t in result["topk"]) == [0, 1, 2]  # the student's 3 classes


def test_a_vision_transformer_is_a_teacher_but_its_tokens_take_no_student_head(capsys):
    name = "timm/vit_tiny_patch16_224"
    assert main(["inspect", name, "--split-points", "--json"]) == 0
    points = _json(capsys)["split_points"]
    assert points and all(len(p["output_shape"]) != 3 for p in points)  # tokens, not [C, H, W] maps
    message = error(resolve, f"{name}-3ch")
    assert "student heads need a split point whose output is a [C, H, W] feature map" in message


def test_timm_teachers_are_listed_for_the_explorer_and_the_planner(capsys):
    from hnd.book.explore import known_teachers

    listed = known_teachers()
    assert "timm/convnext_atto" in listed and listed.index("timm/convnext_atto") > listed.index("resnet18")
    assert main(["models", "--timm", "--json"]) == 0
    names = {r["name"] for r in _json(capsys)}
    assert {"timm/convnext_atto", "timm/regnetx_002", "densenet169"} <= names
    assert main(["plan", "timm/convnext_atto", "--rate", "10", "--channels", "3", "--json"]) == 0
    plan = _json(capsys)
    assert any("HND student 3ch" in json.dumps(row) for row in plan["options"])


def test_timms_own_fx_registrations_make_a_hybrid_traceable():
    """EfficientViT's attention branches on a tensor size; timm registers it as not traceable,
    and the tracer keeps it whole."""
    import math as _math

    import torchvision
    from torchvision.models.feature_extraction import NodePathTracer

    from hnd import tracing

    model = timm.create_model("efficientvit_b0", pretrained=False)
    with pytest.raises(Exception):
        NodePathTracer(autowrap_modules=(_math, torchvision.ops)).trace(model.eval())
    gm = tracing.trace(model)
    x = torch.randn(1, 3, 64, 64)
    assert torch.equal(gm(x), model(x))
