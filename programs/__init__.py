"""Standalone gsplat programs (installed as ``scipion_gsplat.programs``).

Each module has ``add_args(parser)``, ``main(args)`` and ``run(argv=None)``;
``run`` is the console-script entry point ``gsplat_<name>``.
"""
