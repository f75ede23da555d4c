"""Build step for the SCT start-up hook; everything else is declared in setup.cfg.

The wheel carries ``sct_deepseg_epi-sct.pth`` at the top of site-packages (its one line
imports ``sct_deepseg_epi.sct_plugin`` and installs a cheap import hook, see that module).
``build_py`` copies it next to the packages for ordinary wheels; editable installs
(PEP 660) build their wheel without build_py's outputs, so ``editable_wheel`` adds it to
that wheel and to its RECORD. Either way it is listed in RECORD, so ``pip uninstall``
removes it.
"""
import base64
import hashlib
import zipfile
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

HERE = Path(__file__).resolve().parent
PTH_SOURCE = HERE / "sct_deepseg_epi" / "_sct_startup.pth"
PTH_NAME = "sct_deepseg_epi-sct.pth"  # sorts after __editable__*.pth, so the package is importable by then


class build_py_with_pth(build_py):
    def run(self):
        super().run()
        self.copy_file(str(PTH_SOURCE), str(Path(self.build_lib, PTH_NAME)), preserve_mode=0)


def add_to_wheel(wheel: Path, name: str, data: bytes) -> None:
    """Add one file at the root of a wheel and list it in the wheel's RECORD."""
    digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
    with zipfile.ZipFile(wheel) as src:
        if name in src.namelist():
            return
    tmp = wheel.with_name(wheel.name + ".tmp")
    with zipfile.ZipFile(wheel) as src, zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED) as dst:
        for item in src.infolist():
            body = src.read(item.filename)
            if item.filename.endswith(".dist-info/RECORD"):
                body = body.rstrip(b"\n") + f"\n{name},sha256={digest},{len(data)}\n".encode()
                dst.writestr(name, data)
            dst.writestr(item, body)
    tmp.replace(wheel)


cmdclass = {"build_py": build_py_with_pth}
try:
    from setuptools.command.editable_wheel import editable_wheel
except ImportError:  # setuptools < 64: no PEP 660 editable installs
    pass
else:
    class editable_wheel_with_pth(editable_wheel):
        def run(self):
            super().run()
            for wheel in Path(self.dist_dir).glob("*.whl"):
                add_to_wheel(wheel, PTH_NAME, PTH_SOURCE.read_bytes())

    cmdclass["editable_wheel"] = editable_wheel_with_pth

setup(cmdclass=cmdclass)
