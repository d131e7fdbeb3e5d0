"""``python -m l0calib``: the command-line interface (same as the ``l0calib`` script)."""

from l0calib_cli import run

if __name__ == "__main__":
    run()
