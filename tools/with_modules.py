"""
Run a file of your own as train.py with other files' rows registered first: what tools/compare.py
runs for --module=A --module=B.

    python tools/with_modules.py examples/agem.py,examples/memory.py --strategy=agem ...

Every file but the last is imported (it registers its rows and trains nothing); the last runs as
the program, as `python LAST ARGS` would (it runs train.py's main).
"""
import os
import runpy
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the project
from settings import import_files  # noqa: E402

if __name__ == "__main__":
    files = sys.argv[1].split(",")
    import_files(files[:-1])
    sys.argv = [files[-1], *sys.argv[2:]]
    runpy.run_path(files[-1], run_name="__main__")
