"""The install lists every package of the source tree: a subpackage missing from pyproject's
`packages` works in an editable install and vanishes from a real one."""
import pathlib
import re

ROOT = pathlib.Path(__file__).resolve().parent.parent


def test_every_package_is_installed():
    listed = re.search(r"^packages = \[(.*?)\]", (ROOT / "pyproject.toml").read_text(), re.MULTILINE | re.DOTALL)
    installed = set(re.findall(r'"([\w.]+)"', listed.group(1)))
    found = {".".join(init.parent.relative_to(ROOT).parts) for init in (ROOT / "graphc").rglob("__init__.py")}
    assert found - installed == set(), f"packages missing from pyproject.toml: {sorted(found - installed)}"
