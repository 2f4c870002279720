"""The install files, the book configuration and CI agree with each other.

* pyproject.toml keeps lower bounds only; requirements-lock.txt pins every dependency (and extra) at a version
  that satisfies that bound; environment.yml installs exactly the lock's pins plus the package.
* One Python version everywhere (3.11 for CI, the lock and environment.yml; allowed by requires-python).
* One repository URL everywhere: _config.yml, vhmn/notebook.py REPO_URL, every chapter's Colab install cell,
  and any link to the repository in README.md or the book.
* _toc.yml lists every page under book/ and nothing that does not exist.
* .ci/run runs exactly the README's commands.
"""
from __future__ import annotations

import ast
import json
import re
import sys
from pathlib import Path

import pytest
import yaml
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.utils import canonicalize_name
from packaging.version import Version

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    tomllib = pytest.importorskip("tomli")

ROOT = Path(__file__).resolve().parents[1]
CI_PYTHON = "3.11"


def read(rel: str) -> str:
    path = ROOT / rel
    if not path.is_file():
        pytest.fail(f"{rel} is missing at the repository root")
    return path.read_text(encoding="utf-8")


def pyproject() -> dict:
    return tomllib.loads(read("pyproject.toml"))


def pyproject_requirements() -> list[Requirement]:
    project = pyproject()["project"]
    reqs = [Requirement(r) for r in project["dependencies"]]
    for extra in project.get("optional-dependencies", {}).values():
        reqs += [Requirement(r) for r in extra]
    return reqs


def requirement_lines(text: str) -> list[str]:
    return [line.strip() for line in text.splitlines() if line.strip() and not line.strip().startswith("#")]


def lock_pins() -> dict[str, Requirement]:
    pins: dict[str, Requirement] = {}
    for line in requirement_lines(read("requirements-lock.txt")):
        req = Requirement(line)
        name = canonicalize_name(req.name)
        assert name not in pins, f"requirements-lock.txt pins {req.name} twice"
        pins[name] = req
    return pins


def pinned_version(req: Requirement) -> Version:
    specs = list(req.specifier)
    assert len(specs) == 1 and specs[0].operator == "==", f"lock line {req} must be an exact pin `name==version`"
    return Version(specs[0].version)


def environment_yml() -> dict:
    return yaml.safe_load(read("environment.yml"))


def environment_pip_section() -> list[str]:
    deps = environment_yml()["dependencies"]
    sections = [d["pip"] for d in deps if isinstance(d, dict) and "pip" in d]
    assert len(sections) == 1, "environment.yml must have exactly one `pip:` section"
    return [str(x).strip() for x in sections[0]]


def repo_url() -> str:
    tree = ast.parse(read("vhmn/notebook.py"))
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "REPO_URL" for t in node.targets):
            return ast.literal_eval(node.value)
    pytest.fail("vhmn/notebook.py defines no REPO_URL constant")


def notebooks() -> list[Path]:
    return sorted((ROOT / "book").glob("*.ipynb"))


# --- versions --------------------------------------------------------------------------------------------


def test_pyproject_has_lower_bounds_only():
    for req in pyproject_requirements():
        exact = [s for s in req.specifier if s.operator in ("==", "===", "~=")]
        assert not exact, f"pyproject.toml pins {req}; keep lower bounds there, exact pins belong in requirements-lock.txt"
        assert any(s.operator in (">=", ">") for s in req.specifier), f"pyproject.toml: {req} needs a lower bound"


def test_every_lock_line_is_an_exact_pin():
    pins = lock_pins()
    assert pins, "requirements-lock.txt pins nothing"
    for req in pins.values():
        pinned_version(req)
        assert not req.url, f"lock line {req} must come from a package index, not a URL"


def test_lock_pins_every_pyproject_dependency_within_its_bound():
    pins = lock_pins()
    for req in pyproject_requirements():
        name = canonicalize_name(req.name)
        assert name in pins, f"{req.name} (pyproject.toml) is not pinned in requirements-lock.txt"
        version = pinned_version(pins[name])
        assert req.specifier.contains(version, prereleases=True), (
            f"requirements-lock.txt pins {req.name}=={version}, outside pyproject.toml's bound {req.specifier}"
        )


def test_lock_is_self_consistent_for_the_pinned_packages_it_can_see():
    """Each pinned distribution that is installed here at the pinned version has its own requirements pinned."""
    from importlib import metadata

    pins = lock_pins()
    env = {"python_version": CI_PYTHON, "sys_platform": "linux", "platform_system": "Linux", "extra": ""}
    checked = 0
    for name, req in pins.items():
        try:
            dist = metadata.distribution(name)
        except metadata.PackageNotFoundError:
            continue
        if Version(dist.version) != pinned_version(req):
            continue
        checked += 1
        for dep_line in dist.requires or []:
            dep = Requirement(dep_line)
            if dep.marker is not None and not dep.marker.evaluate(env):
                continue
            dep_name = canonicalize_name(dep.name)
            assert dep_name in pins, f"{req.name} needs {dep}, which requirements-lock.txt does not pin"
            assert dep.specifier.contains(pinned_version(pins[dep_name]), prereleases=True), (
                f"{req.name} needs {dep}, but the lock pins {pins[dep_name]}"
            )
    assert checked > 0 or not pins


def test_environment_yml_installs_exactly_the_lock_plus_the_package():
    section = environment_pip_section()
    assert "-e ." in section, "environment.yml's pip section must install the package with `-e .`"
    env_pins = [Requirement(x) for x in section if x != "-e ."]
    lock = lock_pins()
    env_by_name = {canonicalize_name(r.name): r for r in env_pins}
    assert len(env_by_name) == len(env_pins), "environment.yml pins a package twice"
    assert set(env_by_name) == set(lock), (
        "environment.yml and requirements-lock.txt pin different packages: "
        f"only in environment.yml {sorted(set(env_by_name) - set(lock))}, "
        f"only in the lock {sorted(set(lock) - set(env_by_name))}"
    )
    for name, req in lock.items():
        other = env_by_name[name]
        assert (other.specifier, other.marker and str(other.marker)) == (req.specifier, req.marker and str(req.marker)), (
            f"environment.yml has {other}, requirements-lock.txt has {req}"
        )


def test_one_python_version_everywhere():
    requires = SpecifierSet(pyproject()["project"]["requires-python"])
    assert requires.contains(CI_PYTHON + ".0"), f"requires-python {requires} excludes CI's Python {CI_PYTHON}"
    pythons = [d for d in environment_yml()["dependencies"] if isinstance(d, str) and d.startswith("python")]
    assert pythons == [f"python={CI_PYTHON}"], f"environment.yml must ask for python={CI_PYTHON}, has {pythons}"
    ci = read(".ci/run")
    assert f"python{CI_PYTHON} -m venv" in ci, f".ci/run must create its venv with python{CI_PYTHON}"
    other = set(re.findall(r"python(3\.\d+)\b", ci + read("README.md"))) - {CI_PYTHON}
    assert not other, f"README.md / .ci/run mention other Python versions: {sorted(other)}"
    assert f"Python {CI_PYTHON}" in read("requirements-lock.txt"), "the lock's header must say which Python it is for"


# --- one repository URL ----------------------------------------------------------------------------------


def test_config_repository_url_is_repo_url():
    config = yaml.safe_load(read("_config.yml"))
    assert config["repository"]["url"] == repo_url(), "_config.yml repository.url differs from vhmn/notebook.py REPO_URL"
    assert config["launch_buttons"].get("colab_url"), "_config.yml must enable the Colab launch button (colab_url)"


def test_every_chapter_installs_from_repo_url_on_colab():
    url = repo_url()
    expected = f'%pip install -q "vhmn[book] @ git+{url}"'
    found = notebooks()
    for path in found:
        nb = json.loads(path.read_text(encoding="utf-8"))
        cells = nb["cells"]
        assert len(cells) >= 2, f"{path.name}: too few cells"
        cell = cells[1]
        source = "".join(cell["source"]) if isinstance(cell["source"], list) else cell["source"]
        assert cell["cell_type"] == "code" and expected in source, (
            f"{path.name}: the second cell must be the Colab install cell containing `{expected}`"
        )
        assert "google.colab" in source, f"{path.name}: the install cell must only run on Colab"
        assert "remove-cell" in cell.get("metadata", {}).get("tags", []), f"{path.name}: tag the install cell remove-cell"


def test_every_link_to_the_repository_uses_repo_url():
    url = repo_url()
    owner_repo = url.removeprefix("https://github.com/")
    files = [ROOT / "README.md", ROOT / "pyproject.toml", ROOT / "_config.yml", *sorted((ROOT / "book").glob("*.md")), *notebooks()]
    github = re.compile(r"https?://github\.com/([\w.-]+/vhmn)(?![\w-])")
    colab = re.compile(r"colab\.research\.google\.com/github/([\w.-]+/[\w.-]+)/blob/")
    for path in files:
        if not path.is_file():
            continue
        text = path.read_text(encoding="utf-8")
        for m in list(github.finditer(text)) + list(colab.finditer(text)):
            assert m.group(1) == owner_repo, f"{path.relative_to(ROOT)} links to {m.group(0)!r}; the repository is {url}"


# --- book and CI -----------------------------------------------------------------------------------------


def toc_files() -> list[str]:
    toc = yaml.safe_load(read("_toc.yml"))
    files = [toc["root"]]

    def walk(entries):
        for entry in entries or []:
            if "file" in entry:
                files.append(entry["file"])
            walk(entry.get("sections"))
            walk(entry.get("chapters"))

    walk(toc.get("chapters"))
    for part in toc.get("parts", []):
        walk(part.get("chapters"))
    return files


def test_toc_lists_every_book_page_and_only_existing_ones():
    listed = toc_files()
    assert listed[0] == "book/intro"
    assert len(set(listed)) == len(listed), "_toc.yml lists a page twice"
    existing = {str(p.relative_to(ROOT).with_suffix("")) for p in (ROOT / "book").glob("*") if p.suffix in (".md", ".ipynb")}
    missing = [f for f in listed if f not in existing]
    assert not missing, f"_toc.yml lists pages that do not exist: {missing}"
    unlisted = sorted(existing - set(listed))
    assert not unlisted, f"pages under book/ that _toc.yml does not list (they would not be built): {unlisted}"


def readme_commands() -> list[str]:
    blocks = re.findall(r"```(?:bash|sh|shell)?\n(.*?)```", read("README.md"), re.S)
    return [line.strip() for block in blocks for line in block.splitlines() if line.strip().startswith("python3")]


def test_ci_runs_exactly_the_readme_commands():
    commands = readme_commands()
    build = [c for c in commands if "jupyter-book build" in c]
    tests = [c for c in commands if "scripts/test.sh" in c]
    assert len(build) == 1 and len(tests) == 1, f"README.md must show one build and one test command, found {commands}"
    ci = [line.strip() for line in read(".ci/run").splitlines()]
    for command in build + tests:
        assert command in ci, f".ci/run must run the README's command verbatim:\n  {command}"
    assert "--warningiserror" in build[0], "the book build must turn Sphinx warnings into errors"
    test_script = read("scripts/test.sh")
    assert re.search(r"pytest\b.*--nbval\b.*\bbook/", test_script), "scripts/test.sh must run strict `pytest --nbval book/`"
    assert "--nbval-lax" not in test_script, "the notebooks are checked strictly (--nbval, not --nbval-lax)"


def test_decisions_page_ablation_numbers_match_the_committed_results():
    # every "±x.y (`run`)" on the decisions page is that run's test accuracy minus the default's (vhmn_s0),
    # in points, as written by the trainer into results/cpu10/<run>/results.json
    text = read("book/decisions.md")
    found = re.findall(r"([+−±])(\d+\.\d) \(`(vhmn_\w+)`\)", text)
    assert found, "the decisions page quotes no ablation result"
    acc = {}
    for run in {"vhmn_s0", *(r for _, _, r in found)}:
        path = ROOT / "results" / "cpu10" / run / "results.json"
        assert path.is_file(), f"book/decisions.md quotes {run}, but {path.relative_to(ROOT)} does not exist"
        acc[run] = 100 * json.loads(path.read_text())["final"]["test_acc"]
    for sign, value, run in found:
        d = round(acc[run] - acc["vhmn_s0"], 1)
        assert (sign, value) == ("+" if d > 0 else "−" if d < 0 else "±", f"{abs(d):.1f}"), f"{run}: the page says {sign}{value}, the results give {d:+.1f}"
    # the converged protocol: every "±x.y vs ViT (`cpu10long/run`)" is that run's accuracy minus the ViT's (vit_s0 there)
    long = re.findall(r"([+−±])(\d+\.\d) vs ViT \(`cpu10long/(\w+)`\)", text)
    vit = 100 * json.loads((ROOT / "results" / "cpu10long" / "vit_s0" / "results.json").read_text())["final"]["test_acc"]
    for sign, value, run in long:
        path = ROOT / "results" / "cpu10long" / run / "results.json"
        assert path.is_file(), f"book/decisions.md quotes cpu10long/{run}, but {path.relative_to(ROOT)} does not exist"
        d = round(100 * json.loads(path.read_text())["final"]["test_acc"] - vit, 1)
        assert (sign, value) == ("+" if d > 0 else "−" if d < 0 else "±", f"{abs(d):.1f}"), f"cpu10long/{run}: the page says {sign}{value}, the results give {d:+.1f}"


def test_book_figures_are_150_dpi_with_text_of_9_points_or_more():
    """Issue 14: every chapter that plots sets the figure defaults by vhmn.notebook.setup (150 dpi, 10 pt text),
    and no label, title or legend in the book's code asks for less than 9 pt."""
    import matplotlib

    from vhmn.notebook import setup

    setup()
    assert matplotlib.rcParams["figure.dpi"] >= 150 and matplotlib.rcParams["savefig.dpi"] >= 150
    assert matplotlib.rcParams["font.size"] >= 9
    for path in notebooks():
        nb = json.loads(path.read_text(encoding="utf-8"))
        code = "\n".join("".join(c["source"]) for c in nb["cells"] if c["cell_type"] == "code")
        if "plt." in code:
            assert "setup(" in code, f"{path.name} plots without vhmn.notebook.setup(): its figures miss the 150-dpi default"
        small = [s for s in re.findall(r"fontsize=(\d+(?:\.\d+)?)\b", code) if float(s) < 9]
        assert not small, f"{path.name}: fontsize={small[0]} (less than 9 pt) in a figure"
