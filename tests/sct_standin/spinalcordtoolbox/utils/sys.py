"""Stand-in of spinalcordtoolbox.utils.sys: install folders, lazy imports and the CLI banner."""
import importlib
import os
import sys
import types

__version__ = "7.4.dev0-standin"
__sct_dir__ = os.environ.get("SCT_DIR") or os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
__data_dir__ = os.path.join(__sct_dir__, "data")
__deepseg_dir__ = os.path.join(__data_dir__, "deepseg_models")


class LazyLoader(types.ModuleType):
    """Imports the named module on first attribute access (SCT keeps `-h` fast this way)."""

    def __init__(self, local_name, parent_globals, name):
        self._local_name, self._parent_globals = local_name, parent_globals
        super().__init__(name)

    def _load(self):
        module = importlib.import_module(self.__name__)
        self._parent_globals[self._local_name] = module
        self.__dict__.update(module.__dict__)
        return module

    def __getattr__(self, item):
        return getattr(self._load(), item)


def init_sct():
    print(f"\n--\nSpinal Cord Toolbox ({__version__})\n")
    if ".py" in (sys.argv[0] if sys.argv else ""):
        print(f"{os.path.basename(sys.argv[0])[:-3]} {' '.join(sys.argv[1:])}\n--\n")
