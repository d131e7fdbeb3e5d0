"""The ``l0calib`` command line: a thin Typer layer over the :mod:`l0calib` library.

Installed as the ``l0calib_cli`` package. The library never imports it.
"""
