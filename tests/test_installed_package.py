"""The package as `pip install .` builds it: CI installs the wheel, not the checkout, and this checks that the tests
really ran against it, with every file the wheel must carry (the SQL, the bundled model) read from the install."""

from __future__ import annotations

import sysconfig
from importlib import resources
from pathlib import Path

import gpt_sql.runner
from gpt_sql.runner.firstrun import bundled_path

from conftest import missing

REPO = Path(__file__).resolve().parents[1]
# what the runner and loader read at run time, by package: sql/*.sql and the bundled model's files
PACKAGED = {"gpt_sql.sql": ["generate.sql", "schema.sql", "weights.sql", "float16.sql"],
            "gpt_sql.loader": [f"models/shakespeare-mini/{name}" for name in
                               ("config.json", "vocab.json", "merges.txt", "model.safetensors", "MODEL_CARD.md")]}
CHECKOUT = {"gpt_sql.sql": REPO / "sql", "gpt_sql.loader": REPO / "loader"}


def test_tests_run_against_the_installed_wheel():
    runner = Path(gpt_sql.runner.__file__).resolve().parent
    if runner == REPO / "runner":
        missing(f"gpt_sql is imported from the checkout ({runner}), an editable install: the wheel's contents "
                "are not what runs (.ci/run installs the wheel)")
    installed = runner.parent  # site-packages/gpt_sql (CI's venv may itself lie inside the checkout)
    assert installed.is_relative_to(Path(sysconfig.get_paths()["purelib"]).resolve()), installed
    assert bundled_path().resolve().is_relative_to(installed), bundled_path()
    for package, names in PACKAGED.items():
        for name in names:
            shipped = Path(str(resources.files(package).joinpath(name))).resolve()
            assert shipped.is_relative_to(installed) and shipped.is_file(), f"{name} is not in the installed wheel"
            assert shipped.read_bytes() == (CHECKOUT[package] / name).read_bytes(), f"{name} differs from the checkout"
