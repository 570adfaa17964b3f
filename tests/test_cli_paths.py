"""Command-line paths as a user runs them: a generated dataset written and checked, a corrupt
JPEG counted by `data check --verify`, tiny ILSVRC2012 archives extracted by `data imagenet`, a
training config from a YAML file, and a server on every interface with --insecure."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import threading
import time

import yaml

from hnd.cli import main


def test_data_synth_then_check_counts_and_verifies(tmp_path, capsys):
    root = tmp_path / "synth"
    assert main(["data", "synth", "--out", str(root), "--classes", "3", "--train-per-class", "2",
                 "--val-per-class", "2", "--image-size", "40"]) == 0
    assert re.search(r"3 classes, train 6, val 6 images", capsys.readouterr().out)
    assert main(["data", "check", str(root), "--verify", "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["counts"] == {"train": 6, "val": 6} and len(doc["classes"]) == 3 and doc["unreadable"] == []

    broken = sorted((root / "val").rglob("*.JPEG"))[1]
    broken.write_bytes(b"\xff\xd8\xff\xe0 cut short by a failed copy")
    assert main(["data", "check", str(root), "--json"]) == 0  # without --verify nothing is opened
    capsys.readouterr()
    assert main(["data", "check", str(root), "--verify", "--json"]) == 2
    captured = capsys.readouterr()
    [unreadable] = json.loads(captured.out)["unreadable"]
    assert str(broken) in unreadable and "cannot read" in unreadable
    assert captured.err == ("hnd: error: 1 unreadable images; delete them or train with "
                            "skip_bad_images=true\n")


def test_train_config_file_goes_over_the_preset_and_under_the_command_line(tmp_path, capsys):
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump({"lr": 0.02, "epochs": 3, "milestones": [2], "input_size": 64}))
    assert main(["config", "resnet18@layer2-3ch", "--method", "hnd", "--config", str(config), "epochs=5"]) == 0
    shown = yaml.safe_load(capsys.readouterr().out)
    assert (shown["lr"], shown["epochs"], shown["milestones"], shown["input_size"]) == (0.02, 5, [2], 64)
    config.write_text(yaml.safe_dump({"learning_rate": 0.02}))
    assert main(["config", "resnet18@layer2-3ch", "--method", "hnd", "--config", str(config)]) == 2
    assert "unknown config key 'learning_rate'" in capsys.readouterr().err


def test_serve_insecure_listens_on_every_interface():
    """--insecure: no TLS and no tokens off loopback, as a user on a closed network asks."""
    proc = subprocess.Popen([sys.executable, "-m", "hnd", "serve", "resnet18@layer2-3ch", "--random-weights",
                             "--host", "0.0.0.0", "--port", "0", "--insecure"], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    lines: list[str] = []
    threading.Thread(target=lambda: lines.extend(proc.stdout), daemon=True).start()
    try:
        deadline = time.monotonic() + 120
        while not any(line.startswith("hnd serve:") for line in lines):
            assert proc.poll() is None and time.monotonic() < deadline, "".join(lines)
            time.sleep(0.05)
        port = int(re.search(r" on 0\.0\.0\.0:(\d+) ", "".join(lines)).group(1))
        edge = subprocess.run([sys.executable, "-m", "hnd", "edge", "resnet18@layer2-3ch", "--random-weights",
                               "--server", f"127.0.0.1:{port}", "--json", _photograph()],
                              capture_output=True, text=True, timeout=300)
        assert edge.returncode == 0, edge.stderr
        assert len(json.loads(edge.stdout)[0]["topk"]) == 5
    finally:
        proc.terminate()
        proc.wait(timeout=60)


def _photograph() -> str:
    """A real photograph shipped with matplotlib."""
    from matplotlib import cbook

    return cbook.get_sample_data("grace_hopper.jpg", asfileobj=False)


def _jpeg(path, shade: int) -> None:
    from PIL import Image

    Image.new("RGB", (48, 40), (shade, 255 - shade, 90)).save(path, quality=90)


def _tar(path, members: dict, gz: bool = False) -> None:
    """A tar archive of ``members`` (name in the archive -> file on disk)."""
    import tarfile

    with tarfile.open(path, "w:gz" if gz else "w") as tar:
        for name, source in members.items():
            tar.add(source, arcname=name)


def _fabricated_ilsvrc(root, scratch) -> dict[str, str]:
    """Tiny ILSVRC2012 archives in the official layout: a devkit (meta.mat, the validation
    ground truth), a train tar of per-class tars and a val tar; two classes. Their MD5s."""
    import hashlib

    import numpy as np
    import scipy.io

    wnids = ["n00000001", "n00000002"]
    record = np.dtype([("ILSVRC2012_ID", "O"), ("WNID", "O"), ("words", "O"), ("gloss", "O"),
                       ("num_children", "O"), ("wordnet_height", "O"), ("num_train_images", "O")])
    synsets = np.array([(i + 1, w, f"thing {i}, item {i}", "a thing", 0, 0, 2) for i, w in enumerate(wnids)],
                       dtype=record)
    data = scratch / "ILSVRC2012_devkit_t12" / "data"
    data.mkdir(parents=True)
    scipy.io.savemat(data / "meta.mat", {"synsets": synsets})
    (data / "ILSVRC2012_validation_ground_truth.txt").write_text("2\n1\n2\n")  # val images 1-3: classes 2, 1, 2
    _tar(root / "ILSVRC2012_devkit_t12.tar.gz", {"ILSVRC2012_devkit_t12": scratch / "ILSVRC2012_devkit_t12"}, gz=True)
    class_tars = {}
    for c, wnid in enumerate(wnids):
        images = {}
        for k in range(2):
            images[f"{wnid}_{k}.JPEG"] = scratch / f"{wnid}_{k}.JPEG"
            _jpeg(images[f"{wnid}_{k}.JPEG"], 60 * c + 10 * k)
        _tar(scratch / f"{wnid}.tar", images)
        class_tars[f"{wnid}.tar"] = scratch / f"{wnid}.tar"
    _tar(root / "ILSVRC2012_img_train.tar", class_tars)
    val = {}
    for k in range(1, 4):
        val[f"ILSVRC2012_val_{k:08d}.JPEG"] = scratch / f"val_{k}.JPEG"
        _jpeg(val[f"ILSVRC2012_val_{k:08d}.JPEG"], 200 - 20 * k)
    _tar(root / "ILSVRC2012_img_val.tar", val)
    return {name: hashlib.md5((root / name).read_bytes()).hexdigest()
            for name in ("ILSVRC2012_devkit_t12.tar.gz", "ILSVRC2012_img_train.tar", "ILSVRC2012_img_val.tar")}


def test_data_imagenet_extracts_the_official_archives(tmp_path, monkeypatch, capsys):
    """`hnd data imagenet` on archives in the official layout, through torchvision's ImageNet:
    the checksums of the real archives refuse these (one line), and with their own sums the
    images land in class folders, the validation images sorted by the devkit's ground truth."""
    import torchvision.datasets.imagenet as imagenet

    root, scratch = tmp_path / "ilsvrc", tmp_path / "scratch"
    root.mkdir()
    scratch.mkdir()
    sums = _fabricated_ilsvrc(root, scratch)
    assert main(["data", "imagenet", str(root)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "ILSVRC2012_devkit_t12.tar.gz is not present in the root directory or is " \
                                    "corrupted" in err
    for split, (name, _) in imagenet.ARCHIVE_META.items():
        monkeypatch.setitem(imagenet.ARCHIVE_META, split, (name, sums[name]))
    assert main(["data", "imagenet", str(root)]) == 2  # extracted, then the layout check speaks
    assert "has 2 classes, not 1000; is the extraction incomplete?" in capsys.readouterr().err
    assert sorted(p.name for p in (root / "val" / "n00000002").iterdir()) == [
        "ILSVRC2012_val_00000001.JPEG", "ILSVRC2012_val_00000003.JPEG"]
    assert [p.name for p in (root / "val" / "n00000001").iterdir()] == ["ILSVRC2012_val_00000002.JPEG"]
    assert sorted(p.name for p in (root / "train" / "n00000001").iterdir()) == ["n00000001_0.JPEG",
                                                                                "n00000001_1.JPEG"]
