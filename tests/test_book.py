"""The grid runner and the book build: profiles, parameter checks before any kernel starts,
results.json, skipping finished cells, failures, and a book that still builds without them."""

from __future__ import annotations

import json
import re
import shutil
import sys
from pathlib import Path

import nbformat
import pytest
import yaml
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

from browser import check_pages
from conftest import error
from hnd.book.build import build_book
from hnd.book.cells import KERNEL_STARTS, CellRun
from hnd.book.grid import check_cells, load_profile, plan_cells, profile_names, run_grid, summary_table
from hnd.cli import main
from hnd.config import experiment_config
from hnd.registry import resolve
from hnd.errors import HndError
from hnd.book.results import finished_runs, grid_cells, train_overrides, training_runs, unfinished_cells
from hnd.files import read_json
from hnd.tracing import stage_ends

ROOT = Path(__file__).resolve().parents[1]
PROFILES = ("smoke", "cpu", "paper")


def test_the_three_profiles_exist():
    assert set(PROFILES) <= set(profile_names(ROOT))


@pytest.mark.parametrize("name", PROFILES)
def test_every_profile_cell_fits_its_notebook(name, tmp_path):
    profile = load_profile(name, ROOT)
    cells = plan_cells(profile, tmp_path / "runs", tmp_path / "data")
    declared = check_cells(cells, ROOT)  # parameter names and types against the notebooks
    assert {c.notebook for c in cells} >= {"01_split_points", "02_train", "03_rate_accuracy", "04_results",
                                           "05_where_to_split"}
    train = [c for c in cells if c.notebook == "02_train"]
    methods = {c.parameters["method"] for c in train}
    assert methods >= {"naive", "kd", "hnd", "ae", "entropic"}
    # Entropic cells set a rate weight and run both stages; only they set one.
    for cell in train:
        config = experiment_config(resolve(cell.parameters["teacher"]), cell.parameters["method"],
                                   cell.parameters.get("channels", 3),
                                   train_overrides(cell.parameters["method"], cell.parameters.get("overrides"),
                                                   beta=cell.parameters.get("beta", 0.0)))
        if config.method == "entropic":
            assert cell.parameters["beta"] > 0 and 0 < config.stage1_epochs < config.epochs, cell.id
        else:
            assert "beta" not in cell.parameters, cell.id
    trained_teacher = [c for c in train if c.parameters["method"] == "teacher"]
    for cell in train:
        assert "teacher" in cell.parameters and "{out}" not in json.dumps(cell.parameters)
        if trained_teacher and cell not in trained_teacher:  # students start from the profile's teacher
            shipped = trained_teacher[0].parameters.get("shipped")  # or the one shipped with the project
            expected = f"{shipped}/best.pt" if shipped else str(tmp_path / "runs" / trained_teacher[0].id / "run/best.pt")
            assert cell.parameters["teacher_checkpoint"] == expected
    assert all("profile" in spec and "output_dir" in declared["02_train"] for spec in declared.values())
    assert len({c.id for c in cells}) == len(cells)
    # No cell starts beside one whose results it reads (steps with `wait: false` start with the
    # step before): students after their teacher, the chapters that read runs after all training.
    shipped = trained_teacher and trained_teacher[0].parameters.get("shipped")  # read, not trained: no wait
    for cell in train:
        if trained_teacher and cell not in trained_teacher and not shipped:
            assert cell.phase > trained_teacher[0].phase, cell.id
    readers = [c for c in cells if "runs" in c.parameters]
    assert readers and all(r.phase > max(c.phase for c in train) for r in readers)


def test_a_step_that_does_not_wait_starts_with_the_one_before(toy):
    steps = [{"notebook": "02_train", "name": n, **({"wait": False} if n in ("b", "d") else {})} for n in "abcd"]
    write_profile(toy, "phases", {"steps": steps})
    cells = plan_cells(load_profile("phases", toy), toy / "runs", None)
    assert [(c.id, c.phase) for c in cells] == [("02_train/a", 1), ("02_train/b", 1), ("02_train/c", 2),
                                                 ("02_train/d", 2)]
    write_profile(toy, "bad", {"steps": [{"notebook": "02_train", "wait": "no"}]})
    assert error(load_profile, "bad", toy).endswith("step 1: wait must be true or false, got 'no'")


def test_paper_profile_is_the_papers_grid(tmp_path):
    profile = load_profile("paper", ROOT)
    assert profile.full_scale and "imagenet" in profile.data
    train = [c.parameters for c in plan_cells(profile, tmp_path, tmp_path) if c.parameters.get("method")]
    teachers = ("densenet169", "densenet201", "resnet152", "inception_v3")
    grid = {(p["teacher"], p["method"], p["channels"]) for p in train if p["method"] != "entropic"}
    assert grid == {(t, m, c) for t in teachers for m in ("naive", "kd", "hnd", "ae") for c in (3, 6, 9, 12)}
    assert all(p["overrides"] == {} for p in train)  # the official recipes, unchanged
    # Entropic students: 12 channels, the preset beta times 1/4, 1 and 4 for every backbone.
    entropic = [p for p in train if p["method"] == "entropic"]
    for t in teachers:
        preset = experiment_config(resolve(t), "entropic", 12).beta
        betas = sorted(p["beta"] for p in entropic if p["teacher"] == t)
        assert betas == pytest.approx([preset / 4, preset, preset * 4]), t
    assert {p["channels"] for p in entropic} == {12} and len(entropic) == 3 * len(teachers)


def test_cpu_profile_trains_every_student_under_one_rule(tmp_path):
    train = [c.parameters for c in plan_cells(load_profile("cpu", ROOT), tmp_path, tmp_path)
             if c.notebook == "02_train" and c.parameters["method"] != "teacher"]
    rule = ("epochs", "patience", "optimizer", "lr", "milestones", "batch_size", "augment_views", "input_size")
    rules = {tuple(str(p["overrides"].get(k)) for k in rule) for p in train}
    assert len(rules) == 1, rules
    # entropic stage 2 steps down at the same epochs as everyone else
    for p in (p for p in train if p["method"] == "entropic"):
        stage2 = [p["overrides"]["stage1_epochs"] + m for m in p["overrides"]["stage2_milestones"]]
        assert stage2 == [m for m in p["overrides"]["milestones"] if m > p["overrides"]["stage1_epochs"]]
    settings: dict[tuple, set] = {}
    for p in train:
        settings.setdefault((p["method"], p["channels"], p.get("beta")), set()).add(p.get("seed", 0))
    assert all(len(seeds) >= 2 for seeds in settings.values()), settings  # every setting has a spread
    entropic = [p for p in train if p["method"] == "entropic"]
    assert len({p["beta"] for p in entropic}) >= 2
    widths = {p["channels"] for p in train if p["method"] == "hnd"}
    assert len(widths) >= 2 and {p["channels"] for p in entropic} <= widths


# ---------------------------------------------------------------------------------------------
# A toy project: the real book files, and a fast notebook in place of the training chapter.

TOY_PARAMETERS = '''x: int = 1  # a number to square
fail: bool = False  # raise an error instead
output_dir: str = ""  # the cell folder (set by the runner)
profile: str = "manual"  # the profile (set by the runner)'''

TOY_CODE = '''import json, pathlib  # not hnd: a kernel without torch starts in a second
if fail:
    raise ValueError(f"boom {x}")
pathlib.Path(output_dir, "metrics.json").write_text(json.dumps({"test_top1": float(x * x)}))
print("squared", x * x)
# A table to download, linked as hnd.book.tables.csv_download links it
pathlib.Path(output_dir, "squares.csv").write_text(f"x,square\\n{x},{x * x}\\n")
from IPython.display import Markdown
Markdown(f"[the squares](path:{pathlib.Path(output_dir).name}/squares.csv)")'''


def write_toy_notebook(path: Path) -> None:
    nb = new_notebook(metadata={"kernelspec": {"name": "python3", "display_name": "Python 3", "language": "python"},
                                "language_info": {"name": "python"}})
    params = new_code_cell(TOY_PARAMETERS)
    params.metadata["tags"] = ["parameters"]
    nb.cells = [new_markdown_cell("# Toy chapter"), params, new_code_cell(TOY_CODE)]
    nbformat.write(nb, path)


@pytest.fixture
def toy(tmp_path):
    """A copy of the book's files whose 02_train notebook is a toy, and a profile for it."""
    root = tmp_path / "project"
    root.mkdir()
    for name in ("_config.yml", "_toc.yml"):
        shutil.copy(ROOT / name, root / name)
    for folder in ("book", "_vendor"):
        shutil.copytree(ROOT / folder, root / folder)
    (root / "notebooks" / "profiles").mkdir(parents=True)
    write_toy_notebook(root / "notebooks" / "02_train.ipynb")
    profile = {"description": "toy grid", "steps": [
        {"notebook": "02_train", "grid": {"x": [2, 3]}},
        {"notebook": "02_train", "name": "broken", "parameters": {"x": 4, "fail": True}},
    ]}
    (root / "notebooks" / "profiles" / "toy.yaml").write_text(yaml.safe_dump(profile))
    return root


def write_profile(root: Path, name: str, doc: dict) -> None:
    (root / "notebooks" / "profiles" / f"{name}.yaml").write_text(yaml.safe_dump(doc))


def test_runs_record_results_and_failures_and_resume(toy):
    runs = toy / "runs"
    lines = []
    summaries = run_grid("toy", root=toy, runs=runs, log=lines.append)
    assert [(s["id"], s["status"]) for s in summaries] == [
        ("02_train/x-2", "done"), ("02_train/x-3", "done"), ("02_train/broken", "failed")]
    assert summaries[2]["error"] == "ValueError: boom 4"
    assert any("[3/3] 02_train/broken: failed" in line for line in lines)

    record = read_json(runs / "02_train" / "x-3" / "results.json")
    assert record["status"] == "done" and record["parameters"] == {"x": 3}
    # Paths reach the notebook relative to its working folder: no machine's folder names in the pages.
    assert record["injected"]["output_dir"] == "../runs/02_train/x-3"
    executed = nbformat.read(runs / "02_train" / "x-3" / "notebook.ipynb", as_version=4)
    assert not [c for c in executed.cells if str(toy) in c.source + str(c.get("outputs", ""))]
    assert record["injected"]["profile"] == "toy"
    assert record["metrics"] == {"test_top1": 9.0}
    assert record["seconds"] > 0 and record["started"] <= record["finished"]
    assert record["versions"]["papermill"] and record["versions"]["torch"]
    assert record["hardware"]["cpus"] >= 1 and "git" in record
    assert "papermill" in record["command"] and "parameters.yaml" in record["command"]
    executed = nbformat.read(runs / "02_train" / "x-3" / "notebook.ipynb", as_version=4)
    assert "squared 9" in "".join(o.get("text", "") for c in executed.cells if c.cell_type == "code"
                                  for o in c.outputs)
    # The failed cell keeps its partial notebook and its error.
    partial = nbformat.read(runs / "02_train" / "broken" / "notebook.ipynb", as_version=4)
    assert partial.metadata.papermill.exception is True

    table = summary_table(summaries)
    assert "02_train/broken" in table and "ValueError: boom 4" in table and "2 of 3 cells finished, 1 failed" in table
    assert [r["metrics"]["test_top1"] for r in finished_runs(runs)] == [4.0, 9.0]
    assert [c["id"] for c in unfinished_cells(runs)] == ["02_train/broken"]

    # Again: finished cells are skipped (their notebooks untouched), the failed one runs again.
    stamp = (runs / "02_train" / "x-2" / "notebook.ipynb").stat().st_mtime_ns
    # An interrupted cell (killed while running) is run again too.
    record["status"] = "running"
    (runs / "02_train" / "x-3" / "results.json").write_text(json.dumps(record))
    again = run_grid("toy", root=toy, runs=runs, log=lines.append)
    assert [s.get("skipped") for s in again] == [True, False, False]
    assert (runs / "02_train" / "x-2" / "notebook.ipynb").stat().st_mtime_ns == stamp
    assert [s["status"] for s in again] == ["done", "done", "failed"]
    assert [c["status"] for c in grid_cells(runs)] == ["done", "done", "failed"]


def test_cli_exit_code_and_only(toy, monkeypatch, capsys):
    monkeypatch.chdir(toy)
    assert main(["book", "run", "--profile", "toy", "--only", "x-2"]) == 0
    out = capsys.readouterr().out
    assert "02_train/x-2" in out and "1 of 1 cells finished" in out and "broken" not in out
    assert main(["book", "run", "--profile", "toy", "--only", "broken"]) == 1
    assert "1 failed" in capsys.readouterr().out
    assert (toy / "runs" / "book" / "toy" / "grid.json").is_file()


def test_bad_input_stops_before_any_kernel_starts(toy, capsys):
    write_profile(toy, "typo", {"steps": [{"notebook": "02_train", "grid": {"x": [1]}, "parameters": {"fial": True}}]})
    write_profile(toy, "wrongtype", {"steps": [{"notebook": "02_train", "parameters": {"x": "three"}}]})
    write_profile(toy, "nobook", {"steps": [{"notebook": "99_none"}]})
    write_profile(toy, "badkey", {"steps": [{"notebook": "02_train", "params": {}}]})
    write_profile(toy, "placeholder", {"steps": [{"notebook": "02_train", "parameters": {"output_dir": "{nope}"}}]})
    cases = {
        "nosuch": "unknown profile 'nosuch'; valid profiles: badkey, nobook, placeholder, toy, typo, wrongtype",
        "typo": "02_train/x-1: 02_train.ipynb has no parameter 'fial'; its parameters: x, fail, output_dir, profile",
        "wrongtype": "02_train/default: parameter x must be int, got 'three'",
        "nobook": "notebook not found: ",
        "badkey": "step 1 has unknown keys params; valid: grid, name, notebook, parameters",
        "placeholder": "cannot fill '{nope}'",
    }
    for name, message in cases.items():
        with pytest.raises(HndError) as info:
            run_grid(name, root=toy, runs=toy / "runs" / name)
        assert message in str(info.value) and "\n" not in str(info.value)
        assert not (toy / "runs" / name).exists()  # nothing started, nothing written
    with pytest.raises(HndError, match="--only 'zzz' matches no cell; cells: 02_train/x-2, 02_train/x-3"):
        run_grid("toy", root=toy, only="zzz")
    assert main(["book", "run", "--profile", "nosuch"]) == 2
    assert capsys.readouterr().err.startswith("hnd: error: unknown profile 'nosuch'; valid profiles: ")


def test_a_profile_sets_how_many_cells_run_at_once(toy):
    write_profile(toy, "bad", {"jobs": 0, "steps": [{"notebook": "02_train"}]})
    assert error(load_profile, "bad", toy).endswith("jobs must be a positive integer, got 0")
    write_profile(toy, "two", {"jobs": 2, "steps": [{"notebook": "02_train"}]})
    assert (load_profile("two", toy).jobs, load_profile("toy", toy).jobs, load_profile("cpu", ROOT).jobs) == (2, 1, 2)


def test_paper_profile_needs_full_and_data():
    assert "add --full to start it" in error(run_grid, "paper", root=ROOT)
    with pytest.raises(HndError, match="runs on ImageNet; give its folder with --data"):
        run_grid("paper", root=ROOT, runs=ROOT / "runs" / "never-created", full=True)
    assert not (ROOT / "runs" / "never-created").exists()


def test_book_builds_without_the_failed_runs_and_names_them(toy):
    runs = toy / "runs"
    run_grid("toy", root=toy, runs=runs, log=lambda line: None)
    lines = []
    assert build_book("toy", root=toy, runs=runs, log=lines.append) == 0
    assert any("missing run 02_train/broken (failed)" in line for line in lines)
    html = toy / "_build" / "html"
    chapter = html / "_executed" / "02_train"
    assert sorted(p.name for p in chapter.glob("*.html")) == ["x-2.html", "x-3.html"]
    assert "squared 4" in (chapter / "x-2.html").read_text()
    # A cell's CSV file is staged beside its page, which links a copy to download.
    link = re.search(r'href="([^"]*_downloads/[0-9a-f]+/squares.csv)"', (chapter / "x-2.html").read_text())
    assert link and (chapter / link[1]).read_text() == "x,square\n2,4\n"
    # Chapters without a finished run get a page that says so.
    missing = (html / "_executed" / "01_split_points" / "missing.html").read_text()
    assert "No run of" in missing and "01_split_points" in missing
    training = (html / "book" / "training.html").read_text()
    assert "toy</span></code> profile</strong>" in training and "02_train/broken</span>" in training
    summary = (html / "book" / "reproducibility.html").read_text()
    assert "ValueError: boom 4" in summary and "test_top1 9.00" in summary
    # A second build replaces the staged copies; a foreign _executed folder is never deleted.
    assert build_book("toy", root=toy, runs=runs, log=lambda line: None) == 0
    shutil.rmtree(toy / "_executed")
    (toy / "_executed").mkdir()
    (toy / "_executed" / "mine.txt").write_text("keep")
    with pytest.raises(HndError, match="was not written by `hnd book build`; move it away first"):
        build_book("toy", root=toy, runs=runs)
    assert (toy / "_executed" / "mine.txt").read_text() == "keep"


def test_build_needs_runs_of_that_profile(toy):
    with pytest.raises(HndError, match=r"no runs of profile toy in .*; run `hnd book run --profile toy` first"):
        build_book("toy", root=toy, runs=toy / "empty")


def test_smoke_book_builds_and_every_page_works_in_a_browser(tmp_path):
    """The smoke profile end to end, as a reader gets it: run, build, open every page."""
    root = tmp_path / "project"
    root.mkdir()
    for name in ("_config.yml", "_toc.yml"):
        shutil.copy(ROOT / name, root / name)
    for folder in ("book", "_vendor", "notebooks"):
        shutil.copytree(ROOT / folder, root / folder)
    summaries = run_grid("smoke", root=root, log=lambda line: None)
    failed = [(s["id"], s["error"]) for s in summaries if s["status"] != "done"]
    assert not failed, failed
    runs = root / "runs" / "book" / "smoke"
    train = {r.method: r for r in training_runs(runs)}
    assert set(train) == {"teacher", "naive", "kd", "hnd", "ae", "entropic", "head_kd"}
    # the students in front of the teacher's frozen tail record how far their head is from the teacher head's
    assert {k for k, r in train.items() if r.head_error is not None} == {"hnd", "head_kd"}
    assert all(r.head_error > 0 for k, r in train.items() if k in ("hnd", "head_kd"))
    assert all(0 <= r.test_top1 <= 100 and r.checkpoint == "run/best.pt" and r.checkpoint_path.is_file()
               for r in train.values())
    # The entropic cell: its beta reaches the config, its test bytes the record; the others have neither.
    entropic = train["entropic"]
    assert entropic.beta == 0.5 and entropic.model.endswith("-entropic") and entropic.bytes_per_image > 4
    assert all(r.beta is None and r.bytes_per_image is None for k, r in train.items() if k != "entropic")
    stages = [line["stage"] for line in map(json.loads, (runs / "02_train" / "method-entropic_channels-3_beta-0.5"
                                                         / "run" / "metrics.jsonl").read_text().splitlines())]
    assert stages == [1, 2]
    rate = read_json(runs / "03_rate_accuracy" / "default" / "metrics.json")["points"]
    assert {p["kind"] for p in rate} == {"bottleneck", "input", "teacher_split"}
    splits = [p["setting"] for p in rate if p["kind"] == "teacher_split"]
    assert len(splits) > 2 and stage_ends(splits) == splits  # the plain teacher cut where its stages end
    coded = [p for p in rate if p["method"] == "entropic"]
    assert [(p["label"], p["setting"], p["beta"], p["channels"]) for p in coded] == [("entropic 3ch", "β=0.5", 0.5, 3)]
    # The range coder's bytes are the same in training's test and in the rate chapter (same images, one at a time).
    assert coded[0]["bytes"] == pytest.approx(entropic.bytes_per_image)
    assert {p["setting"] for p in rate if p["method"] == "hnd"} == {"fp32", "fp16", "int8", "int8+zlib"}

    assert build_book("smoke", root=root, log=lambda line: None) == 0
    html = root / "_build" / "html"
    pages = sorted(p.relative_to(html).as_posix() for p in html.rglob("*.html")
                   if p.name not in ("genindex.html", "search.html") and p.relative_to(html).parts[0] != "_static")
    executed = [p for p in pages if p.startswith("_executed/")]
    assert len(executed) == 1 + 1 + 7 + 1 + 1 + 1 and "_executed/02_train/method-hnd_channels-3.html" in executed
    assert "_executed/00_data/default.html" in executed
    assert "_executed/02_train/method-entropic_channels-3_beta-0.5.html" in executed
    assert not any("missing" in p for p in pages)
    images = 0
    for page in executed:
        text = (html / page).read_text()
        assert "{glue" not in text and "smoke</span></code></strong> profile" in text, page
        images += text.count("<img ")
    assert images >= 4 + 7 + 1 + 2 + 1  # split points, per training run, rate plane, results, delay
    rate_page = (html / "_executed" / "03_rate_accuracy" / "default.html").read_text()
    assert "The most accurate rate weight of <strong>entropic 3ch</strong> (β=0.5) sends" in rate_page
    # Every rate point in a scrolling box, and as a CSV file the page links for download.
    assert '<div class="hnd-scroll-table"' in rate_page and "…" not in rate_page
    csv = re.search(r'href="([^"]*_downloads/[0-9a-f]+/rate_accuracy.csv)"', rate_page)
    assert csv and (html / "_executed" / "03_rate_accuracy" / csv[1]).read_text().startswith("kind,label,setting,")
    split_page = (html / "_executed" / "01_split_points" / "default.html").read_text()
    assert ('<code class="docutils literal notranslate"><span class="pre">timm/regnetx_002</span></code>'
            in split_page)  # the profile's teachers, as given
    assert "timm/regnetx_002.pycls_in1k" in split_page  # its analysis, under timm's pretrained tag
    results_page = (html / "_executed" / "04_results" / "default.html").read_text()
    assert "(β values trained: 0.5)" in results_page
    assert re.search(r"At 3 channels the head trained on KD(’|&#8217;|')s loss reaches", results_page)  # ablation
    explorer = (html / "_executed" / "05_where_to_split" / "default.html").read_text()
    assert explorer.count('type="application/vnd.jupyter.widget-view+json"') >= 1  # rendered: check_pages
    for page in pages:  # no machine's folder names on any page
        text = (html / page).read_text()
        assert str(root) not in text and "PosixPath(" not in text, page
    problems = {page: found for page, found in check_pages(html, pages).items() if found}
    assert not problems, problems


def test_book_run_flags_as_a_user_gives_them(toy, monkeypatch, capsys):
    """`hnd book run --only --jobs --out`: one cell, into another runs folder; a bad --jobs is one line."""
    monkeypatch.chdir(toy)
    out = toy / "elsewhere"
    assert main(["book", "run", "--profile", "toy", "--only", "x-2", "--jobs", "1", "--out", str(out)]) == 0
    assert "1 of 1 cells finished" in capsys.readouterr().out
    assert read_json(out / "02_train" / "x-2" / "results.json")["status"] == "done"
    assert not (toy / "runs").exists() and not (out / "02_train" / "x-3").exists()
    assert main(["book", "run", "--profile", "toy", "--jobs", "0"]) == 2
    assert capsys.readouterr().err == "hnd: error: --jobs must be at least 1, got 0\n"


def test_a_full_scale_profile_from_the_command_line_then_hnd_book_build(toy, monkeypatch, capsys, tmp_path):
    """`hnd book run --full --data DIR` as a cluster user starts a GPU-scale profile on their
    dataset (each refusal one line before anything runs); `hnd book build` renders its runs."""
    from hnd.synth import write_synthetic_dataset

    write_profile(toy, "big", {"description": "a full-scale toy", "full_scale": True, "data": {"imagenet": True},
                               "steps": [{"notebook": "02_train", "parameters": {"x": 5}}]})
    monkeypatch.chdir(toy)
    refusals = {(): "add --full to start it", ("--full",): "runs on ImageNet; give its folder with --data",
                ("--full", "--data", str(tmp_path / "nowhere")): str(tmp_path / "nowhere")}
    for flags, said in refusals.items():
        assert main(["book", "run", "--profile", "big", *flags]) == 2, flags
        err = capsys.readouterr().err
        assert err.startswith("hnd: error: ") and err.count("\n") == 1 and said in err, (flags, err)
    assert not (toy / "runs").exists()
    data = write_synthetic_dataset(tmp_path / "imagenet", classes=2, train_per_class=1, val_per_class=1,
                                   image_size=32)["root"]
    assert main(["book", "run", "--profile", "big", "--full", "--data", data]) == 0
    runs = toy / "runs" / "book" / "big"
    assert read_json(runs / "02_train" / "default" / "results.json")["status"] == "done"
    assert read_json(runs / "grid.json")["data"] == str(Path(data).resolve())  # the dataset the grid ran on
    capsys.readouterr()
    assert main(["book", "build", "--profile", "big"]) == 0
    page = toy / "_build" / "html" / "_executed" / "02_train" / "default.html"
    assert "squared 25" in page.read_text()
    assert main(["book", "build", "--profile", "nosuch"]) == 2
    assert "nosuch" in capsys.readouterr().err


# A papermill run whose kernel dies at start while its port is taken, for the first ``taken``
# starts, then runs (or fails otherwise); jupyter_client's port race cannot be forced, so this
# prints what such a run logs.
PORT_RACE = """import pathlib, sys
starts = pathlib.Path(sys.argv[1])
starts.write_text(starts.read_text() + "x" if starts.exists() else "x")
if len(starts.read_text()) <= int(sys.argv[2]):
    print("zmq.error.ZMQError: Address already in use (addr='tcp://127.0.0.1:44605')")
    print("RuntimeError: Kernel died before replying to kernel_info")
    sys.exit(1)
if sys.argv[3] == "fails":
    print("ModuleNotFoundError: No module named 'hnd'")
    sys.exit(1)
print("the notebook ran")"""


@pytest.mark.parametrize("taken, then, status, starts", [
    (1, "runs", "done", 2),  # started again, and it ran
    (KERNEL_STARTS, "runs", "failed", KERNEL_STARTS),  # no more than KERNEL_STARTS starts
    (1, "fails", "failed", 2),  # the second start failed otherwise: not started again
    (0, "fails", "failed", 1),  # a notebook that fails otherwise runs once
])
def test_a_kernel_whose_port_was_taken_is_started_again(tmp_path, taken, then, status, starts):
    counter = tmp_path / "starts"
    run = CellRun("02_train/x-1", str(tmp_path), str(tmp_path),
                  [sys.executable, "-c", PORT_RACE, str(counter), str(taken), then], {"cell": "02_train/x-1"})
    record = run.execute()
    assert (record["status"], len(counter.read_text())) == (status, starts)
    log = (tmp_path / "log.txt").read_text()
    assert log.count("the kernel could not bind its ports; starting it again") == starts - 1
    assert read_json(tmp_path / "results.json")["status"] == status
