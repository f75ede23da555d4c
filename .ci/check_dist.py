"""Check a built wheel and sdist against the working tree: every shipped model file, the SCT start-up
hook and every module are in them, so that a file missing from the package data fails here and not
on a user's machine (an editable install reads the tree and would not notice).

    python .ci/check_dist.py DIST_FOLDER
"""
from __future__ import annotations

import sys
import tarfile
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def expected_wheel_members() -> set[str]:
    want = {"sct_deepseg_epi-sct.pth"}
    for f in (ROOT / "sct_deepseg_epi").rglob("*.py"):
        want.add(f.relative_to(ROOT).as_posix())
    for f in (ROOT / "models").glob("*/*/*"):
        if f.name in ("manifest.json", "README.md") or f.suffix == ".onnx":
            want.add("sct_deepseg_epi/models/" + f.relative_to(ROOT / "models").as_posix())
    return want


def main(dist: Path) -> int:
    wheels, sdists = sorted(dist.glob("*.whl")), sorted(dist.glob("*.tar.gz"))
    if len(wheels) != 1 or len(sdists) != 1:
        print(f"{dist}: expected one wheel and one sdist, found {[p.name for p in wheels + sdists]}")
        return 1
    with zipfile.ZipFile(wheels[0]) as z:
        have = set(z.namelist())
    missing = sorted(expected_wheel_members() - have)
    with tarfile.open(sdists[0]) as t:
        top = t.getnames()[0].split("/")[0]
        in_sdist = {n.split("/", 1)[1] for n in t.getnames() if "/" in n}
    need_sdist = {"setup.py", "setup.cfg", "pyproject.toml", "README.md", "LICENSE", "sct_deepseg_epi/_sct_startup.pth"}
    need_sdist |= {m.replace("sct_deepseg_epi/models/", "models/", 1) for m in expected_wheel_members()
                   if m.startswith("sct_deepseg_epi/models/")}
    missing_sdist = sorted(need_sdist - in_sdist)
    for name in missing:
        print(f"{wheels[0].name}: missing {name}")
    for name in missing_sdist:
        print(f"{sdists[0].name} ({top}): missing {name}")
    if missing or missing_sdist:
        return 1
    print(f"{wheels[0].name}: {len(have)} files; {sdists[0].name}: {len(in_sdist)} files; nothing missing")
    return 0


if __name__ == "__main__":
    sys.exit(main(Path(sys.argv[1])))
