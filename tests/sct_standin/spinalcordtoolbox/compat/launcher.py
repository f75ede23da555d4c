"""Stand-in of SCT's console-script launcher: run scripts/<command>.py in a child interpreter."""
import os
import subprocess
import sys

import spinalcordtoolbox


def main():
    command = os.path.basename(sys.argv[0])
    script = os.path.join(os.path.dirname(spinalcordtoolbox.__file__), "scripts", f"{command}.py")
    if not os.path.exists(script):
        raise FileNotFoundError(script)
    return subprocess.run([sys.executable, script] + sys.argv[1:], env=dict(os.environ)).returncode


if __name__ == "__main__":
    sys.exit(main())
