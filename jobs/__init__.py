"""Ray job entrypoints: ``python -m jobs.<command> [arguments of ipb <command>]``.

Each module runs one ``ipb`` command in a submitted job's driver (see :mod:`jobs._run`);
``ipb submit -- <command> ...`` builds that entrypoint.
"""
